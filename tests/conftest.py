"""Shared test helpers: this folder is on sys.path, so tests import ``tiny_models`` (tiny random
models and checkpoints) and the fixtures below."""
