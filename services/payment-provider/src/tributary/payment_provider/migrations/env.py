from sqlmodel import SQLModel

import tributary.payment_provider.models  # noqa: F401  (registers the tables)
from tributary.service.migrations import run_env

run_env(SQLModel.metadata)
