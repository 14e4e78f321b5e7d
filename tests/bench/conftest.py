"""Live-server fixtures shared with the server tests (a tiny random Llama on a free port)."""

from server.conftest import tiny_engine, tiny_model_dir, tiny_server  # noqa: F401
