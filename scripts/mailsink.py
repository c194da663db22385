"""A development SMTP sink: keeps every received mail as an .eml file a person can open.

``python scripts/mailsink.py --port 1025 --dir var/mail``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class MaildirHandler:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{self.count:05d}.eml"
        content: Any = envelope.original_content or envelope.content or b""
        data = content if isinstance(content, bytes) else str(content).encode()
        (self.directory / name).write_bytes(data)
        print(f"mail received: {name} ({len(envelope.rcpt_tos)} recipient(s))", flush=True)
        return "250 OK"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--dir", type=Path, default=Path("var/mail"))
    args = parser.parse_args()
    controller = Controller(MaildirHandler(args.dir), hostname=args.host, port=args.port)
    controller.start()
    print(f"SMTP sink on {args.host}:{args.port}, mail kept in {args.dir}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    controller.stop()


if __name__ == "__main__":
    asyncio.run(main())
