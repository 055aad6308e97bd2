"""Post-hoc EMA (EDM2, Karras et al. 2024, arXiv 2312.02696, Sec. 3 and App. C).

Training tracks a few power-function EMAs of the weights and saves them
every `training.posthoc_ema.snapshot_every` steps to `workdir/posthoc_ema/`;
after training, the EMA of any width is a linear combination of those
snapshots (least squares over the averaging profiles), written as a workdir
that `ddx.load`, `--mode sample` and `--mode eval` read:

  python -m ddx.posthoc_ema --workdir runs/digits --sigma_rel 0.08 --out runs/digits_ema08

The math, with time t in training steps (update n happens at t = n):
- The power-function profile of exponent gamma at time t weights the
  parameters of time tau by p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)
  on (0, t]. It is tracked by an EMA with beta(t) = (1 - 1/t)^(gamma + 1),
  which weights update s exactly by the profile's mass on (s - 1, s].
- Its width relative to t, sigma_rel = std(tau) / t, is
  sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
- The inner product of two profiles has a closed form (`profile_dot`);
  the snapshot weights x solve min || sum_i x_i p_i - p_target || (EDM2
  App. C.2, Alg. 3) and are then divided by their sum, as EDM2's
  `solve_posthoc_coefficients` does: every profile has mass 1, so weights
  summing to 1 reconstruct a constant parameter as that constant. Then
  sum_i x_i snapshot_i is the target profile's EMA up to the residual of
  that fit; a fit too far off (MAX_RELATIVE_RESIDUAL) is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddx import checkpoint as ckpt_lib
from ddx import config as config_lib
from ddx import model as model_lib
from ddx import outdir

SNAPSHOT_DIR = "posthoc_ema"   # workdir/posthoc_ema/<step>/: the snapshots (orbax)

# The relative residual ||sum_i x_i p_i - p|| / ||p|| above which a
# reconstruction is refused. 0.5 is about how far the profile of half or
# twice the target's width is from it (0.47 to 0.89 for widths 0.025 to
# 0.2): past it the fit is no longer the asked width in any useful sense.
# Fits within the tracked widths' reach are far below it (0.005 for 0.08
# from 0.05/0.10 with 12 snapshot steps, 0.11 for 0.25); sigma_rel 1e-6,
# far narrower than any snapshot, gives ~1.0.
MAX_RELATIVE_RESIDUAL = 0.5


# --------------------------------------------------------------------------
# The math (NumPy, float64), and the per-step update the trainer jits.


def gamma_to_sigma_rel(gamma) -> np.ndarray:
  """The relative width std(tau) / t of the power-function profile of exponent gamma."""
  g = np.asarray(gamma, np.float64)
  return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The exponent gamma >= 0 whose profile has relative width sigma_rel.

  sigma_rel^-2 = (gamma + 2)^2 (gamma + 3) / (gamma + 1) is the cubic
  gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2;
  its largest real root is the one with gamma >= 0.

  Raises:
    ValueError: sigma_rel outside (0, config.MAX_SIGMA_REL] (gamma >= 0).
  """
  problem = config_lib.sigma_rel_problem(sigma_rel)
  if problem:
    raise ValueError(f"sigma_rel={problem}")
  s = float(sigma_rel) ** -2
  roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
  return max(0.0, float(roots[np.abs(roots.imag) < 1e-6 * (1 + np.abs(roots))].real.max()))


def ema_weight(gamma: float, n) -> jnp.ndarray:
  """1 - beta(n) = 1 - (1 - 1/n)^(gamma + 1): the new parameters' weight at update n.

  Computed as -expm1((gamma + 1) log1p(-1/n)), which keeps its relative
  precision in float32 where 1 - 1/n rounds (n ~ 1e6: 1 - beta ~ 1e-5).

  Args:
    gamma: the profile's exponent (a Python float).
    n: the update count, >= 1 (int32 scalar); update 1 has weight 1.
  Returns:
    float32 scalar in (0, 1].
  """
  n = jnp.asarray(n, jnp.float32)
  return -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / n))


