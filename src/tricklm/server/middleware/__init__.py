"""What every request passes through before a route: API keys, CORS and security headers (`access.py`), the body's
limit and checks (`body_guard.py`), slow clients' deadlines (`slow_clients.py`), its access line (`access_log.py`)."""
