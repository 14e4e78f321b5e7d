"""What the server says about itself: Prometheus metrics (`metrics.py`) and the periodic stats line (`stats_log.py`)."""
