"""4xx answers that say which field they are about, in the shape of FastAPI's 422."""

from __future__ import annotations

from typing import Literal

from fastapi import HTTPException

Where = Literal["body", "path", "header"]


class FieldProblem(HTTPException):
    def __init__(self, status: int, where: Where, field: str, msg: str, kind: str) -> None:
        super().__init__(status, detail=[{"loc": [where, field], "msg": msg, "type": kind}])


def user_not_found(user_id: str) -> FieldProblem:
    return FieldProblem(404, "path", "user_id", f"no user {user_id}", "not_found")


def email_taken() -> FieldProblem:
    # the address itself is left out: error bodies end up in logs and traces
    return FieldProblem(409, "body", "email", "is already registered", "conflict")
