"""The RADAR algorithm: draft trees, verification, the stop policy and its state, costs, settings.

Imports neither vLLM nor the offline tools."""
