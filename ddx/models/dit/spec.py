"""The DiT's config half (no JAX): its model.* keys, the papers' presets, checks."""
from __future__ import annotations

from ddx.models.spec import Field, Spec, positive_ints, require

# (hidden_size, depth, num_heads) of the paper's Table 1 models.
PRESETS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
           "XL": (1152, 28, 16)}
PATCH_SIZES = (2, 4, 8)

# LightningDiT's block options (Yao et al. 2025, arXiv 2501.01423; the
# hustvl/LightningDiT code), each a model.* key whose first value is DiT's.
MLPS = ("gelu", "swiglu")
TOKEN_NORMS = ("layer", "rms")
POS_EMBEDS = ("sincos", "rope")

# Other papers' models on the DiT backbone: "<family>-<size>/<patch>" -> the
# family's fields beyond the size. SiT (Ma et al. 2024) is DiT's network
# exactly (its models.py; learn_sigma as DiT). LightningDiT's released model
# (configs/lightningdit_xl_vavae_f16d32.yaml): SwiGLU, RMSNorm, RoPE, no QK
# norm, no learned variance; its sizes are DiT's, its patch 1 or 2.
FAMILIES = {
    "SiT": (PATCH_SIZES, dict(learn_sigma=True)),
    "LightningDiT": ((1, 2), dict(learn_sigma=False, mlp="swiglu", token_norm="rms",
                                  pos_embed="rope", qk_norm=False)),
}


def preset(name: str) -> dict:
  """The DiT fields of a paper model: "S/2", "B/4", "XL/8" (DiT's Table 1),
  or another paper's model on the same backbone, "SiT-XL/2", "LightningDiT-B/1".

  Args:
    name: "<size>/<patch>" with size in S, B, L, XL and patch in 2, 4, 8; or
      "SiT-<size>/<patch>" (the same sizes and patches), or
      "LightningDiT-<size>/<patch>" (patch 1 or 2).

  Returns:
    dict with patch_size, hidden_size, depth, num_heads, mlp_ratio; a family's
    preset also holds its learn_sigma and block options (mlp, token_norm,
    pos_embed, qk_norm).
  """
  family, _, short = name.rpartition("-")
  patches, extra = FAMILIES.get(family, (PATCH_SIZES, {}))
  size, _, patch = short.partition("/")
  if ((family and family not in FAMILIES) or size not in PRESETS
      or patch not in [str(p) for p in patches]):
    valid = ", ".join(f"{s}/{p}" for s in PRESETS for p in PATCH_SIZES)
    families = ", ".join(f"{f}-<size>/{'|'.join(map(str, ps))}"
                         for f, (ps, _) in FAMILIES.items())
    raise ValueError(f"DiT preset {name!r} is unknown; use one of {valid}, or "
                     f"{families}")
  hidden, depth, heads = PRESETS[size]
  return dict(patch_size=int(patch), hidden_size=hidden, depth=depth,
              num_heads=heads, mlp_ratio=4.0, **extra)


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
      # LightningDiT's options; the defaults are DiT's network, bit for bit.
      Field("mlp", "gelu", "feed-forward: gelu (DiT's) | swiglu (LightningDiT's, "
            "hidden width int(2/3 * int(D * mlp_ratio)))"),
      Field("token_norm", "layer", "the adaLN norms: layer (DiT's LayerNorm) | rms "
            "(RMSNorm with a learned scale, eps 1e-6)"),
      Field("pos_embed", "sincos", "sincos (DiT's absolute embedding) | rope (also 2-D "
            "RoPE on q and k; head_dim % 4 == 0)"),
      Field("qk_norm", False, "normalise q and k per head (LayerNorm, or RMSNorm "
            "with token_norm=rms)"),
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
    for key, values in (("mlp", MLPS), ("token_norm", TOKEN_NORMS),
                        ("pos_embed", POS_EMBEDS)):
      require(m[key] in values, f"model.{key}={m[key]!r} is unknown; use one of {values}")
    require(isinstance(m["qk_norm"], bool),
            f"model.qk_norm={m['qk_norm']!r} must be True or False")
    if m["pos_embed"] == "rope":
      head_dim = d // heads
      require(head_dim % 4 == 0,
              f"model.pos_embed=rope needs a head dim (hidden_size / num_heads = "
              f"{head_dim}) divisible by 4 (half for rows, half for columns, in pairs); "
              "change model.num_heads or use model.pos_embed=sincos")
    if m["mlp"] == "swiglu":
      require(swiglu_hidden(d, m["mlp_ratio"]) >= 1,
              f"model.mlp=swiglu with hidden_size={d}, mlp_ratio={m['mlp_ratio']} has "
              "no hidden units; raise model.mlp_ratio")

  def hidden_tokens(self, m, height, width):
    """Every block's output tokens: depth blocks on the (H/p, W/p) grid, width D."""
    p = m["patch_size"]
    return m["depth"], (height // p, width // p), m["hidden_size"]

  def check_norm_kernel(self, m) -> None:
    # The Pallas kernel fuses LayerNorm + adaLN; RMSNorm has no fused kernel.
    require(m["token_norm"] == "layer",
            f"model.norm_kernel={m['norm_kernel']!r} fuses DiT's LayerNorm; "
            f"model.token_norm={m['token_norm']!r} has no fused kernel: use "
            "model.norm_kernel=xla")


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
  """SwiGLU's hidden width, LightningDiT's rule: 2/3 of the GELU MLP's
  int(D * mlp_ratio), truncated (so both have about the same parameters;
  D = 1152, ratio 4: 3072)."""
  return int(2 / 3 * int(hidden_size * mlp_ratio))


SPEC = DiTSpec()
