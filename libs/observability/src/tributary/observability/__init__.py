"""Observability for Tributary services: traces, JSON logs, metrics."""
