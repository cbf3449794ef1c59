"""Reference speculative decoder (plain PyTorch over HF transformers), data collection and calibration."""
