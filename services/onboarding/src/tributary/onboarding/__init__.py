"""Onboarding service: one workspace per new user."""