def update(emas: tuple, params: Any, n, gammas: Sequence[float]) -> tuple:
  """The tracked profiles after update n: e + (1 - beta_gamma(n)) (params - e), per gamma.

  Args:
    emas: one parameter pytree per profile (as `params`).
    params: the parameters after update n.
    n: the update count, >= 1.
    gammas: the profiles' exponents (Python floats), one per tree in emas.
  """
  out = []
  for tree, gamma in zip(emas, gammas):
    w = ema_weight(gamma, n)
    out.append(jax.tree.map(lambda e, p, w=w: e + w * (p - e), tree, params))
  return tuple(out)


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
  """The inner product over tau of the profiles (t_a, gamma_a) and (t_b, gamma_b).

  int_0^min(t_a, t_b) p_a(tau) p_b(tau) dtau
    = (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (t_lo / t_hi)^g_hi / t_hi,
  where t_hi is the later time and g_hi its exponent (written with the
  ratio so that large exponents do not overflow). Broadcasts; float64.
  """
  t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
  t_hi, t_lo = np.maximum(t_a, t_b), np.minimum(t_a, t_b)
  g_hi = np.where(t_a >= t_b, g_a, g_b)
  return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (t_lo / t_hi) ** g_hi / t_hi


def solve_weights(steps, gammas, step, gamma) -> tuple[np.ndarray, float]:
  """Weights of snapshots that make the profile (step, gamma), summing to 1.

  The least-squares solution, divided by its sum (EDM2's
  `solve_posthoc_coefficients`). Every profile integrates to 1, so the
  reconstruction of a parameter that never changed is that constant times
  sum_i x_i: only weights summing to 1 give the constant back. The
  least-squares sum alone falls short where the snapshots cannot make the
  target (0.97 for sigma_rel 0.25 from 12 snapshot steps of 0.05/0.10, 0.19
  at 1e-6 from 2), and every parameter would be scaled by it.

  Args:
    steps: [K] the snapshots' times (training steps).
    gammas: [K] the snapshots' profile exponents.
    step, gamma: the target profile's time and exponent.
  Returns:
    (x [K] float64 with sum 1, relative residual ||sum_i x_i p_i - p|| / ||p||
    of these weights).
  """
  steps, gammas = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
  gram = profile_dot(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
  rhs = profile_dot(steps, gammas, step, gamma)
  x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
  x = x / x.sum()
  target = float(profile_dot(step, gamma, step, gamma))
  sq = max(float(x @ gram @ x - 2 * x @ rhs + target), 0.0)
  return x, float(np.sqrt(sq / target))


# --------------------------------------------------------------------------
# Snapshots in a workdir.


def gammas_of(config) -> tuple[float, ...]:
  """The tracked profiles' exponents; () when post-hoc EMA is off."""
  p = config.training.posthoc_ema
  if not p.snapshot_every:
    return ()
  return tuple(sigma_rel_to_gamma(float(r)) for r in p.sigma_rels)


def snapshots(workdir, **kw) -> ckpt_lib.Checkpointer:
  """The snapshot store of a run: an orbax manager over workdir/posthoc_ema/ that
  keeps every step. Its `state` item is {"emas": one parameter tree per
  profile, "batch_stats": BatchNorm's running statistics}, its `config` the
  run's config (which names the profiles). orbax writes a step under a
  temporary name and renames it when complete."""
  return ckpt_lib.Checkpointer(workdir, keep=None, name=SNAPSHOT_DIR, **kw)


class SnapshotWriter:
  """Saves the tracked profiles at every multiple of snapshot_every steps.

  Only there (not at the last or a preempted step): a run resumed, or extended
  to more steps, then holds exactly the snapshots of an uninterrupted run.
  A resumed run recomputes the steps after its checkpoint, so the snapshots
  after that step are removed when it starts and written again (bit for bit
  the same after a kill; from the new trajectory if a setting such as optim.lr
  changed), and the snapshot due at the resumed step is written if a kill came
  between its checkpoint and its snapshot.
  """

  def __init__(self, workdir, config, step: int, state):
    self.every = config.training.posthoc_ema.snapshot_every
    self.config = config
    self.store = snapshots(workdir)
    later = [s for s in self.store.steps() if s > step]
    for s in later:
      self.store.delete(s)
    if self.due(step) and step not in self.store.steps():
      self.save(step, state)

  def due(self, step: int) -> bool:
    return step > 0 and step % self.every == 0

  def save(self, step: int, state) -> None:
    """Starts saving state's profiles at step (asynchronous)."""
    self.store.save(step, {"emas": state.posthoc_ema, "batch_stats": state.batch_stats},
                    self.config)

  def close(self) -> None:
    self.store.close()


def check_resume(workdir, config) -> None:
  """Refuses to go on with profiles other than those the run's snapshots track.

  Raises:
    ConfigError: workdir/posthoc_ema holds snapshots of other sigma_rels.
  """
  if not ckpt_lib.checkpoint_dir(workdir, SNAPSHOT_DIR).is_dir():
    return
  store = snapshots(workdir, read_only=True)
  steps = store.steps()
  if not steps:
    return
  try:
    old = tuple(store.restore_config(steps[-1]).training.posthoc_ema.sigma_rels)
  except Exception:   # a damaged snapshot: reconstruct names it; training goes on
    return
  new = tuple(config.training.posthoc_ema.sigma_rels)
  if old != new:
    raise config_lib.ConfigError(
        f"training.posthoc_ema.sigma_rels={new} but the snapshots in {workdir}/"
        f"{SNAPSHOT_DIR} track {old}; rerun with sigma_rels={old} or use a new --workdir")


# --------------------------------------------------------------------------
# Reconstruction.


class PosthocError(ValueError):
  """A reconstruction that cannot be made (no snapshots, a bad sigma_rel)."""


def _host(tree, dev):
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), tree)


