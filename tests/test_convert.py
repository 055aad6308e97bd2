"""ddx.convert: diffusers UNet2DModel checkpoints -> ddx workdirs.

The reference is diffusers itself: randomly initialised UNet2DModels (every
weight perturbed, so no zero or unit init hides a mis-mapped weight) are saved
with `save_pretrained`, converted, and the ddx network must compute what the
torch network computes, and ddx's DDIM what diffusers' DDIMPipeline computes
from the same x_T. Layouts: google/ddpm-cifar10-32's block structure and the
celebahq/church 256-pixel one, both at small width, and one with diffusers'
own defaults (cos-first time embedding, freq_shift 0, symmetric downsampling
pad, 8-channel attention heads, GroupNorm eps 1e-5, a class-label table).
"""
import inspect
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import ddx
from ddx import convert
from ddx.convert import common, unet
from ddx.models.layers import timestep_embedding

from testutils import ROOT, load_config, tree_digest

# DDPM's layouts as in the google/ddpm-* configs, at small width.
_DDPM = dict(flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
             attention_head_dim=None, norm_eps=1e-6)
LAYOUTS = {
    # google/ddpm-cifar10-32: (128, 256, 256, 256), attention at 16x16.
    "cifar10": dict(_DDPM, sample_size=32, block_out_channels=(32, 64, 64, 64),
                    layers_per_block=2, norm_num_groups=8,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D",
                                      "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D",
                                    "UpBlock2D")),
    # google/ddpm-celebahq-256 / ddpm-church-256: (128, 128, 256, 256, 512,
    # 512), attention at 16x16.
    "256": dict(_DDPM, sample_size=256, block_out_channels=(8, 8, 16, 16, 32, 32),
                layers_per_block=2, norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
    # diffusers' defaults for what DDPM fixed, and a class-label table.
    "diffusers": dict(sample_size=16, block_out_channels=(32, 64),
                      layers_per_block=1, norm_num_groups=8,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                      num_class_embeds=5),
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """torch's tiny-channel convs ran 3x faster on one thread than on two here
  (its threads fight XLA's and the other test worker's for 2 cores)."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def _diffusers_model(layout: str, seed: int = 0):
  """A UNet2DModel of `layout` with every weight randomly perturbed."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**LAYOUTS[layout]).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _scheduler(**kw):
  return diffusers.DDPMScheduler(**kw)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """{layout: (torch model, diffusers folder, ddx workdir)}, converted once."""
  root = tmp_path_factory.mktemp("convert")
  out = {}
  for layout in LAYOUTS:
    model = _diffusers_model(layout)
    src = str(root / f"{layout}_src")
    model.save_pretrained(os.path.join(src, "unet"))
    _scheduler(clip_sample=False).save_pretrained(os.path.join(src, "scheduler"))
    workdir = str(root / f"{layout}_ddx")
    assert convert.main([src, "--workdir", workdir]) == 0
    out[layout] = (model, src, workdir)
  return out


def _torch_forward(model, x, t, labels=None):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                class_labels=None if labels is None else torch.from_numpy(labels))
  return out.sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_matches_diffusers(converted, layout):
  model, _, workdir = converted[layout]
  m = ddx.load(workdir)
  size = LAYOUTS[layout]["sample_size"]
  batch = 2 if layout == "256" else 4
  x = np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)
  t = np.array([0, 999, 1, 500][:batch])          # the ends and the middle
  labels = np.array([0, 4, 2, 1]) if "num_class_embeds" in LAYOUTS[layout] else None
  ref = _torch_forward(model, x, t, labels)
  out = np.asarray(jax.jit(lambda m, x, t, l: m.apply(x, t, l))(
      m, jnp.asarray(x), jnp.asarray(t), None if labels is None else jnp.asarray(labels)))
  scale = np.abs(ref).max()
  assert scale > 0.5    # a real output, not a near-zero one
  assert np.abs(out - ref).max() <= 1e-4 * scale


