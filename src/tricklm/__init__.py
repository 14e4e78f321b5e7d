"""tricklm: a streaming LLM inference server for CPUs."""

__version__ = "0.1.0"