def reconstruct(workdir, sigma_rels: Sequence[float], step: Optional[int] = None):
  """Post-hoc EMAs of the given relative widths at a snapshot step of a run.

  Args:
    workdir: a run trained with training.posthoc_ema.snapshot_every > 0.
    sigma_rels: the target widths, each in (0, config.MAX_SIGMA_REL].
    step: a snapshot step to end the profiles at; default the newest. Only
      snapshots up to it are used.
  Returns:
    (config, [(variables, info)] per sigma_rel): the run's config;
    variables = {"params": float32 numpy tree} (+ "batch_stats" of the
    snapshot at step); info a JSON-able dict: the weight of each snapshot,
    the relative residual of the profile fit, and sum |x| (how much the
    float32 rounding of the snapshots is amplified).
  Raises:
    PosthocError: no snapshots, no snapshot at step, or a bad sigma_rel.
  """
  try:
    targets = [sigma_rel_to_gamma(r) for r in sigma_rels]
  except ValueError as e:
    raise PosthocError(f"--{e}; use e.g. 0.05 to 0.2") from None
  if not ckpt_lib.checkpoint_dir(workdir, SNAPSHOT_DIR).is_dir():
    raise PosthocError(
        f"no post-hoc EMA snapshots in {workdir} (looked for {workdir}/{SNAPSHOT_DIR}); "
        "train with --config.training.posthoc_ema.snapshot_every=N")
  store = snapshots(workdir, read_only=True)
  steps = store.steps()
  if not steps:
    raise PosthocError(f"no complete snapshot in {workdir}/{SNAPSHOT_DIR}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise PosthocError(f"no snapshot at step {step} in {workdir}/{SNAPSHOT_DIR}; "
                       f"have {steps}")
  steps = [s for s in steps if s <= step]
  config = store.restore_config(step)
  rels = tuple(float(r) for r in config.training.posthoc_ema.sigma_rels)
  gammas = [sigma_rel_to_gamma(r) for r in rels]
  solved = [solve_weights(np.repeat(steps, len(rels)), np.tile(gammas, len(steps)),
                          step, g) for g in targets]
  for r, (_, residual) in zip(sigma_rels, solved):
    if residual > MAX_RELATIVE_RESIDUAL:
      raise PosthocError(
          f"--sigma_rel {r!r}: the {len(steps)} snapshot steps of sigma_rels {rels} up "
          f"to step {step} make that profile only with relative residual {residual:.3g} "
          f"(more than {MAX_RELATIVE_RESIDUAL}); choose a sigma_rel nearer the tracked "
          "ones, or train with more snapshots (a smaller "
          "training.posthoc_ema.snapshot_every)")
  abstract = jax.eval_shape(lambda k: model_lib.init_variables(config, k),
                            jax.random.key(0))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"emas": tuple(_host(abstract["params"], dev) for _ in rels),
            "batch_stats": _host(abstract.get("batch_stats", {}), dev)}
  totals = [None] * len(targets)   # float64 sums, one snapshot at a time in memory
  for i, s in enumerate(steps):
    try:
      snap = store.restore(s, target)
    except Exception as e:   # orbax/tensorstore raise many types for damaged files
      raise PosthocError(
          f"snapshot {s} in {workdir}/{SNAPSHOT_DIR} could not be read ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:200] if str(e) else ''}); move it out of that "
          "directory and rerun") from None
    for j, tree in enumerate(snap["emas"]):
      tree = jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
      for k, (x, _) in enumerate(solved):
        w = x[i * len(rels) + j]
        part = jax.tree.map(lambda a, w=w: w * a, tree)
        totals[k] = part if totals[k] is None else jax.tree.map(np.add, totals[k], part)
  results = []
  for r, g, (x, residual), total in zip(sigma_rels, targets, solved, totals):
    variables = {"params": jax.tree.map(lambda a: a.astype(np.float32), total)}
    if snap["batch_stats"]:
      variables["batch_stats"] = jax.tree.map(np.asarray, snap["batch_stats"])
    info = {"sigma_rel": float(r), "gamma": g, "step": int(step),
            "relative_residual": residual, "sum_abs_weights": float(np.abs(x).sum()),
            "snapshots": [{"step": int(s), "sigma_rel": rel,
                           "weight": float(x[i * len(rels) + j])}
                          for i, s in enumerate(steps) for j, rel in enumerate(rels)]}
    results.append((variables, info))
  return config, results


