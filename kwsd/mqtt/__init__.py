"""MQTT: topics and payloads (native, Hermes, Home Assistant), publisher with outbox, inbound control."""
