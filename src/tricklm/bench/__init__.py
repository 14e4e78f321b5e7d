"""`tricklm bench`: a serving benchmark for any OpenAI-compatible server."""
