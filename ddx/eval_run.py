"""Evaluation runs: many samples in resumable chunks, reference statistics, metrics.

Two entry points:
  * `evaluate(config, workdir)` — `--mode eval`: the newest checkpoint's EMA
    model, eval.num_samples samples written to workdir/eval/<tag>/ in chunks of
    eval.batch_size, the metrics of eval.metrics appended to metrics.jsonl /
    TensorBoard and printed. Chunks already on disk are reused, so an
    interrupted evaluation resumes where it stopped.
  * `Evaluator(config, workdir)(model, step, writer)` — training's in-loop
    evaluation every eval.every_steps (samples kept in memory).

Chunk c is sampled with fold_in(key(eval.seed), c), so a resumed run's samples
equal an uninterrupted run's, and every evaluation of a run sees the same noise
(scores at different steps differ by the model, not by the draw).

Metrics (eval.metrics):
  digits   DigitsMetric (ddx.evaluation): Fréchet distance to the held-out
           digits in a small classifier's features, confident fraction, class
           entropy. Classifier cached in workdir/eval/digits_classifier.npz.
  fid/kid  Inception pool3 features (ddx.inception) against reference
           statistics of the dataset (`reference_stats`).
  is       Inception Score of the samples' 1008-way logits.
  bpd      bits/dim of held-out data (ddx.bpd; no sampling, no Inception):
           eval/bpd_ode (+ _stderr, _nfe) and/or eval/bpd_vlb (+ _stderr),
           eval.batch_size images at a time, each batch cached as
           bpd_XXXXX.npz next to the sample chunks (`bpd_chunks`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zipfile
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddx import batch_files
from ddx import bpd as bpd_lib
from ddx import config as config_lib
from ddx import data as data_lib
from ddx import evaluation
from ddx import inception
from ddx import logging as log_lib
from ddx import model as model_lib
from ddx import options as options_lib
from ddx import parallel

KID_REFERENCE_SIZE = 5000   # reference features kept for KID (subsets of 1,000 by default)


class Extractor(NamedTuple):
  """A feature network over uint8 images.

  name: identifies the network and its weights (stored with reference stats).
  fn: uint8 [N, H, W, C] -> (features [N, D] float, logits [N, K] float or
    None), or a third element, sFID's spatial features [N, S], when the
    network has them (the Inception).
  """
  name: str
  fn: Callable[[np.ndarray], tuple]


def inception_extractor(weights_path: str, batch_size: int = 100,
                        protocol: str = "pytorch_fid") -> Extractor:
  """The FID Inception-v3 with weights from a local .npz (see ddx.inception).

  Args:
    protocol: "pytorch_fid" (its resize; logits with the classifier's bias)
      or "adm" (the TF graph's resize and scaling, as ADM's evaluator feeds
      it; logits without the bias, as ADM's Inception Score takes them).
  Returns:
    fn -> (pool3 [N, 2048], logits [N, 1008], spatial [N, 2023]).
  """
  variables = inception.load_weights(weights_path)
  digest = inception.weights_digest(variables)[:16]
  variables = inception.put_weights(variables)

  def fn(u8):
    pool, spatial, logits = inception.features(variables, u8, batch_size=batch_size,
                                               protocol=protocol, spatial=True)
    if protocol == "adm":
      logits = inception.adm_logits(variables, pool)
    return pool, logits, spatial

  # pytorch_fid keeps its old name, so reference statistics cached before stay valid.
  tag = "inception-fid" if protocol == "pytorch_fid" else f"inception-fid-{protocol}"
  return Extractor(f"{tag}:{digest}", fn)


def dinov2_extractor(folder: str, batch_size: int = 100) -> Extractor:
  """FD-DINOv2's features, dgm-eval's protocol: PIL bicubic resize of the uint8
  images to 224x224, ImageNet mean/std, the final-norm CLS token of a
  converted DINOv2 (`ddx.encoders.dinov2`; dgm-eval uses ViT-L/14)."""
  from ddx.encoders import dinov2
  encoder = dinov2.load(folder)
  digest = dinov2.weights_digest(encoder.params)[:16]

  def fn(u8):
    u8 = np.asarray(u8)
    parts = []
    for start in range(0, len(u8), batch_size):
      x = dinov2.preprocess_pil(u8[start:start + batch_size])
      real = len(x)
      if real < batch_size and len(u8) > batch_size:   # one program for every batch
        x = np.concatenate([x, np.zeros((batch_size - real,) + x.shape[1:], x.dtype)])
      parts.append(np.asarray(dinov2.features(encoder, x)["cls"], np.float32)[:real])
    return np.concatenate(parts), None

  return Extractor(f"dinov2-cls:{digest}", fn)


def digits_extractor(metric: evaluation.DigitsMetric) -> Extractor:
  """The digits classifier's 64 hidden units (8x8 grey images only)."""
  return Extractor("digits-mlp", metric.features)


# --------------------------------------------------------------------------
# Reference statistics of a dataset.


def _data_fingerprint(data_config) -> dict:
  """The data settings that decide which images the reference holds."""
  d = data_config
  return {"name": d.name, "split": d.split, "image_size": d.image_size,
          "channels": d.channels, "crop": d.crop, "path": d.path,
          "image_key": d.image_key}


def default_reference_path(config, workdir: str) -> str:
  return os.path.join(workdir, "eval", f"reference_{config.data.name}.npz")


class Moments:
  """Streaming mean and covariance of feature batches, in float64.

  Sums run about the first batch's mean rather than 0, so the one-pass
  covariance cancels far less (a constant feature gets exactly 0), and only
  D + D² accumulators need memory however many images stream through.
  """

  def __init__(self):
    self.n, self.shift, self.sum, self.outer = 0, None, None, None

  def add(self, features: np.ndarray) -> None:
    f = np.asarray(features, np.float64)
    if self.shift is None:
      self.shift = f.mean(0)
      self.sum, self.outer = np.zeros_like(self.shift), np.zeros((f.shape[1],) * 2)
    f = f - self.shift
    self.n += len(f)
    self.sum += f.sum(0)
    self.outer += f.T @ f

  def stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]) of everything added (>= 2 rows)."""
    m = self.sum / self.n
    return self.shift + m, (self.outer - self.n * np.outer(m, m)) / (self.n - 1)


def _progress(what: str, done: int, n: int, t0: float) -> None:
  rate = done / (time.perf_counter() - t0)
  print(f"eval: {what} {done}/{n} images, {rate:.1f} img/s, "
        f"ETA {log_lib.hms((n - done) / rate)}", flush=True)


def _pixel_data_config(config):
  """config.data, or for a latent run the pixel dataset its latents were encoded from."""
  if config.data.name != "latents":
    return config.data
  from ddx import latents
  if not config.encode.source:
    raise config_lib.ConfigError(
        "the sample metrics of a latent model compare with the pixel dataset the latents "
        "were encoded from; set --config.encode.source (and its data keys), "
        "--config.eval.reference=BATCH.npz or --config.eval.reference_stats=FILE.npz")
  return latents.source_config(config)


PR_REFERENCE_SIZE = 10_000   # reference features kept for precision/recall (ADM's
                             # reference batches hold 10,000 images)


def read_reference(path: str) -> batch_files.ReferenceBatch:
  """eval.reference, an ADM batch; its errors as one-line ConfigErrors."""
  try:
    return batch_files.read_batch(path)
  except batch_files.BatchFileError as e:
    raise config_lib.ConfigError(f"eval.reference: {e}") from None


def reference_source(config) -> tuple[dict, int, Callable[[np.ndarray], np.ndarray]]:
  """The reference images the sample metrics compare with.

  eval.reference's arr_0 when set (an ADM batch), else every image of the
  (pixel) dataset of config.data, in order.

  Returns:
    (what they are, for cache keys; their number; read(indices) -> uint8
    [n, H, W, C]).
  """
  path = config.eval.get("reference", "")
  if path:
    images = read_reference(path).images
    st = os.stat(path)
    what = {"reference": os.path.abspath(path), "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns}
    return what, 0 if images is None else len(images), lambda idx: np.asarray(images[idx])
  data_config = _pixel_data_config(config)
  source = data_lib.make_source(data_config)
  read = lambda idx: np.stack([np.asarray(source[int(i)][0]) for i in idx])
  return {"data": _data_fingerprint(data_config)}, len(source), read


def reference_features(config, spaces: Callable[[np.ndarray], dict], names: dict, path: str,
                       *, keep: Optional[dict] = None, batch_size: int = 200,
                       progress: bool = True) -> dict:
  """Mean and covariance of feature spaces over every reference image, cached in `path`.

  One pass over `reference_source(config)` computes every space at once
  (streaming float64 sums, so only D + D² accumulators per space need
  memory) and keeps the features of a fixed random subset where `keep`
  asks (precision/recall's reference features). A file made for other
  reference images or other networks is recomputed, never reused.

  Args:
    config: eval.reference or config.data say the images.
    spaces: uint8 images -> {space: features [n, D]}.
    names: {space: the network that makes it (Extractor.name)}, the cache key.
    path: the .npz to read or write (ddx's own file in workdir/eval/).
    keep: {space: how many images' features to keep} (seed 0, without
      replacement; all when fewer).
  Returns:
    {space: {"mu": [D] float64, "sigma": [D, D] float64, "kept": [M, D]
    float32 (empty when not kept)}}, and "num_images".
  Raises:
    ConfigError: the reference has no images (only statistics).
  """
  keep = keep or {}
  what, n, read = reference_source(config)
  fingerprint = json.dumps({"images": what, "spaces": names, "keep": keep}, sort_keys=True)
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f["fingerprint"]) == fingerprint:
        return {"num_images": int(f["num_images"]),
                **{k: {"mu": f[f"{k}_mu"], "sigma": f[f"{k}_sigma"], "kept": f[f"{k}_kept"]}
                   for k in names}}
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
    pass
  if n < 2:
    raise config_lib.ConfigError(
        f"the reference ({what}) has {n} image(s); {', '.join(names)} features need at "
        "least 2 (an ADM batch with arr_0, or a dataset)")
  kept_index = {k: np.sort(np.random.default_rng(0).choice(n, min(n, m), replace=False))
                for k, m in keep.items()}
  moments, kept = {k: Moments() for k in names}, {k: [] for k in names}
  t0, next_report = time.perf_counter(), 0.1
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(n, start + batch_size))
    feats = spaces(read(idx))
    for k in names:
      moments[k].add(feats[k])
      if k in kept_index:
        kept[k].append(np.asarray(feats[k], np.float32)[np.isin(idx, kept_index[k])])
    done = idx[-1] + 1
    if progress and (done / n >= next_report or done == n):
      _progress(f"reference features ({', '.join(names)})", done, n, t0)
      next_report += 0.1
  out, arrays = {"num_images": n}, {}
  for k in names:
    mu, sigma = moments[k].stats()
    out[k] = {"mu": mu, "sigma": sigma,
              "kept": (np.concatenate(kept[k]) if kept[k] else
                       np.zeros((0, len(mu)), np.float32))}
    arrays.update({f"{k}_{x}": v for x, v in out[k].items()})
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, fingerprint=fingerprint, num_images=n, **arrays)
    os.replace(tmp, path)
  return out


def reference_stats(config, extractor: Extractor, path: str, *, batch_size: int = 200,
                    progress: bool = True) -> dict:
  """Feature mean/covariance of every image of the configured dataset, cached in `path`.

  All images of config.data (the training split, uint8, no flips, the last
  partial batch included) go through the extractor once; the result is saved
  to `path` and read back by later calls. A file made for other data or
  another extractor is refused, not silently reused.

  Args:
    config: the run config (config.data says the dataset).
    extractor: the feature network (its name is stored with the stats).
    path: the .npz to read or write.
    batch_size: images per extractor call.
    progress: print a progress line per ~10% of the dataset.
  Returns:
    {"mu": [D] float64, "sigma": [D, D] float64, "kid_features": [M, D] float32
     (a fixed random subset, M <= KID_REFERENCE_SIZE), "num_images": int,
     "is_mean", "is_std": the dataset's own Inception Score (nan without logits)}.
  Raises:
    ConfigError: `path` holds statistics of other data or another extractor.
  """
  data_config = _pixel_data_config(config)
  fingerprint = json.dumps({"data": _data_fingerprint(data_config),
                            "features": extractor.name}, sort_keys=True)
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as f:
        stored = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise config_lib.ConfigError(
          f"eval.reference_stats={path} cannot be read ({' '.join(str(e).split())}); "
          "delete it to recompute") from None
    if str(stored.get("fingerprint", "")) != fingerprint:
      raise config_lib.ConfigError(
          f"eval.reference_stats={path} holds statistics of "
          f"{str(stored.get('fingerprint', '?'))}, not of {fingerprint}; delete it or "
          "point --config.eval.reference_stats at another file")
    return {"mu": stored["mu"], "sigma": stored["sigma"],
            "kid_features": stored["kid_features"], "num_images": int(stored["num_images"]),
            "is_mean": float(stored["is_mean"]), "is_std": float(stored["is_std"])}

  source = data_lib.make_source(data_config)
  n = len(source)
  if n < 2:
    raise data_lib.DataError(f"data.name={data_config.name!r} has {n} image(s); "
                             "reference statistics need at least 2")
  kid_index = np.sort(np.random.default_rng(0).choice(n, min(n, KID_REFERENCE_SIZE),
                                                      replace=False))
  moments, kid_parts, logit_parts = Moments(), [], []
  t0, next_report = time.perf_counter(), 0.1
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(n, start + batch_size))
    images = np.stack([np.asarray(source[int(i)][0]) for i in idx])
    feats, logits = extractor.fn(images)[:2]
    moments.add(feats)
    kid_parts.append(np.asarray(feats, np.float32)[np.isin(idx, kid_index)])
    if logits is not None:
      logit_parts.append(np.asarray(logits, np.float32))
    done = idx[-1] + 1
    if progress and (done / n >= next_report or done == n):
      _progress("reference statistics", done, n, t0)
      next_report += 0.1
  mu, sigma = moments.stats()
  is_mean, is_std = (evaluation.inception_score(np.concatenate(logit_parts))
                     if logit_parts else (float("nan"), float("nan")))
  out = {"mu": mu, "sigma": sigma, "kid_features": np.concatenate(kid_parts),
         "num_images": n, "is_mean": is_mean, "is_std": is_std}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, fingerprint=fingerprint, **out)
    os.replace(tmp, path)
  return out


# --------------------------------------------------------------------------
# Samples in chunks.


@jax.jit
def _weights_digest(variables):
  """Two sums over every weight: differ for any other checkpoint, in practice."""
  leaves = [x.astype(jnp.float32).ravel() for x in jax.tree.leaves(variables)]
  flat = jnp.concatenate(leaves)
  ramp = jnp.linspace(1.0, 2.0, flat.shape[0], dtype=jnp.float32)
  return jnp.stack([jnp.sum(flat), jnp.sum(flat * ramp)])


def model_fingerprint(model: model_lib.Model) -> str:
  """A short text that identifies the model's weights (for reusing sample chunks)."""
  return ",".join(f"{v:.9e}" for v in np.asarray(_weights_digest(model.variables)))


def _settings(options: options_lib.SampleOptions, e, model: model_lib.Model,
              guide: Optional[model_lib.Model] = None, guide_workdir: str = "") -> str:
  """Everything besides the chunk index that decides a chunk's images: every
  sampling option, eval.seed and eval.batch_size (of `e`, the eval group),
  and the autoguidance guide (its workdir and weights) if there is one.

  Includes a fingerprint of the weights, so chunks left by an earlier run in
  the same workdir at the same step are not reused after a retrain (nor
  after the guide's run wrote a newer checkpoint).
  """
  guided = None if guide is None else {"workdir": guide_workdir,
                                       "weights": model_fingerprint(guide)}
  return json.dumps({"options": json.loads(options.to_json()), "seed": e.seed,
                     "chunk": e.batch_size, "weights": model_fingerprint(model),
                     "guide": guided}, sort_keys=True)


def guide_workdir(model: model_lib.Model, config=None) -> str:
  """sampling.guide_workdir of `config` (the command line's), else of the
  model's saved config; "" = no guide."""
  return str((config if config is not None else model.config).sampling.get(
      "guide_workdir", ""))


def load_guide(model: model_lib.Model, config=None) -> Optional[model_lib.Model]:
  """The autoguidance guide: the newest readable checkpoint of guide_workdir
  (`guide_workdir`), checked against `model`; None when it is "".

  Raises:
    ConfigError: guide_workdir has no readable checkpoint, or its model
      cannot guide this one (`ddx.model.check_guide`); one line each.
  """
  from ddx import checkpoint as ckpt_lib
  path = guide_workdir(model, config)
  if not path:
    return None
  _, guide = ckpt_lib.load_run("sampling.guide_workdir", path)
  try:
    model_lib.check_guide(model, guide)
  except ValueError as e:
    raise config_lib.ConfigError(f"sampling.guide_workdir={path!r}: {e}") from None
  return guide


def _chunk_file(out_dir: str, prefix: str, chunk: int) -> str:
  return os.path.join(out_dir, f"{prefix}_{chunk:05d}.npz")


def chunk_path(out_dir: str, chunk: int) -> str:
  """Where `sample_chunks` keeps chunk `chunk` of out_dir."""
  return _chunk_file(out_dir, "samples", chunk)


def _read_chunk(path: str, settings: str, keys) -> Optional[dict]:
  """A finished chunk's arrays by key, or None if absent, unreadable or made otherwise."""
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f["settings"]) != settings:
        return None
      return {k: np.asarray(f[k]) for k in keys}
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
    return None


def resumable_chunks(num: int, batch_size: int, compute: Callable[[int, int], dict], *,
                     keys, settings: str, out_dir: Optional[str] = None,
                     prefix: str = "samples",
                     valid: Callable[[dict, int], bool] = lambda arrays, count: True,
                     progress: bool = True, label: str = "samples", unit: str = "chunk",
                     verb: str = "sampled") -> list[dict]:
  """compute(c, count) for chunks c = 0 .. ceil(num / batch_size) - 1, resumable on disk.

  Chunk c covers items c·B .. c·B + count - 1 (count = B but for the last).
  With out_dir, process 0 writes each chunk's arrays and `settings` to
  out_dir/<prefix>_XXXXX.npz (complete or not at all), and a later call
  reuses a chunk whose settings are equal and whose arrays pass
  valid(arrays, count); any other file is recomputed and overwritten.

  Args:
    num, batch_size: items in all, items per chunk.
    compute: (chunk index, count) -> {key: numpy array}; every process calls
      it (it may run one program over all devices).
    keys: the keys compute returns (those read back from disk).
    settings: a text that names everything besides the chunk index that
      decides the results (options, seed, weights fingerprint).
    progress: print one line per chunk: "eval: <label> done/num (<unit> c/n
      <verb> | reused from disk), rate, ETA".
  Returns:
    One dict per chunk, in order.
  """
  chunks = math.ceil(num / batch_size)
  is_main = jax.process_index() == 0
  if out_dir and is_main:
    os.makedirs(out_dir, exist_ok=True)
  parts, t0, made = [], time.perf_counter(), 0
  for c in range(chunks):
    count = min(batch_size, num - c * batch_size)
    path = _chunk_file(out_dir, prefix, c) if out_dir else None
    res = _read_chunk(path, settings, keys) if path else None
    if res is not None and not valid(res, count):
      res = None
    fresh = res is None
    if fresh:
      res = compute(c, count)
      made += count
      if path and is_main:
        tmp = path + ".tmp.npz"
        np.savez(tmp, settings=settings, **res)
        os.replace(tmp, path)   # a chunk on disk is always complete
    parts.append(res)
    if progress and is_main:
      done = c * batch_size + count
      rate = made / (time.perf_counter() - t0) if made else float("nan")
      eta = (num - done) / rate if rate == rate and rate > 0 else float("nan")
      speed = f", {rate:.1f} img/s, ETA {log_lib.hms(eta)}" if made else ""
      print(f"eval: {label} {done}/{num} ({unit} {c + 1}/{chunks} "
            f"{verb if fresh else 'reused from disk'}){speed}", flush=True)
  return parts


def _to_host(images) -> np.ndarray:
  """A (possibly multi-process) global array as uint8 on this host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    images = multihost_utils.process_allgather(images, tiled=True)
  return model_lib.to_uint8(images)


def eval_options(model: model_lib.Model, config) -> options_lib.SampleOptions:
  """The options evaluation samples with: `config`'s eval group (sampler, steps,
  eta, spacing, batch_size) and sampling group (the rest) over the model's
  saved config (`ddx.options.resolve` with group="eval")."""
  return options_lib.resolve(model.config, config, group="eval")


def label_rule(model: model_lib.Model, config) -> Optional[str]:
  """sampling.labels of `config` (the command line's) for a class-conditional
  model, None for an unconditional one."""
  if model.config.model.num_classes <= 0:
    return None
  return str(config.sampling.get("labels", "balanced"))


def sample_batch(model: model_lib.Model, config, out_dir: Optional[str] = None,
                 progress: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """eval.num_samples samples of `model` and their class labels, eval.batch_size
  (global) at a time.

  Chunk c holds samples c·B .. c·B+B-1 and is drawn with
  fold_in(key(eval.seed), c) (the last chunk keeps its first samples), so the
  result does not depend on which chunks were already on disk. A
  class-conditional model's labels follow sampling.labels over the whole
  batch (`ddx.model.class_labels`: balanced = sample i is class i mod K,
  random = uniform draws seeded by eval.seed and the chunk).

  Args:
    model: the EMA model (`ddx.load` or built from a TrainState).
    config: the run (or command-line) config: eval.{num_samples, batch_size,
      seed}, sampling.labels, the options of `eval_options` and
      sampling.guide_workdir (an autoguidance guide, `load_guide`); every one
      of them is in a chunk's key, so a changed option, label rule or guide
      never reuses a chunk.
    out_dir: if given, each chunk is written as samples_XXXXX.npz (uint8
      "images" [n, H, W, C], and int32 "labels" [n] for a class-conditional
      model) and chunks already there are reused.
    progress: print a line per chunk.
  Returns:
    (uint8 [eval.num_samples, H, W, C], int32 [eval.num_samples] labels or
    None for an unconditional model).
  """
  e = config.eval
  options = eval_options(model, config)
  guide = load_guide(model, config)
  base = jax.random.key(e.seed)
  shape = tuple(model.image_shape)
  bs = int(e.batch_size)
  rule = label_rule(model, config)
  keys = ("images",) if rule is None else ("images", "labels")

  def compute(c, count):
    labels = (None if rule is None else model_lib.class_labels(
        rule, model.config.model.num_classes, c * bs, bs, seed=int(e.seed)))
    x = model_lib.sample_fn(model, jax.random.fold_in(base, c), options=options,
                            labels=labels, guide_model=guide)
    out = {"images": _to_host(x)[:count]}
    if labels is not None:
      out["labels"] = labels[:count]
    return out

  def valid(arrays, count):
    images = arrays["images"]
    ok = images.dtype == np.uint8 and images.shape == (count,) + shape
    return ok and (rule is None or arrays["labels"].shape == (count,))

  settings = _settings(options, e, model, guide, guide_workdir(model, config))
  if rule is not None:   # unconditional chunks keep the key they had before the rule existed
    settings = json.dumps({**json.loads(settings), "labels": rule}, sort_keys=True)
  parts = resumable_chunks(int(e.num_samples), bs, compute, keys=keys, settings=settings,
                           out_dir=out_dir, valid=valid, progress=progress)
  images = np.concatenate([p["images"] for p in parts])
  labels = None if rule is None else np.concatenate([p["labels"] for p in parts])
  return images, labels


def sample_chunks(model: model_lib.Model, config, out_dir: Optional[str] = None,
                  progress: bool = True) -> np.ndarray:
  """The images of `sample_batch`: uint8 [eval.num_samples, H, W, C]."""
  return sample_batch(model, config, out_dir, progress)[0]


# --------------------------------------------------------------------------
# Bits/dim of held-out data in resumable batches.

SAMPLE_METRICS = tuple(m for m in evaluation.METRICS if m != "bpd")   # score samples


def bpd_images(config) -> tuple[np.ndarray, np.ndarray]:
  """The held-out images the bpd metric scores, in a fixed order.

  digits: load_digits()[1000:] (the digits metric's held-out 797; note that
  the digits configs train on all 1,797); a tfds dataset: its
  eval.bpd_split; a folder: every image. The first eval.bpd_num_images of
  them (0 = all).

  Returns:
    (uint8 [N, H, W, C], int64 [N] labels, -1 where unlabelled).
  Raises:
    DataError: the data cannot be read. ConfigError: bpd_num_images exceeds
      the held-out set.
  """
  e, d = config.eval, config.data
  if d.name == "digits":
    source, start = data_lib.make_source(d), evaluation.DIGITS_TRAIN
  else:
    held = config_lib.from_dict(config_lib.to_dict(d))
    if d.name != "folder":
      held.split = e.bpd_split
    source, start = data_lib.make_source(held), 0
  available = len(source) - start
  num = int(e.bpd_num_images) or available
  if num > available:
    raise config_lib.ConfigError(
        f"eval.bpd_num_images={num} but the held-out set of data.name={d.name} has "
        f"{available} images; use at most {available}, or 0 for all")
  if num < 1:
    raise data_lib.DataError(f"data.name={d.name} has no held-out images to score")
  idx = np.arange(start, start + num)
  if hasattr(source, "read_batch"):
    images, labels = source.read_batch(idx)
  else:
    pairs = [source[int(i)] for i in idx]
    images = np.stack([np.asarray(p[0]) for p in pairs])
    labels = np.asarray([p[1] for p in pairs], np.int64)
  return np.asarray(images, np.uint8), np.asarray(labels, np.int64)


def _bpd_estimators(config) -> tuple[str, ...]:
  est = config.eval.bpd_estimator
  return ("ode", "vlb") if est == "both" else (est,)


def _bpd_labels(model: model_lib.Model, labels: np.ndarray) -> tuple[Optional[np.ndarray], str]:
  """(labels to condition on, what they are): the null label for log p(x) when it
  was trained, else the images' own classes (log p(x | y))."""
  if model.config.model.num_classes <= 0:
    return None, "unconditional"
  if float(model.config.training.get("label_dropout", 0.0)) > 0:
    return None, "null label: log p(x)"
  if np.any(labels < 0):
    raise data_lib.DataError(
        "the model is class-conditional with an untrained null label "
        "(training.label_dropout=0), but the held-out images are unlabelled; "
        "set data.label_key")
  return labels, "the images' classes: log p(x | y)"


def _bpd_settings(config, model: model_lib.Model, num_images: int, variance: str) -> str:
  """Everything besides the batch index that decides a batch's bits/dim."""
  e = config.eval
  return json.dumps({"estimator": e.bpd_estimator, "trace": e.bpd_trace,
                     "probe": e.bpd_probe, "probes": e.bpd_probes,
                     "solver": e.bpd_solver, "steps": e.bpd_steps,
                     "rtol": float(e.bpd_rtol), "atol": float(e.bpd_atol),
                     "vlb_terms": e.bpd_vlb_terms, "num_images": num_images,
                     "split": e.bpd_split, "data": _data_fingerprint(config.data),
                     "seed": e.seed, "chunk": e.batch_size,
                     "ddpm_variance": variance, "weights": model_fingerprint(model)}, sort_keys=True)


def bpd_chunk_path(out_dir: str, chunk: int) -> str:
  """Where `bpd_chunks` keeps batch `chunk` of out_dir."""
  return _chunk_file(out_dir, "bpd", chunk)


def bpd_chunks(model: model_lib.Model, config, images: np.ndarray, labels: np.ndarray,
               out_dir: Optional[str] = None, progress: bool = True) -> dict:
  """Bits/dim of every image, eval.batch_size (global) at a time, resumable.

  Batch c holds images c·B .. c·B+B-1 (the last one padded with copies of
  its last image to a full batch, so one program serves every batch) and
  draws its dequantisation, probes and x_t with fold_in(key(eval.seed), c).

  Args:
    model: the EMA model.
    config: eval.bpd_* (the estimators and their settings), eval.batch_size,
      eval.seed, and sampling.ddpm_variance (the VLB's reverse variance,
      over the model's saved one).
    images: uint8 [N, H, W, C] (`bpd_images`); labels: int64 [N].
    out_dir: if given, batch c is written as bpd_XXXXX.npz and batches
      already there (same settings and weights) are reused.
    progress: print a line per batch.
  Returns:
    {"ode": float32 [N] bits/dim, "ode_nfe": int32 [chunks]} and/or
    {"vlb": float32 [N], "vlb_nfe": int32 [chunks]}.
  """
  e = config.eval
  num, bs = len(images), int(e.batch_size)
  estimators = _bpd_estimators(config)
  keys = [k for est in estimators for k in (est, est + "_nfe")]
  variance = options_lib.resolve(model.config, config).ddpm_variance
  settings = _bpd_settings(config, model, num, variance)
  cond_labels, what = _bpd_labels(model, labels)
  base = jax.random.key(e.seed)
  if progress and jax.process_index() == 0:
    print(f"eval: bits/dim of {num} held-out images ({', '.join(estimators)}; "
          f"{what})", flush=True)

  def compute(c, count):
    pad = np.concatenate([np.arange(c * bs, c * bs + count),
                          np.full(bs - count, c * bs + count - 1)])
    batch = images[pad]
    y = None if cond_labels is None else jnp.asarray(cond_labels[pad], jnp.int32)
    ode_rng, vlb_rng = jax.random.split(jax.random.fold_in(base, c))
    res = {}
    if "ode" in estimators:
      b, nfe = bpd_lib.ode_bpd(model, batch, ode_rng, labels=y, trace=e.bpd_trace,
                               probe=e.bpd_probe, num_probes=e.bpd_probes,
                               solver=e.bpd_solver, steps=e.bpd_steps,
                               rtol=e.bpd_rtol, atol=e.bpd_atol,
                               trace_chunk=16 if e.bpd_trace == "exact" else None)
      res["ode"] = np.asarray(parallel.gather(b), np.float32)[:count]
      res["ode_nfe"] = np.asarray(nfe, np.int32)
    if "vlb" in estimators:
      b, nfe = bpd_lib.vlb_bpd(model, batch, vlb_rng, labels=y,
                               num_terms=e.bpd_vlb_terms or None, variance=variance)
      res["vlb"] = np.asarray(parallel.gather(b), np.float32)[:count]
      res["vlb_nfe"] = np.asarray(nfe, np.int32)
    return res

  def valid(arrays, count):
    return all(arrays[k].shape == (count,) for k in keys if not k.endswith("nfe"))

  parts = resumable_chunks(num, bs, compute, keys=keys, settings=settings, out_dir=out_dir,
                           prefix="bpd", valid=valid, progress=progress, label="bits/dim",
                           unit="batch", verb="scored")
  return {k: (np.concatenate([p[k] for p in parts]) if not k.endswith("nfe")
              else np.stack([p[k] for p in parts])) for k in keys}


def bpd_metrics(results: dict) -> dict:
  """Flat metrics of `bpd_chunks` results: the mean bits/dim over images, its
  standard error (over images: the spread of the data, the dequantisation and
  the probes together) and the mean NFE per image."""
  out = {}
  for est in ("ode", "vlb"):
    if est in results:
      v = np.asarray(results[est], np.float64)
      out[f"bpd_{est}"] = float(v.mean())
      out[f"bpd_{est}_stderr"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
      out[f"bpd_{est}_nfe"] = float(np.mean(results[est + "_nfe"]))
  return out


# --------------------------------------------------------------------------
# Metrics.


class Evaluator:
  """Scores a model's samples with config.eval.metrics.

  Building it checks the config and reads the Inception (and DINOv2) weights
  if a metric needs them, so bad inputs fail at once; the digits classifier
  and the reference statistics are made (or read from workdir/eval/) by
  `setup`, at the first scoring at the latest.

  What the sample metrics compare with: without eval.reference, every image
  of config.data (fid/kid/is: `reference_stats`; sfid, precision/recall and
  fd_dinov2: `reference_features`, precision/recall on a fixed subset of
  PR_REFERENCE_SIZE); with eval.reference, an ADM batch: its stored
  mu/sigma (mu_s/sigma_s) where it has them, as ADM's evaluator prefers,
  else statistics of its images, and all its images' features for kid,
  precision/recall and fd_dinov2.
  """

  def __init__(self, config, workdir: str, extractor: Optional[Extractor] = None,
               dinov2: Optional[Extractor] = None):
    """Args:
      config: the run config (eval.*, and data.* for the reference statistics).
      workdir: where eval/ caches live.
      extractor: the feature network behind the Inception metrics; default the
        FID Inception with eval.inception_weights. Another one (say, a domain
        classifier) gives Fréchet/kernel distances in its own feature space.
      dinov2: the network behind fd_dinov2; default `dinov2_extractor` of
        eval.dinov2_weights.
    """
    self.config, self.workdir = config, workdir
    self.metrics = tuple(config.eval.metrics)
    self._digits = self._ref = self._extra = self._bpd_data = None
    self._extractor, self._dinov2 = extractor, dinov2
    e = config.eval
    self._adm = e.get("inception_protocol", "pytorch_fid") == "adm"
    path = guide_workdir(None, config)
    if path:   # fail now, not at the first evaluation (loaded there: the newest)
      from ddx import checkpoint as ckpt_lib
      if not ckpt_lib.has_checkpoints(path):
        raise config_lib.ConfigError(
            f"sampling.guide_workdir={path} has no checkpoints/; point it at a trained "
            "run, or set it to \"\" for no guide")
    if extractor is None or (dinov2 is None and "fd_dinov2" in self.metrics):
      config_lib.check_eval_inputs(config)
    # Read the weights now: a bad file fails before any sampling or training.
    if extractor is None and set(self.metrics) & set(evaluation.INCEPTION_METRICS):
      self._extractor = inception_extractor(e.inception_weights, e.feature_batch_size,
                                            e.get("inception_protocol", "pytorch_fid"))
    if dinov2 is None and "fd_dinov2" in self.metrics:
      self._dinov2 = dinov2_extractor(e.dinov2_weights, e.feature_batch_size)
    self._reference = read_reference(e.reference) if e.get("reference", "") else None

  def _spaces(self, images_u8: np.ndarray, want) -> dict:
    """{space: features} of uint8 images for the spaces in `want`: pool and
    logits (and spatial) of the Inception, dinov2 of DINOv2."""
    out = {}
    if {"pool", "logits", "spatial"} & set(want):
      res = self._extractor.fn(images_u8)
      out["pool"], out["logits"] = res[0], res[1]
      if "spatial" in want:
        if len(res) < 3:
          raise config_lib.ConfigError(
              f"eval.metrics has sfid, but the feature network {self._extractor.name} has "
              "no spatial features; drop sfid")
        out["spatial"] = res[2]
    if "dinov2" in want:
      out["dinov2"] = self._dinov2.fn(images_u8)[0]
    return out

  def _extra_spaces(self) -> dict:
    """{space: network name} that `reference_features` must compute."""
    m, ref, names = set(self.metrics), self._reference, {}
    stored = ref.stats if ref is not None else {}
    # The pool features themselves: precision/recall always; with an ADM
    # batch also kid, and fid unless the batch stores mu/sigma.
    pool_users = {"precision", "recall"}
    if ref is not None:
      pool_users |= {"kid"} | (set() if "pool" in stored else {"fid"})
    if m & pool_users:
      names["pool"] = self._extractor.name
    if "sfid" in m and "spatial" not in stored:
      names["spatial"] = self._extractor.name
    if "fd_dinov2" in m:
      names["dinov2"] = self._dinov2.name
    return names

  def setup(self) -> None:
    """Fits or reads the digits classifier; computes or reads the reference stats;
    reads the held-out images of the bpd metric."""
    e = self.config.eval
    if "bpd" in self.metrics and self._bpd_data is None:
      self._bpd_data = bpd_images(self.config)
    if "digits" in self.metrics and self._digits is None:
      self._digits = evaluation.DigitsMetric(
          os.path.join(self.workdir, "eval", "digits_classifier.npz"))
    if self._reference is None and set(self.metrics) & {"fid", "kid"} and self._ref is None:
      path = e.reference_stats or default_reference_path(self.config, self.workdir)
      self._ref = reference_stats(self.config, self._extractor, path,
                                  batch_size=e.feature_batch_size)
    names = self._extra_spaces()
    if names and self._extra is None:
      # Of an ADM batch: every image kept for kid and precision/recall.
      size = PR_REFERENCE_SIZE if self._reference is None else len(
          self._reference.images if self._reference.images is not None else ())
      keep = {"pool": size} if "pool" in names else {}
      key = json.dumps([names, keep, e.get("reference", "")], sort_keys=True)
      tag = f"{self.config.data.name}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
      self._extra = reference_features(
          self.config, lambda u8: self._spaces(u8, names), names,
          os.path.join(self.workdir, "eval", f"reference_features_{tag}.npz"),
          keep=keep, batch_size=e.feature_batch_size)

  def _reference_stats(self, space: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference in `space`: an ADM batch's stored pair first."""
    ref = self._reference
    if ref is not None and space in ref.stats:
      return ref.stats[space]
    if space == "pool" and self._reference is None:
      return self._ref["mu"], self._ref["sigma"]
    return self._extra[space]["mu"], self._extra[space]["sigma"]

  def scores(self, samples_u8: np.ndarray) -> dict:
    """The metrics of uint8 samples [N, H, W, C], flat name -> float."""
    self.setup()
    e, m, out = self.config.eval, set(self.metrics), {}
    if "digits" in m:
      out.update({f"digits_{k}": v for k, v in self._digits.score(samples_u8).items()})
    want = set()
    if m & set(evaluation.INCEPTION_METRICS):
      want |= {"pool", "logits"} | ({"spatial"} if "sfid" in m else set())
    if "fd_dinov2" in m:
      want.add("dinov2")
    if not want:
      return out
    f = self._spaces(samples_u8, want)
    if "fid" in m:
      out["fid"] = evaluation.frechet_distance(*evaluation.feature_stats(f["pool"]),
                                               *self._reference_stats("pool"))
    if "kid" in m:
      ref = self._ref["kid_features"] if self._reference is None else self._extra["pool"]["kept"]
      out["kid"], out["kid_std"] = evaluation.kid(
          f["pool"], ref, num_subsets=e.kid_subsets,
          subset_size=min(e.kid_subset_size, len(f["pool"]), len(ref)))
    if "is" in m:
      if self._adm:   # ADM's: 5,000-image splits, one number
        out["is"] = evaluation.inception_score_adm(f["logits"])
      else:
        out["is"], out["is_std"] = evaluation.inception_score(f["logits"])
    if "sfid" in m:
      out["sfid"] = evaluation.frechet_distance(*evaluation.feature_stats(f["spatial"]),
                                                *self._reference_stats("spatial"))
    if m & {"precision", "recall"}:
      p, r = evaluation.precision_recall(self._extra["pool"]["kept"], f["pool"])
      out.update({k: v for k, v in (("precision", p), ("recall", r)) if k in m})
    if "fd_dinov2" in m:
      out["fd_dinov2"] = evaluation.frechet_distance(
          *evaluation.feature_stats(f["dinov2"]), *self._reference_stats("dinov2"))
    return out

  def __call__(self, model: model_lib.Model, step: int,
               writer: Optional[log_lib.MetricWriter] = None,
               out_dir: Optional[str] = None) -> dict:
    """Samples, scores, logs; returns the metrics ({} on processes other than 0).

    Every process samples (the sampler is one program over all devices);
    process 0 scores and writes. Sampling happens only for the sample
    metrics (all but bpd); bpd scores held-out data. With out_dir and
    eval.save_batch, the samples (and their labels) are also written there
    as one ADM batch, `batch_file`.
    """
    t0 = time.perf_counter()
    metrics = {}
    if set(self.metrics) & set(SAMPLE_METRICS):
      samples, labels = sample_batch(model, self.config, out_dir)
      if jax.process_index() == 0:
        if out_dir and self.config.eval.get("save_batch", False):
          path = batch_file(out_dir, samples.shape)
          if not os.path.exists(path):   # the same samples: a resumed eval keeps the file
            batch_files.write_batch(path, samples, labels)
            print(f"eval: wrote the sample batch {path}", flush=True)
        metrics.update(self.scores(samples))
    if "bpd" in self.metrics:
      if self._bpd_data is None:
        self._bpd_data = bpd_images(self.config)
      metrics.update(bpd_metrics(bpd_chunks(model, self.config, *self._bpd_data, out_dir)))
    if jax.process_index() != 0:
      return {}
    metrics["eval_seconds"] = time.perf_counter() - t0
    if writer is not None:
      writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
    print(f"eval step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
          flush=True)
    return metrics


def batch_file(out_dir: str, shape) -> str:
  """Where eval.save_batch writes the samples: samples_<N>x<H>x<W>x<C>.npz, the
  name guided-diffusion's sampling scripts give their batches."""
  return os.path.join(out_dir, f"samples_{'x'.join(str(int(d)) for d in shape)}.npz")


def _newest_model(workdir: str):
  """(step, Model) of the newest checkpoint that reads back (`ddx.checkpoint.load_with_step`)."""
  from ddx import checkpoint as ckpt_lib
  return ckpt_lib.load_with_step(workdir)


def evaluate(config, workdir: str) -> dict:
  """`--mode eval`: metrics of the newest checkpoint's EMA model, resumable.

  Samples go to workdir/eval/step_XXXXXXX_<sampler><steps>/samples_XXXXX.npz
  (reused when present, also by a later evaluation with more samples), bpd
  batches to bpd_XXXXX.npz in the same folder (reused likewise), the
  metrics to metrics.jsonl / TensorBoard under eval/ and to
  metrics_<num_samples>.json in the same folder.

  Raises:
    ConfigError: missing Inception weights, metrics that do not fit the
      images, or a --config whose images differ from the checkpoint's.
    CheckpointError: no readable checkpoint in workdir.
  """
  evaluator = Evaluator(config, workdir)
  step, model = _newest_model(workdir)
  want = config_lib.image_shape(config)
  if tuple(model.image_shape) != want:
    raise config_lib.ConfigError(
        f"the checkpoint in {workdir} makes {model.image_shape} images but --config says "
        f"{want}; pass the run's own config file")
  if jax.process_index() == 0:
    evaluator.setup()   # reference statistics before sampling: a data error shows early
  e, o = config.eval, eval_options(model, config)
  out_dir = os.path.join(workdir, "eval", f"step_{step:07d}_{o.sampler}{o.steps}")
  writer = log_lib.MetricWriter(workdir, active=jax.process_index() == 0)
  try:
    metrics = evaluator(model, step, writer, out_dir)
  finally:
    writer.close()
  if jax.process_index() == 0:
    # Per sample count: evaluations with more samples reuse the same chunks.
    path = os.path.join(out_dir, f"metrics_{e.num_samples}.json")
    with open(path, "w") as f:
      json.dump({"step": step, "num_samples": e.num_samples, **metrics}, f, indent=2)
    print(f"eval: wrote {path} and metrics.jsonl", flush=True)
  return metrics