def _ddim_pipeline_images(model, x_T, steps, clip):
  """diffusers' DDIMPipeline from x_T (by replaying its generator): [N, H, W, C] in [0, 1]."""
  sched = diffusers.DDIMScheduler(
      num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
      beta_end=0.02, clip_sample=clip, set_alpha_to_one=True, steps_offset=0,
      timestep_spacing="leading")
  pipe = diffusers.DDIMPipeline(unet=model, scheduler=sched)
  pipe.set_progress_bar_config(disable=True)
  gen = torch.Generator().manual_seed(0)
  # The pipeline draws x_T with torch.randn from the generator; replaying the
  # same draw gives the x_T that ddx gets.
  np.testing.assert_array_equal(
      torch.randn(x_T.shape, generator=torch.Generator().manual_seed(0)).numpy(), x_T)
  # With clipping, ddx recomputes ε̂ from the clipped x̂_0 (DDIM's Eq. 12 with a
  # consistent pair); diffusers does that with use_clipped_model_output=True.
  return pipe(batch_size=x_T.shape[0], generator=gen, eta=0.0, num_inference_steps=steps,
              use_clipped_model_output=clip, output_type="np").images


@pytest.mark.parametrize("layout,clip", [("cifar10", True), ("256", False)])
def test_ddim_matches_diffusers_pipeline(converted, layout, clip):
  model, _, workdir = converted[layout]
  m = ddx.load(workdir)
  size = LAYOUTS[layout]["sample_size"]
  n = 1 if layout == "256" else 2
  x_T = torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(0)).numpy()
  ref = _ddim_pipeline_images(model, x_T, steps=10, clip=clip)
  imgs = ddx.sample_fn(m, jax.random.key(0), steps=10, sampler="ddim", eta=0.0,
                       x_T=jnp.asarray(x_T.transpose(0, 2, 3, 1)), clip_x0=clip,
                       spacing="uniform")   # diffusers' "leading"
  imgs = (np.asarray(imgs) + 1.0) / 2.0
  assert ref.std() > 0.05                # not a blank image
  np.testing.assert_allclose(imgs, ref, atol=2e-4, rtol=0)


def test_ddim_visits_diffusers_leading_timesteps():
  """DDIMScheduler(leading, steps_offset 0) visits ddx's uniform indices."""
  from ddx.processes.ddpm import sampling as discrete
  for T, steps in ((1000, 10), (1000, 50), (1000, 1000), (100, 7)):
    s = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading",
                                steps_offset=0, set_alpha_to_one=True)
    s.set_timesteps(steps)
    np.testing.assert_array_equal(s.timesteps.numpy(), discrete.timesteps(T, steps))


def test_config_read_from_diffusers(converted):
  cfg = json.load(open(os.path.join(converted["cifar10"][2], "config.json")))
  m = cfg["model"]
  assert (m["ch"], m["ch_mult"], m["num_res_blocks"], m["attn_resolutions"]) == (
      32, [1, 2, 2, 2], 2, [16])
  assert (m["flip_sin_to_cos"], m["freq_shift"], m["downsample_padding"],
          m["attn_head_dim"], m["norm_eps"]) == (False, 1, "bottom_right", 0, 1e-6)
  assert (cfg["data"]["image_size"], cfg["data"]["channels"]) == (32, 3)
  assert {k: cfg["diffusion"][k] for k in ("process", "schedule", "num_timesteps",
                                            "beta_start", "beta_end", "prediction")} == {
      "process": "ddpm", "schedule": "linear", "num_timesteps": 1000,
      "beta_start": 1e-4, "beta_end": 0.02, "prediction": "eps"}
  assert cfg["sampling"]["clip_x0"] is False
  assert json.load(open(os.path.join(converted["256"][2], "config.json")))["model"][
      "attn_resolutions"] == [16]
  m = json.load(open(os.path.join(converted["diffusers"][2], "config.json")))["model"]
  assert (m["flip_sin_to_cos"], m["freq_shift"], m["downsample_padding"],
          m["attn_head_dim"], m["norm_eps"], m["num_classes"]) == (
              True, 0, "symmetric", 8, 1e-5, 5)


