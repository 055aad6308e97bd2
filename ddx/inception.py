"""Inception-v3 as used for FID / KID / IS, in Flax linen, with local weights.

The network is the one in the 2015-12-05 TensorFlow graph that TTUR's FID,
pytorch-fid and clean-fid use; it differs from torchvision's Inception-v3 in
three places (pytorch-fid's FIDInceptionA/C/E):
  * the 3x3 average pools in the A, C and first E blocks ignore the zero
    padding (TF's average pool; PyTorch's count_include_pad=False);
  * the last E block (Mixed_7c) max-pools in its pool branch;
  * 1008 output classes.
BatchNorm runs in inference mode with eps = 0.001. pool3 (the global average
of the last 8x8x2048 map) is the FID/KID feature; `fc` gives the 1008 logits
for the Inception Score.

Preprocessing has two protocols (`preprocess(..., protocol=...)`):
  * "pytorch_fid" (the default): uint8 -> [0, 1] floats, a bilinear resize to
    299x299 with half-pixel centres and no antialiasing (PyTorch's
    F.interpolate(mode="bilinear", align_corners=False)), then x -> 2x - 1.
    FIDs are comparable with pytorch-fid's.
  * "adm": what the TF graph itself does to the float [0, 255] batch that TTUR
    and ADM's evaluator (guided-diffusion evaluations/evaluator.py) feed in at
    its ExpandDims node: TF1's legacy ResizeBilinear to 299x299
    (align_corners=False, half_pixel_centers=False: source = dest * in/out),
    then (x - 128) / 128 (the graph's Sub and Mul nodes; TensorFlow's
    image_retraining example feeds the same graph at Mul:0 with mean 128 and
    std 128). Numbers are comparable with ADM's and TTUR's.
clean-fid resizes uint8 images with PIL-bicubic and differs from both.

Besides pool3 and the logits the network can return sFID's spatial features
(`features(..., spatial=True)`): ADM's `mixed_6/conv` tensor, the first 7
channels of Mixed_6d's branch1x1 (see `InceptionV3`).

Weights are never downloaded. The runtime format is an .npz keyed by
pytorch-fid's state_dict names (`Conv2d_1a_3x3.conv.weight`, `fc.bias`, ...)
in PyTorch layouts. Make it once from pytorch-fid's public release file
(torch needed only for this step):

  python -m ddx.inception --convert pt_inception-2015-12-05-6726825d.pth inception_fid.npz
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import zipfile
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddx import weight_files

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
# sFID's features: the first SPATIAL_CHANNELS channels of the 17x17 map of
# Mixed_6d.branch1x1, flattened in NHWC order (ADM's evaluator).
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS   # 2023 at 299x299
PROTOCOLS = ("pytorch_fid", "adm")
# The release file's name carries the first hex digits of its SHA-256.
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_SHA256_PREFIX = "6726825d"


class InceptionWeightsError(ValueError):
  """The weights file is missing or does not fit the network; names the key."""


# --------------------------------------------------------------------------
# The network. Module names mirror pytorch-fid's attribute names, so every
# leaf's state_dict key follows from its path (see `torch_key`).


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU."""
  features: int
  kernel: Any = 1
  stride: int = 1
  padding: Any = 0

  @nn.compact
  def __call__(self, x):
    # Weights always come from a file: zero init keeps tracing init cheap
    # (random initialisers made jax.eval_shape of init take ~12 s here).
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                kernel_init=nn.initializers.zeros, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def avg_pool_3x3_same(x):
  """3x3 stride-1 average pool over the valid pixels only (TF's, count_include_pad=False).

  Args:
    x: [N, H, W, C].
  Returns:
    [N, H, W, C]; a border pixel averages its 4 or 6 in-image neighbours.
  """
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool_3x3_same(x):
  """3x3 stride-1 max pool, padding with -inf (PyTorch's max_pool2d, padding=1)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  pool: str  # "avg" (Mixed_7b) or "max" (Mixed_7c, a quirk of the FID graph)

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = avg_pool_3x3_same(x) if self.pool == "avg" else max_pool_3x3_same(x)
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3, from normalised images to (pool3, logits).

  Call with x: [N, H, W, 3] float32 in [-1, 1] (H = W = 299 for standard
  numbers; any size >= 75 runs). Returns pool3 [N, 2048], logits [N, 1008];
  with spatial=True, (pool3, spatial, logits) where spatial [N, h, w, 7]
  (h = w = 17 at 299) is sFID's tensor.

  Which tensor sFID uses: ADM's evaluator reads "mixed_6/conv:0" of the
  2015-12-05 TF graph and keeps its first 7 channels. That graph names its
  blocks mixed, mixed_1, mixed_2 (= Mixed_5b/5c/5d), mixed_3 (= Mixed_6a),
  mixed_4 .. mixed_7 (= Mixed_6b .. 6e), mixed_8 .. mixed_10 (= Mixed_7a ..
  7c), and inside a block `conv` is the 1x1 branch while the other branches
  sit under tower, tower_1, tower_2. A conv layer of that graph is a scope
  holding <scope>/conv2d_params, <scope>/Conv2D and <scope>/batchnorm/*, and
  the op named <scope> itself is the layer's output after the ReLU. So
  mixed_6/conv:0 is the ReLU output of Mixed_6d.branch1x1 (192 channels at
  17x17). The block correspondence is read off torch-fidelity's
  TF-graph-to-PyTorch converter (utils/util_convert_inception_weights.py),
  whose table, matched by tensor shapes, maps "mixed_6/conv/conv2d_params" and
  "mixed_6/conv/batchnorm" to Mixed_6d.branch1x1.conv and .bn, "mixed/conv" to
  Mixed_5b.branch1x1 and "mixed_3/conv" to Mixed_6a.branch3x3 (pytorch-fid's
  weights carry these names); the scope layout from dump scripts that read
  the graph's layers as <scope>/Conv2D and <scope>/batchnorm. The graph file
  itself cannot be fetched here, so this is not checked against TF. branch1x1
  is the first part of the block's concatenation, so its first 7 channels are
  the block output's first 7.
  """
  spatial: bool = False

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3_s2(x)
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
      if name == "Mixed_6d":
        spatial = x[..., :SPATIAL_CHANNELS]   # = branch1x1's first channels
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, kernel_init=nn.initializers.zeros, name="fc")(pool3)
    return (pool3, spatial, logits) if self.spatial else (pool3, logits)


