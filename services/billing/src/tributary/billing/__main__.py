from __future__ import annotations

from tributary.billing.app import create_app
from tributary.billing.settings import Settings
from tributary.service.runner import serve


def main() -> None:
    settings = Settings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
