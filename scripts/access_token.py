"""``make token``: print an access token for the bootstrap admin key (for curl in the README).

The key comes from ``BOOTSTRAP_ADMIN_API_KEY``, else the file ``make dev`` keeps it in, else
``.env`` (``make demo``); identity from ``IDENTITY_URL`` (default http://127.0.0.1:8001).
``SCOPE`` narrows the token's scopes.
Standard library only: it is the same client-credentials request curl would send.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

import local_secrets  # scripts/local_secrets.py, beside this file


def main() -> int:
    key = local_secrets.find()
    if not key:
        print("no BOOTSTRAP_ADMIN_API_KEY, var/bootstrap-admin-api-key or .env", file=sys.stderr)
        return 2
    form = {"grant_type": "client_credentials", "client_secret": key}
    if scope := os.environ.get("SCOPE"):
        form["scope"] = scope
    url = os.environ.get("IDENTITY_URL", "http://127.0.0.1:8001").rstrip("/") + "/oauth/token"
    if not url.startswith(("http://", "https://")):
        print(f"IDENTITY_URL must be http(s): {url}", file=sys.stderr)
        return 2
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode())  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            print(json.load(answer)["access_token"])
    except urllib.error.HTTPError as exc:
        print(f"{exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
