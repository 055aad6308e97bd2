"""The field's evaluator: ADM's metrics of a sample batch against a reference batch.

  python -m ddx.evaluate SAMPLES.npz REFERENCE.npz --inception_weights FILE.npz

prints, one per line and with ADM's labels, `Inception Score:`, `FID:`,
`sFID:`, `Precision:` and `Recall:`, computed as guided-diffusion's
evaluations/evaluator.py computes them (whose command line takes the
reference first; this one takes the samples first). Both files are ADM .npz
batches (ddx/batch_files.py); a reference's stored mu/sigma (mu_s/sigma_s)
are used in place of statistics of its images, as ADM does, and its images
give precision and recall. The Inception weights are pytorch-fid's, converted
once with `python -m ddx.inception --convert IN.pth OUT.npz`. By default the
images are prepared as ADM's TF graph prepares them (`--protocol adm`);
`--protocol pytorch_fid` gives pytorch-fid's numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, Optional

import numpy as np

from ddx import batch_files
from ddx import evaluation

LABELS = ("Inception Score", "FID", "sFID", "Precision", "Recall")
ADM_BATCH_SIZE = 64   # ADM's Evaluator(batch_size=64)


class EvaluateError(ValueError):
  """Bad input to the evaluator; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Extractor:
  """The feature functions the metrics need.

  Attributes:
    features: uint8 [N, H, W, C] -> (pool [N, D] float32, spatial [N, S] float32).
    logits: pool [N, D] -> class logits [N, K] for the Inception Score.
    extra: label -> (uint8 images -> features [N, E]): further feature spaces
      scored by Fréchet distance against the reference images, one line
      each after ADM's five (the hook for FD-DINOv2).
  """
  features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  logits: Callable[[np.ndarray], np.ndarray]
  extra: dict = dataclasses.field(default_factory=dict)


def inception_extractor(weights_path: str, batch_size: int = ADM_BATCH_SIZE,
                        protocol: str = "adm") -> Extractor:
  """The Inception features (pool3, sFID's spatial) and ADM's bias-free logits.

  Raises:
    ddx.inception.InceptionWeightsError: the weights file is missing or wrong.
  """
  from ddx import inception
  variables = inception.put_weights(inception.load_weights(weights_path))

  def features(images_u8):
    pool, spatial, _ = inception.features(variables, images_u8, batch_size=batch_size,
                                          protocol=protocol, spatial=True)
    return pool, spatial

  return Extractor(features=features,
                   logits=lambda pool: inception.adm_logits(variables, pool))


def _stats(batch: batch_files.ReferenceBatch, kind: str, acts: Optional[np.ndarray],
           name: str, width: int):
  """(mu, sigma) of one feature space: the file's own when stored (as ADM
  prefers them), else of the activations; None when neither exists."""
  if kind in batch.stats:
    mu, sigma = batch.stats[kind]
    if len(mu) != width:
      keys = batch_files.STAT_PAIRS[kind]
      raise EvaluateError(f"{name}: {keys[0]} has {len(mu)} dims, the network's {kind} "
                          f"features have {width}; was it made with another network?")
    return mu, sigma
  if acts is None:
    return None
  if len(acts) < 2:
    raise EvaluateError(f"{name}: statistics need at least 2 images, it has {len(acts)}")
  return evaluation.feature_stats(acts)


