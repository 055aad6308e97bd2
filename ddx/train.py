"""Training: a pure `train_step`, and the `train_and_evaluate` loop (the state: `ddx.state`).

`train_step(state, batch, base_rng) -> (state, metrics)` is a pure function of
its arguments; randomness is `fold_in(base_rng, state.step)`, so nothing about
it needs saving and a resumed run draws exactly what an uninterrupted one
would. It is jitted over a Mesh (`ddx.parallel`) with the batch split over
every device and the state replicated, or split over the "fsdp" axis when
training.fsdp > 1; XLA adds the gradient reduction and any all-gathers.
"""
from __future__ import annotations

import functools
import json
import signal
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from ddx import checkpoint as ckpt_lib
from ddx import config as config_lib
from ddx import data as data_lib
from ddx import eval_run
from ddx import evaluation
from ddx import latents
from ddx import logging as log_lib
from ddx import parallel
from ddx import posthoc_ema
from ddx import processes
from ddx import model as model_lib
from ddx import repa as repa_lib
from ddx.models import layers
from ddx.state import (TrainState, create_state, ema_decay, ema_variables,
                       init_opt_state, lr_schedule, make_optimizer)
from ddx import workdir as workdir_lib


def process_loss(apply_fn, params, process, x0, rng, config, **inputs):
  """The training loss of the run's process (`process.loss`, `ddx.processes`),
  with the network's auxiliary output. `apply_fn(params, x, time) -> (out, aux)`.
  A bare Schedule trains in config.diffusion.prediction. `inputs` holds every
  entry of `ddx.processes.base.LOSS_INPUTS`; the process gets those its
  Spec.loss_inputs names.
  """
  process = processes.as_process(process, config.diffusion.get("prediction"))
  extras = {k: inputs[k] for k in process.spec.loss_inputs}
  return process.loss(apply_fn, params, x0, rng, has_aux=True, **extras)


def teacher_denoiser(teacher: Optional[model_lib.Model], labels):
  """training.teacher's EMA network as EDM's denoiser D(y [B, ...], σ [B]) of
  y = x_0 + σ·n, whatever the teacher's process (`sigma_denoiser`), on the
  student's labels; None without a teacher."""
  if teacher is None:
    return None
  if teacher.config.model.num_classes <= 0:
    labels = None
  net = model_lib.denoiser(teacher, labels)
  return teacher.process.sigma_denoiser(net)


