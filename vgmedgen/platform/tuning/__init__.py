"""Hyperparameter sweeps: the sweep file (config.py) and its Ray Tune search space (space.py)."""
