"""Pure samplers, each a whole trajectory in one `lax.scan` (what research code imports).

  discrete.py   the DDPM process over a `Schedule`: ddpm, ddim, dpm_solver_pp,
                and the timestep spacings

`sample(denoise_fn, process, rng, shape, sampler=..., steps=...)` runs any of
them; it is pure and composes under the caller's `jax.jit`. The face that
wraps a trained network (guidance, jit, sharding) is `ddx.model`.
"""
from ddx.sampling.discrete import (DDPM_VARIANCES, SAMPLERS, SPACINGS, DenoiseFn,
                                   Step, initial_noise, sample, timesteps)

__all__ = ["sample", "timesteps", "initial_noise", "SAMPLERS", "SPACINGS",
           "DDPM_VARIANCES", "DenoiseFn", "Step"]
