"""At-least-once messaging for Tributary services on RabbitMQ.

A service declares handlers; the runtime gives it topology, a transactional outbox and relay,
idempotent (inbox) batched consumption, retries with delayed redelivery and dead-lettering.
"""

from tributary.messaging.errors import PermanentError
from tributary.messaging.settings import MessagingSettings

__all__ = ["MessagingSettings", "PermanentError"]
