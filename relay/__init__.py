"""walsaga's outbox side: the capture layer that fills ``walsaga.outbox`` and the
relay that tails the transaction log and publishes each event to Kafka."""

from relay.errors import (
    BusinessError,
    ConfigError,
    PermanentError,
    SetupError,
    SlotBusyError,
    SlotLostError,
    SpecError,
    TransientError,
    WalsagaError,
)

__all__ = [
    "BusinessError",
    "ConfigError",
    "PermanentError",
    "SetupError",
    "SlotBusyError",
    "SlotLostError",
    "SpecError",
    "TransientError",
    "WalsagaError",
]
