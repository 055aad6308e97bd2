"""DDPM's U-Net (model.name = unet): `spec` (its model.* keys and checks, no JAX)
and `network` (the Flax module, `UNet`).

No JAX here (importing the spec runs this file); `ddx.models.unet.UNet` and the
network's other names are imported on first use.
"""
from ddx.models.spec import forward as _forward


def __getattr__(name):
  return _forward(__name__, name)
