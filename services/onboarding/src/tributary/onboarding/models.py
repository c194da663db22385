from __future__ import annotations

import hashlib
from datetime import datetime

from sqlmodel import Field, SQLModel

from tributary.messaging.db import now


class WorkspaceBase(SQLModel):
    owner_id: str = Field(max_length=60, unique=True, index=True)
    name: str = Field(max_length=200)


class Workspace(WorkspaceBase, table=True):
    __tablename__ = "workspaces"

    id: str = Field(primary_key=True, max_length=60)
    created_at: datetime = Field(default_factory=now)

    @staticmethod
    def id_for(owner_id: str) -> str:
        """The id derives from the owner: a redelivered event can only ever make this one."""
        return f"ws_{hashlib.sha256(owner_id.encode()).hexdigest()[:20]}"

    @classmethod
    def for_owner(cls, owner_id: str, name: str) -> Workspace:
        return cls(id=cls.id_for(owner_id), owner_id=owner_id, name=name)


class WorkspacePublic(WorkspaceBase):
    id: str
    created_at: datetime
