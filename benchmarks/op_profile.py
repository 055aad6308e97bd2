"""Where a training or sampling step spends its time, by XLA operation and category.

  python benchmarks/op_profile.py --config cifar10 --set model.dtype=bfloat16 --batch 128
  python benchmarks/op_profile.py --config cifar10_dit --what sample --steps 2
  python benchmarks/op_profile.py --config test --batch 4      # a CPU run in seconds

Compiles the run's real jitted update (`ddx.train.make_setup`) or its sampler
(`ddx.model.sample_jit`, --steps steps) for --config (a file in configs/) with
--set overrides, runs it once to warm up, then --reps times under the JAX
profiler (`jax.profiler.trace` into a temporary directory, or --trace_dir).
The trace's op events (their `hlo_op`) are matched with the compiled
program's optimised HLO, and each op's self time is put in one category:

  matmul/conv      convolutions and matmuls (dot, cuBLAS/cuDNN custom calls)
                   and fusions containing one, outside attention cores
  attention        the attention core (q k^T, softmax, p v; ops named under an
                   attention module other than its projections), fused
                   attention kernels (cuDNN fMHA, Pallas flash)
  norm/elementwise fusions and ops of arithmetic and reductions without a
                   matmul: normalisation, activations, optimizer, EMA
  communication    collectives (all-reduce, all-gather, reduce-scatter, ...)
  other            copies, transposes, pads, slices, control flow, RNG

Prints the top --top ops (time per step, share, category) and the share of
each category; on CPU the times are summed over XLA's worker threads. The
name is not profile.py because that would shadow Python's `profile` module
(imported by cProfile, which the ddx import chain loads) when run as a script.
"""
from __future__ import annotations

import argparse
import ast
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CATEGORIES = ("matmul/conv", "attention", "norm/elementwise", "communication", "other")

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast", "send", "recv",
                "ragged-all-to-all")
# Data movement, layout and control: neither arithmetic nor a matmul.
_MOVES = {"copy", "copy-start", "copy-done", "transpose", "bitcast", "reshape",
          "broadcast", "slice", "dynamic-slice", "dynamic-update-slice",
          "concatenate", "pad", "gather", "scatter", "reverse", "tuple",
          "get-tuple-element", "parameter", "constant", "iota", "while",
          "conditional", "call", "rng", "rng-bit-generator",
          "rng-get-and-update-state", "sort", "after-all", "partition-id",
          "replica-id", "infeed", "outfeed", "bitcast-convert", "optimization-barrier",
          "add-dependency", "domain", "get-dimension-size", "async-start",
          "async-update", "async-done"}
