"""Bench-only StealGuard defense: the cost floor of a last-layer MAD-family defense (see defense.py)."""
