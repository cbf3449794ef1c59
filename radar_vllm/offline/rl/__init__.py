"""Offline RL for the stop policy: round tables, the simulator, trainers, oracle, evaluation."""