# --------------------------------------------------------------------------
# Preprocessing.


def resize_bilinear(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """Bilinear resize with half-pixel centres and no antialiasing.

  Equals PyTorch's F.interpolate(mode="bilinear", align_corners=False) (the
  resize pytorch-fid applies), source coordinates outside the image clamped
  to the edge. jax.image.resize antialiases when downsampling, so it is
  called with antialias=False.

  Args:
    x: [N, H, W, C] float.
    size: output height and width.
  Returns:
    [N, size, size, C] float32.
  """
  n, _, _, c = x.shape
  return jax.image.resize(x.astype(jnp.float32), (n, size, size, c), "bilinear",
                          antialias=False)


def tf1_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """TF1's legacy ResizeBilinear along one axis, as an [n_out, n_in] matrix.

  TF1 (align_corners=False, half_pixel_centers=False) samples output pixel i
  at source coordinate i * (n_in / n_out), computed in float32 as TF does;
  it interpolates between floor and ceil of it (clamped to n_in - 1) with
  weight src - floor(src). There is no half-pixel shift, so the image moves
  by up to half a source pixel and the last source rows weigh less; this is
  the resize inside the FID graph that TTUR and ADM use.

  Returns:
    float32 [n_out, n_in]; each row sums to 1.
  """
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.arange(n_out, dtype=np.float32) * scale
  lo = np.floor(src)
  lerp = src - lo
  lo = lo.astype(np.int64)
  hi = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
  m = np.zeros((n_out, n_in), np.float32)
  rows = np.arange(n_out)
  np.add.at(m, (rows, lo), 1.0 - lerp)
  np.add.at(m, (rows, hi), lerp)
  return m


def resize_tf1_legacy(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """TF1's legacy bilinear resize (see `tf1_resize_matrix`) as two matmuls.

  Args:
    x: [N, H, W, C] float.
    size: output height and width.
  Returns:
    [N, size, size, C] float32.
  """
  _, h, w, _ = x.shape
  my, mx = tf1_resize_matrix(h, size), tf1_resize_matrix(w, size)
  # HIGHEST: on GPUs a float32 matmul may otherwise run in TF32.
  return jnp.einsum("oh,nhwc,pw->nopc", my, x.astype(jnp.float32), mx,
                    precision=jax.lax.Precision.HIGHEST)


def preprocess(images_u8: jnp.ndarray, size: int = INPUT_SIZE,
               protocol: str = "pytorch_fid") -> jnp.ndarray:
  """uint8 images -> the network's input, as pytorch-fid or ADM prepares it.

  Args:
    images_u8: [N, H, W, C] uint8, C = 1 (grey, repeated to RGB) or 3.
    size: the side the network sees (299 for standard FID).
    protocol: "pytorch_fid" (half-pixel bilinear, 2x/255 - 1) or "adm" (the
      TF graph's own: TF1 legacy bilinear on [0, 255], then (x - 128) / 128).
  Returns:
    [N, size, size, 3] float32 in [-1, 1].
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  x = images_u8.astype(jnp.float32)
  if protocol == "pytorch_fid":
    x = x / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if protocol == "adm":
    if x.shape[1:3] != (size, size):
      x = resize_tf1_legacy(x, size)
    return (x - 128.0) / 128.0
  if x.shape[1:3] != (size, size):
    x = resize_bilinear(x, size)
  return 2.0 * x - 1.0


# --------------------------------------------------------------------------
# Weights: pytorch-fid state_dict names <-> the Flax variables tree.

# (collection, Flax leaf name) -> PyTorch attribute name.
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}
# pytorch-fid's BatchNorm layers also carry this counter; it is not a weight.
_IGNORED_SUFFIX = ".num_batches_tracked"


def _leaves(tree) -> list[tuple[tuple[str, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def torch_key(path: Sequence[str]) -> str:
  """pytorch-fid's state_dict key of a Flax variable at path (collection first)."""
  collection, *modules, leaf = path
  return ".".join(modules + [_LEAF_NAMES[(collection, leaf)]])


def to_torch_layout(path: Sequence[str], value: np.ndarray) -> np.ndarray:
  """A Flax leaf in PyTorch's layout: conv HWIO -> OIHW, dense (in, out) -> (out, in)."""
  if path[-1] == "kernel":
    return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
  return value


def from_torch_layout(path: Sequence[str], value: np.ndarray) -> np.ndarray:
  """Inverse of to_torch_layout: OIHW -> HWIO, (out, in) -> (in, out)."""
  if path[-1] == "kernel":
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T
  return value


@functools.lru_cache(maxsize=1)
def abstract_variables():
  """The Flax variables tree of InceptionV3 as ShapeDtypeStructs (nothing computed)."""
  # Shapes do not depend on the image size; 75 is the smallest that runs.
  return jax.eval_shape(InceptionV3().init, jax.random.key(0),
                        jnp.zeros((1, 75, 75, 3), jnp.float32))


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Every state_dict key the weights file must hold, with its PyTorch shape."""
  out = {}
  for path, leaf in _leaves(abstract_variables()):
    shape = tuple(leaf.shape)
    if path[-1] == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    out[torch_key(path)] = shape
  return out


def variables_from_state_dict(state: dict, source: str = "weights") -> dict:
  """Builds the Flax variables from a pytorch-fid state_dict of NumPy arrays.

  Args:
    state: key -> array in PyTorch layout (`expected_shapes()` names them).
    source: where the arrays came from, for error messages.
  Returns:
    {"params": ..., "batch_stats": ...} float32 NumPy arrays.
  Raises:
    InceptionWeightsError: a key is missing or unexpected, or a shape is wrong.
  """
  keys = {k for k in state if not k.endswith(_IGNORED_SUFFIX)}
  want = expected_shapes()
  missing = sorted(set(want) - keys)
  if missing:
    raise InceptionWeightsError(
        f"{source} lacks {len(missing)} Inception weight(s), first {missing[0]!r}; "
        f"convert pytorch-fid's {PYTORCH_FID_FILE} with "
        "python -m ddx.inception --convert")
  extra = sorted(keys - set(want))
  if extra:
    raise InceptionWeightsError(
        f"{source} has {len(extra)} key(s) the FID Inception does not use, first "
        f"{extra[0]!r}; is it pytorch-fid's {PYTORCH_FID_FILE}?")
  leaves = []
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_variables())
  for path, leaf in flat:
    path = tuple(k.key for k in path)
    key = torch_key(path)
    value = np.asarray(state[key])
    if tuple(value.shape) != want[key]:
      raise InceptionWeightsError(
          f"{source}: {key!r} has shape {tuple(value.shape)}, the FID Inception "
          f"needs {want[key]}")
    leaves.append(from_torch_layout(path, value).astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def state_dict_from_variables(variables) -> dict[str, np.ndarray]:
  """The inverse of variables_from_state_dict: pytorch-fid keys and layouts."""
  return {torch_key(path): to_torch_layout(path, np.asarray(v))
          for path, v in _leaves(variables)}


def load_weights(path: str) -> dict:
  """Reads an Inception .npz (pytorch-fid keys) into Flax variables.

  Raises:
    InceptionWeightsError: no such file, not an .npz, or keys/shapes that do
      not fit (the message names the first offending key).
  """
  if not path:
    raise InceptionWeightsError(
        "no Inception weights given; set --config.eval.inception_weights=FILE.npz "
        "(README: Evaluation)")
  if not os.path.isfile(path):
    raise InceptionWeightsError(
        f"Inception weights {path} do not exist; convert pytorch-fid's "
        f"{PYTORCH_FID_FILE} with python -m ddx.inception --convert (README: Evaluation)")
  try:
    with np.load(path, allow_pickle=False) as f:
      state = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise InceptionWeightsError(f"cannot read Inception weights {path}: "
                                f"{' '.join(str(e).split())}") from None
  return variables_from_state_dict(state, source=path)


def save_weights(variables, path: str) -> None:
  """Writes Flax variables as an .npz keyed by pytorch-fid names (atomically)."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, **state_dict_from_variables(variables))
  os.replace(tmp, path)


def weights_digest(variables) -> str:
  """SHA-256 (hex) of the weight values: names the weights behind cached
  reference statistics, the same for every conversion of the same file."""
  h = hashlib.sha256()
  for key, value in sorted(state_dict_from_variables(variables).items()):
    h.update(key.encode())
    h.update(np.ascontiguousarray(value, np.float32).tobytes())
  return h.hexdigest()


def file_digest(path: str) -> str:
  """SHA-256 of a file, hex."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# --------------------------------------------------------------------------
# Features of uint8 images, in batches.


@functools.partial(jax.jit, static_argnames=("size", "protocol"))
def _preprocess(images_u8, size, protocol):
  return preprocess(images_u8, size, protocol)


@functools.partial(jax.jit, static_argnames=("spatial",))
def _network(variables, x, spatial):
  # Compiled apart from the preprocessing: both protocols share one program.
  return InceptionV3(spatial=spatial).apply(variables, x)


def adm_logits(variables, pool3: np.ndarray) -> np.ndarray:
  """The class logits as ADM's and improved-gan's Inception Score take them.

  Both multiply pool3 by the graph's softmax/weights (the input of its
  softmax/logits/MatMul node) and leave out softmax/biases; `features`'
  logits include the bias (pytorch-fid's fc, torchmetrics' and TTUR's IS).

  Args:
    variables: the Inception variables (`load_weights`).
    pool3: [N, 2048] float32.
  Returns:
    [N, 1008] float32.
  """
  kernel = np.asarray(variables["params"]["fc"]["kernel"], np.float32)
  return np.asarray(pool3, np.float32) @ kernel


def _local_mesh():
  from ddx import parallel
  # This process's devices only: features need no cross-host collectives.
  return parallel.make_mesh(devices=jax.local_devices())


def put_weights(variables):
  """The weights replicated on this process's devices; do it once, `features` reuses them."""
  from ddx import parallel
  return jax.device_put(variables, parallel.replicated(_local_mesh()))


def features(variables, images_u8: np.ndarray, batch_size: int = 100,
             size: int = INPUT_SIZE, protocol: str = "pytorch_fid",
             spatial: bool = False):
  """pool3 features and logits of uint8 images, one compiled program per call shape.

  Batches are padded to batch_size (the padding is dropped), so every batch
  reuses one program. Each batch is split over this process's devices (its
  size rounded up to a multiple of their count); the weights are replicated.

  Args:
    variables: from `load_weights` (or any tree of the same structure); pass
      `put_weights(variables)` when calling many times, to copy them to the
      devices once.
    images_u8: [N, H, W, C] uint8, C in (1, 3).
    batch_size: images per forward pass.
    size: network input side; 299 for standard numbers.
    protocol: the preprocessing, "pytorch_fid" or "adm" (see `preprocess`).
    spatial: also return sFID's features.
  Returns:
    (pool3 [N, 2048] float32, logits [N, 1008] float32), NumPy; with
    spatial=True (pool3, spatial [N, 2023] float32, logits), spatial being
    Mixed_6d.branch1x1's first 7 channels flattened in NHWC order, as ADM
    flattens them.
  """
  from ddx import parallel
  images_u8 = np.asarray(images_u8)
  if images_u8.ndim != 4 or images_u8.dtype != np.uint8 or images_u8.shape[-1] not in (1, 3):
    raise ValueError(f"images must be uint8 [N, H, W, 1 or 3], got "
                     f"{images_u8.dtype} {images_u8.shape}")
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  n = len(images_u8)
  if n == 0:
    raise ValueError("no images to compute Inception features of")
  bs = max(1, min(batch_size, n))
  mesh = _local_mesh()
  shards = parallel.num_data_shards(mesh)
  if shards > 1 and bs % shards:
    bs = -(-bs // shards) * shards   # round up: padding is cheaper than one device
  data = parallel.data_sharded(mesh) if shards > 1 else None
  variables = put_weights(variables)   # no copy when already placed
  outs = []
  for start in range(0, n, bs):
    batch = images_u8[start:start + bs]
    real = len(batch)
    if real < bs:
      batch = np.concatenate([batch, np.zeros((bs - real,) + batch.shape[1:], np.uint8)])
    batch = jax.device_put(batch, data) if data is not None else batch
    out = _network(variables, _preprocess(batch, size, protocol), spatial)
    outs.append([np.asarray(o)[:real] for o in out])
  pools, *rest = [np.concatenate(parts) for parts in zip(*outs)]
  if spatial:
    maps, logits = rest
    return pools, maps.reshape(n, -1), logits
  return pools, rest[0]


# --------------------------------------------------------------------------
# One-time conversion of pytorch-fid's release file.


def convert(pth_path: str, npz_path: str) -> None:
  """Converts pytorch-fid's .pth state_dict into the .npz this module loads.

  Needs torch (not a ddx dependency): pip install torch, run this once, and
  the .npz is all later runs need. Never writes over an existing file.
  """
  if os.path.exists(npz_path):
    raise InceptionWeightsError(f"{npz_path} already exists; ddx.inception never "
                                "overwrites a file: name a new OUT.npz")
  try:
    import torch
  except ImportError:
    raise InceptionWeightsError(
        "converting a .pth needs PyTorch: pip install torch (only for this one-time "
        "step), or convert on another machine and copy the .npz") from None
  if not os.path.isfile(pth_path):
    raise InceptionWeightsError(f"{pth_path} does not exist; download pytorch-fid's "
                                f"{PYTORCH_FID_FILE} from its GitHub releases")
  digest = file_digest(pth_path)
  if not digest.startswith(PYTORCH_FID_SHA256_PREFIX):
    print(f"warning: {pth_path} has SHA-256 {digest[:16]}..., not pytorch-fid's "
          f"{PYTORCH_FID_SHA256_PREFIX}...; FIDs will not be comparable", file=sys.stderr)
  try:
    state = torch.load(pth_path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise InceptionWeightsError(
        weight_files.unreadable_reason(pth_path, e, "pytorch-fid weight file")) from None
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()
            if not k.endswith(_IGNORED_SUFFIX)}
  variables = variables_from_state_dict(arrays, source=pth_path)   # checks every key
  save_weights(variables, npz_path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m ddx.inception",
      description="Convert pytorch-fid's Inception weights (.pth) to ddx's .npz.")
  p.add_argument("--convert", nargs=2, metavar=("IN.pth", "OUT.npz"), required=True)
  args = p.parse_args(argv)
  try:
    convert(*args.convert)
  except InceptionWeightsError as e:
    print(f"ddx.inception: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.convert[1]} ({len(expected_shapes())} arrays)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
