"""ddx.autoencoder and its diffusers import, against diffusers' AutoencoderKL itself.

A small AutoencoderKL (two levels, so a stride-2 downsample, a nearest
upsample and channel-changing shortcuts on both paths) with every weight
perturbed (norm scales and biases too, so no unit or zero init hides a
mis-mapped weight) is saved with `save_pretrained`, converted through the CLI,
loaded, and must encode and decode what torch computes, on non-square images
(a swapped H / W shows).
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ddx import autoencoder as ae_lib
from ddx import convert

LAYOUT = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
              latent_channels=4, sample_size=16,
              down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2)
SHAPE = (2, 16, 24, 3)    # non-square: a swapped H / W fails


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def _diffusers_vae(seed: int = 0):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**LAYOUT).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(torch model, diffusers folder, autoencoder folder, root tmp dir)."""
  root = tmp_path_factory.mktemp("vae")
  model = _diffusers_vae()
  src, out = str(root / "src"), str(root / "out")
  model.save_pretrained(src)
  assert convert.main([src, "--workdir", out]) == 0
  return model, src, out, root


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_posterior(model, x):
  with torch.no_grad():
    post = model.encode(_nchw(x)).latent_dist
  return _nhwc(post.mean), _nhwc(post.std)


def _torch_decode(model, z):
  with torch.no_grad():
    return _nhwc(model.decode(_nchw(z)).sample)


def _rel_err(out, ref):
  return np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()


def _images(seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, SHAPE).astype(np.float32)


def test_encode_decode_match_diffusers(converted):
  model, _, out, _ = converted
  ae = ae_lib.load(out)
  sf = model.config.scaling_factor
  assert ae.settings.scaling_factor == pytest.approx(sf) and ae.settings.shift_factor == 0.0
  x = _images()
  t_mean, t_std = _torch_posterior(model, x)
  assert t_mean.shape == (2, 8, 12, 4)
  assert ae_lib.latent_shape(ae, (16, 24)) == (8, 12, 4)
  mean, std = ae_lib.encode_moments(ae, x)
  assert np.abs(t_mean).max() > 0.1 and t_std.std() > 1e-3   # not trivial outputs
  assert _rel_err(mean, t_mean) <= 1e-4
  assert _rel_err(std, t_std) <= 1e-4
  assert _rel_err(ae_lib.encode(ae, x), t_mean * sf) <= 1e-4
  z = np.random.default_rng(1).standard_normal((2, 8, 12, 4)).astype(np.float32)
  ref = _torch_decode(model, z)
  assert np.abs(ref).max() > 0.5
  # decode takes the diffusion model's (scaled) latents.
  assert _rel_err(ae_lib.decode(ae, jnp.asarray(z * sf)), ref) <= 1e-4


def test_posterior_sample_and_shift(converted):
  model, _, out, _ = converted
  ae = ae_lib.load(out)
  x = _images(2)
  t_mean, t_std = _torch_posterior(model, x)
  rng = jax.random.key(3)
  noise = np.asarray(jax.random.normal(rng, t_mean.shape))
  sample = ae_lib.encode(ae, x, rng)
  assert _rel_err(sample, (t_mean + t_std * noise) * ae.settings.scaling_factor) <= 1e-4
  assert not np.allclose(sample, ae_lib.encode(ae, x, jax.random.key(4)))
  # A shift_factor (as FLUX's VAE has): latents (mean - shift) * scale, decoded back.
  shifted = ae.replace(settings=dataclasses.replace(ae.settings, scaling_factor=0.5,
                                                    shift_factor=0.1))
  assert _rel_err(ae_lib.encode(shifted, x), (t_mean - 0.1) * 0.5) <= 1e-4
  z = np.random.default_rng(5).standard_normal((1, 8, 12, 4)).astype(np.float32)
  assert _rel_err(ae_lib.decode(shifted, z), _torch_decode(model, z / 0.5 + 0.1)) <= 1e-4


def test_bfloat16_is_close(converted):
  model, _, out, _ = converted
  ae = ae_lib.load(out, dtype="bfloat16")
  assert ae.settings.dtype == "bfloat16"
  assert ae.fingerprint == ae_lib.load(out).fingerprint    # same VAE, other arithmetic
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(ae.params))
  x = _images()
  t_mean, _ = _torch_posterior(model, x)
  mean, std = ae_lib.encode_moments(ae, x)
  assert mean.dtype == jnp.float32
  assert _rel_err(mean, t_mean) <= 3e-2
  z = np.random.default_rng(1).standard_normal((2, 8, 12, 4)).astype(np.float32)
  out_img = ae_lib.decode(ae, z * ae.settings.scaling_factor)
  assert out_img.dtype == jnp.float32
  assert _rel_err(out_img, _torch_decode(model, z)) <= 3e-2


def _write_variant(converted, name, state=None, config_update=None, sub=""):
  """A diffusers folder like the converted one, with `state` as its .bin weights."""
  model, src, _, root = converted
  folder = root / name / sub if sub else root / name
  folder.mkdir(parents=True)
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg.update(config_update or {})
  (folder / "config.json").write_text(json.dumps(cfg))
  state = model.state_dict() if state is None else state
  torch.save(dict(state), str(folder / "diffusion_pytorch_model.bin"))
  return str(root / name)


