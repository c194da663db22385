"""Test support for Tributary services: real brokers and databases, found or started."""
