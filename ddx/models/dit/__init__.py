"""The Diffusion Transformer (model.name = dit): `spec` (its model.* keys, the
paper's presets and the checks, no JAX) and `network` (the Flax module, `DiT`).

No JAX here (importing the spec runs this file); `ddx.models.dit.preset` (the
spec's), `ddx.models.dit.DiT` and the network's other names are imported on
first use.
"""
from ddx.models.spec import forward as _forward


def __getattr__(name):
  return _forward(__name__, name)
