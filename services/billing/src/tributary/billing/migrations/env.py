from sqlmodel import SQLModel

import tributary.billing.models  # noqa: F401  (registers the tables)
from tributary.service.migrations import run_env

run_env(SQLModel.metadata)