# Submodules of an attention block that are projections, not its core.
_PROJECTIONS = {"q", "k", "v", "qkv", "proj", "proj_out", "norm", "out"}
_ATTENTION_MODULE = re.compile(r"(^|_)(attn|attention)(_\d+)?$")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}])([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


class Instr(NamedTuple):
  opcode: str
  calls: tuple          # names of the computations it calls
  op_name: str          # JAX's name stack (module path) from the metadata
  target: str           # custom-call target, "" otherwise


def parse_hlo(text: str) -> tuple[dict, dict, str]:
  """The instructions of an optimised HLO module's text.

  Args:
    text: `compiled.as_text()`.

  Returns:
    (instrs, computations, module): instrs maps each instruction name to its
    Instr; computations maps each computation name to its instructions'
    names; module is the HloModule name (what the trace's hlo_module says).
  """
  instrs, comps, comp, module = {}, {}, None, ""
  for line in text.splitlines():
    if line.startswith("HloModule "):
      module = line.split()[1].rstrip(",")
      continue
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      m = _HEADER.match(line)
      comp = m.group(1) if m else None
      comps.setdefault(comp, [])
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    name, rest = m.groups()
    op = _OPCODE.search(rest)
    calls = _CALLS.findall(rest)
    for group in _CALL_LISTS.findall(rest):
      calls += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
    op_name = _OP_NAME.search(rest)
    target = _TARGET.search(rest)
    instrs[name] = Instr(op.group(1) if op else "", tuple(calls),
                         op_name.group(1) if op_name else "",
                         target.group(1) if target else "")
    comps[comp].append(name)
  return instrs, comps, module


def _in_attention_core(op_name: str) -> bool:
  """Whether JAX's name stack puts the op inside an attention module, but not
  in one of its projections (q/k/v/qkv, the output projection, the norm)."""
  parts = op_name.split("/")
  for i, part in enumerate(parts[:-1]):
    if _ATTENTION_MODULE.search(part):
      rest = parts[i + 1:-1]
      return not (rest and rest[0] in _PROJECTIONS)
  return False


def categorise(instrs: dict, comps: dict) -> dict:
  """The category (one of CATEGORIES) of every instruction.

  A fusion or call takes the strongest category found in what it calls
  (communication > attention > matmul/conv > norm/elementwise > other); the
  attention category comes from the op's own name stack.
  """
  rank = {c: i for i, c in enumerate(("other", "norm/elementwise", "matmul/conv",
                                      "attention", "communication"))}
  memo = {}

  def comp_kind(comp):   # the strongest kind of work inside a computation
    if comp not in memo:
      memo[comp] = "other"   # guards recursion
      kinds = [own(instrs[n]) for n in comps.get(comp, ())]
      memo[comp] = max(kinds, key=rank.get, default="other")
    return memo[comp]

  def own(ins):
    op, target = ins.opcode, ins.target.lower()
    if op.startswith(_COLLECTIVES):
      return "communication"
    if op == "custom-call":
      if any(s in target for s in ("fmha", "flash", "attention")):
        return "attention"
      if any(s in target for s in ("conv", "gemm", "matmul", "cublas", "dot")):
        return "matmul/conv"
      if any(part.startswith("norm") for part in ins.op_name.split("/")):
        return "norm/elementwise"    # a Pallas kernel in a norm module (model.norm_kernel)
      return "other"
    if op in ("convolution", "dot", "scaled-dot"):
      return "matmul/conv"
    if op == "fusion" or op in ("call", "while", "conditional") or ins.calls:
      kinds = [comp_kind(c) for c in ins.calls]
      kind = max(kinds, key=rank.get, default="other")
      if op in ("while", "conditional", "call"):   # their body ops are profiled apart
        return "other"
      return kind
    if op in _MOVES:
      return "other"
    return "norm/elementwise"

  out = {}
  for name, ins in instrs.items():
    kind = own(ins)
    if kind in ("matmul/conv", "norm/elementwise") and _in_attention_core(ins.op_name):
      kind = "attention"
    out[name] = kind
  return out


# Lines the profiler derives from others (their events repeat the real ones).
_DERIVED = ("XLA Modules", "XLA TraceMe", "Steps", "TensorFlow Ops", "TensorFlow Name Scope",
            "Framework Ops", "Framework Name Scope", "Source code", "Launch Stats")


def op_self_times(events: list, instrs: dict, module: str) -> dict:
  """Microseconds of self time per HLO op of `module` in a trace.

  Args:
    events: the Chrome-trace events of `jax.profiler.trace`'s .trace.json.gz.
    instrs: parse_hlo's instructions (op names of the profiled program).
    module: the program's HloModule name.

  Returns:
    {op name: µs}; a nested event's time is its parent's minus its own.
    Device lines (/device:...) are used when there are any, else the host's
    XLA threads (CPU); derived lines are skipped, except "XLA Ops" when a
    device has nothing else (TPU).
  """
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  by_line = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X":
      continue
    args = e.get("args") or {}
    op = args.get("hlo_op") or e.get("name", "")
    if op not in instrs:
      continue
    mod = args.get("hlo_module", module)
    if module and not str(mod).startswith(module):
      continue
    by_line[(e["pid"], e.get("tid"))].append((float(e["ts"]), float(e.get("dur", 0)), op))
  lines = {k: v for k, v in by_line.items()
           if not threads.get(k, "").startswith(_DERIVED)}
  device = {k: v for k, v in lines.items() if procs.get(k[0], "").startswith("/device")}
  if device:
    lines = device
    real = {k: v for k, v in lines.items() if threads.get(k, "") != "XLA Ops"}
    lines = real or lines
  times = collections.defaultdict(float)
  for evs in lines.values():
    evs.sort(key=lambda x: (x[0], -x[1]))
    stack = []   # [end, op] of the enclosing events
    for ts, dur, op in evs:
      while stack and stack[-1][0] <= ts:
        stack.pop()
      if stack:
        times[stack[-1][1]] -= dur
      times[op] += dur
      stack.append([ts + dur, op])
  return dict(times)


def load_trace(trace_dir: str) -> list:
  """The events of the newest .trace.json.gz under `trace_dir`."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no .trace.json.gz under {trace_dir}; the profiler wrote none")
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def _step_program(config, what: str, batch: int, steps: int):
  """(compiled program, run) for one training update or one sampler call."""
  import jax
  if what == "train":
    from gpu_latent import compiled_train_step
    compiled, args, _ = compiled_train_step(config, batch)
    box = [args[0]]

    def run():   # the state is donated: carry it
      box[0], metrics = compiled(box[0], *args[1:])
      jax.block_until_ready(metrics)
    return compiled, run
  import speed
  from ddx import model as model_lib
  model = speed.ddx_model(config)
  rng = jax.random.key(0)
  s = config.sampling
  kw = dict(num_samples=batch, steps=steps, sampler=s.sampler, clip_x0=s.clip_x0,
            guided=False, ddpm_variance=s.ddpm_variance, spacing=None,
            return_trajectory=False)
  compiled = model_lib.sample_jit.lower(model, rng, None, 1.0, s.eta, None, **kw).compile()
  run = lambda: model_lib.sample_fn(model, rng, steps=steps, num_samples=batch,
                                   sampler=s.sampler, eta=s.eta).block_until_ready()
  return compiled, run


def profile(config, what: str = "train", batch: int = 8, steps: int = 1, reps: int = 2,
            trace_dir: str = "") -> dict:
  """Profiles a training update or a sampler call of `config`.

  Args:
    config: a run config (ddx.config); training.remat, model.attention and the
      rest apply as in training.
    what: "train" (one update at `batch`) or "sample" (the run's sampler with
      `steps` steps, `batch` samples).
    reps: profiled calls (after one warm-up call).
    trace_dir: where the profiler writes; "" = a temporary directory.

  Returns:
    {"ops": [(name, category, opcode, µs per call)] longest first,
     "categories": {category: µs per call}, "total_us", "wall_s" (per call,
     timed without the profiler),
     "backend", "module"}.
  """
  import jax
  compiled, run = _step_program(config, what, batch, steps)
  instrs, comps, module = parse_hlo(compiled.as_text())
  kinds = categorise(instrs, comps)
  run()
  t0 = time.perf_counter()   # wall time without the profiler's overhead
  for _ in range(reps):
    run()
  wall = (time.perf_counter() - t0) / reps
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="ddx-profile-")
  with jax.profiler.trace(trace_dir):
    for _ in range(reps):
      run()
  times = op_self_times(load_trace(trace_dir), instrs, module)
  if not times:
    raise RuntimeError(f"the trace in {trace_dir} has no op events of {module} on "
                       f"{jax.default_backend()}; open it in Perfetto to see what it holds")
  ops = sorted(((n, kinds[n], instrs[n].opcode, us / reps) for n, us in times.items()),
               key=lambda r: -r[3])
  cats = {c: 0.0 for c in CATEGORIES}
  for _, c, _, us in ops:
    cats[c] += us
  return {"ops": ops, "categories": cats, "total_us": sum(cats.values()), "wall_s": wall,
          "backend": jax.default_backend(), "module": module, "trace_dir": trace_dir}


def table(report: dict, top: int = 20) -> str:
  """The report as two markdown tables: categories, then the top ops."""
  total = report["total_us"] or 1.0
  lines = [f"{report['module']} on {report['backend']}: {total / 1e3:.2f} ms of op time "
           f"per call ({report['wall_s'] * 1e3:.1f} ms wall)", "",
           "| category | ms per call | share |", "|---|---|---|"]
  for c, us in report["categories"].items():
    lines.append(f"| {c} | {us / 1e3:.3f} | {100 * us / total:.1f}% |")
  lines += ["", "| op | opcode | category | ms per call | share |", "|---|---|---|---|---|"]
  for name, cat, opcode, us in report["ops"][:top]:
    lines.append(f"| {name} | {opcode} | {cat} | {us / 1e3:.3f} | {100 * us / total:.1f}% |")
  return "\n".join(lines)


def _override(config, setting: str) -> None:
  """Applies one --set group.field=value (value as a Python literal, else a string)."""
  key, _, text = setting.partition("=")
  group, _, field = key.partition(".")
  if not field or group not in config or field not in config[group]:
    raise SystemExit(f"--set {setting!r}: {key!r} is not a config key (group.field)")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  config[group][field] = value


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="cifar10", help="a config in configs/ (name or path)")
  ap.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                  help="config override, repeatable (e.g. --set training.remat=dots)")
  ap.add_argument("--what", choices=("train", "sample"), default="train")
  ap.add_argument("--batch", type=int, default=0, help="0 = training.batch_size")
  ap.add_argument("--steps", type=int, default=1, help="sampler steps (--what sample)")
  ap.add_argument("--reps", type=int, default=3, help="profiled calls after a warm-up")
  ap.add_argument("--top", type=int, default=20)
  ap.add_argument("--trace_dir", default="", help="keep the trace here (TensorBoard/Perfetto)")
  ap.add_argument("--out", default="", help="also write the report as JSON")
  args = ap.parse_args()
  from ddx import config as config_lib
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = args.config if args.config.endswith(".py") else os.path.join(
      root, "configs", f"{args.config}.py")
  config = config_lib.from_file(path)
  for s in args.set:
    _override(config, s)
  config_lib.validate(config)
  report = profile(config, args.what, args.batch or config.training.batch_size, args.steps,
                   args.reps, args.trace_dir)
  print(table(report, args.top))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
