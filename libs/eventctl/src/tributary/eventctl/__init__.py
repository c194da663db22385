"""Tributary operator CLI."""
