"""MQTT out (events, owner notifications, state) and in (Sentinel commands), through a durable outbox (docs/mqtt.md)."""
