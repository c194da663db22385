"""One-click unsubscribe (RFC 8058): ``POST /unsubscribe?token=…``; ``GET`` only asks.

Every mail of a category that can be switched off carries ``List-Unsubscribe: <{public URL}/
unsubscribe?token=…>`` and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``. The mail
client POSTs to it (body ``List-Unsubscribe=One-Click``, read or not: the token is the whole
credential) and the user's email for that category is off -- a choice like one made with
``PUT /users/{id}/preferences``, which can switch it on again. A GET of the URL (a person
following the link, or a mail scanner that follows every link) changes nothing: it shows a
page with a button that POSTs.

Every category's email can be switched off (``account`` too: only its in-app notifications are
critical). Refused, each with its own status: a malformed token 400, a forged one (or one for
another user or category: the signature covers both) 403, an expired one 410, an erased user
404 (and 422 for a category whose email were critical: none is). POST answers problem details;
GET answers an HTML page to a browser and problem details to anything else.
"""

from __future__ import annotations

import html
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from tributary.messaging.erasure import was_erased
from tributary.notification import tokens
from tributary.notification.preferences import Category
from tributary.notification.store import set_choice
from tributary.service.app import SessionDep, UowDep
from tributary.service.auth import public
from tributary.service.limits import rate_limit
from tributary.service.problems import Problem, not_found, problem_responses

log = logging.getLogger("tributary.notification")

router = APIRouter(tags=["unsubscribe"])

LABELS: dict[Category, str] = {
    "account": "account",
    "billing": "billing",
    "mentions": "mention",
    "reports": "report",
}
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",  # the token must not leave in a Referer header
    "X-Content-Type-Options": "nosniff",
}
TokenQuery = Annotated[
    str,
    Query(
        min_length=1,
        max_length=tokens.MAX_LENGTH,
        description="The signed token of the mail's List-Unsubscribe link",
    ),
]
ONE_CLICK_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "RFC 8058's `List-Unsubscribe=One-Click` (optional: the token decides)",
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {"List-Unsubscribe": {"type": "string", "enum": ["One-Click"]}},
                }
            }
        },
    }
}


class Unsubscribed(BaseModel):
    user_id: str
    category: Category
    email: bool
    """Always false: the category's email is off."""


def _page(title: str, paragraphs: list[str], *, form_token: str | None = None) -> str:
    form = ""
    if form_token is not None:
        action = html.escape(f"?token={form_token}", quote=True)
        form = (
            f'<form method="post" action="{action}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'
        )
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:32em;margin:3em auto;padding:0 1em}"
        "button{font-size:1em;padding:.5em 1em}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}{form}</body></html>"
    )


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _check(request: Request, token: str) -> tokens.Unsubscribe:
    key: bytes = request.app.state.unsubscribe_key
    try:
        return tokens.parse(token, key=key)
    except tokens.TokenRejected as exc:
        raise Problem(exc.status, exc.detail) from None


def _page_for_problem(problem: Problem) -> HTMLResponse:
    return HTMLResponse(
        _page("This link does not work", [str(problem.detail)]),
        status_code=problem.status_code,
        headers=PAGE_HEADERS,
    )


@router.get(
    "/unsubscribe",
    response_class=HTMLResponse,
    dependencies=[public(), rate_limit("unsubscribe", per_address="60/minute")],
    responses=problem_responses(400, 403, 404, 410, 422),
)
async def confirm_unsubscribe(request: Request, session: SessionDep, token: TokenQuery) -> Response:
    """A page asking to confirm (a button that POSTs); changes nothing."""
    try:
        allowed = _check(request, token)
        if await was_erased(session, allowed.user_id):
            raise not_found("There is no such user.")
    except Problem as problem:
        return _page_for_problem(problem) if _wants_html(request) else problem.response()
    label = LABELS[allowed.category]
    page = _page(
        f"Stop {label} emails?",
        [
            f"You will no longer get emails about {label} notifications. They still appear "
            "in the app, and you can switch these emails on again in your settings."
        ],
        form_token=token,
    )
    return HTMLResponse(page, headers=PAGE_HEADERS)


@router.post(
    "/unsubscribe",
    dependencies=[public(), rate_limit("unsubscribe", per_address="60/minute")],
    responses={
        200: {"model": Unsubscribed, "content": {"text/html": {}}},
        **problem_responses(400, 403, 404, 410, 422),
    },
    openapi_extra=ONE_CLICK_BODY,
)
async def one_click_unsubscribe(request: Request, uow: UowDep, token: TokenQuery) -> Response:
    """Switch the token's category email off for its user (RFC 8058 one-click)."""
    allowed = _check(request, token)
    if await was_erased(uow.session, allowed.user_id):
        raise not_found("There is no such user.")
    await set_choice(uow.session, allowed.user_id, allowed.category, "email", False)
    await uow.commit()
    log.info("user %s unsubscribed from %s email", allowed.user_id, allowed.category)
    if _wants_html(request):
        label = LABELS[allowed.category]
        page = _page(
            "You are unsubscribed",
            [f"You will no longer get emails about {label} notifications."],
        )
        return HTMLResponse(page, headers=PAGE_HEADERS)
    answer = Unsubscribed(user_id=allowed.user_id, category=allowed.category, email=False)
    return JSONResponse(answer.model_dump(), headers={"Cache-Control": "no-store"})
