"""MeanFlow (Geng et al. 2025): a network of the average velocity over [r, t], 1-step sampling.

spec.py is plain Python (imported by config validation: keep this file free of
imports); core.py and process.py are the JAX half.
"""
