"""The OpenAI-compatible API: request models (`protocol.py`), routes (`routes.py`), the serving of each endpoint
(`serving.py`, `chat.py`, `completions.py`) and tool calls (`tools.py`)."""
