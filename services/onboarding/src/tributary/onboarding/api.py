from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlmodel import col, select

from tributary.onboarding.models import Workspace, WorkspacePublic
from tributary.service.app import SessionDep
from tributary.service.auth import Principal, not_owner, require
from tributary.service.problems import not_found

router = APIRouter(tags=["workspaces"])


@router.get("/workspaces", response_model=list[WorkspacePublic])
async def list_workspaces(
    session: SessionDep,
    principal: Annotated[Principal, require("workspaces:read")],
    owner_id: Annotated[
        str | None,
        Query(min_length=1, max_length=60, description="default: the caller"),
    ] = None,
) -> list[Workspace]:
    """The workspaces a user owns (at most one: the one made on sign-up).

    Your own with `workspaces:read`; another user's with `users:admin` as well.
    """
    owner_id = owner_id or principal.subject
    if owner_id != principal.subject and not principal.is_admin:
        raise not_owner()
    rows = await session.exec(select(Workspace).where(col(Workspace.owner_id) == owner_id))
    return list(rows.all())


@router.get("/workspaces/{workspace_id}", response_model=WorkspacePublic)
async def get_workspace(
    session: SessionDep,
    principal: Annotated[Principal, require("workspaces:read")],
    workspace_id: Annotated[str, Path(max_length=60)],
) -> Workspace:
    """One workspace: your own with `workspaces:read`, anyone's with `users:admin` as well."""
    workspace = await session.get(Workspace, workspace_id)
    if workspace is None or not (principal.is_admin or workspace.owner_id == principal.subject):
        # another user's workspace answers as if it did not exist
        raise not_found(
            f"There is no workspace {workspace_id}.",
            field="path.workspace_id",
            message="no such workspace",
        )
    return workspace
