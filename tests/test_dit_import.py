"""ddx.convert.dit: official facebookresearch/DiT checkpoints -> ddx workdirs.

The checkpoint is a random state_dict in the official module layout and key
names (models.py: timm PatchEmbed/Attention/Mlp, adaLN_modulation Sequential,
final_layer, y_embedder.embedding_table, the pos_embed buffer), with EVERY
weight random, including the adaLN and output layers the official init
zeroes. The reference is a NumPy transcription of the official DiT forward
pass on that state_dict in torch layout (NCHW), written here from models.py,
not from ddx's network.
"""
import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ddx
from ddx import convert

# Small DiT: hidden 384 / 6 heads (DiT-S's width), depth 2, patch 2, 8x8x4
# latents, 10 classes + the null class, learn_sigma.
D, HEADS, DEPTH, P, C, K, LATENT = 384, 6, 2, 2, 4, 10, 8


# --------------------------------------------------------------------------
# The official layout, in NumPy.


def official_pos_embed(dim, grid):
  """models.py's get_2d_sincos_pos_embed: meshgrid(w, h), the first half of the
  channels from grid[0] (w), the second from grid[1] (h); [sin, cos] each."""
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32),
                       np.arange(grid, dtype=np.float32))   # w goes first

  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


def official_state_dict(seed=0, hidden=D, depth=DEPTH, p=P, c=C, classes=K,
                        latent=LATENT, learn_sigma=True, shapes_only=False):
  """A random state_dict with models.py's DiT keys and shapes (float32 numpy).

  shapes_only: every weight but pos_embed is a zero-strided view of one zero
  (the official XL models' shapes without their memory).
  """
  rng = np.random.default_rng(seed)
  out_ch = 2 * c if learn_sigma else c

  def fill(std, shape):
    if shapes_only:
      return np.broadcast_to(np.float32(0), shape)
    return rng.normal(0, std, shape).astype(np.float32)

  def lin(name, n_out, n_in):
    sd[name + ".weight"] = fill(1 / math.sqrt(n_in), (n_out, n_in))
    sd[name + ".bias"] = fill(0.1, (n_out,))

  sd = {}
  sd["pos_embed"] = official_pos_embed(hidden, latent // p)[None].astype(np.float32)
  sd["x_embedder.proj.weight"] = fill(1 / math.sqrt(c * p * p), (hidden, c, p, p))
  sd["x_embedder.proj.bias"] = fill(0.1, (hidden,))
  lin("t_embedder.mlp.0", hidden, 256)
  lin("t_embedder.mlp.2", hidden, hidden)
  sd["y_embedder.embedding_table.weight"] = fill(1.0, (classes + 1, hidden))
  for i in range(depth):
    lin(f"blocks.{i}.attn.qkv", 3 * hidden, hidden)
    lin(f"blocks.{i}.attn.proj", hidden, hidden)
    lin(f"blocks.{i}.mlp.fc1", 4 * hidden, hidden)
    lin(f"blocks.{i}.mlp.fc2", hidden, 4 * hidden)
    lin(f"blocks.{i}.adaLN_modulation.1", 6 * hidden, hidden)
  lin("final_layer.linear", p * p * out_ch, hidden)
  lin("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
  return sd


def official_forward(sd, x, t, y, heads=HEADS):
  """models.py's DiT.forward in NumPy (float64).

  Args:
    sd: the state_dict (torch layout).
    x: [N, C, H, W]; t: [N] timesteps; y: [N] labels (K = null).
  Returns:
    [N, out_channels, H, W].
  """
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]
  silu = lambda h: h / (1 + np.exp(-h))

  def ln(h):      # LayerNorm(elementwise_affine=False, eps=1e-6)
    mu = h.mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

  modulate = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
  n, c, hh, ww = x.shape
  w = sd["x_embedder.proj.weight"]
  dim, p = w.shape[0], w.shape[2]
  gh, gw = hh // p, ww // p
  # PatchEmbed: Conv2d(kernel = stride = p), flatten(2).transpose(1, 2).
  patches = x.reshape(n, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
  tok = patches.reshape(n, gh * gw, c * p * p) @ w.reshape(dim, -1).T
  tok = tok + sd["x_embedder.proj.bias"] + sd["pos_embed"]
  # TimestepEmbedder: [cos, sin] of t * exp(-log(10000) * k / 128), MLP.
  freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  t_emb = lin(silu(lin(np.concatenate([np.cos(args), np.sin(args)], -1),
                       "t_embedder.mlp.0")), "t_embedder.mlp.2")
  cond = t_emb + sd["y_embedder.embedding_table.weight"][y]
  dh = dim // heads
  i = 0
  while f"blocks.{i}.attn.qkv.weight" in sd:
    b = f"blocks.{i}"
    mod = lin(silu(cond), b + ".adaLN_modulation.1")
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(mod, 6, 1)
    # timm Attention: qkv reshape (B, N, 3, H, Dh), permute (2, 0, 3, 1, 4).
    h = modulate(ln(tok), shift_msa, scale_msa)
    qkv = lin(h, b + ".attn.qkv").reshape(n, -1, 3, heads, dh).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(0, 1, 3, 2) * dh ** -0.5
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    h = (a @ v).transpose(0, 2, 1, 3).reshape(n, -1, dim)
    tok = tok + gate_msa[:, None] * lin(h, b + ".attn.proj")
    # timm Mlp with GELU(approximate="tanh").
    h = lin(modulate(ln(tok), shift_mlp, scale_mlp), b + ".mlp.fc1")
    h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    tok = tok + gate_mlp[:, None] * lin(h, b + ".mlp.fc2")
    i += 1
  shift, scale = np.split(lin(silu(cond), "final_layer.adaLN_modulation.1"), 2, 1)
  out = lin(modulate(ln(tok), shift, scale), "final_layer.linear")
  oc = out.shape[-1] // (p * p)
  # unpatchify: reshape (N, h, w, p, p, c), einsum nhwpqc->nchpwq.
  out = np.einsum("nhwpqc->nchpwq", out.reshape(n, gh, gw, p, p, oc))
  return out.reshape(n, oc, gh * p, gw * p)


# --------------------------------------------------------------------------
# Helpers.


def save(sd, path, wrap=None):
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
  torch.save(wrap(tensors) if wrap else tensors, path)
  return str(path)


def fake_autoencoder(folder, latent_channels=C, blocks=(128, 256, 512, 512)):
  """An autoencoder folder as far as the import reads it (autoencoder.json)."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "autoencoder.json"), "w") as f:
    json.dump({"latent_channels": latent_channels,
               "block_out_channels": list(blocks)}, f)
  return str(folder)


def tiny_autoencoder(folder):
  """A real (random, narrow) autoencoder folder with the SD VAE's 4 levels (8x)."""
  from ddx import autoencoder as ae_lib
  settings = ae_lib.Settings(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                             norm_num_groups=4, latent_channels=C)
  ae_lib.save(str(folder), settings, ae_lib.init_params(settings, jax.random.key(0)))
  return str(folder)


def run_cli(capsys, *argv):
  code = convert.main([str(a) for a in argv])
  return code, capsys.readouterr()


def check_against_official(model, sd, latent, seed=1):
  n = 4
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, C, latent, latent)).astype(np.float32)
  t = np.array([0, 1, 500, 999], np.int32)
  y = np.array([0, 3, K - 1, K], np.int32)          # K: the null label
  ref = official_forward(sd, x, t, y)
  got = np.asarray(model.apply(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                               jnp.asarray(y))).transpose(0, 3, 1, 2)
  assert got.shape == ref.shape == (n, 2 * C, latent, latent)
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert err < 1e-4, err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The small DiT as a plain .pt, converted with no autoencoder."""
  root = tmp_path_factory.mktemp("dit")
  sd = official_state_dict()
  pt = save(sd, root / "DiT-S-2-tiny.pt")
  out = root / "work"
  assert convert.main([pt, "--workdir", str(out)]) == 0
  return sd, str(out)


# --------------------------------------------------------------------------
# Tests.


def test_forward_matches_official(converted):
  sd, out = converted
  model = ddx.load(out)
  assert model.image_shape == (LATENT, LATENT, C)
  check_against_official(model, sd, LATENT)


def test_config(converted):
  _, out = converted
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  m = cfg["model"]
  assert (m["name"], m["patch_size"], m["hidden_size"], m["depth"], m["num_heads"],
          m["mlp_ratio"], m["num_classes"], m["learn_sigma"]) == (
              "dit", P, D, DEPTH, HEADS, 4.0, K, True)
  f = cfg["diffusion"]
  assert (f["process"], f["schedule"], f["num_timesteps"], f["prediction"]) == (
      "ddpm", "linear", 1000, "eps")
  assert (f["beta_start"], f["beta_end"]) == (1e-4, 0.02)
  assert cfg["training"]["label_dropout"] == 0.1
  s = cfg["sampling"]
  assert (s["sampler"], s["steps"], s["guidance_scale"], s["ddpm_variance"],
          s["clip_x0"]) == ("ddpm", 250, 1.5, "beta", False)
  # No autoencoder: the pixels' size, the latent model's shape, no decoder.
  assert cfg["autoencoder"]["path"] == ""
  assert (cfg["data"]["name"], cfg["data"]["image_size"], cfg["data"]["channels"]) == (
      "latents", 8 * LATENT, 3)
  assert (cfg["autoencoder"]["downsample"], cfg["autoencoder"]["latent_channels"]) == (8, C)


def test_training_checkpoint_takes_ema(converted, tmp_path):
  sd, out = converted
  noisy = {k: v + 1.0 for k, v in sd.items()}      # "model": not what is imported
  pt = save(sd, tmp_path / "0400000.pt", wrap=lambda ema: {
      "model": {k: torch.from_numpy(v) for k, v in noisy.items()}, "ema": ema,
      "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
      "args": argparse.Namespace(model="DiT-S/2", image_size=16)})
  assert convert.main([pt, "--workdir", str(tmp_path / "w")]) == 0
  a, b = ddx.load(out).variables, ddx.load(str(tmp_path / "w")).variables
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_bigger_grid_with_autoencoder(tmp_path, capsys):
  """A 512-style checkpoint (twice the grid): image_size = 8 * sqrt(T) * p."""
  latent = 2 * LATENT
  sd = official_state_dict(seed=3, latent=latent)
  pt = save(sd, tmp_path / "big.pt")
  ae = tiny_autoencoder(tmp_path / "vae")
  code, io = run_cli(capsys, pt, "--workdir", tmp_path / "w", "--autoencoder", ae)
  assert code == 0, io.err
  assert "DiT" in io.out and "first 3" in io.out
  model = ddx.load(str(tmp_path / "w"))
  c = model.config
  assert c.data.image_size == 8 * latent and c.data.channels == 3
  assert c.autoencoder.path == os.path.abspath(ae)
  assert (c.autoencoder.downsample, c.autoencoder.latent_channels) == (8, C)
  assert model.image_shape == (latent, latent, C)
  assert model.autoencoder is not None
  check_against_official(model, sd, latent)


@pytest.mark.parametrize("latent", [32, 64])
def test_official_xl_shapes(tmp_path, latent):
  """DiT-XL-2-256x256.pt / -512x512.pt as shapes: the inferred architecture,
  the config, and every ddx parameter's official key and shape (no weights
  are materialised)."""
  from ddx.convert import dit
  from ddx.convert.common import abstract_train_state
  sd = official_state_dict(hidden=1152, depth=28, classes=1000, latent=latent,
                           shapes_only=True)
  arch = dit.architecture(sd)
  assert arch == dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                      mlp_ratio=4.0, num_classes=1000, learn_sigma=True,
                      channels=4, latent_size=latent)
  config = dit.ddx_config(arch, fake_autoencoder(tmp_path / "vae"))
  assert config.data.image_size == 8 * latent
  assert "DiT-XL/2" in dit.summary(config)
  params = abstract_train_state(config).params
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  got = {dit.torch_key(tuple(k.key for k in path)): dit._torch_shape(
      tuple(k.key for k in path), leaf.shape) for path, leaf in flat}
  want = {k: v.shape for k, v in sd.items() if k != "pos_embed"}
  assert got == want


def test_missing_weight_named(tmp_path, capsys):
  sd = official_state_dict()
  del sd["blocks.1.mlp.fc2.bias"]
  code, io = run_cli(capsys, save(sd, tmp_path / "a.pt"), "--workdir", tmp_path / "w")
  assert code == 2
  assert "blocks.1.mlp.fc2.bias" in io.err and len(io.err.strip().splitlines()) == 1


def test_extra_and_misshaped_weights_named(tmp_path, capsys):
  sd = official_state_dict()
  sd["blocks.0.attn.q_norm.weight"] = np.ones(64, np.float32)
  code, io = run_cli(capsys, save(sd, tmp_path / "a.pt"), "--workdir", tmp_path / "w")
  assert code == 2 and "blocks.0.attn.q_norm.weight" in io.err
  sd = official_state_dict()
  sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"][:, :-1]
  code, io = run_cli(capsys, save(sd, tmp_path / "b.pt"), "--workdir", tmp_path / "w")
  assert code == 2 and "blocks.0.attn.proj.weight" in io.err


def test_unknown_hidden_size_refused(tmp_path, capsys):
  sd = official_state_dict(hidden=64, depth=1)
  code, io = run_cli(capsys, save(sd, tmp_path / "a.pt"), "--workdir", tmp_path / "w")
  assert code == 2 and "hidden size 64" in io.err
  assert not os.path.exists(tmp_path / "w")


def test_pos_embed_must_be_the_fixed_table(tmp_path, capsys):
  sd = official_state_dict()
  half = D // 2     # rows and columns swapped: a different layout
  sd["pos_embed"] = np.concatenate([sd["pos_embed"][..., half:],
                                    sd["pos_embed"][..., :half]], -1)
  code, io = run_cli(capsys, save(sd, tmp_path / "a.pt"), "--workdir", tmp_path / "w")
  assert code == 2 and "pos_embed" in io.err and "sin-cos" in io.err


def test_autoencoder_checked(tmp_path, capsys):
  pt = save(official_state_dict(), tmp_path / "a.pt")
  code, io = run_cli(capsys, pt, "--workdir", tmp_path / "w",
                     "--autoencoder", tmp_path / "nothing")
  assert code == 2 and "nothing" in io.err
  ae = fake_autoencoder(tmp_path / "vae3", latent_channels=3)
  code, io = run_cli(capsys, pt, "--workdir", tmp_path / "w", "--autoencoder", ae)
  assert code == 2 and "latent_channels=3" in io.err
  ae = fake_autoencoder(tmp_path / "vae4", blocks=(64, 128))
  code, io = run_cli(capsys, pt, "--workdir", tmp_path / "w", "--autoencoder", ae)
  assert code == 2 and "downsamples by 2" in io.err


def test_refuses_workdir_with_checkpoints(converted, tmp_path, capsys):
  sd, out = converted
  code, io = run_cli(capsys, save(sd, tmp_path / "a.pt"), "--workdir", out)
  assert code == 2 and "is not empty" in io.err