def test_legacy_attention_names_and_conv_weights(converted):
  model, _, out, root = converted
  legacy = {}
  for k, v in model.state_dict().items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      if f"attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        if k.endswith("weight"):      # old checkpoints stored them as 1x1 convs
          v = v[:, :, None, None]
    legacy[k] = v
  assert "encoder.mid_block.attentions.0.query.weight" in legacy
  src = _write_variant(converted, "legacy", legacy, sub="vae")   # a pipeline's vae/
  assert convert.kind(src) == "autoencoder"
  assert convert.main([src, "--workdir", str(root / "legacy_out")]) == 0
  a, b = ae_lib.load(out), ae_lib.load(str(root / "legacy_out"))
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert a.fingerprint == b.fingerprint


def _convert_error(converted, capsys, name, **kw):
  src = _write_variant(converted, name, **kw)
  capsys.readouterr()
  assert convert.main([src, "--workdir", str(converted[3] / f"{name}_out")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert not os.path.exists(converted[3] / f"{name}_out" / ae_lib.SETTINGS_FILE)
  return err


def test_conversion_errors(converted, capsys):
  model, src, out, _ = converted
  state = dict(model.state_dict())
  del state["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
  err = _convert_error(converted, capsys, "missing", state=state)
  assert "decoder.up_blocks.1.resnets.0.conv_shortcut.weight is missing" in err
  state = dict(model.state_dict())
  state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:, :2]
  err = _convert_error(converted, capsys, "shape", state=state)
  assert "encoder.conv_in.weight" in err and "shape" in err
  state = dict(model.state_dict(), **{"encoder.extra.weight": torch.zeros(1)})
  assert "encoder.extra.weight" in _convert_error(converted, capsys, "extra", state=state)
  err = _convert_error(converted, capsys, "act", config_update={"act_fn": "relu"})
  assert "act_fn='relu'" in err
  err = _convert_error(converted, capsys, "stats",
                       config_update={"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
  assert "latents_mean" in err
  err = _convert_error(converted, capsys, "blocks", config_update={
      "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
  assert "down_block_types[1]='AttnDownEncoderBlock2D'" in err
  # Never over an existing autoencoder folder.
  before = open(os.path.join(out, ae_lib.SETTINGS_FILE)).read()
  assert convert.main([src, "--workdir", out]) == 2
  assert "is not empty" in capsys.readouterr().err
  assert open(os.path.join(out, ae_lib.SETTINGS_FILE)).read() == before
  ae = ae_lib.load(out)
  with pytest.raises(ValueError, match="already holds an autoencoder"):
    ae_lib.save(out, ae.settings, ae.params)


def test_load_errors(converted, tmp_path):
  _, _, out, _ = converted
  with pytest.raises(ValueError, match="does not exist"):
    ae_lib.load(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="autoencoder.json does not exist"):
    ae_lib.load(str(tmp_path / "empty"))
  d = json.load(open(os.path.join(out, ae_lib.SETTINGS_FILE)))
  broken = tmp_path / "broken"
  shutil.copytree(out, broken)
  del d["latent_channels"]
  (broken / ae_lib.SETTINGS_FILE).write_text(json.dumps(d))
  with pytest.raises(ValueError, match="'latent_channels' is missing"):
    ae_lib.load(str(broken))
  noparams = tmp_path / "noparams"
  noparams.mkdir()
  shutil.copy(os.path.join(out, ae_lib.SETTINGS_FILE), noparams)
  with pytest.raises(ValueError, match="params does not exist"):
    ae_lib.load(str(noparams))
  with pytest.raises(ValueError, match="multiple of the autoencoder's downsample 2"):
    ae_lib.latent_shape(ae_lib.load(out), 15)


def test_fingerprint(converted, tmp_path):
  _, _, out, _ = converted
  ae = ae_lib.load(out)
  assert len(ae.fingerprint) == 16 and ae.settings["fingerprint"] == ae.fingerprint
  # Stable: recomputed from the loaded params, and through another save / load.
  assert ae_lib.fingerprint(ae.settings, ae.params) == ae.fingerprint
  saved = ae_lib.save(str(tmp_path / "copy"), dataclasses.replace(ae.settings, source="x"),
                      ae.params)
  assert saved.fingerprint == ae.fingerprint == ae_lib.load(str(tmp_path / "copy")).fingerprint
  # One weight changed by one float32 ulp-ish step, or another scaling: another VAE.
  params = jax.tree.map(np.array, ae.params)
  params["decoder"]["conv_out"]["bias"][0] += 1e-6
  assert ae_lib.fingerprint(ae.settings, params) != ae.fingerprint
  rescaled = dataclasses.replace(ae.settings, scaling_factor=0.13025)
  assert ae_lib.fingerprint(rescaled, ae.params) != ae.fingerprint


def test_network_fields_are_declared_once():
  """Settings' network fields and defaults are AutoencoderKL's, and the importer
  reads each of them from a diffusers config.json (dtype is ddx's own)."""
  from ddx.convert import autoencoder as convert_ae
  from ddx.models.autoencoder import AutoencoderKL
  net = {f.name: f.default for f in dataclasses.fields(AutoencoderKL)
         if f.name not in ("parent", "name")}
  assert ae_lib.NETWORK_FIELDS == tuple(net)
  settings = ae_lib.Settings()
  assert {k: getattr(settings, k) for k in net} == net
  cfg = dict(diffusers.AutoencoderKL(**LAYOUT).config)
  assert set(net) - {"dtype"} <= set(cfg)
  got = convert_ae.settings_of(cfg)
  assert set(got) == {f.name for f in dataclasses.fields(ae_lib.Settings)} - {
      "source", "fingerprint"}
  assert got["block_out_channels"] == [32, 64] and got["norm_num_groups"] == 8
