"""DDPM (Ho et al. 2020): the discrete-time process over a noise schedule, its
samplers (DDPM, DDIM, DPM-Solver++) and its VP mapping onto EDM's σ form.

spec.py is plain Python (imported by config validation: keep this file free of
imports); core.py and process.py are the JAX half.
"""
