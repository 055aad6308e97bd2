"""Command line: python -m ddx.main --config configs/<name>.py --workdir DIR [--mode ...].

Modes:
  train   train (or resume) the run in --workdir                     (default)
  sample  load the newest checkpoint and write sampling.num_samples images
          to workdir/samples/ as a PNG grid and an .npz (uint8 [N, H, W, C])
  eval    score the newest checkpoint with eval.metrics (digits, or FID/KID/IS
          with --config.eval.inception_weights=FILE.npz); samples are kept in
          workdir/eval/ so an interrupted evaluation resumes (README: Evaluation)
  encode  encode the pixel dataset encode.source with the autoencoder at
          autoencoder.path into the latent cache at data.path, resumably
          (README: Latent diffusion); --workdir is not written

Override any config key with --config.<group>.<key>=VALUE. Bad input (an
unknown key, a wrong type, an impossible value, missing data) prints one line
naming what is wrong and how to fix it, and exits with code 2.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file with get_config(); e.g. configs/digits.py",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "encode"],
                          "What to do.")
# Several processes (one per host, or N on one machine): see launch/. TPU pod
# slices, SLURM and Open MPI are detected without these.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for a multi-process run "
    "(env DDX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Number of processes in a multi-process run (env DDX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "This process's index in [0, num_processes) (env DDX_PROCESS_ID).")

EXIT_BAD_INPUT = 2


def _fail(msg: str) -> None:
  print(f"ddx: error: {msg}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def _parse_flags(argv):
  """absl's parser, with config-override errors turned into one clear line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for a file without get_config, unknown keys
    # and wrong types in --config.a.b=v overrides.
    _fail(_override_error(e))
  except SyntaxError as e:   # the --config file itself does not parse
    _fail(f"config file {e.filename} line {e.lineno}: {e.msg}; fix the file")
  except Exception as e:     # the --config file raised while loading
    _config_load_failed(e)


def _config_paths() -> list[str]:
  """The --config file paths on the command line."""
  argv = sys.argv
  paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  return paths + [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]


def _override_error(e: BaseException) -> str:
  """One line for a --config that ml_collections could not load or override:
  a file without get_config, or an override naming no key (with the nearest
  real key), else ml_collections' own first line."""
  import difflib
  text = str(e).strip().strip("'\"").splitlines()[0] if str(e) else type(e).__name__
  paths = _config_paths()
  if "has no attribute 'get_config'" in str(e):
    return (f"--config {paths[-1] if paths else ''} has no get_config(); define "
            "get_config() returning an ml_collections.ConfigDict (see configs/digits.py)")
  from ddx import config as config_lib
  try:
    base = config_lib.from_file(paths[-1]) if paths else None
  except Exception:
    base = None
  overrides = [a[len("--config."):].split("=", 1)[0] for a in sys.argv[1:]
               if a.startswith("--config.")]
  for key in overrides if base is not None else ():
    node, parts = base, key.split(".")
    for i, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part in keys:
        node = node[part]
        continue
      where = ".".join(parts[:i])
      close = difflib.get_close_matches(part, keys, n=1, cutoff=0.5)
      hint = (f"; did you mean --config.{where + '.' if where else ''}{close[0]}?"
              if close else f"; {where or 'the config'} has {', '.join(sorted(keys))}"
              if keys else "")
      return (f"--config.{key}: {where + '.' if where else ''}{part} is not a config key"
              f"{hint} (configs/default.py lists every key)")
  return (f"bad config override: {text} "
          "(see configs/default.py for the keys and their types)")


def _config_load_failed(e: BaseException) -> None:
  """One line for a --config file that does not exist, load or run."""
  # ml_collections wraps the cause in a multi-line OSError; keep the line that
  # says why, and name the file from the command line.
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  why = next((l for l in lines if "Errno" in l), None) or (
      f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)
  paths = _config_paths()
  bad = [p for p in paths if not os.path.isfile(p)] or paths
  _fail(f"--config {bad[-1] if bad else ''} could not be loaded ({why}); pass an "
        "existing config file with get_config(), e.g. --config configs/digits.py")


def _check_writable(workdir: str) -> None:
  """Fails unless workdir is a writable directory or can be created (local paths;
  a gs:// workdir is checked by its first write)."""
  from ddx import outdir
  if "://" in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _fail(f"workdir {workdir} exists and is not a directory; choose another --workdir")
  existing = outdir.blocked_by(workdir)
  if existing:
    _fail(f"workdir {workdir} cannot be created or written ({existing} is not a "
          "writable directory); choose a writable --workdir")


def _with_run(config, workdir: str):
  """--mode sample / eval: the run's own diffusion.* and model.* (its
  config.json) over the --config file's, with one note line when they differ;
  the config unchanged when workdir holds no config.json (the load then says
  what is missing)."""
  import json
  from etils import epath
  from ddx import config as config_lib
  path = epath.Path(workdir) / "config.json"
  try:
    saved = json.loads(path.read_text()) if path.exists() else None
  except (OSError, ValueError) as e:
    _fail(f"{path} does not read as a ddx config ({type(e).__name__}); is --workdir a "
          "ddx run?")
  if saved is None:
    return config
  config, changed = config_lib.with_run(config, saved)
  if changed:
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    print(f"ddx: note: using the run's own {'/'.join(config_lib.RUN_GROUPS)} settings "
          f"from {path} where --config differs ({'; '.join(changed[:3])}{more})",
          file=sys.stderr, flush=True)
  return config


