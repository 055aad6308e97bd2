"""Every runnable block of README.md and docs/*.md runs as written.

Blocks are found, not listed: each ```python and ```bash block of README.md and
docs/*.md is one test. A block preceded by `<!-- skip-test: REASON -->` is not
run; SKIPPED below must name every such block with the same reason, so a block
cannot go untested silently. All blocks share ONE short training run at
`runs/digits` in a temporary working directory (README's training command, made
cheap as below), and the compile cache of tests/conftest.py.

Python blocks are exec'd there as written. Shell blocks may only run
`python -m ddx.main ...`; each command runs in-process through ddx.main's own
`main` (flags parsed into a fresh FlagValues), made cheap as the tests' own
runs are: training commands run 2 steps (of a test-sized network, except README's
command, which resumes the shared run at its end), sample and eval commands draw
a handful of samples or images.
"""
import glob
import os
import re
import shlex

import numpy as np
import pytest

from testutils import ROOT, load_config, main_in_process

# (page, text of the block's first line) -> the reason its skip marker gives.
SKIPPED = {
    ("docs/posthoc-ema.md", "python -m ddx.main --config configs/digits.py --workdir runs/digits_ph \\"):
        "tests/test_posthoc_ema.py trains with snapshots through the same trainer and checks them against the paper's recursion",
    ("docs/posthoc-ema.md", "python -m ddx.posthoc_ema --workdir runs/digits_ph --sigma_rel 0.08 --out runs/digits_ph_008"):
        "tests/test_posthoc_ema.py runs this command on a tiny run and loads, samples and scores its output",
    ("docs/meanflow.md", "python -m ddx.main --config configs/digits_meanflow.py --workdir runs/digits_meanflow"):
        "tests/test_meanflow.py trains, resumes, loads and samples MeanFlow with 1 and 2 steps in-process; docs/shortcut.md's block runs a few-step config through the CLI",
    ("docs/meanflow.md", "import jax, ddx"):
        "needs the run above: tests/test_meanflow.py loads a trained MeanFlow run and samples it with 1 and 2 steps",
    ("docs/shortcut.md", "python -m ddx.main --config configs/digits_shortcut.py --workdir runs/digits_shortcut"):
        "tests/test_shortcut_process.py trains, resumes, loads and samples a shortcut run in-process (1, 2 steps, guided); --mode sample is process-agnostic and runs in test_train.py",
    ("docs/processes.md", "python -m ddx.main --config configs/digits_edm.py --workdir runs/digits_edm"):
        "tests/test_processes.py trains, resumes and samples every process through the same trainer in-process",
    ("docs/checkpoints.md", "python -m ddx.main --config configs/digits_flow.py --workdir runs/digits_flow"):
        "two training runs; tests/test_two_times.py runs init_from through the trainer's own start-up",
    ("docs/speed.md", "python -m ddx.main --config configs/cifar10.py --workdir runs/c10 \\"):
        "needs CIFAR-10 and a GPU",
    ("docs/speed.md", "python benchmarks/op_profile.py --config cifar10 --set model.dtype=bfloat16 --batch 128"):
        "benchmarks; tests/test_op_profile.py profiles a tiny config, gpu_speed.py --quick is its CPU smoke run",
    ("README.md", "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
                  "python -m ddx.main --config configs/digits.py --workdir runs/digits"):
        "installs ddx; its training command runs in README's Train, sample, evaluate block",
    ("README.md", "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' "
                  "&& python -m pytest tests -q -n 2 --dist loadfile"):
        "installs the test extra and runs the whole suite: this is what .ci/run runs",
    ("docs/samplers.md", "import jax, jax.numpy as jnp"):
        "needs a class-conditional run: test_features.py runs it on a random conditional network",
    ("docs/backbones.md", "python -m ddx.main --config configs/article.py --workdir runs/article \\"):
        "needs your image folder (data.path)",
    ("docs/backbones.md",
     "python -m ddx.main --config configs/cifar10_dit.py --workdir runs/cifar10_dit   # DiT-S/2, pixels"):
        "needs CIFAR-10 prepared (docs/data.md)",
    ("docs/data.md", "python -m ddx.main --config configs/cifar10.py --workdir runs/cifar10 --config.data.num_workers=8"):
        "needs CIFAR-10 prepared",
    ("docs/data.md", "pip install tensorflow tensorflow-datasets"):
        "needs the network and TensorFlow",
    ("docs/data.md", "python -m ddx.main --config configs/cifar10.py --workdir runs/cifar10 \\"):
        "needs CIFAR-10 prepared",
    ("docs/checkpoints.md", "python -m ddx.main --config configs/cifar10.py --workdir runs/ddpm-cifar10 --mode sample \\"):
        "needs published weights; test_convert.py converts random ones",
    ("docs/checkpoints.md", "python benchmarks/reproduce_cifar10.py --workdir runs/ddpm-cifar10 \\"):
        "needs published weights, CIFAR-10 and an accelerator; test_reproduce_cifar10.py runs it on a tiny model",
    ("docs/evaluation.md", "# CIFAR-10: FID-50k, KID and IS of the newest checkpoint"):
        "needs CIFAR-10 and the Inception weights",
    ("docs/evaluation.md", "pip install torch       # only for this step; not a ddx dependency"):
        "needs pytorch-fid's weight file",
    ("docs/evaluation.md", "# a run's samples scored against ADM's ImageNet-256 reference, written as an ADM batch too"):
        "needs ImageNet samples, ADM's reference batch and the Inception weights",
    ("docs/evaluation.md", "python -m ddx.evaluate samples_50000x256x256x3.npz VIRTUAL_imagenet256_labeled.npz \\"):
        "needs two ADM batches and the Inception weights; tests/test_adm_metrics.py and tests/test_eval_reference.py run main() on made batches",
    ("docs/latent.md", "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema"):
        "downloads published weights",
    ("docs/latent.md", "from ddx import autoencoder"):
        "needs published weights; test_autoencoder.py runs these calls on random weights",
    ("docs/latent.md", "python -m ddx.main --config configs/imagenet256_dit.py --mode encode --workdir runs/in256 \\"):
        "needs ImageNet and the VAE; test_latents.py encodes and trains on digits",
    ("docs/latent.md", "wget https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"):
        "downloads published weights",
    ("docs/meanflow.md", "python -m ddx.main --config configs/digits_flow.py --workdir runs/digits_flow"):
        "tests/test_two_times.py checks that a two-time network started by init_from from a one-time run computes its output; tests/test_meanflow.py trains MeanFlow through the same trainer",
    ("docs/latent.md", "import jax, jax.numpy as jnp, ddx"):
        "needs published weights; test_dit_import.py imports random ones",
}

