"""The DiT's config half (no JAX): its model.* keys, the paper's presets, checks."""
from __future__ import annotations

from ddx.models.spec import Field, Spec, positive_ints, require

# (hidden_size, depth, num_heads) of the paper's Table 1 models.
PRESETS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
           "XL": (1152, 28, 16)}
PATCH_SIZES = (2, 4, 8)


def preset(name: str) -> dict:
  """The DiT fields of a paper model, e.g. "S/2", "B/4", "XL/8".

  Args:
    name: "<size>/<patch>" with size in S, B, L, XL and patch in 2, 4, 8.

  Returns:
    dict with patch_size, hidden_size, depth, num_heads, mlp_ratio.
  """
  size, _, patch = name.partition("/")
  if size not in PRESETS or patch not in [str(p) for p in PATCH_SIZES]:
    valid = ", ".join(f"{s}/{p}" for s in PRESETS for p in PATCH_SIZES)
    raise ValueError(f"DiT preset {name!r} is unknown; use one of {valid}")
  hidden, depth, heads = PRESETS[size]
  return dict(patch_size=int(patch), hidden_size=hidden, depth=depth,
              num_heads=heads, mlp_ratio=4.0)


class DiTSpec(Spec):
  """The Diffusion Transformer (Peebles & Xie 2023); defaults are DiT-S/2."""
  name = "dit"
  fields = (
      Field("patch_size", 2, "p: p x p pixels per token; divides the image size"),
      Field("hidden_size", 384, "token width D; a multiple of 4 and of num_heads"),
      Field("depth", 12, "DiT blocks"),
      Field("num_heads", 6, "attention heads"),
      Field("mlp_ratio", 4.0, "MLP hidden width / D"),
      Field("learn_sigma", False, "2C output channels (official DiT); ddx uses the "
            "first C"),
  )
  implementation = "ddx.models.dit.network:DiT"
  tiny = dict(patch_size=2, hidden_size=32, depth=1, num_heads=2)

  def check(self, m, height, width, what) -> None:
    positive_ints(m, "patch_size", "hidden_size", "depth", "num_heads")
    p, d, heads = m["patch_size"], m["hidden_size"], m["num_heads"]
    require(height % p == 0 and width % p == 0,
            f"{what} is not divisible by model.patch_size={p}; use a patch size "
            "that divides the image size")
    require(d % heads == 0,
            f"model.hidden_size={d} is not divisible by model.num_heads={heads}; use a "
            "head count that divides it")
    require(d % 4 == 0, f"model.hidden_size={d} must be a multiple of 4 (2-D sin-cos "
            "position embedding)")
    require(m["mlp_ratio"] > 0, f"model.mlp_ratio={m['mlp_ratio']} must be > 0")


SPEC = DiTSpec()