def test_label_table_gets_a_zero_null_row(converted):
  model, _, workdir = converted["diffusers"]
  table = np.asarray(ddx.load(workdir).variables["params"]["label_embed"]["embedding"])
  np.testing.assert_array_equal(table[:5], model.class_embedding.weight.detach().numpy())
  np.testing.assert_array_equal(table[5], 0.0)


def test_unet_defaults_are_diffusers_defaults():
  """A config.json field left out takes UNet2DModel's default, as in diffusers."""
  sig = inspect.signature(diffusers.UNet2DModel.__init__).parameters
  got = {k: p.default for k, p in sig.items() if k != "self"}
  assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in got.items()} \
      == unet.UNET_DEFAULTS


@pytest.mark.parametrize("name,kw", [
    ("linear", dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.03)),
    ("cosine", dict(beta_schedule="squaredcos_cap_v2")),
])
def test_schedule_betas_match_diffusers(name, kw):
  sched = _scheduler(num_train_timesteps=500, **kw)
  keys = unet.schedule_keys(dict(sched.config))
  assert keys["diffusion"]["schedule"] == name
  from ddx import config as config_lib
  from ddx.processes.ddpm import schedules
  d = config_lib.base_config().diffusion
  d.update(keys["diffusion"])
  ours = schedules.from_config(d)
  # Identical formulas; diffusers' cumulative product is float32.
  np.testing.assert_allclose(ours.betas, sched.betas.numpy(), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(ours.alphas_cumprod, sched.alphas_cumprod.numpy(),
                             rtol=1e-5, atol=1e-6)


def test_scheduler_fields_map():
  k = unet.schedule_keys({"prediction_type": "v_prediction", "clip_sample": False,
                             "variance_type": "fixed_large"})
  assert k["diffusion"]["prediction"] == "v"
  assert k["sampling"] == {"clip_x0": False, "ddpm_variance": "beta"}
  assert unet.schedule_keys(None)["diffusion"] == {
      "schedule": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
      "beta_end": 0.02, "prediction": "eps"}


def test_timestep_embedding_options_closed_form():
  t = np.array([0.0, 3.0, 250.0])
  half = 4
  for flip, shift in ((False, 1), (True, 0)):
    f = 10000.0 ** (-np.arange(half) / (half - shift))
    sin, cos = np.sin(t[:, None] * f), np.cos(t[:, None] * f)
    want = np.concatenate([cos, sin] if flip else [sin, cos], axis=1)
    got = timestep_embedding(jnp.asarray(t), 2 * half, flip, shift)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_legacy_bin_checkpoint(converted, tmp_path):
  """The google/ddpm-* hub files: a .bin with the pre-rename attention names."""
  model, src, workdir = converted["cifar10"]
  legacy = str(tmp_path / "legacy")
  shutil.copytree(src, legacy)
  os.remove(os.path.join(legacy, "unet", common.WEIGHT_FILES[0]))
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  sd = {}
  for k, v in model.state_dict().items():
    for new, name in old.items():
      k = k.replace(f".{new}.", f".{name}.")
    sd[k] = v
  assert any(".query." in k for k in sd)
  torch.save(sd, os.path.join(legacy, "unet", common.WEIGHT_FILES[1]))
  cfg = unet.ddx_config(json.load(open(os.path.join(legacy, "unet", "config.json"))), None)
  params = unet.params_from_state_dict(
      unet.read_state_dict(unet.weight_files(os.path.join(legacy, "unet"))), cfg)
  ref = ddx.load(workdir).variables["params"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)


def _edit_config(src, dst, **changes):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "unet", "config.json")
  cfg = json.load(open(path))
  cfg.update(changes)
  json.dump(cfg, open(path, "w"))
  return dst


def _run_main(capsys, src, workdir):
  code = convert.main([src, "--workdir", workdir])
  err = capsys.readouterr().err.strip()
  return code, err


