"""``Cache-Control: no-store`` for answers that carry a secret (a new API key, a token)."""

from __future__ import annotations

from fastapi import Response

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
"""RFC 9111 ``no-store``; ``Pragma: no-cache`` for HTTP/1.0 caches (RFC 6749 §5.1)."""


def no_store(response: Response) -> None:
    """Keep the answer out of every cache.

    Call it on the response (``no_store(response)``), or make it a dependency of the route:
    ``dependencies=[Depends(no_store)]`` (FastAPI hands it the route's response).
    """
    response.headers.update(NO_STORE)
