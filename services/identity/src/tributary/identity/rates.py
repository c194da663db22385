"""Identity's rate limits; each one's rate is replaced by ``TRIBUTARY_RATE_<NAME>``.

Put them after the route's auth dependency: ``dependencies=[require(...), WRITES]``.
"""

from __future__ import annotations

from tributary.service.limits import rate_limit

SIGN_UP = rate_limit("signup", per_address="20/minute")
"""``POST /users``, per client address."""
TOKEN = rate_limit("token", per_address="30/minute")
"""``POST /oauth/token``, per client address."""
WRITES = rate_limit("writes", per_key="120/minute")
"""Every other POST, PUT, PATCH and DELETE, per API key (the token's ``client_id``)."""
