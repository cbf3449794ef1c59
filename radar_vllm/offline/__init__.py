"""Offline tools: head training, the RL pipeline, the reference decoder, calibration, data."""