def train_step(state: TrainState, batch: dict, base_rng: jax.Array,
               teacher: Optional[model_lib.Model] = None, encoder=None, *, net,
               sched, tx: optax.GradientTransformation,
               config) -> tuple[TrainState, dict]:
  """One optimizer update on a global batch; pure.

  Args:
    state: the current TrainState.
    batch: {"image": [B, H, W, C] float32 in [-1, 1], "label": [B] int32}.
    base_rng: the run's base key; this step's key is fold_in(base_rng, step).
    teacher: training.teacher's model (EMA weights as jit arguments), or None.
    encoder: training.repa's frozen encoder (`ddx.repa.load_encoder`, params
      as jit arguments), or None (no REPA: the program is the same as without
      the argument). With it, the loss adds training.repa.weight times REPA's
      alignment loss of state.repa's projector (`ddx.repa`).
    net, sched, tx, config: static (bound with functools.partial before jit);
      sched is the process (`ddx.processes.Process`, or a bare Schedule, EDM
      or Flow).
  Returns:
    (new state, metrics): loss, grad_norm (before clipping), param_norm,
    update_norm, lr, ema_decay, mse_by_quartile [4], finite (bool); with
    REPA also repa_loss (-mean cosine) and repa_cos: "loss" stays the
    process's loss, the objective is loss + weight * repa_loss, and grad_norm
    is the norm of the network's and the projector's gradients together (what
    optim.grad_clip clips). A non-finite loss or gradient leaves params, EMAs,
    optimizer, BatchNorm statistics and projector untouched.
  """
  rng = jax.random.fold_in(base_rng, state.step)
  loss_rng, drop_rng, label_rng = jax.random.split(rng, 3)
  num_classes = config.model.num_classes
  labels = None
  if num_classes > 0:
    labels = batch["label"].astype(jnp.int32)
    p = config.training.label_dropout
    if p > 0:  # classifier-free guidance: train the null label too
      drop = jax.random.bernoulli(label_rng, p, labels.shape)
      labels = jnp.where(drop, num_classes, labels)

  use_repa = encoder is not None
  if use_repa:   # the frozen encoder's features of the clean images (no gradient)
    r = config.training.repa
    _, grid, _ = repa_lib.token_layout(config)
    target = repa_lib.encoder_targets(encoder, batch["image"], r.resolution, grid,
                                      r.get("spatial_norm", "none"),
                                      r.get("zscore_alpha", 1.0))
  mutable = ["batch_stats", "logvar"] + ([layers.HIDDEN] if use_repa else [])

  def loss_fn(params, projector=None):
    # BatchNorm normalises with this batch's statistics and returns updated
    # running ones; under jit over the Mesh the batch axis is the global one,
    # so they are global-batch statistics (XLA adds the cross-device sums).
    # For GroupNorm batch_stats is {} and stays {}.
    logvar = processes.as_process(sched, config.diffusion.get("prediction")).spec.logvar

    def apply(p, x, t, labels=labels):
      out, updates = net.apply({"params": p, "batch_stats": state.batch_stats}, x, t,
                               labels, train=True, rngs={"dropout": drop_rng},
                               mutable=mutable)
      out = model_lib.mean_output(config, out)
      if logvar:   # the head's value, sown by the network (layers.sow_logvar)
        out = (out, jax.tree.leaves(updates["logvar"])[0])
      stats = dict(updates).get("batch_stats", {})
      if use_repa:   # this call's tokens after block depth (layers.sow_hidden)
        stats = (stats, updates[layers.HIDDEN]["tokens"][r.depth - 1])
      return out, stats
    loss, aux = process_loss(apply, params, sched, batch["image"], loss_rng, config,
                             labels=labels, null_label=num_classes, step=state.step,
                             teacher=teacher_denoiser(teacher, labels))
    if not use_repa:
      return loss, aux
    # The process's aux is its network call on x_t (Spec.repa).
    stats, hidden = aux["aux"]
    repa_loss, cos = repa_lib.loss(config, projector, hidden, target)
    aux = {**aux, "aux": stats, "loss": loss, "repa_loss": repa_loss, "repa_cos": cos}
    return loss + r.weight * repa_loss, aux

  projector = state.repa
  if not use_repa:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
  else:
    (loss, aux), (grads, p_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.repa)
    grad_norm = optax.tree.norm((grads, p_grads))
    if config.optim.grad_clip > 0:
      # REPA clips the SiT and its projectors together: scale both by the
      # joint norm first, so each tx's own clip (of a part's norm) is a no-op.
      c = jnp.minimum(1.0, config.optim.grad_clip / jnp.maximum(grad_norm, 1e-30))
      grads, p_grads = jax.tree.map(lambda g: g * c.astype(g.dtype), (grads, p_grads))
    net_opt, p_opt = state.opt_state
    updates, net_opt = tx.update(grads, net_opt, state.params)
    p_updates, p_opt = tx.update(p_grads, p_opt, state.repa)
    opt_state = (net_opt, p_opt)
    projector = optax.apply_updates(state.repa, p_updates)
  params = optax.apply_updates(state.params, updates)
  n = state.step + 1
  decay = ema_decay(config.optim, n)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  posthoc = posthoc_ema.update(state.posthoc_ema, params, n, posthoc_ema.gammas_of(config))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(step=n, params=keep(params, state.params),
                         ema_params=keep(ema, state.ema_params),
                         opt_state=keep(opt_state, state.opt_state),
                         batch_stats=keep(dict(aux["aux"]), state.batch_stats),
                         posthoc_ema=keep(posthoc, state.posthoc_ema),
                         repa=keep(projector, state.repa))
  metrics = {
      "loss": aux["loss"] if use_repa else loss,
      "mse_by_quartile": aux["mse_by_quartile"],
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
      "lr": lr_schedule(config.optim)(state.step),
      "ema_decay": decay,
      "finite": finite,
  }
  if use_repa:
    metrics.update(repa_loss=aux["repa_loss"], repa_cos=aux["repa_cos"])
  return new_state, metrics


