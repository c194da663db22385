"""Email: the only service that talks SMTP."""
