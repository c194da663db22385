"""Plain-text templates, in code: subject and body per template and language.

Variables are substituted with ``str.format_map``; a missing one renders empty. The values are
inserted, never interpreted, so a name such as ``{plan}`` is printed as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tributary.contracts.events import Template

DEFAULT_LOCALE = "en-GB"


@dataclass(frozen=True)
class Text:
    subject: str
    body: str


_GREETING = {
    "en": ("Hi {given_name},", "Hello,"),
    "de": ("Hallo {given_name},", "Hallo,"),
    "fr": ("Bonjour {given_name},", "Bonjour,"),
}

_SIGNATURE = {"en": "The Tributary team", "de": "Ihr Tributary-Team", "fr": "L'équipe Tributary"}

_TEXTS: dict[tuple[Template, str], Text] = {
    ("welcome", "en"): Text(
        "Welcome to Tributary",
        "welcome to Tributary! Your account is ready and your first workspace is on its way.",
    ),
    ("welcome", "de"): Text(
        "Willkommen bei Tributary",
        "willkommen bei Tributary! Ihr Konto ist bereit, Ihr erster Workspace folgt gleich.",
    ),
    ("welcome", "fr"): Text(
        "Bienvenue sur Tributary",
        "bienvenue sur Tributary ! Votre compte est prêt, votre premier espace arrive.",
    ),
    ("subscription_activated", "en"): Text(
        "Your Tributary {plan} plan is active",
        "thank you! Your {plan} plan is now active.",
    ),
    ("subscription_activated", "de"): Text(
        "Ihr Tributary-Tarif {plan} ist aktiv",
        "vielen Dank! Ihr Tarif {plan} ist ab sofort aktiv.",
    ),
    ("subscription_activated", "fr"): Text(
        "Votre offre Tributary {plan} est active",
        "merci ! Votre offre {plan} est désormais active.",
    ),
    ("notification", "en"): Text("News from Tributary", "{text}\n\n{url}"),
    ("notification", "de"): Text("Neues von Tributary", "{text}\n\n{url}"),
    ("notification", "fr"): Text("Du nouveau sur Tributary", "{text}\n\n{url}"),
}


class _Blank(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def language(locale: str | None) -> str:
    """``de-AT`` → ``de``; languages without texts fall back to English."""
    lang = (locale or DEFAULT_LOCALE).split("-", 1)[0].lower()
    return lang if lang in _SIGNATURE else "en"


def render(template: Template, locale: str | None, variables: Mapping[str, str]) -> Text:
    """Subject and body of ``template`` in the language of ``locale``.

    Variables used: ``given_name`` (every template), ``plan`` (subscription_activated),
    ``text`` and ``url`` (notification).
    """
    lang = language(locale)
    values = _Blank(variables)
    text = _TEXTS[(template, lang)]
    named, anonymous = _GREETING[lang]
    greeting = named if values["given_name"] else anonymous
    body = text.body.format_map(values).strip()
    lines = [greeting.format_map(values), "", body, "", "-- ", _SIGNATURE[lang], ""]
    return Text(subject=text.subject.format_map(values), body="\n".join(lines))