def train_steps(state: TrainState, batches: dict, base_rng: jax.Array,
                teacher: Optional[model_lib.Model] = None, encoder=None, *,
                unroll: bool = False, **static) -> tuple[TrainState, dict]:
  """k updates in one program: `train_step` scanned over batches [k, B, ...].

  The same updates as k calls of `train_step` (each step's key is
  fold_in(base_rng, step)); metrics come back stacked, [k, ...]. This is
  `training.steps_per_dispatch`, score_sde's n_jitted_steps. `unroll=True`
  writes the k steps out in full, which costs k times the compile time: the
  training loop does this on CPU, where XLA ran a rolled scan of the digits
  step 17x slower than single steps (BENCHMARKS.md, "Updates per call").
  """
  def body(s, batch):
    return train_step(s, batch, base_rng, teacher, encoder, **static)
  return jax.lax.scan(body, state, batches, unroll=unroll)


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss with nan_policy=stop)."""


def _check_resume(ck: ckpt_lib.Checkpointer, workdir: str, config, abstract) -> None:
  """Refuses, before anything is restored, a config that changes the state's structure.

  The newest checkpoint's saved leaves are compared with the state this config
  builds; if they differ, the error names every changed key that can change
  structure (model.*, optim.*, data.image_size/channels) with its old and new
  value. Post-hoc EMA profiles (training.posthoc_ema) turned on or off, or
  with other sigma_rels, are refused too: each follows the run from step 1.
  A checkpoint whose metadata does not read is left to `resume`, which sets
  it aside as unreadable.
  """
  steps = ck.steps()
  if not steps:
    return
  step = steps[-1]
  reset = config.training.reset_optimizer
  try:
    saved = ck.saved_shapes(step)
  except Exception:
    return
  if not any(k.split(".")[0] == "params" for k in saved):
    # A post-hoc EMA export or an import (ddx.convert): EMA weights only.
    raise config_lib.ConfigError(
        f"workdir {workdir} holds EMA weights only (step {step}: a post-hoc EMA export "
        "or an imported model), not a training state to resume; start a new run from "
        f"them with --config.training.init_from={workdir} and a new --workdir")
  ignore = ("opt_state",) if reset else ()
  detail = ckpt_lib.structure_difference(saved, abstract, ignore=ignore)
  try:
    old = ck.restore_config(step)
  except Exception:
    old = None
  rels = lambda c: (tuple(c.training.posthoc_ema.sigma_rels)
                    if c.training.posthoc_ema.snapshot_every else ())
  posthoc_changed = old is not None and rels(old) != rels(config)
  if detail is None and not posthoc_changed:
    return
  if posthoc_changed or ckpt_lib.structure_difference(
      saved, abstract, ignore=ignore + ("posthoc_ema",)) is None:
    raise config_lib.ConfigError(
        f"workdir {workdir} holds checkpoints (step {step}) that track the post-hoc "
        f"EMA profiles sigma_rels={rels(old) if old is not None else '?'}, not "
        f"{rels(config)}; a profile follows a run from its first step: rerun with the "
        "old training.posthoc_ema values or use a new --workdir")
  params_ok = ckpt_lib.structure_difference(saved, abstract, ignore=("opt_state",)) is None
  changes = config_lib.structure_changes(old, config) if old is not None else []
  named = (", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
           or f"no config key differs, but {detail}")
  ways = ("rerun with the old values, add --config.training.reset_optimizer=True to keep "
          "the weights and start a fresh optimizer state, or use a new --workdir"
          if params_ok else "rerun with the old values or use a new --workdir")
  raise config_lib.ConfigError(
      f"workdir {workdir} holds checkpoints (step {step}) of another "
      f"{'optimizer' if params_ok else 'model'} structure ({named}); {ways}")


def _keep_optimizer(ck: ckpt_lib.Checkpointer, config) -> bool:
  """With training.reset_optimizer, whether the newest checkpoint already has
  the fresh optimizer state (written by this reset run: resume it exactly)."""
  if not config.training.reset_optimizer:
    return True
  steps = ck.steps()
  try:
    old = ck.restore_config(steps[-1]) if steps else None
  except Exception:
    return False
  return bool(old is not None and old.training.reset_optimizer
              and config_lib.to_dict(old.optim) == config_lib.to_dict(config.optim))


def resolve_auto(config, workdir: Optional[str], source) -> ml_collections.ConfigDict:
  """The run config with its "auto" values made numbers, as config.json records them.

  diffusion.sigma_data = auto is measured on the training source
  (`ddx.data.value_std`); model.time_embedding and time_scale = auto become the
  process's (`ddx.config.time_embedding`). A value that the workdir's
  config.json already holds is kept instead, so a resumed run (and
  `ddx.load`) sees the numbers the run started with.

  Args:
    config: the validated run config (not changed).
    workdir: the run's directory; its config.json may not exist yet. None:
      measure afresh (a run with no checkpoint yet: an earlier start's
      config.json is not kept, so a corrected rerun gets its own values).
    source: the training source (`ddx.latents.run_source`).
  Returns:
    a new ConfigDict without "auto" in those keys.
  """
  d = config_lib.to_dict(config)
  saved = None
  if workdir is not None:
    path = epath.Path(workdir) / "config.json"
    if path.exists():
      saved = config_lib.to_dict(config_lib.with_defaults(json.loads(path.read_text())))

  def pick(group: str, key: str, fresh: Callable[[], Any]) -> None:
    if d[group].get(key, "auto") != "auto":
      return
    old = saved[group][key] if saved is not None else "auto"
    d[group][key] = old if old != "auto" else fresh()

  pick("diffusion", "sigma_data", lambda: data_lib.value_std(source))
  pick("model", "time_embedding",
       lambda: config_lib.time_embedding(config_lib.from_dict(d))[0])
  pick("model", "time_scale", lambda: config_lib.time_embedding(config_lib.from_dict(d))[1])
  if config.diffusion.get("sigma_data") == "auto":
    logging.info("diffusion.sigma_data=auto: %.6f (written to config.json)",
                 d["diffusion"]["sigma_data"])
  return config_lib.from_dict(d)


class TrainSetup(NamedTuple):
  """Everything compiled or derived once for a config on a mesh (see `make_setup`)."""
  mesh: Any
  net: Any
  sched: Any
  tx: optax.GradientTransformation
  abstract: Any          # TrainState of ShapeDtypeStructs with shardings
  state_sharding: Any
  init: Callable         # init(rng) -> sharded TrainState
  step: Callable         # step(state, global batch, rng) -> (state, metrics), donates state
  steps: Callable        # steps(state, [k, B, ...] batches, rng): k updates per call
  teacher: Any = None    # training.teacher's Model (replicated), or None
  teacher_step: Optional[int] = None   # the teacher checkpoint's step
  encoder: Any = None    # training.repa's frozen encoder (replicated), or None


class _WithTeacher:
  """A jitted update f(state, batch, rng, teacher[, encoder]) called as
  f(state, batch, rng): the teacher's weights (and REPA's encoder's, when
  set) go in as arguments on every call (never baked in)."""

  def __init__(self, fn, teacher, encoder=None):
    self.fn = fn
    self.frozen = (teacher,) if encoder is None else (teacher, encoder)

  def __call__(self, state, batch, rng):
    return self.fn(state, batch, rng, *self.frozen)

  def lower(self, state, batch, rng):
    return self.fn.lower(state, batch, rng, *self.frozen)


def load_teacher(config, mesh) -> tuple[Optional[int], Optional[model_lib.Model]]:
  """(step, model): training.teacher's newest readable checkpoint's step and EMA
  model, replicated over `mesh`; (None, None) when unset.

  Raises:
    config_lib.ConfigError: the teacher is not a finished ddx run, or its
      image shape or classes differ from this run's (one line).
  """
  path = config.training.get("teacher", "")
  if not path:
    return None, None
  step, teacher = ckpt_lib.load_run(
      "training.teacher", path, config_lib.image_shape(config), config.model.num_classes,
      "distil from a teacher trained on the same data and classes")
  return step, parallel.replicate(teacher.replace(autoencoder=None), mesh)


def make_setup(config, mesh) -> TrainSetup:
  """The network, optimizer, state shardings and jitted init/step for `config` on `mesh`.

  The state is created already sharded (replicated, or split over "fsdp"):
  its shardings come from its abstract shapes. Tests and benchmarks build
  their steps with this too, so they measure what training runs.
  """
  # training.remat only matters under differentiation: sampling builds the plain net.
  net = model_lib.network(config).clone(remat=config.training.remat)
  sched = model_lib.process_from_config(config.diffusion)
  tx = make_optimizer(config.optim)
  encoder = repa_lib.load_encoder(config, mesh)   # training.repa's, or None
  init = functools.partial(create_state, config, tx, encoder_width=(
      encoder.config.hidden_size if encoder is not None else 0))
  shapes = jax.eval_shape(init, jax.random.key(0))
  state_sharding = parallel.state_sharding(shapes, mesh)
  # Init runs once: compile it without backend optimisation (XLA:CPU spent
  # ~14 s optimising the threefry-heavy init of even a small U-Net).
  init_fn = jax.jit(init, out_shardings=state_sharding,
                    compiler_options={"xla_backend_optimization_level": 0})
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, state_sharding)
  repl = parallel.replicated(mesh)
  teacher_step, teacher = load_teacher(config, mesh)
  static = dict(net=net, sched=sched, tx=tx, config=config)
  frozen = (repl, repl) if encoder is not None else (repl,)   # teacher[, encoder]
  step_fn = jax.jit(
      functools.partial(train_step, **static),
      in_shardings=(state_sharding, parallel.data_sharded(mesh), repl) + frozen,
      out_shardings=(state_sharding, repl), donate_argnums=(0,))
  # steps_per_dispatch > 1: k updates per call (compiled once per k it sees:
  # k, and a shorter call to reach the grid after an off-grid resume or at the end).
  # Rolled on accelerators; unrolled on CPU (see train_steps).
  multi_fn = jax.jit(
      functools.partial(train_steps, unroll=mesh.devices.flat[0].platform == "cpu",
                        **static),
      in_shardings=(state_sharding, NamedSharding(mesh, P(None, parallel.BATCH_AXES)),
                    repl) + frozen,
      out_shardings=(state_sharding, repl), donate_argnums=(0,))
  return TrainSetup(mesh, net, sched, tx, abstract, state_sharding, init_fn,
                    _WithTeacher(step_fn, teacher, encoder),
                    _WithTeacher(multi_fn, teacher, encoder), teacher, teacher_step, encoder)


def step_flops(step_fn, state, batch, rng) -> float:
  """FLOPs of one jitted update on the global batch, from XLA's cost analysis of
  the program (0.0 where the backend gives none). Logged as flops_per_image and
  tflops_per_sec: divide by your chip's peak for the model FLOPs utilisation.

  The lowered program's analysis costs no compile; where the backend gives none
  before compiling (jax 0.11's GPU backend), the compiled program's is used
  (a second compile, served by the persistent cache `ddx.main` turns on)."""
  def flops(cost) -> float:
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))
  try:
    lowered = step_fn.lower(state, batch, rng)
    return flops(lowered.cost_analysis()) or flops(lowered.compile().cost_analysis())
  except Exception:   # a backend without cost analysis: no MFU, training goes on
    return 0.0


def restore_or_init(setup: TrainSetup, ck: ckpt_lib.Checkpointer, config,
                    rng: jax.Array, source: Optional[model_lib.Model] = None) -> TrainState:
  """The newest checkpoint's state (optimizer reset if asked), or a fresh one
  (started from `source`, training.init_from's checked model, if given)."""
  keep = _keep_optimizer(ck, config)
  restored, step = ck.resume(setup.abstract, keep_optimizer=keep)
  if restored is None:
    logging.info("initialised a new run")
    return init_from(setup.init(rng), config, source)
  if keep:
    logging.info("resumed from the checkpoint at step %d", step)
    return restored
  logging.warning("reset_optimizer: resuming params, EMA and batch stats from step %d "
                  "with a fresh optimizer state", step)
  opt_init = jax.jit(functools.partial(init_opt_state, setup.tx),
                     out_shardings=setup.state_sharding.opt_state)
  return TrainState(opt_state=opt_init(restored["params"], restored["repa"]), **restored)


def load_init_from(config, abstract) -> Optional[model_lib.Model]:
  """training.init_from's model, checked against the state this config builds;
  None when the key is "". Only reads: training calls it before writing
  anything, so a bad source leaves the workdir as it was.

  Args:
    abstract: the TrainState (ShapeDtypeStructs, e.g. `TrainSetup.abstract`,
      or arrays) whose params and batch_stats the source must fit.
  Raises:
    config_lib.ConfigError: the source is not a finished run, has another
      image shape or classes, or a parameter this network lacks or has in
      another shape (one line).
  """
  path = config.training.get("init_from", "")
  if not path:
    return None
  where = f"training.init_from={path!r}"
  _, source = ckpt_lib.load_run("training.init_from", path, config_lib.image_shape(config),
                                config.model.num_classes, "start from a run on the same data")

  def check(mine: dict, theirs: dict, group: str) -> None:
    dst = flax.traverse_util.flatten_dict(dict(mine), sep="/")
    src = flax.traverse_util.flatten_dict(dict(theirs), sep="/")
    extra = sorted(set(src) - set(dst))
    if extra:
      raise config_lib.ConfigError(
          f"{where} has {group} {extra[0]} that this network lacks (another backbone "
          "or size): start from a run of the same model.* settings")
    for k in sorted(set(dst) & set(src)):
      if tuple(np.shape(src[k])) != tuple(dst[k].shape):
        raise config_lib.ConfigError(
            f"{where}: {group} {k} has shape {tuple(np.shape(src[k]))}, this network "
            f"{tuple(dst[k].shape)}; start from a run of the same model.* settings")

  check(abstract.params, source.variables["params"], "parameter")
  if abstract.batch_stats:
    check(abstract.batch_stats, source.variables.get("batch_stats", {}), "batch_stats")
  return source


def init_from(state: TrainState, config,
              source: Optional[model_lib.Model] = None) -> TrainState:
  """A fresh state started from training.init_from's EMA weights (as params, EMA
  and every post-hoc EMA profile; BatchNorm statistics too); unchanged when
  the key is "". Parameters the source lacks (e.g. a second time's embedding,
  zero-initialised) keep their initialisation; the optimizer starts fresh.

  Args:
    source: `load_init_from(config, ...)`'s model, if already loaded.
  Raises:
    config_lib.ConfigError: as `load_init_from`.
  """
  path = config.training.get("init_from", "")
  if not path:
    return state
  where = f"training.init_from={path!r}"
  if source is None:
    source = load_init_from(config, state)

  def merge(mine: dict, theirs: dict, group: str) -> dict:
    dst = flax.traverse_util.flatten_dict(mine, sep="/")
    src = flax.traverse_util.flatten_dict(dict(theirs), sep="/")
    out = {}
    for k, x in dst.items():
      if k not in src:
        out[k] = x
        continue
      host = np.asarray(src[k], x.dtype)   # shapes checked by load_init_from
      out[k] = jax.make_array_from_callback(x.shape, x.sharding, lambda i, h=host: h[i])
    fresh = sorted(set(dst) - set(src))
    if fresh:
      logging.info("%s: %d %s tensors initialised fresh (the source lacks them): %s",
                   where, len(fresh), group, ", ".join(fresh))
    return flax.traverse_util.unflatten_dict(out, sep="/")

  params = merge(state.params, source.variables["params"], "parameter")
  stats = (merge(state.batch_stats, source.variables.get("batch_stats", {}), "batch_stats")
           if state.batch_stats else state.batch_stats)
  copy = lambda: jax.tree.map(jnp.copy, params)
  logging.info("%s: started from its EMA weights", where)
  return state.replace(params=params, ema_params=copy(), batch_stats=stats,
                       posthoc_ema=tuple(copy() for _ in state.posthoc_ema))


class _Preemption:
  """Says when to stop for SIGTERM (preemption), the same step on every host.

  One process: a SIGTERM handler sets a flag, checked before each step.
  Several processes (TPU pods, clusters): JAX's preemption sync point, which
  makes all hosts agree on the step at which to save and stop.
  """

  def __init__(self):
    self._signal = None
    self._old = None
    self._multi = jax.process_count() > 1
    if not self._multi:
      try:
        self._old = signal.signal(signal.SIGTERM, self._on_term)
      except ValueError:  # not the main thread (e.g. a notebook worker)
        self._old = None

  def _on_term(self, signum, frame):
    del frame
    self._signal = signum

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption service (e.g. not started by jax.distributed)
        return False
    return self._signal is not None

  def close(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


def save_samples(model: model_lib.Model, rng: jax.Array, path: str,
                 writer: log_lib.MetricWriter | None = None, step: int = 0):
  """Samples a grid with the model's sampling config (and its sampling.guide_workdir,
  autoguidance) and writes it as PNG."""
  images = model_lib.sample_fn(model, rng, guide_model=eval_run.load_guide(model))
  u8 = model_lib.to_uint8(images)
  grid = evaluation.save_grid(u8, path)
  if writer is not None:
    writer.write_image(step, "samples", grid)
  return u8


def _teacher_path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "teacher.json"


def teacher_record(config, setup: TrainSetup) -> Optional[dict]:
  """What identifies training.teacher's weights: {"teacher": path, "step",
  "weights": a digest of its EMA weights}; None without a teacher. A
  distillation writes it to workdir/teacher.json at its first start."""
  if setup.teacher is None:
    return None
  return {"teacher": config.training.teacher, "step": setup.teacher_step,
          "weights": eval_run.model_fingerprint(setup.teacher)}


def check_teacher(workdir: str, record: Optional[dict]) -> None:
  """Refuses to resume a distillation whose teacher's weights have changed since
  its first start (teacher.json): the student would follow another teacher.

  Raises:
    config_lib.ConfigError: one line naming both steps.
  """
  path = _teacher_path(workdir)
  first = None if record is None else workdir_lib.read_record(path)
  if first is None or first.get("weights") == record["weights"]:
    return
  raise config_lib.ConfigError(
      f"training.teacher is now the teacher's checkpoint at step {record['step']}, but "
      f"the run in {workdir} started distilling from its step {first.get('step')} "
      f"(other weights, {path}); point training.teacher at a copy that does not "
      "change (the teacher as it was, or a post-hoc EMA export), or use a new --workdir")


def _check_guide(config, abstract) -> None:
  """sampling.guide_workdir loads and can guide this run (before anything is
  written, not at the first sample grid)."""
  if not config.sampling.get("guide_workdir", ""):
    return
  model = model_lib.Model({"params": abstract.params}, config_lib.freeze(config))
  eval_run.load_guide(model)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the run in `workdir`; returns the final TrainState.

  Validates the config first, resumes from the newest readable checkpoint,
  logs every training.log_every steps, checkpoints every checkpoint_every and
  at the end, and writes EMA sample grids every sample_every and at the end.
  Every eval.every_steps it logs eval.metrics of the EMA model (eval/* in
  metrics.jsonl and TensorBoard; ddx/eval_run.py).
  SIGTERM (preemption) saves a checkpoint at the current step and returns.

  Every input is checked before anything is written (`ddx.workdir`'s folder
  rules, the config, a resumed run's structure, training.init_from,
  training.teacher, training.repa.encoder and sampling.guide_workdir); then process 0 takes the
  workdir's lock (`ddx.workdir.lock`), held until this returns.
  Raises:
    config_lib.ConfigError: bad input, one line; `ddx.workdir.WorkdirError`
      for a folder that is not ddx's or that another trainer holds.
  """
  config_lib.validate(config, jax.device_count())
  workdir_lib.check_trainable(workdir)   # before config.json is even read
  if jax.device_count() % config.training.fsdp:
    raise config_lib.ConfigError(
        f"training.fsdp={config.training.fsdp} does not divide the {jax.device_count()} "
        "devices; use a divisor of the device count (1 = replicated params)")
  mesh = parallel.make_mesh(config.training.fsdp)
  source = latents.run_source(config)
  autoencoder = model_lib.load_autoencoder(config)   # decodes a latent model's samples
  if config.model.num_classes and not source.num_classes:
    raise config_lib.ConfigError(
        f"model.num_classes={config.model.num_classes} but data.name="
        f"{config.data.name!r} has no labels; set --config.model.num_classes=0")
  if config.model.num_classes and source.num_classes > config.model.num_classes:
    raise config_lib.ConfigError(
        f"model.num_classes={config.model.num_classes} is smaller than the dataset's "
        f"{source.num_classes} classes; set --config.model.num_classes={source.num_classes}")
  is_main = jax.process_index() == 0
  # Nothing is written before these checks.
  reader = (ckpt_lib.Checkpointer(workdir, read_only=True)
            if ckpt_lib.has_checkpoints(workdir) else None)
  steps = reader.steps() if reader is not None else []
  # config.json keeps the numbers of a run that has checkpoints.
  config = resolve_auto(config, workdir if steps else None, source)
  setup = make_setup(config, mesh)   # loads and checks training.teacher
  if steps:
    _check_resume(reader, workdir, config, setup.abstract)
  if config.training.posthoc_ema.snapshot_every:
    posthoc_ema.check_resume(workdir, config)
  source_model = None
  if not steps:
    source_model = load_init_from(config, setup.abstract)
  elif config.training.get("init_from", ""):
    path = config.training.init_from
    exists = epath.Path(path).exists()
    (logging.info if exists else logging.warning)(
        "training.init_from=%r%s is ignored: the run resumes from its own checkpoint "
        "(step %d)", path, "" if exists else " (which does not exist)", steps[-1])
  teacher = teacher_record(config, setup)
  encoder = repa_lib.record(config, setup.encoder)
  if steps:
    check_teacher(workdir, teacher)
    repa_lib.check_record(workdir, encoder)
  _check_guide(config, setup.abstract)

  lock, busy = None, None
  if is_main:   # the hosts of one job are one run: process 0 holds the lock
    try:
      lock = workdir_lib.lock(workdir)
    except workdir_lib.WorkdirError as e:
      busy = e
  if not ckpt_lib.all_processes_agree(busy is None):
    raise busy or workdir_lib.WorkdirError(
        f"workdir {workdir} is in use by another ddx process (process 0 could not "
        "lock it); wait for it to finish or stop it, or use another --workdir")
  try:
    if is_main:
      workdir_lib.mark(workdir)
      if teacher is not None and not (steps and _teacher_path(workdir).exists()):
        _teacher_path(workdir).write_text(json.dumps(teacher, indent=2) + "\n")
      if not steps:   # a run's first start records its REPA encoder (repa.json)
        repa_lib.write_record(workdir, encoder)
      config_lib.write_json(config, workdir)
    return _train(config, workdir, setup, source, autoencoder, mesh, source_model)
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir: str, setup: TrainSetup, source, autoencoder, mesh,
           source_model) -> TrainState:
  """The loop of `train_and_evaluate`, once every input is checked and the
  workdir is held."""
  is_main = jax.process_index() == 0
  ck = ckpt_lib.Checkpointer(workdir, keep=config.training.keep_checkpoints)
  base = jax.random.key(config.training.seed)
  init_rng, train_rng, sample_rng = (jax.random.fold_in(base, i) for i in range(3))
  state = restore_or_init(setup, ck, config, init_rng, source_model)
  step = int(state.step)
  step_fn, multi_fn = setup.step, setup.steps
  snapshots = (posthoc_ema.SnapshotWriter(workdir, config, step, state)
               if config.training.posthoc_ema.snapshot_every else None)

  frozen = config_lib.freeze(config)
  t = config.training
  writer = log_lib.MetricWriter(workdir, active=is_main)
  progress = log_lib.Progress(step, t.num_steps, active=is_main)
  samples_dir = epath.Path(workdir) / "samples"
  if is_main:
    samples_dir.mkdir(parents=True, exist_ok=True)
  # Sample-quality metrics every eval.every_steps (set up at the first one).
  evaluator = eval_run.Evaluator(config, workdir) if config.eval.every_steps else None

  preemption = _Preemption()
  loader = data_lib.Loader(
      source, step, batch_size=t.batch_size, seed=t.seed,
      random_flip=config.data.random_flip, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.data.num_workers)
  flops_per_step = None  # XLA's count for one update on the global batch (MFU logging)
  pending = []          # per-step device metrics since the last log (no host sync per step)
  last_log_time, last_log_step = time.perf_counter(), step
  first_logged = False
  try:
    while step < t.num_steps and not preemption.reached(step):
      k = t.steps_per_dispatch
      n = min(k - step % k, t.num_steps - step)   # back on the grid of k after a resume
      if n == 1:
        _, local = next(loader)
        batch = parallel.global_batch(local, mesh)
        if flops_per_step is None:
          flops_per_step = step_flops(step_fn, state, batch, train_rng)
        state, metrics = step_fn(state, batch, train_rng)
        pending.append((False, metrics))
      else:
        batches = parallel.stacked_global_batch([next(loader)[1] for _ in range(n)], mesh)
        state, metrics = multi_fn(state, batches, train_rng)
        pending.append((True, metrics))   # stacked over the n steps
      step += n
      done = step == t.num_steps
      if step % t.log_every == 0 or done:
        fetched = []   # one dict per step
        for stacked, m in jax.device_get(pending):
          fetched += ([jax.tree.map(lambda x, j=j: x[j], m) for j in range(len(m["loss"]))]
                      if stacked else [m])
        pending = []
        bad = [step - len(fetched) + j + 1 for j, m in enumerate(fetched) if not m["finite"]]
        if bad and t.nan_policy == "stop":
          raise TrainingError(
              f"non-finite loss or gradient at step {bad[0]} (update skipped; "
              f"parameters stay finite); last checkpoint: {ck.latest_step()}. "
              "Lower optim.lr, check the data, or set training.nan_policy=skip")
        now = time.perf_counter()
        mean = {k: np.mean([m[k] for m in fetched], axis=0) for k in fetched[0]}
        steps_per_sec = (step - last_log_step) / (now - last_log_time)
        mean["images_per_sec"] = steps_per_sec * t.batch_size
        if flops_per_step:    # model FLOPs (forward + backward) and the rate achieved
          mean["flops_per_image"] = flops_per_step / t.batch_size
          mean["tflops_per_sec"] = flops_per_step * steps_per_sec / 1e12
        mean["nonfinite_steps"] = len(bad)
        mean["data_skipped"] = loader.skipped   # unreadable images replaced so far
        del mean["finite"]
        writer.write(step, mean)
        progress.report(step, mean)
        if not first_logged:  # rate after compile, not including it
          progress.reset(step)
          first_logged = True
        last_log_time, last_log_step = now, step
      if t.checkpoint_every and step % t.checkpoint_every == 0 or done:
        ck.save(step, state, config)
      if snapshots and snapshots.due(step):
        snapshots.save(step, state)
      if t.sample_every and (step % t.sample_every == 0 or done):
        model = model_lib.Model(ema_variables(state), frozen, autoencoder)
        save_samples(model, jax.random.fold_in(sample_rng, step),
                     samples_dir / f"step_{step:07d}.png" if is_main else None,
                     writer, step)
      if evaluator and step % config.eval.every_steps == 0:
        evaluator(model_lib.Model(ema_variables(state), frozen, autoencoder), step, writer)
    if step < t.num_steps:  # preempted
      logging.warning("preempted: saving a checkpoint at step %d and stopping", step)
      ck.save(step, state, config)
  finally:
    loader.close()
    writer.close()
    preemption.close()
    try:
      if snapshots:
        snapshots.close()   # waits for the last snapshot; may raise CheckpointWriteError
    finally:
      ck.close()   # last: waits for the final save and may raise CheckpointWriteError
  return state
