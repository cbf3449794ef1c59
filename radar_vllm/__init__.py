"""radar_vllm: RADAR dynamic draft trees for EAGLE-3 speculative decoding in stock vLLM.

Nothing here imports vLLM: every touch of vLLM internals lives in ``radar_vllm.vllm``.
"""

__version__ = "0.1.0"
