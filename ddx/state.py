"""The training state and what builds it: `TrainState`, the optimizer, the EMA.

`create_state(config, tx, rng)` is what training starts from, and what
`ddx.convert` builds abstractly (`jax.eval_shape`) to write an imported
model as a workdir that trains on; neither needs the training loop
(`ddx.train`).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddx import model as model_lib
from ddx import posthoc_ema
from ddx import repa


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray      # int32 scalar: number of updates taken
  params: Any
  ema_params: Any
  opt_state: Any
  # BatchNorm's running statistics (model.norm = batch), {} for GroupNorm.
  # Not averaged: sampling uses them with ema_params (see `ema_variables`).
  batch_stats: Any = flax.struct.field(default_factory=dict)
  # training.posthoc_ema: one power-function EMA of params per sigma_rel
  # (`ddx.posthoc_ema`), () when off.
  posthoc_ema: Any = ()
  # training.repa: the projector's params (`ddx.repa`), optimised with params
  # (opt_state is then (network's, projector's)), in no EMA; () when off, so a
  # run without REPA keeps the layout of older checkpoints.
  repa: Any = ()


def ema_variables(state: TrainState) -> dict:
  """The Flax variables to sample with: EMA weights (+ running BatchNorm stats).

  BatchNorm's running statistics are already an exponential average (over
  about the last 10 batches), taken with the training weights; they are used
  as they are with the EMA weights rather than kept as a second EMA.
  """
  variables = {"params": state.ema_params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def lr_schedule(optim: ml_collections.ConfigDict):
  """DDPM's schedule: linear warm-up to optim.lr over warmup_steps, then constant.

  Update n (counting from 0) uses lr · min(1, (n + 1) / warmup_steps), so the
  first update is not wasted at lr = 0.
  """
  lr, warmup = float(optim.lr), int(optim.warmup_steps)
  if warmup <= 0:
    return lambda count: jnp.asarray(lr, jnp.float32)
  return lambda count: lr * jnp.minimum(1.0, (count + 1) / warmup)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(W) with the warm-up schedule and optional global-norm clipping."""
  sched = lr_schedule(optim)
  if optim.weight_decay > 0:
    opt = optax.adamw(sched, b1=optim.beta1, b2=optim.beta2, eps=optim.eps,
                      weight_decay=optim.weight_decay)
  else:
    opt = optax.adam(sched, b1=optim.beta1, b2=optim.beta2, eps=optim.eps)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
  return opt


def ema_decay(optim: ml_collections.ConfigDict, n: jnp.ndarray) -> jnp.ndarray:
  """EMA decay after update n: min(decay, (1+n)/(10+n)) with warm-up, else decay.

  Without warm-up an EMA at 0.999 still holds ~13% of the random initial
  weights after 2,000 steps; the warm-up lets short runs sample well.
  """
  d = jnp.asarray(optim.ema_decay, jnp.float32)
  if optim.ema_warmup:
    n = n.astype(jnp.float32)
    d = jnp.minimum(d, (1.0 + n) / (10.0 + n))
  return d


def init_opt_state(tx: optax.GradientTransformation, params: Any, projector: Any = ()) -> Any:
  """The optimizer state of params, or (params', projector's) with REPA's projector."""
  if not jax.tree.leaves(projector):
    return tx.init(params)
  return (tx.init(params), tx.init(projector))


def create_state(config, tx: optax.GradientTransformation, rng: jax.Array,
                 encoder_width: int = 0) -> TrainState:
  """A fresh TrainState: initialised network, its copy as EMA (and as each
  post-hoc EMA profile, which update 1 replaces), optimizer state; with
  encoder_width > 0 (training.repa's encoder's token width) REPA's projector
  too (`ddx.repa.init_projector`)."""
  variables = model_lib.init_variables(config, rng)
  params = variables["params"]
  projector = repa.init_projector(config, encoder_width, rng) if encoder_width else ()
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=init_opt_state(tx, params, projector),
                    batch_stats=dict(variables.get("batch_stats", {})),
                    posthoc_ema=tuple(jax.tree.map(jnp.copy, params)
                                      for _ in posthoc_ema.gammas_of(config)),
                    repa=projector)