# Cheap versions of what a command does (appended, so they win over the block's).
# Trainings other than README's (the shared run, on the real digits network) use
# a test-sized network; U-Net keys are ignored by a DiT and DiT keys by a U-Net.
SMALL_NET = ["--config.model.ch=8", "--config.model.num_res_blocks=1",
             "--config.model.num_groups=4", "--config.model.hidden_size=32",
             "--config.model.depth=1", "--config.model.num_heads=2"]
CHEAP = {
    "train": ["--config.training.num_steps=2", "--config.training.batch_size=16",
              "--config.training.log_every=1", "--config.training.sample_every=0",
              "--config.eval.every_steps=0", "--config.training.steps_per_dispatch=1"],
    "sample": ["--config.sampling.num_samples=4", "--config.sampling.steps=2"],
    "eval": ["--config.eval.num_samples=8", "--config.eval.batch_size=4",
             "--config.eval.steps=2", "--config.eval.bpd_num_images=4",
             "--config.eval.bpd_steps=8"],   # the steps of likelihood.md's Python block
}

_BLOCK = re.compile(r"(?:<!--\s*skip-test:\s*(?P<skip>.*?)\s*-->\s*\n)?"
                    r"^(?P<indent>[ \t]*)```(?P<lang>\S*)\n(?P<code>.*?)^(?P=indent)```",
                    re.S | re.M)


def _pages():
  return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in
                                glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _blocks():
  """(page, index, lang, code, skip reason or None) of every fenced block."""
  out = []
  for page in _pages():
    with open(os.path.join(ROOT, page)) as f:
      text = f.read()
    for i, m in enumerate(_BLOCK.finditer(text)):
      code = "\n".join(l[len(m["indent"]):] for l in m["code"].split("\n"))
      out.append((page, i, m["lang"], code, m["skip"]))
  return out


def _first_line(code):
  return code.strip().split("\n")[0].strip()