# Written into OUT first and removed last: OUT holding it is a reconstruction
# that was killed, which the same command redoes (`ddx.outdir`).
MARKER = ".ddx-posthoc-unfinished"
# What write_workdir writes into a workdir.
WORKDIR_NAMES = frozenset({"config.json", "config.json.tmp", "posthoc_ema.json", "checkpoints"})


def _kill_point(name: str) -> None:
  """Test-only: kill -9 of this process at the point DDX_TEST_KILL_AT names.

  tests/test_posthoc_ema.py kills a real reconstruction with it and reruns
  the command; unset (always, outside that test) it does nothing.
  """
  if os.environ.get("DDX_TEST_KILL_AT") == name:
    os.kill(os.getpid(), signal.SIGKILL)


def write_workdir(out, variables: dict, config, step: int, info: dict) -> None:
  """Writes a workdir that `ddx.load`, --mode sample and --mode eval read.

  OUT/config.json, OUT/posthoc_ema.json (info) and OUT/checkpoints/<step>/
  (state {"step", "ema_params", "batch_stats"} and the config; orbax writes
  it under a temporary name and renames it when complete). Writes into out
  as it is: `main` has claimed it (MARKER) before.
  """
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  config_lib.write_json(config, out)
  (out / "posthoc_ema.json").write_text(json.dumps(info, indent=2))
  _kill_point("config")
  ck = ckpt_lib.Checkpointer(out, keep=1)
  state = {"step": np.asarray(step, np.int32), "ema_params": variables["params"],
           "batch_stats": variables.get("batch_stats", {})}
  ck.save(step, state, config)
  ck.close()


def _clear_stale_tmp(out: str) -> None:
  """Removes the temporary siblings `.OUT.tmp-<8 hex>` that this command wrote
  before it wrote OUT directly (ddx up to 2026-12): a killed run left one for
  good. Only folders of that name holding only a workdir's names go."""
  parent, name = os.path.split(os.path.abspath(out))
  if "://" in out or not os.path.isdir(parent):
    return
  pattern = re.compile(rf"\.{re.escape(name)}\.tmp-[0-9a-f]{{8}}")
  for entry in os.listdir(parent):
    path = os.path.join(parent, entry)
    if (pattern.fullmatch(entry) and os.path.isdir(path) and not os.path.islink(path)
        and set(os.listdir(path)) <= WORKDIR_NAMES):
      epath.Path(path).rmtree()


# --------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    _fail(f"{message} (python -m ddx.posthoc_ema --help)")


def _fail(msg: str):
  print(f"ddx: error: {msg}", file=sys.stderr, flush=True)
  sys.exit(2)


