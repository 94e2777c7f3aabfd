"""The HTTP edge: OpenAI-compatible inference, the adapter REST API, metrics and auth."""