def evaluate_batches(samples: batch_files.ReferenceBatch,
                     reference: batch_files.ReferenceBatch, extractor: Extractor,
                     k: int = 3, split_size: int = evaluation.ADM_IS_SPLIT,
                     names: tuple[str, str] = ("samples", "reference")
                     ) -> tuple[dict, list[str]]:
  """ADM's five metrics (and any extra Fréchet distances) of samples vs reference.

  Args:
    samples: a batch with images.
    reference: a batch with images and/or statistics.
    extractor: the feature functions (`inception_extractor`).
    k: precision/recall neighbourhood size (ADM: 3).
    split_size: Inception Score chunk size (ADM: 5000).
    names: the two batches' names for messages.
  Returns:
    ({label: value} in print order, notes on what was skipped and why).
  Raises:
    EvaluateError: samples without images, statistics of the wrong width,
      too few images.
  """
  sname, rname = names
  if samples.images is None:
    raise EvaluateError(
        f"{sname} has statistics but no images (arr_0); ddx.evaluate takes SAMPLES.npz "
        "then REFERENCE.npz (ADM's evaluator.py takes the reference first)")
  s_pool, s_spatial = extractor.features(samples.images)
  r_pool = r_spatial = None
  if reference.images is not None:
    r_pool, r_spatial = extractor.features(reference.images)
  out, notes = {}, []
  out["Inception Score"] = evaluation.inception_score_adm(extractor.logits(s_pool),
                                                          split_size=split_size)
  for label, kind, s_acts, r_acts in (("FID", "pool", s_pool, r_pool),
                                      ("sFID", "spatial", s_spatial, r_spatial)):
    width = s_acts.shape[1]
    s_stats = _stats(samples, kind, s_acts, sname, width)
    r_stats = _stats(reference, kind, r_acts, rname, width)
    if r_stats is None:
      notes.append(f"{rname} has no images (arr_0) and no {kind} statistics "
                   f"({', '.join(batch_files.STAT_PAIRS[kind])}): {label} skipped")
      continue
    out[label] = evaluation.frechet_distance(*s_stats, *r_stats)
  if r_pool is None:
    notes.append(f"{rname} has statistics but no images (arr_0): Precision and "
                 "Recall skipped (they need the reference's features)")
  else:
    for name, acts in ((sname, s_pool), (rname, r_pool)):
      if len(acts) <= k:
        raise EvaluateError(f"{name}: precision and recall with k={k} need more than "
                            f"{k} images, it has {len(acts)}")
    out["Precision"], out["Recall"] = evaluation.precision_recall(r_pool, s_pool, k=k)
  for label, encode in extractor.extra.items():
    if reference.images is None:
      notes.append(f"{rname} has no images (arr_0): {label} skipped")
      continue
    out[label] = evaluation.frechet_distance(
        *evaluation.feature_stats(encode(samples.images)),
        *evaluation.feature_stats(encode(reference.images)))
  return out, notes


def _dinov2_features(folder: str, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images -> DINOv2 CLS features, dgm-eval's protocol (`ddx.eval_run.dinov2_extractor`)."""
  from ddx import eval_run
  fn = eval_run.dinov2_extractor(folder, batch_size).fn
  return lambda u8: fn(u8)[0]


def main(argv=None, extractor: Optional[Extractor] = None) -> int:
  """The command line; `extractor` replaces the Inception (tests, other encoders)."""
  from ddx import inception
  from ddx.encoders.dinov2 import EncoderWeightsError
  p = argparse.ArgumentParser(
      prog="python -m ddx.evaluate",
      description="ADM's evaluator: Inception Score, FID, sFID, precision and recall "
                  "of SAMPLES.npz against REFERENCE.npz (ADM .npz batches).")
  p.add_argument("samples", metavar="SAMPLES.npz")
  p.add_argument("reference", metavar="REFERENCE.npz")
  p.add_argument("--inception_weights", metavar="FILE.npz", default="",
                 help="pytorch-fid's Inception, converted with "
                      "python -m ddx.inception --convert IN.pth OUT.npz")
  p.add_argument("--batch_size", type=int, default=ADM_BATCH_SIZE,
                 help="images per Inception forward pass (default %(default)s, ADM's)")
  p.add_argument("--protocol", choices=inception.PROTOCOLS, default="adm",
                 help="image preparation: the TF graph's (adm, default) or pytorch-fid's")
  p.add_argument("--dinov2_weights", metavar="FOLDER", default="",
                 help="also print FD-DINOv2 (dgm-eval's protocol) with this converted "
                      "DINOv2 folder (ViT-L/14 for dgm-eval's numbers; docs/encoders.md)")
  args = p.parse_args(argv)
  try:
    if args.batch_size < 1:
      raise EvaluateError(f"--batch_size must be >= 1, got {args.batch_size}")
    samples = batch_files.read_batch(args.samples)
    reference = batch_files.read_batch(args.reference)
    if extractor is None:
      if not args.inception_weights:
        raise EvaluateError(
            "no --inception_weights; convert pytorch-fid's "
            f"{inception.PYTORCH_FID_FILE} once with python -m ddx.inception "
            "--convert IN.pth OUT.npz and pass OUT.npz")
      extractor = inception_extractor(args.inception_weights, args.batch_size,
                                      args.protocol)
    if args.dinov2_weights:
      extractor = dataclasses.replace(extractor, extra={
          **extractor.extra, "FD-DINOv2": _dinov2_features(args.dinov2_weights,
                                                           args.batch_size)})
    metrics, notes = evaluate_batches(samples, reference, extractor,
                                      names=(args.samples, args.reference))
  except (batch_files.BatchFileError, inception.InceptionWeightsError,
          EncoderWeightsError, EvaluateError) as e:
    print(f"ddx.evaluate: error: {e}", file=sys.stderr)
    return 2
  for note in notes:
    print(f"ddx.evaluate: note: {note}", file=sys.stderr)
  for label, value in metrics.items():
    print(f"{label}: {value}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
