"""Tributary event contracts."""
