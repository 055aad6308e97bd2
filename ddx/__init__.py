"""ddx: diffusion models (DDPM, DDIM and after) in pure JAX.

Public API (see README):
  ddx.schedules.linear / cosine       noise schedules
  ddx.q_sample, ddx.diffusion_loss    forward process and training loss
  ddx.sample                          any sampler as one lax.scan
  ddx.load, ddx.sample_fn, ddx.Model  a trained model, and sampling from it
  ddx.invert, ddx.invert_fn, ddx.slerp DDIM inversion and latent interpolation
  ddx.to_uint8                        [-1, 1] floats -> uint8 images
"""
from ddx import schedules
from ddx.checkpoint import load
from ddx.diffusion import diffusion_loss, q_sample
from ddx.inversion import invert, invert_fn, slerp
from ddx.sampling import Model, sample, sample_fn, to_uint8

__all__ = ["schedules", "q_sample", "diffusion_loss", "sample", "sample_fn",
           "load", "Model", "to_uint8", "invert", "invert_fn", "slerp"]
__version__ = "0.1.0"
