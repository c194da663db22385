"""Audit: append-only, hash-chained, PII-masked log of every event."""
