"""Triton kernels of radar_vllm, installed as ``radar_vllm.kernels``.

Each kernel sits in its own folder beside a plain-torch reference with the same signature; the
reference is also the CPU fallback.
"""
