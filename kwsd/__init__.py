"""kwsd: an on-premise wake-word daemon (小云小云 FSMN-CTC keyword spotting, wake events over MQTT)."""

__version__ = "0.1.0"
