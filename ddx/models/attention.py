"""Multi-head attention implementations, chosen by `model.attention`.

  xla         each network's own XLA path (the default; every backend): the
              U-Net's einsums with a float32 softmax, DiT's
              `jax.nn.dot_product_attention` (so for DiT, xla = auto today).
  auto        `jax.nn.dot_product_attention(implementation=None)`: JAX picks
              (jax 0.10 picks XLA everywhere; later versions may pick a fused
              kernel).
  cudnn       cuDNN's fused flash attention through
              `jax.nn.dot_product_attention(implementation="cudnn")`; NVIDIA
              GPUs only, float16/bfloat16 only.
  tpu_flash   the Pallas TPU flash-attention kernel
              (`jax.experimental.pallas.ops.tpu.flash_attention`); TPU only.

All take q, k, v as [B, T, N, H] (batch, tokens, heads, head dim) and scale
the logits by H^-1/2. Whether the backend has an implementation is checked
once, before anything is traced (`unavailable`), so a run asking for cudnn on
a CPU stops with one line instead of failing inside the compiled program.
"""

from typing import Optional

import jax
import jax.numpy as jnp

ATTENTIONS = ("xla", "auto", "cudnn", "tpu_flash")

# The backend (jax.default_backend()) each non-portable implementation needs.
_NEEDS = {"cudnn": "gpu", "tpu_flash": "tpu"}


def unavailable(attention: str, backend: str) -> Optional[str]:
  """Why `attention` cannot run on `backend`, or None when it can.

  Args:
    attention: a name in ATTENTIONS.
    backend: jax.default_backend() ("cpu" | "gpu" | "tpu").

  Returns:
    None, or one sentence naming what is missing.
  """
  if attention not in ATTENTIONS:
    return f"{attention!r} is unknown; use one of {ATTENTIONS}"
  need = _NEEDS.get(attention)
  if need and backend != need:
    return f"{attention} needs a {need.upper()} backend, this one is {backend}"
  if attention == "tpu_flash":
    try:
      from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
    except ImportError as e:   # a jax without the Pallas TPU ops
      return f"tpu_flash cannot be imported from this jax ({e})"
  return None


def _tpu_flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The Pallas TPU kernel; it wants [B, N, T, H] and blocks dividing T."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  t, h = q.shape[1], q.shape[-1]
  blk = min(128, t)
  sizes = fa.BlockSizes(
      block_q=blk, block_k_major=blk, block_k=blk, block_b=1,
      block_q_major_dkv=blk, block_k_major_dkv=blk, block_k_dkv=blk,
      block_q_dkv=blk, block_k_major_dq=blk, block_k_dq=blk, block_q_dq=blk)
  heads_first = lambda a: a.transpose(0, 2, 1, 3)
  out = fa.flash_attention(heads_first(q), heads_first(k), heads_first(v),
                           sm_scale=h ** -0.5, block_sizes=sizes)
  return heads_first(out)


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           attention: str) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v with a fused implementation.

  `attention="xla"` is not handled here: each network keeps its own XLA path
  (so its default program is unchanged); the other names are.

  Args:
    q, k, v: [B, T, N, H], one dtype (float32 or bfloat16).
    attention: "auto" | "cudnn" | "tpu_flash".

  Returns:
    [B, T, N, H] in q's dtype. The logits and softmax are float32 for every
    implementation (cuDNN and the Pallas kernel accumulate in float32).
  """
  if attention == "auto":
    return jax.nn.dot_product_attention(q, k, v, implementation=None)
  if attention == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  if attention == "tpu_flash":
    return _tpu_flash(q, k, v).astype(q.dtype)
  raise ValueError(f"attention={attention!r} has no fused implementation; use "
                   f"one of {ATTENTIONS[1:]}")


__all__ = ["ATTENTIONS", "attend", "unavailable"]
