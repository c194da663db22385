"""Who gets what through which channel: categories, channels, defaults and precedence.

Every notification has a **category**; every user has a choice per category and **channel**.
What decides whether a channel is used, first match wins:

1. **critical**: ``account`` notifications (a workspace made, the account itself) always reach
   the in-app inbox: that cell cannot be switched off, a request that tries is refused (422).
   Their email and webhook follow the rules below like any other category's;
2. **the user's choice** for that category and channel (``PUT /users/{id}/preferences``, or the
   one-click unsubscribe link of a mail, which switches that category's email off);
3. **the default** below: everything on, except ``billing`` email (the email service mails an
   activated subscription itself, with its own template).

A channel that is on still needs somewhere to deliver: email an address (from user.created and
user.email_changed), a webhook an endpoint the user registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

Category = Literal["account", "billing", "mentions", "reports"]
ChannelName = Literal["in_app", "email", "webhook"]
Source = Literal["critical", "user", "default"]

CATEGORIES: tuple[Category, ...] = get_args(Category)
CHANNELS: tuple[ChannelName, ...] = get_args(ChannelName)

CRITICAL: frozenset[tuple[Category, ChannelName]] = frozenset({("account", "in_app")})
"""Cells (category and channel) no preference can switch off (Novu's critical workflows)."""

DEFAULTS: Mapping[tuple[Category, ChannelName], bool] = {
    (category, channel): (category, channel) != ("billing", "email")
    for category in CATEGORIES
    for channel in CHANNELS
}
"""Everything on but ``billing`` email: in-app and email for every other category; webhooks
for every category once the user registers an endpoint (without one nothing is sent)."""

Choices = Mapping[tuple[Category, ChannelName], bool]
"""A user's own choices (absent: no choice made, the default applies)."""


def decide(category: Category, channel: ChannelName, choices: Choices) -> tuple[bool, Source]:
    """Whether ``channel`` is on for ``category``, and which rule said so."""
    if (category, channel) in CRITICAL:
        return True, "critical"
    chosen = choices.get((category, channel))
    if chosen is not None:
        return chosen, "user"
    return DEFAULTS[(category, channel)], "default"


def enabled(category: Category, channel: ChannelName, choices: Choices) -> bool:
    return decide(category, channel, choices)[0]


def is_critical(category: Category, channel: ChannelName) -> bool:
    return (category, channel) in CRITICAL


def critical_cells() -> dict[Category, list[ChannelName]]:
    """The critical cells by category, as the API shows them: ``{"account": ["in_app"]}``."""
    return {
        c: [ch for ch in CHANNELS if (c, ch) in CRITICAL]
        for c in CATEGORIES
        if any((c, ch) in CRITICAL for ch in CHANNELS)
    }


def is_category(value: str) -> bool:
    return value in CATEGORIES
