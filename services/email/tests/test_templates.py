from __future__ import annotations

from tributary.email.templates import language, render


def test_every_template_renders_in_every_language() -> None:
    for template in ("welcome", "subscription_activated", "notification"):
        for locale in ("en-GB", "de-DE", "fr-FR"):
            text = render(template, locale, {"given_name": "Ada", "plan": "pro", "text": "x"})
            assert text.subject
            assert "Ada" in text.body.splitlines()[0]
            assert "{" not in text.body


def test_unknown_languages_and_missing_locales_fall_back_to_english() -> None:
    assert language("pt-BR") == "en"
    assert language(None) == "en"
    assert language("de-AT") == "de"


def test_a_missing_name_gives_a_greeting_without_one() -> None:
    assert render("welcome", "en-GB", {}).body.startswith("Hello,\n")


def test_variables_are_inserted_not_interpreted() -> None:
    body = render("notification", "en-GB", {"text": "{given_name} {0} {x.y}"}).body
    assert "{given_name} {0} {x.y}" in body