@pytest.mark.parametrize("field,value", [
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
                          "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]),
    ("class_embed_type", "timestep"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"),
    ("_class_name", "UNet2DConditionModel"),
])
def test_unsupported_config_is_one_line_exit_2(converted, tmp_path, capsys, field, value):
  src = _edit_config(converted["cifar10"][1], str(tmp_path / "src"), **{field: value})
  code, err = _run_main(capsys, src, str(tmp_path / "out"))
  assert code == 2 and len(err.splitlines()) == 1
  assert field in err and "config.json" in err
  assert not os.path.exists(tmp_path / "out")


def _edit_weights(src, dst, edit):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "unet", common.WEIGHT_FILES[0])
  from safetensors.torch import load_file, save_file
  sd = load_file(path)
  edit(sd)
  save_file(sd, path)
  return dst


def test_bad_weights_name_the_weight(converted, tmp_path, capsys):
  src = converted["cifar10"][1]
  key = "down_blocks.1.attentions.0.to_q.weight"
  cases = {
      "missing": (lambda sd: sd.pop(key), key),
      "extra": (lambda sd: sd.update({"extra.weight": torch.zeros(3)}), "extra.weight"),
      "shape": (lambda sd: sd.update({key: torch.zeros(64, 32)}), key),
  }
  for name, (edit, named) in cases.items():
    bad = _edit_weights(src, str(tmp_path / name), edit)
    code, err = _run_main(capsys, bad, str(tmp_path / f"{name}_out"))
    assert code == 2 and len(err.splitlines()) == 1 and named in err, (name, err)
  for name, path in (("no_weights", common.WEIGHT_FILES[0]), ("no_config", "config.json")):
    bad = str(tmp_path / name)
    shutil.copytree(src, bad)
    os.remove(os.path.join(bad, "unet", path))
    code, err = _run_main(capsys, bad, str(tmp_path / f"{name}_out"))
    assert code == 2 and len(err.splitlines()) == 1 and path in err, (name, err)
  code, err = _run_main(capsys, str(tmp_path / "nowhere"), str(tmp_path / "x"))
  assert code == 2 and "nowhere" in err


def test_bad_scheduler_is_one_line_exit_2(converted, tmp_path, capsys):
  src = str(tmp_path / "src")
  shutil.copytree(converted["cifar10"][1], src)
  path = os.path.join(src, "scheduler", "scheduler_config.json")
  cfg = json.load(open(path))
  cfg["beta_schedule"] = "scaled_linear"
  json.dump(cfg, open(path, "w"))
  code, err = _run_main(capsys, src, str(tmp_path / "out"))
  assert code == 2 and len(err.splitlines()) == 1
  assert "beta_schedule" in err and "scheduler_config.json" in err


