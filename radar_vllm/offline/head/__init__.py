"""EAGLE-3 head training: data regeneration, target features, the head model, the training loop."""
