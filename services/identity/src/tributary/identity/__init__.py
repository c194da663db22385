"""Identity: users, roles, plans, API keys."""
