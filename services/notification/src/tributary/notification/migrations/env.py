from sqlmodel import SQLModel

import tributary.notification.models  # noqa: F401  (registers the tables)
from tributary.service.migrations import run_env

run_env(SQLModel.metadata)
