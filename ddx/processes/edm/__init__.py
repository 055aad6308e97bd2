"""EDM (Karras et al. 2022): the σ-parameterised process with its preconditioning.

spec.py is plain Python (imported by config validation: keep this file free of
imports); core.py and process.py are the JAX half.
"""
