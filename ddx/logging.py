"""Run logging: metrics.jsonl, TensorBoard events and a progress line with ETA.

Only process 0 writes; other processes get a writer that does nothing.
TensorBoard events are written with tensorboardX (no TensorFlow needed).
"""
from __future__ import annotations

import json
import logging as py_logging
import math
import sys
import time
from typing import Mapping

import numpy as np
from etils import epath


def _scalars(metrics: Mapping) -> dict:
  """Flattens metrics to float scalars; a vector m of length n becomes m/0..m/n-1."""
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v)
    if a.ndim == 0:
      out[k] = float(a)
    else:
      for j, x in enumerate(a.reshape(-1)):
        out[f"{k}/{j}"] = float(x)
  return out


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch at import time when it is installed (only to
  accept torch tensors, which ddx never passes), and that import costs over a
  second of every run's start. torch is hidden for that import unless this
  process already loaded it."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None     # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  except ImportError:             # a tensorboardX that needs torch: let it have it
    for name in [m for m in sys.modules if m.startswith("tensorboardX")]:
      del sys.modules[name]
  finally:
    del sys.modules["torch"]
  from tensorboardX import SummaryWriter
  return SummaryWriter


class MetricWriter:
  """Appends one JSON object per log step to metrics.jsonl and mirrors to TensorBoard."""

  def __init__(self, workdir: str, active: bool = True):
    self.active = active
    self._tb = self._jsonl = None
    if not active:
      return
    # Local or gs:// (etils.epath). Remote files take appends poorly, so
    # metrics.jsonl is kept open for the run and flushed at each write.
    self._jsonl = (epath.Path(workdir) / "metrics.jsonl").open("a")
    try:
      self._tb = _summary_writer()(str(epath.Path(workdir) / "tensorboard"))
    except ImportError:  # TensorBoard is a convenience; metrics.jsonl is the record
      self._tb = None

  def _failed(self, err: OSError) -> None:
    """Logs are not worth a crash: on the first write error (say, a full disk) warn
    once and stop writing them. Checkpoints have their own error path."""
    py_logging.warning("ddx: stopped writing metrics/TensorBoard logs: %s", err)
    self.active = False
    for f in (self._jsonl, self._tb):
      try:
        if f is not None:
          f.close()
      except Exception:  # already failing; the warning above says why
        pass

  def write(self, step: int, metrics: Mapping) -> None:
    if not self.active:
      return
    flat = _scalars(metrics)
    rec = {"step": int(step)}
    rec.update({k: (v if math.isfinite(v) else str(v)) for k, v in flat.items()})
    try:
      self._jsonl.write(json.dumps(rec) + "\n")
      self._jsonl.flush()   # a line per log step: tail -f and crashes see it
      if self._tb is not None:
        for k, v in flat.items():
          self._tb.add_scalar(k, v, int(step))
    except OSError as e:
      self._failed(e)

  def write_image(self, step: int, tag: str, image_u8: np.ndarray) -> None:
    """image_u8: [H, W, C] uint8."""
    if self.active and self._tb is not None:
      try:
        self._tb.add_image(tag, image_u8, int(step), dataformats="HWC")
      except OSError as e:
        self._failed(e)

  def flush(self) -> None:
    if self.active:
      try:
        self._jsonl.flush()
        if self._tb is not None:
          self._tb.flush()
      except OSError as e:
        self._failed(e)

  def close(self) -> None:
    if self.active:
      try:
        self._jsonl.close()
        if self._tb is not None:
          self._tb.close()
      except OSError as e:
        self._failed(e)
      self.active = False


class Progress:
  """A one-line progress report: step, loss, steps/s, ETA."""

  def __init__(self, start_step: int, total_steps: int, active: bool = True,
               stream=sys.stdout):
    self.total = total_steps
    self.active = active
    self.stream = stream
    self._t0 = time.perf_counter()
    self._s0 = start_step

  def reset(self, step: int) -> None:
    """Restart the rate clock (e.g. after the first step, which includes compile)."""
    self._t0, self._s0 = time.perf_counter(), step

  def rate(self, step: int) -> float:
    dt = time.perf_counter() - self._t0
    return (step - self._s0) / dt if dt > 0 and step > self._s0 else float("nan")

  def report(self, step: int, metrics: Mapping) -> None:
    if not self.active:
      return
    r = self.rate(step)
    eta = (self.total - step) / r if r == r and r > 0 else float("nan")
    loss = float(np.asarray(metrics.get("loss", float("nan"))))
    print(f"step {step}/{self.total}  loss {loss:.4f}  {r:.2f} steps/s  "
          f"ETA {hms(eta)}", file=self.stream, flush=True)


def hms(seconds: float) -> str:
  """A duration as H:MM:SS (hours unbounded), "?" when it is not finite (no rate yet)."""
  if not math.isfinite(seconds):
    return "?"
  s = int(seconds)
  return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"
