"""Robust connections over the nodes of a cluster: the first node that answers, the next one
when it is lost.

aio-pika's ``connect_robust`` knows one URL and, when that node dies, retries it until it comes
back. Every failed attempt and every lost connection of a :class:`RobustConnection` pass through
``_on_connection_close`` before the next attempt reads ``self.url``, so moving ``url`` on there is
enough: the next attempt goes to the next node, and aio-pika restores the channels, declarations
and consumers there as it would on the same node. Each node is tried once without waiting; after a
whole round of failures the connection's ``reconnect_interval`` passes before the next round.

A robust connection holds its channels weakly: whoever consumes on a channel must hold it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aio_pika import RobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

log = logging.getLogger("tributary.messaging.connection")


def _shown(url: URL) -> str:
    return str(url.with_password("******") if url.password else url)


class FailoverConnection(RobustConnection):
    """A robust connection that moves to the next of ``urls`` whenever one is lost or refused.

    The query parameters of each URL (``heartbeat``, ``name``) apply when connecting to it;
    aio-pika's own (``reconnect_interval``) are read from the first.
    """

    def __init__(
        self,
        urls: Sequence[str | URL],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        first: int = 0,
        **kwargs: Any,
    ) -> None:
        if not urls:
            raise ValueError("no broker URL to connect to")
        self.urls = tuple(URL(url) for url in urls)
        self._node = first % len(self.urls)
        super().__init__(self.urls[self._node], loop=loop, **kwargs)
        self._interval = self.reconnect_interval
        self._misses = 0

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self._close_called and len(self.urls) > 1:
            self._next_node()
        await super()._on_connection_close(closing)

    def _next_node(self) -> None:
        lost = self.url
        self._node = (self._node + 1) % len(self.urls)
        self.url = self.urls[self._node]
        self._misses += 1
        # each node once in a row, then the reconnect interval before the next round
        self.reconnect_interval = 0 if self._misses % len(self.urls) else self._interval
        log.info("broker %s lost or refused; next attempt: %s", _shown(lost), _shown(self.url))

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._misses = 0
        self.reconnect_interval = self._interval

    @property
    def node_url(self) -> URL:
        """The node this connection uses (or tries next)."""
        return self.url


async def connect_failover(
    urls: Sequence[str | URL], *, timeout: float | None = None, **kwargs: Any
) -> FailoverConnection:
    """Connect to the first of ``urls`` that answers, trying each once in order.

    Raises the last node's error when none answers (as ``connect_robust`` does for its one
    node). ``timeout`` bounds every connection attempt, then and on reconnection: a node that
    accepts TCP but never speaks AMQP (a stopped VM) costs that long, not forever.
    """
    error: BaseException | None = None
    for first in range(len(urls)):
        connection = FailoverConnection(urls, first=first, **kwargs)
        try:
            await connection.connect(timeout=timeout)
        except CONNECTION_EXCEPTIONS as exc:
            error = exc
            await connection.close()
            log.warning("broker %s refused: %s", _shown(URL(urls[first])), exc)
            continue
        return connection
    if error is None:
        raise ValueError("no broker URL to connect to")
    raise error
