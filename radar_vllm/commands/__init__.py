"""Subcommands of ``radar-vllm``; one module each, registered in ``radar_vllm.cli``."""
