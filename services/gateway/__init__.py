"""The OpenAI-compatible HTTP gateway: OpenAI's chat completions API in front of a coordinator,
spoken to through the project's own client library (`vlmesh.AsyncClient`)."""
