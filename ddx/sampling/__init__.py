"""Pure samplers that several processes share, each a whole trajectory in one `lax.scan`.

  sigma.py      samplers on a σ grid for any D(x; σ) in EDM's form x = y + σn:
                euler, heun, stochastic (EDM Alg. 1-2), dpm_solver_pp, and
                EDM's grid `karras_sigmas` (EDM and DDPM's VP mapping walk it)
  flow.py       ODE samplers in t from 1 to 0 (flow matching, the shortcut
                model's d = 0 flow): euler, heun
  steps.py      the steps every grid shares: Euler/Heun, DPM-Solver++(2M),
                and the starting noise `initial_noise`

A sampler only one process uses lives in that process's folder (DDPM's
ddpm/ddim/dpm_solver_pp: `ddx.processes.ddpm.sampling`; MeanFlow's, the
shortcut model's and sCM's in their `core.py`). `ddx.sample(denoise_fn,
process, rng, shape, sampler=..., steps=...)` runs any process's sampler
(`ddx.processes.common.sample`). Nothing here imports a process.
"""
from ddx.sampling import flow
from ddx.sampling import sigma
from ddx.sampling import steps
from ddx.sampling.steps import initial_noise

DenoiseFn = sigma.SigmaDenoiseFn   # denoise_fn(x [B, ...], time [B]) -> [B, ...]

__all__ = ["flow", "sigma", "steps", "initial_noise", "DenoiseFn"]
