"""Argument types shared by eventctl's commands."""

from __future__ import annotations

import argparse


def positive(value: str) -> int:
    """An integer of at least 1 (``type=`` of a count, a limit or a batch size)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number
