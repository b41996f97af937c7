"""Diagnosis: per-group W8A8 sensitivity and mixed-precision plans; attention sinks and massive activations."""
