"""Billing's client of the payment provider's API (httpx, bounded by a timeout)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

log = logging.getLogger("tributary.billing.provider")


class ProviderError(Exception):
    """The provider could not be asked, or refused."""


class ProviderUnavailable(ProviderError):
    """No answer (connection, timeout) or a 5xx: worth trying again later."""


class ProviderRefused(ProviderError):
    """A 4xx: the provider will not do it (the message says what it answered)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"the provider answered {status}: {detail}")
        self.status = status


@dataclass(frozen=True)
class Checkout:
    id: str
    pay_url: str
    status: str


@dataclass(frozen=True)
class Refund:
    id: str
    payment_id: str
    amount_cents: int
    created_at: datetime
    replayed: bool
    """The provider answered the refund made earlier with the same idempotency key."""


class ProviderClient:
    def __init__(self, base_url: str, api_key: str, timeout: float) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "tributary-billing"},
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            log.warning("payment provider %s %s: %s", method, path, type(exc).__name__)
            raise ProviderUnavailable(
                f"the provider did not answer ({type(exc).__name__})"
            ) from exc
        return self._body(response)

    @staticmethod
    def _body(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 500:
            raise ProviderUnavailable(f"the provider answered {response.status_code}")
        if response.status_code >= 400:
            try:
                detail = str(response.json().get("detail", ""))[:200]
            except (ValueError, AttributeError):
                detail = ""
            raise ProviderRefused(response.status_code, detail)
        try:
            body = response.json()
        except ValueError as exc:
            raise ProviderUnavailable("the provider answered something that is not JSON") from exc
        if not isinstance(body, dict):
            raise ProviderUnavailable("the provider answered something that is not an object")
        return body

    async def create_checkout(
        self, *, subscription_id: str, amount_cents: int, currency: str, plan: str
    ) -> Checkout:
        """A checkout for the subscription; asked again, the provider answers the same one
        (the subscription id is the Idempotency-Key)."""
        body = await self._call(
            "POST",
            "/checkouts",
            json={
                "amount_cents": amount_cents,
                "currency": currency,
                "reference": subscription_id,
                "metadata": {"subscription_id": subscription_id, "plan": plan},
            },
            headers={"Idempotency-Key": f"checkout:{subscription_id}"},
        )
        return Checkout(
            id=str(body["id"]), pay_url=str(body["pay_url"]), status=str(body["status"])
        )

    async def expire_checkout(self, checkout_id: str) -> str:
        """Close the checkout; its status after (``expired``, or ``declined`` as it was).
        :class:`ProviderRefused` (409) when it is paid or a payment is under way."""
        body = await self._call("POST", f"/checkouts/{checkout_id}/expire")
        return str(body["status"])

    async def refund(
        self, payment_id: str, *, amount_cents: int | None, reason: str, idempotency_key: str
    ) -> Refund:
        """Refund ``amount_cents`` of the provider's payment (None: all that is left). The
        same ``idempotency_key`` with the same body answers the refund made the first time,
        so a repeated call refunds once; :class:`ProviderRefused` when the provider will not
        (409: nothing left, or the key was used with another body)."""
        try:
            response = await self._http.post(
                f"/payments/{payment_id}/refunds",
                json={"amount_cents": amount_cents, "reason": reason},
                headers={"Idempotency-Key": idempotency_key},
            )
        except httpx.HTTPError as exc:
            log.warning("payment provider refund: %s", type(exc).__name__)
            raise ProviderUnavailable(
                f"the provider did not answer ({type(exc).__name__})"
            ) from exc
        body = self._body(response)
        try:
            return Refund(
                id=str(body["id"]),
                payment_id=str(body["payment_id"]),
                amount_cents=int(body["amount_cents"]),
                created_at=datetime.fromisoformat(str(body["created_at"])),
                replayed=response.headers.get("Idempotent-Replayed") == "true",
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderUnavailable("the provider's refund answer lacks a field") from exc
