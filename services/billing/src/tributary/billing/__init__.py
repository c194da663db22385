"""Billing: paid plans, payment webhooks, event-sourced subscriptions and their projections."""
