"""Shipped data files: the feature networks of the embedded data sets (safetensors + JSON)."""
