"""ddx: diffusion models (DDPM, DDIM and after) in pure JAX.

Public API (see README):
  ddx.schedules.linear / cosine       DDPM noise schedules (ddx/processes/ddpm/schedules.py)
  ddx.edm, ddx.flow                   EDM's and flow matching's math (processes/<name>/core.py)
  ddx.processes                       the process protocol and registry (diffusion.process)
  ddx.models.build                    the network a config names (U-Net, DiT)
  ddx.sampling                        the samplers several processes share
  ddx.q_sample, ddx.diffusion_loss    forward process and training loss
  ddx.sample                          any sampler as one lax.scan
  ddx.load, ddx.sample_fn, ddx.Model  a trained model, and sampling from it
  ddx.options, ddx.SampleOptions      every sampling option, resolved once
  ddx.invert, ddx.invert_fn, ddx.slerp DDIM inversion and latent interpolation
  ddx.to_uint8                        [-1, 1] floats -> uint8 images
  ddx.bpd.ode_bpd / vlb_bpd           bits/dim of 8-bit images (likelihood)
  ddx.autoencoder                     the KL autoencoder (SD VAE): load, encode, decode
  ddx.latents                         the latent cache (--mode encode) as a data source

Names are imported on first use (PEP 562), so `from ddx.config import
base_config` in a config file loads ml_collections alone, not JAX.
"""
import importlib

_API = {
    "schedules": ("ddx.processes.ddpm.schedules", None),
    "edm": ("ddx.processes.edm.core", None),
    "flow": ("ddx.processes.flow.core", None),
    "processes": ("ddx.processes", None),
    "models": ("ddx.models", None),
    "sampling": ("ddx.sampling", None),
    "bpd": ("ddx.bpd", None),
    "autoencoder": ("ddx.autoencoder", None),
    "latents": ("ddx.latents", None),
    "load": ("ddx.checkpoint", "load"),
    "diffusion_loss": ("ddx.processes.ddpm.core", "diffusion_loss"),
    "q_sample": ("ddx.processes.ddpm.core", "q_sample"),
    "invert": ("ddx.inversion", "invert"),
    "invert_fn": ("ddx.inversion", "invert_fn"),
    "slerp": ("ddx.inversion", "slerp"),
    "sample": ("ddx.processes.common", "sample"),
    "Model": ("ddx.model", "Model"),
    "sample_fn": ("ddx.model", "sample_fn"),
    "options": ("ddx.options", None),
    "SampleOptions": ("ddx.options", "SampleOptions"),
    "to_uint8": ("ddx.model", "to_uint8"),
}

__all__ = list(_API)
__version__ = "0.1.0"


def __getattr__(name):
  if name not in _API:
    raise AttributeError(f"module 'ddx' has no attribute {name!r}")
  module, attr = _API[name]
  value = importlib.import_module(module)
  value = value if attr is None else getattr(value, attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_API))
