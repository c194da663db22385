"""Notification: per-user channel preferences, the in-app inbox and its live stream, email."""
