from __future__ import annotations

from tributary.notification.app import create_app
from tributary.notification.server import serve
from tributary.notification.settings import Settings


def main() -> None:
    settings = Settings()
    serve(create_app(settings), settings.host, settings.port)


if __name__ == "__main__":
    main()
