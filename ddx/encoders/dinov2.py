"""DINOv2 (2304.07193), and DINOv2 with registers (2309.16588), in Flax linen.

The network is facebookresearch/dinov2's `DinoVisionTransformer`, as
`transformers.Dinov2Model` / `Dinov2WithRegistersModel` also build it:
  * a 14x14 stride-14 conv patch embedding (with bias);
  * a CLS token, then the position embedding added to [CLS, patches]: a
    learned table for 1 + M*M tokens (M = 37 for the released weights, made
    at 518 px), bicubically resized to other patch grids (`pos_embed_for_grid`);
  * then R register tokens (0 or 4) inserted after CLS; they get no position
    embedding;
  * pre-norm blocks: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)),
    LayerNorm eps 1e-6, attention with qkv bias and head dim 64, LayerScale
    (a learned per-channel gain) on both branches, an MLP with exact-erf GELU
    (ViT-S/B/L) or SwiGLU (ViT-g: silu(x W1) * (x W2) with 2/3 of the MLP
    width rounded up to a multiple of 8: 4096 for ViT-g);
  * a final LayerNorm; its outputs are DINOv2's x_norm_clstoken,
    x_norm_regtokens and x_norm_patchtokens.

Position-embedding resizing, three conventions, chosen by two config fields
with the official code's names:
  interpolate_offset 0.0, interpolate_antialias False: transformers'
    `Dinov2Model` (5.25): F.interpolate(size=(h, w), mode="bicubic",
    align_corners=False), Keys' cubic with a = -0.75, border taps clamped.
  interpolate_offset 0.1, interpolate_antialias False: the official torch-hub
    models without registers (dinov2_vit{s,b,l,g}14): F.interpolate with
    scale_factor (g + 0.1) / M, so the sampling positions are those of a grid
    scaled by M / (g + 0.1), not M / g (dino issue #8's "kludge"), so it
    differs slightly from transformers' at 224 px.
  interpolate_offset 0.0, interpolate_antialias True: the official models
    with registers (dinov2_vit*14_reg) and `Dinov2WithRegistersModel`:
    torch's antialiased bicubic (a = -0.5, PIL's kernel stretched by the
    downscale factor, weights renormalised over the taps inside the image);
    timm's `resample_abs_pos_embed`, which REPA applies once to the hub
    model's table, is this one too.
The patch grid equal to the table's grid on a square image uses the table as
it is (both implementations skip the resize then). jax.image.resize's cubic is
a = -0.5 without clamping, so the torch kernels are written here as constant
NumPy matrices (`resize_matrix`), applied with einsum.

Preprocessing, two pure functions:
  `preprocess` (REPA): images in [-1, 1] (float) or uint8 -> [0, 1] ->
    ImageNet mean/std -> F.interpolate(mode="bicubic", align_corners=False,
    no antialiasing) to the encoder's side (224), in JAX, as REPA's
    `preprocess_raw_image` does.
  `preprocess_pil` (dgm-eval's FD-DINOv2): uint8 images -> PIL's
    Image.resize(BICUBIC) to 224x224 (torchvision's Resize on a PIL image;
    PIL's bicubic is a = -0.5 and antialiased) -> ToTensor -> mean/std, on
    the host with PIL itself so the pixels match dgm-eval's exactly.

On disk (written by `save`, e.g. through `python -m ddx.convert SRC
--workdir DIR`) an encoder folder holds
  params.npz     the float32 params keyed by Flax path ("blocks_0/attn/qkv/kernel");
  encoder.json   {"format", "encoder": "dinov2", "config", "weights_digest",
                 "source"}, written last.
`weights_digest` hashes every leaf's path and bytes: REPA checkpoints and
cached reference statistics record an encoder by its folder and this digest.

    enc = ddx.encoders.dinov2.load("dinov2_vitb14/")
    out = ddx.encoders.dinov2.features(enc, ddx.encoders.dinov2.preprocess(images))
    out["patch"]   # [B, 256, 768] at 224 px
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 1
SETTINGS_FILE = "encoder.json"
PARAMS_FILE = "params.npz"
HEAD_DIM = 64          # every released DINOv2 has 64 channels per head
PATCH_SIZE = 14
INPUT_SIZE = 224        # REPA's and dgm-eval's encoder resolution
# torchvision / timm IMAGENET_DEFAULT_MEAN / _STD.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_CUBIC_A = -0.75   # F.interpolate(mode="bicubic") without antialiasing
PIL_CUBIC_A = -0.5      # PIL's bicubic and torch's antialiased bicubic


class EncoderWeightsError(ValueError):
  """An encoder folder that is missing or does not fit the network; one line naming it."""


# --------------------------------------------------------------------------
# The architecture.


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """The fields that fix a DINOv2 network (hashable: a static jit argument).

  Attributes:
    hidden_size: token width D.
    depth: number of blocks.
    num_heads: attention heads (D / 64 in every released model).
    patch_size: side of a patch in pixels.
    pos_grid: side M of the position-embedding grid (37: made at 518 px).
    num_registers: register tokens R (0, or 4 for the _reg models).
    mlp: "gelu" (fc1 -> exact GELU -> fc2) or "swiglu" (ViT-g).
    mlp_ratio: MLP width / D before SwiGLU's 2/3 rounding.
    qkv_bias: whether q, k, v have biases (always in the released models).
    layer_norm_eps: every LayerNorm's epsilon.
    interpolate_offset, interpolate_antialias: the position-embedding resize
      (module docstring; the official code's names and meaning).
  """
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  patch_size: int = PATCH_SIZE
  pos_grid: int = 37
  num_registers: int = 0
  mlp: str = "gelu"
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  interpolate_offset: float = 0.0
  interpolate_antialias: bool = False

  def __post_init__(self):
    if self.mlp not in ("gelu", "swiglu"):
      raise ValueError(f"Dinov2Config.mlp={self.mlp!r}; use 'gelu' or 'swiglu'")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"Dinov2Config: hidden_size {self.hidden_size} is not a multiple "
                       f"of num_heads {self.num_heads}")

  @property
  def mlp_hidden(self) -> int:
    """The MLP's inner width; SwiGLU's as DINOv2's SwiGLUFFNFused rounds it."""
    width = int(self.hidden_size * self.mlp_ratio)
    if self.mlp == "swiglu":
      width = (int(width * 2 / 3) + 7) // 8 * 8
    return width

  @property
  def base_size(self) -> int:
    """The image side at which the position table needs no resizing (518)."""
    return self.pos_grid * self.patch_size

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _hub(hidden, depth, registers, mlp="gelu"):
  # torch hub's hubconf: the models with registers resize with antialiasing
  # and no offset, the others with offset 0.1 and no antialiasing.
  return Dinov2Config(hidden_size=hidden, depth=depth, num_heads=hidden // HEAD_DIM,
                      num_registers=4 if registers else 0, mlp=mlp,
                      interpolate_offset=0.0 if registers else 0.1,
                      interpolate_antialias=registers)


# The released models by their torch-hub names.
PRESETS = {
    f"dinov2_vit{name}14{'_reg' if reg else ''}": _hub(d, n, reg, mlp)
    for name, d, n, mlp in (("s", 384, 12, "gelu"), ("b", 768, 12, "gelu"),
                            ("l", 1024, 24, "gelu"), ("g", 1536, 40, "swiglu"))
    for reg in (False, True)}


def preset_name(config: Dinov2Config) -> Optional[str]:
  """The torch-hub name of a released architecture (ignoring the resize fields), or None."""
  for name, p in PRESETS.items():
    if dataclasses.replace(config, interpolate_offset=p.interpolate_offset,
                           interpolate_antialias=p.interpolate_antialias) == p:
      return name
  return None


# --------------------------------------------------------------------------
# torch's bicubic resize as matrices.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a, at |x|."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(in_size: int, out_size: int, *, antialias: bool = False,
                  scale_factor: Optional[float] = None) -> np.ndarray:
  """torch's 1-D bicubic resize (align_corners=False) as an [out, in] matrix.

  antialias=False is F.interpolate(mode="bicubic"): output i samples input
  position s = scale * (i + 0.5) - 0.5 with four taps floor(s)-1 .. floor(s)+2
  clamped to the border, weighted by Keys' cubic with a = -0.75.
  antialias=True is F.interpolate(mode="bicubic", antialias=True): around
  centre c = scale * (i + 0.5) the cubic with a = -0.5 is stretched by
  max(scale, 1), only taps inside the image are kept, and the weights are
  renormalised to sum to 1 (PIL's resampling).

  Args:
    in_size, out_size: lengths along the axis.
    antialias: the kernel (above).
    scale_factor: as F.interpolate's scale_factor (the sampling scale is then
      1 / scale_factor, not in_size / out_size); None: from the sizes.
  Returns:
    [out_size, in_size] float64; out = M @ in along the axis.
  """
  scale = 1.0 / scale_factor if scale_factor else in_size / out_size
  m = np.zeros((out_size, in_size))
  i = np.arange(out_size)
  if not antialias:
    s = scale * (i + 0.5) - 0.5
    base = np.minimum(np.floor(s), in_size - 1)
    t = np.clip(s - base, 0.0, 1.0)
    for k in range(-1, 3):
      idx = np.clip(base + k, 0, in_size - 1).astype(int)
      np.add.at(m, (i, idx), _cubic(t - k, TORCH_CUBIC_A))
    return m
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  max_taps = int(math.ceil(support)) * 2 + 1
  for o in range(out_size):
    centre = scale * (o + 0.5)
    lo = max(int(centre - support + 0.5), 0)     # int() truncates, as the C++ cast
    n = min(max(min(int(centre + support + 0.5), in_size) - lo, 0), max_taps)
    w = _cubic((np.arange(n) + lo - centre + 0.5) * inv, PIL_CUBIC_A)
    total = w.sum()
    m[o, lo:lo + n] = w / total if total != 0 else w
  return m


