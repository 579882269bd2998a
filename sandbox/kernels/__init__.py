"""Triton chunk kernels (forward and backward) for every rule; see the module docstrings."""