def _sigma_rels(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    _fail(f"--sigma_rel={text!r} must be a number or comma-separated numbers, e.g. 0.08")
  if not values:
    _fail("--sigma_rel is empty; give e.g. --sigma_rel 0.08")
  for v in values:
    problem = config_lib.sigma_rel_problem(v)
    if problem:
      _fail(f"--sigma_rel {problem}; use e.g. 0.05 to 0.2")
  names = [_folder(v) for v in values]
  for i, (v, name) in enumerate(zip(values, names)):
    if name in names[:i]:
      w = values[names.index(name)]
      _fail(f"--sigma_rel repeats {v:g}; give each width once" if v == w else
            f"--sigma_rel {w!r} and {v!r} would both be written to OUT/{name}; "
            "give widths that differ in their first 6 digits")
  return values


def _folder(sigma_rel: float) -> str:
  """The folder of one sigma_rel when the command writes several."""
  return f"sigma_rel_{sigma_rel:g}"


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_out(args, owned: set) -> None:
  """Refuses an --out that would break the run, holds anything but this
  command's unfinished output, or cannot be written; only reads."""
  if "://" not in args.out and "://" not in args.workdir:
    if _inside(args.workdir, args.out):
      _fail(f"--out {args.out} is the run's --workdir or holds it; choose a new "
            "directory outside it")
    for sub in (SNAPSHOT_DIR, "checkpoints"):   # orbax would read OUT as a step
      if _inside(args.out, str(ckpt_lib.checkpoint_dir(args.workdir, sub))):
        _fail(f"--out {args.out} is inside the run's {sub}/ folder, where it would break "
              "the run; choose a directory outside it")
  try:
    outdir.check(args.out, MARKER, owned, flag="--out", command="ddx.posthoc_ema",
                 error=PosthocError)
  except PosthocError as e:
    _fail(str(e))
  existing = outdir.blocked_by(args.out)
  if existing:
    _fail(f"--out {args.out} cannot be created or written ({existing} is not a "
          "writable directory); choose a writable --out")


def main(argv: Optional[Sequence[str]] = None) -> None:
  """python -m ddx.posthoc_ema --workdir RUN --sigma_rel S[,S2,...] --out OUT [--step N]

  One sigma_rel writes the workdir OUT; several write OUT/sigma_rel_<S>/ each.
  Bad input prints one line and exits with code 2, before anything is
  written. OUT must not exist, be empty, or be one this command was killed
  while writing (MARKER and only its own names): that one is redone.
  """
  ap = _Parser(prog="python -m ddx.posthoc_ema",
               description="Reconstruct the post-hoc EMA of a run for given sigma_rel.")
  ap.add_argument("--workdir", required=True, help="the run (trained with "
                  "training.posthoc_ema.snapshot_every > 0)")
  ap.add_argument("--sigma_rel", required=True, help="target width(s), e.g. 0.08 or "
                  "0.05,0.08,0.12")
  ap.add_argument("--out", required=True, help="the new workdir (must not exist or be empty)")
  ap.add_argument("--step", type=int, default=None, help="a snapshot step (default newest)")
  args = ap.parse_args(argv)
  values = _sigma_rels(args.sigma_rel)
  out = epath.Path(args.out)
  targets = ([(values[0], out)] if len(values) == 1 else
             [(v, out / _folder(v)) for v in values])
  owned = {MARKER} | (WORKDIR_NAMES if len(values) == 1 else {p.name for _, p in targets})
  _check_out(args, owned)
  try:
    config, results = reconstruct(args.workdir, values, args.step)
  except (PosthocError, ckpt_lib.CheckpointError) as e:
    _fail(str(e).splitlines()[0])
  _clear_stale_tmp(args.out)
  outdir.begin(args.out, MARKER, owned, flag="--out", command="ddx.posthoc_ema",
               error=PosthocError)
  _kill_point("claimed")
  for i, ((v, path), (variables, info)) in enumerate(zip(targets, results)):
    info["source"] = str(args.workdir)
    write_workdir(path, variables, config, info["step"], info)
    _kill_point(f"wrote {i}")
    print(f"wrote sigma_rel={v:g} (step {info['step']}, relative residual "
          f"{info['relative_residual']:.2e}) to {path}", flush=True)
  outdir.finish(args.out, MARKER)


if __name__ == "__main__":
  main()
