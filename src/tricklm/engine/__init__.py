"""The engine: requests in, per-step token deltas out; one batched forward pass per step."""
