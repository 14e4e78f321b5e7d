"""HTTP layer: FastAPI app, SSE, the /generate API and the OpenAI-compatible API."""