def resize_bicubic(x: jnp.ndarray, size: tuple[int, int], *, antialias: bool = False,
                   scale_factor: Optional[tuple[float, float]] = None) -> jnp.ndarray:
  """torch's bicubic F.interpolate (align_corners=False) of [..., H, W, C] images.

  Args:
    x: [..., H, W, C] float.
    size: (out_h, out_w).
    antialias, scale_factor: as in `resize_matrix` (scale_factor per axis).
  Returns:
    [..., out_h, out_w, C], in x's dtype (at least float32).
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  sh, sw = scale_factor if scale_factor else (None, None)
  mh = resize_matrix(x.shape[-3], size[0], antialias=antialias, scale_factor=sh)
  mw = resize_matrix(x.shape[-2], size[1], antialias=antialias, scale_factor=sw)
  x = x.astype(dtype)
  x = jnp.einsum("oh,...hwc->...owc", jnp.asarray(mh, dtype), x,
                 precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,...owc->...opc", jnp.asarray(mw, dtype), x,
                    precision=jax.lax.Precision.HIGHEST)


def pos_embed_for_grid(pos_embed: jnp.ndarray, config: Dinov2Config,
                       grid: tuple[int, int], square_image: bool = True) -> jnp.ndarray:
  """The position embedding of [CLS, patches] for a patch grid.

  Args:
    pos_embed: [1, 1 + M*M, D], the learned table (M = config.pos_grid).
    config: its network; interpolate_offset / _antialias pick the resize.
    grid: (gh, gw) patches of the image.
    square_image: whether the image is square in pixels; the official code
      and transformers use the table unresized only for the table's grid on
      a square image.
  Returns:
    [1, 1 + gh*gw, D] in pos_embed's dtype; resized in at least float32
    (as both implementations do, whatever the network's dtype).
  """
  m = config.pos_grid
  gh, gw = grid
  if (gh, gw) == (m, m) and square_image:
    return pos_embed
  d = pos_embed.shape[-1]
  table = pos_embed[0, 1:].reshape(m, m, d)
  offset = config.interpolate_offset
  scale = ((gh + offset) / m, (gw + offset) / m) if offset else None
  patches = resize_bicubic(table, (gh, gw), antialias=config.interpolate_antialias,
                           scale_factor=scale)
  patches = patches.reshape(1, gh * gw, d).astype(pos_embed.dtype)
  return jnp.concatenate([pos_embed[:, :1], patches], axis=1)


# --------------------------------------------------------------------------
# The network. Module and parameter names are the official state_dict's
# (blocks.3.attn.qkv.weight <-> blocks_3/attn/qkv/kernel; see `official_key`).

_zeros = nn.initializers.zeros    # weights always come from a file


def _layer_norm(eps, name):
  # Two-pass variance: DINOv2's residual stream has tokens of large norm,
  # where E[x^2] - E[x]^2 cancels in float32.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class _Attention(nn.Module):
  num_heads: int
  qkv_bias: bool

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.num_heads
    qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, kernel_init=_zeros, name="qkv")(x)
    # The official layout: [q | k | v] along the output, heads contiguous inside.
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, hd), 2, 0)
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) * (hd ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, d)
    return nn.Dense(d, kernel_init=_zeros, name="proj")(out)


class _Mlp(nn.Module):
  config: Dinov2Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    if c.mlp == "swiglu":
      # SwiGLUFFNFused: one w12 projection, chunked into (gate, value).
      gate, value = jnp.split(nn.Dense(2 * c.mlp_hidden, kernel_init=_zeros,
                                       name="w12")(x), 2, axis=-1)
      return nn.Dense(c.hidden_size, kernel_init=_zeros, name="w3")(nn.silu(gate) * value)
    h = nn.Dense(c.mlp_hidden, kernel_init=_zeros, name="fc1")(x)
    return nn.Dense(c.hidden_size, kernel_init=_zeros, name="fc2")(
        nn.gelu(h, approximate=False))


class _LayerScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param("gamma", nn.initializers.ones, (x.shape[-1],))


class _Block(nn.Module):
  config: Dinov2Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    eps = c.layer_norm_eps
    x = x + _LayerScale(name="ls1")(_Attention(c.num_heads, c.qkv_bias, name="attn")(
        _layer_norm(eps, "norm1")(x)))
    return x + _LayerScale(name="ls2")(_Mlp(c, name="mlp")(_layer_norm(eps, "norm2")(x)))


class Dinov2(nn.Module):
  """DINOv2 from normalised images to its normalised tokens.

  Call with x: [B, H, W, 3] float, ImageNet-normalised (`preprocess`); H and W
  need not be multiples of the patch (the conv drops the remainder, as
  torch's does). blocks: 0-based indices of blocks whose outputs to return.
  Returns a dict:
    cls: [B, D]; registers: [B, R, D]; patch: [B, N, D], N = (H//14)*(W//14)
      in row-major order; all after the final LayerNorm;
    hidden (only with blocks): tuple of [B, 1 + R + N, D], each block's
      output before the final norm ([CLS, registers, patches]; transformers'
      hidden_states[i + 1]).
  """
  config: Dinov2Config

  @nn.compact
  def __call__(self, x, blocks: Sequence[int] = ()):
    c = self.config
    bad = [i for i in blocks if not 0 <= i < c.depth]
    if bad:
      raise ValueError(f"blocks={tuple(blocks)}: block {bad[0]} does not exist; this "
                       f"DINOv2 has blocks 0..{c.depth - 1}")
    d, p = c.hidden_size, c.patch_size
    bsz, h, w, _ = x.shape
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=_zeros,
                name="patch_embed")(x)
    gh, gw = x.shape[1:3]
    x = x.reshape(bsz, gh * gw, d)
    cls = self.param("cls_token", _zeros, (1, 1, d)).astype(x.dtype)
    pos = self.param("pos_embed", _zeros, (1, 1 + c.pos_grid ** 2, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (bsz, 1, d)), x], axis=1)
    x = x + pos_embed_for_grid(pos, c, (gh, gw), square_image=h == w).astype(x.dtype)
    r = c.num_registers
    if r:
      reg = self.param("register_tokens", _zeros, (1, r, d)).astype(x.dtype)
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (bsz, r, d)), x[:, 1:]], axis=1)
    hidden = []
    for i in range(c.depth):
      x = _Block(c, name=f"blocks_{i}")(x)
      if i in blocks:
        hidden.append(x)
    x = _layer_norm(c.layer_norm_eps, "norm")(x)
    out = {"cls": x[:, 0], "registers": x[:, 1:1 + r], "patch": x[:, 1 + r:]}
    if blocks:
      by_index = dict(zip([i for i in range(c.depth) if i in blocks], hidden))
      out["hidden"] = tuple(by_index[i] for i in blocks)
    return out


@functools.lru_cache(maxsize=16)
def abstract_params(config: Dinov2Config) -> Any:
  """The params tree of `Dinov2(config)` as ShapeDtypeStructs (nothing computed)."""
  s = config.patch_size
  return jax.eval_shape(Dinov2(config).init, jax.random.key(0),
                        jnp.zeros((1, s, s, 3), jnp.float32))["params"]


# --------------------------------------------------------------------------
# Official state_dict names <-> Flax paths.

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma"}


def official_key(path: Sequence[str]) -> str:
  """The facebookresearch/dinov2 state_dict key of the param at `path`.

  e.g. ("blocks_3", "attn", "qkv", "kernel") -> "blocks.3.attn.qkv.weight",
  ("patch_embed", "kernel") -> "patch_embed.proj.weight", ("cls_token",) -> "cls_token".
  """
  if len(path) == 1:
    return path[0]
  *mods, leaf = path
  parts = []
  for mod in mods:
    parts.extend(mod.split("_", 1) if mod.startswith("blocks_") else [mod])
  if mods == ["patch_embed"]:
    parts.append("proj")
  return ".".join(parts + [_LEAF[leaf]])


def from_torch_layout(path: Sequence[str], value: np.ndarray) -> np.ndarray:
  """A torch-layout weight in Flax's: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
  if path[-1] == "kernel":
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def torch_shape(path: Sequence[str], shape: Sequence[int]) -> tuple:
  """The torch layout's shape of a Flax leaf of `shape` at `path`."""
  if path[-1] == "kernel":
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape[::-1])
  return tuple(shape)


# --------------------------------------------------------------------------
# The encoder: config + params, and its folder.


@flax.struct.dataclass
class Encoder:
  """A loaded DINOv2: a pytree whose params are jit arguments.

  Attributes:
    config: the architecture (static).
    params: the Flax params, float32.
    digest: `weights_digest(params)` (static), as recorded in encoder.json.
  """
  config: Dinov2Config = flax.struct.field(pytree_node=False)
  params: Any = None
  digest: str = flax.struct.field(pytree_node=False, default="")


def _leaves(params) -> list[tuple[str, np.ndarray]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [("/".join(k.key for k in path), leaf) for path, leaf in flat]


def weights_digest(params: Any) -> str:
  """SHA-256 (hex) over every param's path and float32 bytes, in path order:
  the same for every conversion of the same weights."""
  h = hashlib.sha256()
  for key, value in sorted(_leaves(params), key=lambda kv: kv[0]):
    h.update(key.encode())
    h.update(np.ascontiguousarray(np.asarray(value), np.float32).tobytes())
  return h.hexdigest()


def check_params(config: Dinov2Config, params: Any, where: str) -> None:
  """Raises EncoderWeightsError naming the first param missing, extra or misshaped."""
  want = {k: tuple(v.shape) for k, v in _leaves(abstract_params(config))}
  got = {k: tuple(np.shape(v)) for k, v in _leaves(params)}
  for k, shape in want.items():
    if k not in got:
      raise EncoderWeightsError(f"{where} lacks param {k}; convert the weights again "
                                "(python -m ddx.convert SRC --workdir DIR)")
    if got[k] != shape:
      raise EncoderWeightsError(f"{where}: param {k} has shape {got[k]}; the config "
                                f"implies {shape}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise EncoderWeightsError(f"{where}: param {extra[0]} is not part of the network "
                              "the config describes")


def save(folder: str, config: Dinov2Config, params: Any,
         source: Optional[dict] = None) -> Encoder:
  """Writes an encoder folder: params.npz, then encoder.json (last).

  Args:
    folder: a local or gs:// folder without an encoder in it.
    config: the architecture.
    params: its Flax params (NumPy or jax arrays).
    source: what the weights were converted from (recorded as given).
  Returns:
    the Encoder as `load` will read it.
  Raises:
    EncoderWeightsError: the folder already holds an encoder, or the params
      do not fit the config.
  """
  from etils import epath
  root = epath.Path(folder)
  if (root / SETTINGS_FILE).exists() or (root / PARAMS_FILE).exists():
    raise EncoderWeightsError(f"{folder} already holds an encoder; choose a new folder "
                              "(an encoder is never overwritten)")
  check_params(config, params, str(folder))
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  digest = weights_digest(params)
  root.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, **dict(_leaves(params)))
  (root / PARAMS_FILE).write_bytes(buf.getvalue())
  meta = {"format": FORMAT, "encoder": "dinov2", "config": config.to_dict(),
          "weights_digest": digest, "source": source or {}}
  (root / SETTINGS_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  return Encoder(config=config, params=params, digest=digest)


def load(folder: str) -> Encoder:
  """Reads an encoder folder written by `save` / python -m ddx.convert.

  Raises:
    EncoderWeightsError: a missing folder or file, a json of another format
      or encoder, params that do not fit, or params whose digest is not the
      recorded one (a damaged file); one line naming it.
  """
  from etils import epath
  root = epath.Path(folder)
  jpath = root / SETTINGS_FILE
  if not jpath.exists():
    raise EncoderWeightsError(
        f"{jpath} does not exist; convert DINOv2 weights first (python -m ddx.convert "
        "dinov2_vitb14_pretrain.pth --workdir DIR; docs/encoders.md)")
  try:
    meta = json.loads(jpath.read_text())
  except json.JSONDecodeError as e:
    raise EncoderWeightsError(f"{jpath} is not valid JSON ({e}); convert again") from None
  if not isinstance(meta, dict) or meta.get("encoder") != "dinov2":
    raise EncoderWeightsError(f"{jpath} does not describe a DINOv2 encoder; convert "
                              "DINOv2 weights with python -m ddx.convert")
  if meta.get("format") != FORMAT:
    raise EncoderWeightsError(f"{jpath} has format {meta.get('format')!r}, this ddx "
                              f"reads format {FORMAT}; convert the weights again")
  try:
    config = Dinov2Config(**meta["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise EncoderWeightsError(f"{jpath}: bad config ({' '.join(str(e).split())}); "
                              "convert the weights again") from None
  ppath = root / PARAMS_FILE
  if not ppath.exists():
    raise EncoderWeightsError(f"{ppath} does not exist; the encoder folder is "
                              "incomplete, convert it again")
  try:
    with np.load(io.BytesIO(ppath.read_bytes()), allow_pickle=False) as f:
      flat = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError) as e:
    raise EncoderWeightsError(f"cannot read {ppath}: {' '.join(str(e).split())}; "
                              "convert the weights again") from None
  abstract = abstract_params(config)
  paths = [k for k, _ in _leaves(abstract)]
  missing = [k for k in paths if k not in flat]
  if missing:
    raise EncoderWeightsError(f"{ppath} lacks param {missing[0]}; convert the weights again")
  treedef = jax.tree_util.tree_structure(abstract)
  params = jax.tree_util.tree_unflatten(treedef, [flat[k] for k in paths])
  check_params(config, params, str(ppath))
  if len(flat) != len(paths):
    extra = sorted(set(flat) - set(paths))[0]
    raise EncoderWeightsError(f"{ppath}: param {extra} is not part of the network "
                              f"{jpath} describes")
  digest = weights_digest(params)
  if digest != meta.get("weights_digest"):
    raise EncoderWeightsError(f"{ppath} has weights digest {digest[:16]}..., "
                              f"{jpath} records {str(meta.get('weights_digest'))[:16]}...; "
                              "the folder is damaged or mixed: convert it again")
  return Encoder(config=config, params=params, digest=digest)


# --------------------------------------------------------------------------
# Features.


def forward(encoder: Encoder, images: jnp.ndarray, blocks: Sequence[int] = ()) -> dict:
  """DINOv2's normalised tokens of preprocessed images; traceable (composes
  under the caller's jit, the params flow in as arguments).

  Args:
    encoder: from `load`.
    images: [B, H, W, 3] float, ImageNet-normalised (`preprocess`).
    blocks: 0-based blocks whose outputs to add as "hidden" (a tuple: it is
      static under `features`).
  Returns:
    {"cls": [B, D], "registers": [B, R, D], "patch": [B, N, D]} (and
    "hidden", see `Dinov2`), in the images' dtype (at least float32).
  """
  images = images.astype(jnp.promote_types(images.dtype, jnp.float32))
  return Dinov2(encoder.config).apply({"params": encoder.params}, images,
                                      blocks=tuple(blocks))


features = jax.jit(forward, static_argnames=("blocks",))
features.__doc__ = "`forward`, jitted (one program per image shape and blocks)."


def _normalise(x):
  mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
  std = jnp.asarray(IMAGENET_STD, x.dtype)
  return (x - mean) / std


def preprocess(images: jnp.ndarray, size: int = INPUT_SIZE) -> jnp.ndarray:
  """REPA's preprocessing: [0, 1] -> ImageNet mean/std -> torch bicubic resize.

  The resize is F.interpolate(mode="bicubic", align_corners=False) without
  antialiasing (Keys a = -0.75, border taps clamped), applied after the
  normalisation as REPA's `preprocess_raw_image` does; skipped when the
  images already have the size. Traceable.

  Args:
    images: [B, H, W, 3] uint8 in [0, 255], or float in [-1, 1].
    size: the encoder's side (224; REPA uses 224 * (resolution // 256)).
  Returns:
    [B, size, size, 3] float32 (float64 for float64 input).
  """
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  else:
    x = (images.astype(jnp.promote_types(images.dtype, jnp.float32)) + 1.0) / 2.0
  x = _normalise(x)
  if x.shape[1:3] != (size, size):
    x = resize_bicubic(x, (size, size))
  return x


def preprocess_pil(images_u8: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
  """dgm-eval's FD-DINOv2 preprocessing, on the host: PIL bicubic, ToTensor, mean/std.

  PIL's Image.resize((size, size), Image.BICUBIC) (a = -0.5, antialiased:
  what torchvision's Resize((224, 224), BICUBIC) does to a PIL image), then
  /255 and (x - mean) / std in float32 as ToTensor and Normalize compute it.
  Grey images are repeated to RGB (dgm-eval converts to RGB).

  Args:
    images_u8: [B, H, W, C] uint8, C in (1, 3).
    size: output side (224).
  Returns:
    [B, size, size, 3] float32 NumPy.
  """
  from PIL import Image
  images_u8 = np.asarray(images_u8)
  if images_u8.ndim != 4 or images_u8.dtype != np.uint8 or images_u8.shape[-1] not in (1, 3):
    raise ValueError(f"images must be uint8 [B, H, W, 1 or 3], got "
                     f"{images_u8.dtype} {images_u8.shape}")
  if images_u8.shape[-1] == 1:
    images_u8 = np.repeat(images_u8, 3, axis=-1)
  out = np.empty((len(images_u8), size, size, 3), np.float32)
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  for i, img in enumerate(images_u8):
    if img.shape[:2] != (size, size):
      img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    out[i] = (img.astype(np.float32) / np.float32(255.0) - mean) / std
  return out
