"""Flow matching / rectified flow (Lipman et al. 2022, Liu et al. 2022): x_t = (1 − t)x_0 + tε.

spec.py is plain Python (imported by config validation: keep this file free of
imports); core.py and process.py are the JAX half.
"""