# What --mode sample and eval write in the workdir (they only read its checkpoints).
_MODE_OUTPUTS = {"sample": ("samples",), "eval": ("eval", "metrics.jsonl")}


def _check_outputs(mode: str, workdir: str) -> None:
  """Fails unless --mode sample/eval can write what it writes in workdir (local
  paths; gs:// is checked by the first write), before anything is sampled."""
  from ddx import outdir
  for name in _MODE_OUTPUTS.get(mode, ()):
    path = os.path.join(os.path.abspath(workdir), name)
    existing = outdir.blocked_by(path)
    if existing and not (os.path.isfile(existing) and os.access(existing, os.W_OK)):
      _fail(f"--mode {mode} writes {path}, but {existing} is not writable (a read-only "
            "file system or folder?); make it writable, or copy the run to a writable "
            "folder and pass that as --workdir")


def _sample(config, workdir):
  import io
  import jax
  import numpy as np
  from etils import epath
  import ddx
  from ddx import eval_run
  from ddx import evaluation
  from ddx import checkpoint
  from ddx import model as model_lib
  from ddx import options as options_lib
  step, model = checkpoint.load_with_step(workdir)   # says which checkpoints it skipped
  # Every sampling option from the command line config over the run's saved one.
  options = options_lib.resolve(model.config, config)
  guide = eval_run.load_guide(model, config)   # sampling.guide_workdir: autoguidance
  seed = config.training.seed + 1
  rule = eval_run.label_rule(model, config)   # sampling.labels: balanced | random
  labels = None if rule is None else model_lib.class_labels(
      rule, model.config.model.num_classes, 0, options.num_samples, seed=seed)
  images = ddx.sample_fn(model, jax.random.key(seed), options=options, labels=labels,
                         guide_model=guide)
  u8 = ddx.to_uint8(images)
  if jax.process_index() != 0:   # every process sampled its share; one writes
    return
  out = epath.Path(workdir) / "samples"
  out.mkdir(parents=True, exist_ok=True)
  npz = _new_file(out, f"sample_{options.sampler}_{options.steps}", ".npz")
  buf = io.BytesIO()
  extra = {} if labels is None else {"labels": labels, "label_rule": rule}
  np.savez_compressed(buf, images=u8, sampling=options.to_json(), seed=seed,
                      guide_workdir=eval_run.guide_workdir(model, config), **extra)
  npz.write_bytes(buf.getvalue())
  png = npz.with_suffix(".png")
  evaluation.save_grid(u8, png)
  print(f"wrote {len(u8)} samples of the checkpoint at step {step} to {png} and "
        f"{npz.name}")


def _new_file(folder, stem: str, suffix: str):
  """Creates and returns folder/stem_NNN.suffix with the first NNN (001, 002, ...)
  not taken by a .npz or .png: a run never writes over an earlier run's samples.

  Local folders claim the name with O_EXCL, so two concurrent runs get two
  names; on gs:// the first name that does not exist is taken.
  """
  for k in range(1, 1_000_000):
    path = folder / f"{stem}_{k:03d}{suffix}"
    if path.with_suffix(".png").exists() or path.with_suffix(".npz").exists():
      continue
    if "://" in str(folder):
      return path
    try:
      os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
      return path
    except FileExistsError:
      continue
  raise RuntimeError(f"{folder} holds a million sample files; choose another workdir")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; flags look like --workdir=DIR")
  try:
    config = _CONFIG.value
    if config is not None:
      config.training   # a file that failed to load raises on first attribute access
  except (OSError, AttributeError, ImportError, SyntaxError) as e:
    # ml_collections reports a config file that failed to load when the value
    # is first read.
    _config_load_failed(e)
  if config is None and _config_paths():
    _fail(f"--config {_config_paths()[-1]}: get_config() returned None; make it return "
          "an ml_collections.ConfigDict (see configs/digits.py)")
  if config is None:
    _fail("--config is required, e.g. --config configs/digits.py")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir runs/digits")
  workdir = _WORKDIR.value
  from ddx import compile_cache, parallel
  # Before JAX starts: use every CPU core (one XLA:CPU device each).
  parallel.split_cpu_into_devices({"train": config.training.batch_size,
                                   "eval": config.eval.batch_size,
                                   "encode": config.encode.batch_size}.get(
                                       _MODE.value, config.sampling.num_samples))
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
  except ValueError as e:
    _fail(str(e))
  compile_cache.enable()   # compiled programs kept in ~/.cache/ddx/jax (atomic writes)
  from ddx import checkpoint, config as config_lib, data, eval_run, inception, train
  try:
    if _MODE.value == "train":
      _check_writable(workdir)
      train.train_and_evaluate(config, workdir)
    elif _MODE.value == "eval":
      config = _with_run(config, workdir)
      config_lib.validate(config)
      _check_outputs("eval", workdir)
      eval_run.evaluate(config, workdir)
    elif _MODE.value == "encode":
      config_lib.validate(config)
      config_lib.validate_encode(config)
      from ddx import latents
      latents.encode_dataset(config)
    else:
      config = _with_run(config, workdir)
      config_lib.validate(config)
      _check_outputs("sample", workdir)
      try:
        _sample(config, workdir)
      except ValueError as e:   # sample_fn's input checks (labels, guidance, ...)
        _fail(str(e).splitlines()[0])
  except (config_lib.ConfigError, data.DataError, checkpoint.CheckpointError,
          inception.InceptionWeightsError) as e:
    _fail(str(e))
  except (train.TrainingError, checkpoint.CheckpointWriteError) as e:
    print(f"ddx: training stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=_parse_flags)
