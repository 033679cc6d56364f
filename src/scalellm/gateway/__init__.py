"""The gateway: OpenAI HTTP in front, gRPC to replicas, routing, retries.
Never imports torch or engine code (a test checks)."""
