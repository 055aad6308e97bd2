"""The U-Net's config half (no JAX): its model.* keys, defaults and checks."""
from __future__ import annotations

from ddx.models.spec import Field, Spec, require

NORMS = ("group", "batch")                    # model.norm (ddx.models.layers.NORMS)
DOWNSAMPLE_PADDINGS = ("bottom_right", "symmetric")   # ddx.models.layers


class UNetSpec(Spec):
  """DDPM's U-Net (Ho et al. 2020), with the options diffusers' UNet2DModel exposes."""
  name = "unet"
  fields = (
      Field("ch", 32, "base channel count"),
      Field("ch_mult", (1, 2), "channel multiplier per level (len = levels)"),
      Field("num_res_blocks", 2, "ResBlocks per level (one more on the way up)"),
      Field("attn_resolutions", (4,), "feature-map heights with self-attention"),
      Field("dropout", 0.0, "dropout in the ResBlocks (training only)"),
      Field("num_groups", 8, "GroupNorm groups (32 in DDPM)"),
      Field("resamp_with_conv", True, "3x3 convs in Downsample/Upsample"),
      Field("norm", "group", "group (GroupNorm, DDPM) | batch (BatchNorm, running stats)"),
      # The choices DDPM fixed and diffusers' UNet2DModel exposes (ddx.convert sets them):
      Field("flip_sin_to_cos", False, "time embedding [cos, sin] instead of DDPM's "
            "[sin, cos]"),
      Field("freq_shift", 1, "time-embedding frequencies 10000^(-k/(ch/2 - freq_shift)); "
            "DDPM 1"),
      Field("downsample_padding", "bottom_right", "stride-2 conv pad: bottom_right "
            "(DDPM) | symmetric"),
      Field("attn_head_dim", 0, "channels per attention head; 0 = one head (DDPM)"),
      Field("norm_eps", 1e-6, "GroupNorm epsilon (DDPM 1e-6; diffusers' default 1e-5)"),
  )
  implementation = "ddx.models.unet.network:UNet"
  tiny = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)

  def check(self, m, height, width, what) -> None:
    require(isinstance(m["ch"], int) and m["ch"] > 0,
            f"model.ch={m['ch']!r} must be a positive integer")
    ch, ch_mult = m["ch"], tuple(m["ch_mult"])
    require(len(ch_mult) >= 1 and all(isinstance(c, int) and c > 0 for c in ch_mult),
            f"model.ch_mult={m['ch_mult']!r} must be a non-empty tuple of positive integers")
    levels = len(ch_mult)
    div = 2 ** (levels - 1)
    require(height % div == 0 and width % div == 0,
            f"{what} is not divisible by 2^(levels-1)={div} "
            f"for model.ch_mult={ch_mult}; use a multiple of {div} or fewer levels")
    resolutions = tuple(height // 2 ** l for l in range(levels))
    for r in tuple(m["attn_resolutions"]):
      require(r in resolutions,
              f"model.attn_resolutions contains {r}, which is not a U-Net level; "
              f"the levels of a {height}px model are {resolutions}")
    require(m["num_res_blocks"] >= 1,
            f"model.num_res_blocks={m['num_res_blocks']} must be >= 1")
    require(0.0 <= m["dropout"] < 1.0, f"model.dropout={m['dropout']} must be in [0, 1)")
    norm, groups = m["norm"], m["num_groups"]
    require(norm in NORMS, f"model.norm={norm!r} is unknown; use one of {NORMS}")
    channels = tuple(sorted({ch} | {ch * c for c in ch_mult}))
    require(norm != "group" or (isinstance(groups, int) and groups >= 1
                                and all(c % groups == 0 for c in channels)),
            f"model.num_groups={groups!r} must divide every channel count "
            f"{channels} of model.ch={ch}, model.ch_mult={ch_mult}; use a divisor of {ch}")
    self._check_options(m)

  def _check_options(self, m) -> None:
    """The diffusers-layout options (ddx.convert sets them)."""
    require(isinstance(m["flip_sin_to_cos"], bool),
            f"model.flip_sin_to_cos={m['flip_sin_to_cos']!r} must be True or False")
    shift, ch = m["freq_shift"], m["ch"]
    require(isinstance(shift, int) and 0 <= shift < ch // 2,
            f"model.freq_shift={shift!r} must be an integer in [0, ch/2={ch // 2})")
    require(m["downsample_padding"] in DOWNSAMPLE_PADDINGS,
            f"model.downsample_padding={m['downsample_padding']!r} must be bottom_right "
            "or symmetric")
    widths = [ch * c for c in m["ch_mult"]]
    head = m["attn_head_dim"]
    require(isinstance(head, int) and head >= 0
            and all(w % head == 0 for w in widths if head),
            f"model.attn_head_dim={head!r} must be 0 (one head) or divide "
            f"every channel count {tuple(widths)}")
    require(m["norm_eps"] > 0, f"model.norm_eps={m['norm_eps']} must be > 0")

  def check_norm_kernel(self, m) -> None:
    # The Pallas kernel fuses GroupNorm + SiLU; BatchNorm has no fused kernel.
    require(m["norm"] == "group",
            f"model.norm_kernel={m['norm_kernel']!r} fuses the U-Net's GroupNorm (and "
            f"DiT's LayerNorm); this U-Net has norm={m['norm']!r}: use "
            "model.norm_kernel=xla")


SPEC = UNetSpec()
