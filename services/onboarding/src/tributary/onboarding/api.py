from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import col, select

from tributary.onboarding.models import Workspace, WorkspacePublic
from tributary.service.app import SessionDep
from tributary.service.problems import not_found

router = APIRouter(tags=["workspaces"])


@router.get("/workspaces", response_model=list[WorkspacePublic])
async def list_workspaces(
    session: SessionDep,
    owner_id: Annotated[str, Query(min_length=1, max_length=60)],
) -> list[Workspace]:
    """The workspaces a user owns (at most one: the one made on sign-up)."""
    rows = await session.exec(select(Workspace).where(col(Workspace.owner_id) == owner_id))
    return list(rows.all())


@router.get("/workspaces/{workspace_id}", response_model=WorkspacePublic)
async def get_workspace(session: SessionDep, workspace_id: str) -> Workspace:
    workspace = await session.get(Workspace, workspace_id)
    if workspace is None:
        raise not_found(
            f"There is no workspace {workspace_id}.",
            field="path.workspace_id",
            message="no such workspace",
        )
    return workspace
