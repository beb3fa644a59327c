"""The durable embedded broker: Tansu behind a proxy that journals what it acknowledges."""
