"""Who gets what through which channel: categories, channels, defaults and precedence.

Every notification has a **category**; every user has a choice per category and **channel**.
What decides whether a channel is used, first match wins:

1. **critical**: ``account`` notifications (a workspace made, the account itself) cannot be
   switched off on any channel; a request that tries is refused (422);
2. **the user's choice** for that category and channel (``PUT /users/{id}/preferences``, or the
   one-click unsubscribe link of a mail, which switches that category's email off);
3. **the default** below.

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

CRITICAL: frozenset[Category] = frozenset({"account"})
"""Categories no preference can switch off (Novu's critical workflows)."""

DEFAULTS: Mapping[tuple[Category, ChannelName], bool] = {
    (category, channel): True for category in CATEGORIES for channel in CHANNELS
}
"""Everything on: in-app and email for every category; webhooks for every category once the
user registers an endpoint (without one nothing is sent)."""

Choices = Mapping[tuple[Category, ChannelName], bool]
"""A user's own choices (absent: no choice made, the default applies)."""


def decide(category: Category, channel: ChannelName, choices: Choices) -> tuple[bool, Source]:
    """Whether ``channel`` is on for ``category``, and which rule said so."""
    if category in CRITICAL:
        return True, "critical"
    chosen = choices.get((category, channel))
    if chosen is not None:
        return chosen, "user"
    return DEFAULTS[(category, channel)], "default"


def enabled(category: Category, channel: ChannelName, choices: Choices) -> bool:
    return decide(category, channel, choices)[0]


def is_category(value: str) -> bool:
    return value in CATEGORIES
