"""Shortcut models (Frans et al. 2024): flow matching conditioned on the step size d.

spec.py is plain Python (imported by config validation: keep this file free of
imports); core.py and process.py are the JAX half.
"""