def _runnable():
  return [pytest.param(page, lang, code, id=f"{page}:{i}")
          for page, i, lang, code, skip in _blocks()
          if lang in ("python", "bash") and skip is None]


def test_every_block_is_run_or_listed_as_skipped():
  """Only python, bash and plain blocks; skip markers match SKIPPED exactly."""
  marked = {}
  for page, i, lang, code, skip in _blocks():
    assert lang in ("python", "bash", ""), f"{page} block {i}: ```{lang} is neither run nor plain"
    if skip is not None:
      assert lang, f"{page} block {i}: a skip marker on a plain block"
      marked[(page, _first_line(code))] = skip
  assert marked == SKIPPED


def test_readme_test_command_is_what_ci_runs():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = [l.strip() for l in f if l.strip() and not l.startswith("#")]
  readme = [code for page, _, lang, code, _ in _blocks() if page == "README.md" and lang == "bash"]
  assert readme[1].strip().endswith("&& " + ci[-1])
  assert "pip install -e '.[test]'" in readme[1] and ci[-2] == "pip install -q -e '.[test]'"


README_RUN = ["--config", "configs/digits.py", "--workdir", "runs/digits"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """A working directory holding one short training run at runs/digits."""
  tmp = tmp_path_factory.mktemp("docs")
  cwd = os.getcwd()
  os.chdir(tmp)
  try:
    _run_main(README_RUN)
    yield tmp
  finally:
    os.chdir(cwd)


def _commands(code):
  """The shell block's commands as argument lists (continuations joined)."""
  return [a for a in (shlex.split(l, comments=True)
                      for l in code.replace("\\\n", " ").split("\n")) if a]


def _run_main(args):
  """Runs `python -m ddx.main ARGS` in-process, cheaply; returns its mode and workdir."""
  args = [a.replace("configs/", os.path.join(ROOT, "configs") + "/", 1)
          if a.startswith(("configs/", "--config=configs/")) else a for a in args]
  modes = [a.split("=", 1)[1] for a in args if a.startswith("--mode=")]
  modes += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--mode"]
  mode = (modes or ["train"])[-1]
  small = SMALL_NET if mode == "train" and args != README_RUN else []
  code, workdir = main_in_process(["ddx.main", *args, *CHEAP[mode], *small])
  if code:
    pytest.fail(f"python -m ddx.main {' '.join(args)} exited {code} (stderr above)")
  return mode, workdir


# What a block must produce, checked after it ran (block text -> check).
def _check_python(code, scope):
  if 'ddx.load("runs/digits")' in code and "ddx.sample_fn" in code and "invert_fn" not in code:
    assert scope["imgs"].shape == (load_config("digits").sampling.num_samples, 8, 8, 1)
  if "invert_fn" in code:      # 8 interpolants of two digits
    assert scope["imgs"].shape == (8, 8, 8, 1)
  if "processes.register(SPEC)" in code:   # docs/adding.md: a process trained and sampled
    from ddx import processes
    assert int(scope["state"].step) == 2 and scope["images"].shape == (2, 8, 8, 1)
    assert bool(np.all(np.isfinite(scope["images"]))) and "ve" not in processes.REGISTRY
  if "models.register(SPEC)" in code:   # docs/adding.md: a backbone trained and sampled
    from ddx import models
    assert int(scope["state"].step) == 2 and scope["pixels"].shape == (2, 8, 8, 1)
    assert bool(np.all(np.isfinite(scope["pixels"]))) and "mlp" not in models.REGISTRY
  if "ddx.bpd" in code:        # finite, positive bits/dim per image
    assert scope["bpd"].shape == (4,) and bool((scope["bpd"] > 0).all())


@pytest.mark.slow
@pytest.mark.parametrize("page,lang,code", _runnable())
def test_block_runs(page, lang, code, workspace):
  if lang == "python":
    scope = {}
    exec(compile(code, page, "exec"), scope)
    _check_python(code, scope)
    return
  for argv in _commands(code):
    assert argv[:3] == ["python", "-m", "ddx.main"], (
        f"{page}: a runnable shell block may only run python -m ddx.main; mark "
        f"`{' '.join(argv)}` with <!-- skip-test: REASON --> and list it in SKIPPED")
    mode, workdir = _run_main(argv[3:])
    if mode == "train":
      assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
