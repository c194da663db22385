"""The price list: what each paid plan costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Plan = Literal["starter", "pro"]


@dataclass(frozen=True)
class Price:
    amount_cents: int
    currency: str


PRICES: dict[Plan, Price] = {
    "starter": Price(900, "EUR"),
    "pro": Price(2900, "EUR"),
}
