"""The OpenAI-compatible HTTP surface, shared by the replica and the gateway.
Knows a Backend (protocol.generation), never the engine or torch."""
