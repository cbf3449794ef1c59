"""The only place that touches vLLM internals. Nothing here is imported by the core modules."""