def test_cli_refuses_a_folder_of_the_users(converted, tmp_path):
  """`python -m ddx.convert` as a user runs it, into a folder holding the user's
  own config.json, notes and samples (no checkpoints/): exit 2, one line
  naming what is there, every file's bytes unchanged."""
  _, src, _ = converted["diffusers"]
  out = tmp_path / "mine"
  (out / "samples").mkdir(parents=True)
  (out / "config.json").write_text('{"my": "experiment"}')
  (out / "notes.txt").write_text("do not lose")
  np.savez(out / "samples" / "keep.npz", x=np.arange(3))
  before = tree_digest(out)
  p = subprocess.run([sys.executable, "-m", "ddx.convert", src, "--workdir", str(out)],
                     cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == 2, p.stderr
  assert p.stderr.strip().splitlines() == [
      f"ddx.convert: error: --workdir {out} is not empty (it holds config.json, "
      "notes.txt, samples); ddx.convert writes only into a new or empty folder: "
      "choose another --workdir"]
  assert tree_digest(out) == before


def test_refuses_a_file_and_a_converted_workdir(converted, tmp_path, capsys):
  _, src, workdir = converted["diffusers"]
  plain = tmp_path / "plain"
  plain.write_bytes(b"user data")
  code, err = _run_main(capsys, src, str(plain))
  assert code == 2 and err.splitlines() == [
      f"ddx.convert: error: --workdir {plain} is a file, not a folder; pass the path "
      "of a new or empty folder"]
  assert plain.read_bytes() == b"user data"
  before = tree_digest(workdir)
  code, err = _run_main(capsys, src, workdir)     # a finished import is not redone
  assert code == 2 and len(err.splitlines()) == 1 and "is not empty" in err
  assert tree_digest(workdir) == before


def test_interrupted_conversion_is_redone(converted, tmp_path, capsys):
  """Killed after its marker and half a checkpoint: the same command clears
  what it left and converts; a user's file beside them makes it refuse."""
  _, src, workdir = converted["diffusers"]
  out = tmp_path / "out"
  (out / "checkpoints" / "0").mkdir(parents=True)
  (out / common.MARKER).write_text("")
  (out / "config.json.tmp").write_text("{")
  assert _run_main(capsys, src, str(out))[0] == 0
  assert sorted(os.listdir(out)) == sorted(os.listdir(workdir))
  a, b = ddx.load(str(out)), ddx.load(workdir)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.variables),
                                                  jax.tree.leaves(b.variables)))
  (out / common.MARKER).write_text("")
  (out / "notes.txt").write_text("mine")
  code, err = _run_main(capsys, src, str(out))
  assert code == 2 and "(it holds notes.txt)" in err
  assert (out / "notes.txt").read_text() == "mine"


def test_unreadable_weights_are_one_short_line(converted, tmp_path, capsys):
  """A .bin that is a pickle of more than tensors: the line says what the file is
  not, and never passes on torch's advice to unpickle it unsafely."""
  src = str(tmp_path / "src")
  shutil.copytree(converted["cifar10"][1], src)
  os.remove(os.path.join(src, "unet", common.WEIGHT_FILES[0]))
  bad = os.path.join(src, "unet", common.WEIGHT_FILES[1])
  torch.save({"w": torch.zeros(2), "opt": _Unsafe()}, bad)
  code, err = _run_main(capsys, src, str(tmp_path / "out"))
  assert code == 2 and len(err.splitlines()) == 1 and len(err) - len(bad) < 200, err
  assert f"{bad} is not a readable diffusers weight file" in err
  assert "weights_only" not in err and "trust" not in err
  open(bad, "wb").write(b"not a zip")
  code, err = _run_main(capsys, src, str(tmp_path / "out"))
  assert code == 2 and len(err.splitlines()) == 1 and len(err) - len(bad) < 200, err
  assert not os.path.exists(tmp_path / "out")


class _Unsafe:
  """A pickled object that is not a tensor (torch refuses it with weights_only)."""


@pytest.mark.slow
def test_flat_hub_layout_and_finetuning_resumes(tmp_path):
  """A flat folder (config.json beside scheduler_config.json, as the google/ddpm-*
  repos are) converts, and fine-tuning with another optimizer (no gradient
  clipping: another optimizer-state structure) resumes from the converted
  weights with training.reset_optimizer."""
  src = str(tmp_path / "flat")
  kw = dict(_DDPM, sample_size=8, in_channels=1, out_channels=1,
            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
  torch.manual_seed(0)
  diffusers.UNet2DModel(**kw).save_pretrained(src)
  _scheduler(num_train_timesteps=100).save_pretrained(src)
  workdir = str(tmp_path / "run")
  convert.convert(src, workdir)
  start = ddx.load(workdir).variables["params"]
  # configs/test.py is this U-Net (ch 8, ch_mult (1, 2), attention at 4x4) on
  # digits with T = 100: its run resumes the converted step-0 checkpoint.
  config = load_config()
  config.training.num_steps = 1
  config.training.sample_every = 0
  config.optim.grad_clip = 0.0
  config.training.reset_optimizer = True
  from ddx import train
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 1
  # One Adam step moves each weight by about lr * warm-up fraction at most;
  # a fresh init would be O(0.1) away.
  step = config.optim.lr / config.optim.warmup_steps
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(start)))
  assert 0 < diff <= 1.5 * step
