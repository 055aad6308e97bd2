"""Continuous-time consistency models (sCM, Lu & Song 2024) in TrigFlow time.

spec.py is plain Python (imported by config validation: keep this file free of
imports); core.py and process.py are the JAX half.
"""
