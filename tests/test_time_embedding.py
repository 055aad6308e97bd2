"""model.time_embedding / time_scale: how each process's time enters the network.

The sensitivity figure: for each process's training law of its noise level,
how fast the network's time embedding moves with ln σ (σ the noise-to-signal
ratio: DDPM √((1 − ᾱ)/ᾱ), EDM σ, flow t/(1 − t)), from the embedding formulas
transcribed in NumPy (DDPM's / DiT's sinusoidal tables, NCSN++'s Gaussian
Fourier features), not from the code under test. Run with -s to print it.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from ddx import config as config_lib
from ddx import model as model_lib
from ddx import models
from ddx import processes
from ddx.models import dit as dit_lib
from ddx.models import layers
from testutils import load_config

# The EDM setting the figure supports: positional, time input ln(σ)/4 · 600.
EDM_POSITIONAL_SCALE = 600.0


def positional_freqs(dim, shift=1.0):
  """DDPM (U-Net): 10000^(-k / (dim/2 - shift)), k < dim/2."""
  half = dim // 2
  return np.exp(-math.log(10000.0) * np.arange(half) / (half - shift))


def dit_freqs(dim=256):
  """DiT: exp(-ln(10000) k / (dim/2)), k < dim/2."""
  half = dim // 2
  return np.exp(-math.log(10000.0) * np.arange(half) / half)


def fourier_freqs(dim):
  """NCSN++ / EDM2 Gaussian Fourier projection: 2π·N(0, 1), drawn once (seed 0)."""
  return 2 * np.pi * np.random.default_rng(0).standard_normal(dim // 2)


def embed(x, freqs):
  """[sin(f x), cos(f x)]: [N] -> [N, 2K], float64."""
  a = np.outer(x, freqs)
  return np.concatenate([np.sin(a), np.cos(a)], axis=1)


# Each process's training law of ln σ and its network time input x(ln σ), at
# M quantiles (DDPM: every index, uniform).
M = 4001


def ddpm_law():
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  lnsig = 0.5 * np.log((1 - abar) / abar)
  index = np.arange(1000.0)
  # x(ln σ) by interpolating the (monotone) table; the range: all T indices.
  return lnsig, lambda l: np.interp(l, lnsig, index), 999.0


def edm_law(scale, p_mean=-1.2, p_std=1.2):
  q = stats.norm.ppf((np.arange(M) + 0.5) / M)
  return p_mean + p_std * q, lambda l: scale * l / 4, scale * 6 * p_std / 4


def flow_law():
  # t = sigmoid(u), u ~ N(0, 1): ln σ = ln(t / (1 − t)) = u.
  q = stats.norm.ppf((np.arange(M) + 0.5) / M)
  x = lambda l: 1000 * special.expit(l)
  return q, x, 1000 * (special.expit(3) - special.expit(-3))


def sensitivity(law, freqs, h=1e-4):
  """(mean over the law of ‖d emb / d ln σ‖₂, frequencies that turn >= 1 rad
  over the law's central range: DDPM all indices, else ±3 standard deviations)."""
  lnsig, x, span = law
  d = (embed(x(lnsig + h), freqs) - embed(x(lnsig - h), freqs)) / (2 * h)
  return float(np.linalg.norm(d, axis=1).mean()), int((np.abs(freqs) * span >= 1).sum())


WIDTHS = (("U-Net ch=32", positional_freqs(32)), ("U-Net ch=128", positional_freqs(128)),
          ("DiT (256)", dit_freqs()))


def test_sensitivity_figure():
  rows = []
  for name, freqs in WIDTHS:
    ddpm = sensitivity(ddpm_law(), freqs)
    flow = sensitivity(flow_law(), freqs)
    edm = sensitivity(edm_law(1.0), freqs)
    edm_new = sensitivity(edm_law(EDM_POSITIONAL_SCALE), freqs)
    k = len(freqs)
    rows += [(name, "ddpm", "positional, index i", ddpm, k),
             (name, "flow", "positional, 1000·t", flow, k),
             (name, "edm", "positional, ln(σ)/4 (default)", edm, k),
             (name, "edm", f"positional, ln(σ)/4 · {EDM_POSITIONAL_SCALE:g}", edm_new, k)]
    # Today's EDM input barely moves the embedding: ~1/500 of DDPM's.
    assert edm[0] < ddpm[0] / 300 and edm[1] <= max(2, len(freqs) // 10)
    assert ddpm[0] > 100 and flow[0] > 100
    # The scaled EDM input separates noise levels at least as well as DDPM's index.
    assert edm_new[0] >= ddpm[0] and edm_new[1] >= ddpm[1], (name, edm_new, ddpm)
  four = fourier_freqs(32)
  rows.append(("U-Net ch=32", "edm", "fourier, ln(σ)/4 (EDM2)",
               sensitivity(edm_law(1.0), four), len(four)))
  print("\n| network | process | time input | ‖d emb / d ln σ‖ (mean) | frequencies "
        "turning ≥ 1 rad |\n|---|---|---|---|---|")
  for name, process, what, (s, turns), k in rows:
    print(f"| {name} | {process} | {what} | {s:.2f} | {turns}/{k} |")


def test_the_networks_embeddings_are_the_transcribed_formulas():
  t = jnp.asarray([-1.55, 0.0, 0.3, 1.1], jnp.float32)
  for scale in (1.0, 600.0):
    x = np.asarray(t, np.float64) * scale
    got = layers.timestep_embedding(layers.scaled_time(t, scale), 32)
    np.testing.assert_allclose(got, embed(x, positional_freqs(32)), atol=2e-4)
    got = layers.fourier_embedding(layers.scaled_time(t, scale), 32)
    np.testing.assert_allclose(got, embed(x, fourier_freqs(32)), atol=2e-3 * scale)
    got = layers.timestep_embedding(layers.scaled_time(t, scale),   # DiT's table
                                    dit_lib.FREQUENCY_EMBEDDING_SIZE, True, 0)
    want = embed(x, dit_freqs())
    np.testing.assert_allclose(got, np.concatenate([want[:, 128:], want[:, :128]], 1),
                               atol=2e-4)
  # Scale 1 is no multiply at all: bit for bit the unscaled embedding.
  i = jnp.arange(0, 1000, 37, dtype=jnp.int32)
  np.testing.assert_array_equal(layers.timestep_embedding(layers.scaled_time(i, 1.0), 32),
                                layers.timestep_embedding(i, 32))
  assert layers.fourier_embedding(t, 7).shape == (4, 7)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_auto_is_todays_network_bit_for_bit_for_every_process(backbone):
  """"auto" builds the network exactly as before the key existed (positional,
  unscaled) for ddpm, edm and flow; a fourier or scaled network differs."""
  c = load_config()
  if backbone == "dit":
    c.model.update(name="dit", hidden_size=32, depth=1, num_heads=2)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  t = jnp.asarray([0.5, 10.0, 900.0], jnp.float32)
  base = {k: v for k, v in c.model.items() if k not in ("time_embedding", "time_scale")}
  old = models.build(base)
  shapes = jax.eval_shape(old.init, jax.random.key(1), x, t)   # a real init is slow here
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1,
                                                 jnp.float32), shapes)
  nets = {}
  for process in processes.names():
    if processes.spec(process).second_time or processes.spec(process).logvar:   # other networks: tests/test_two_times.py
      continue
    c.diffusion.process = process
    c.diffusion.prediction = "v" if process == "flow" else "eps"
    nets[process] = model_lib.network(c)
    assert nets[process] == old        # the same fields: the same program
  nets["fourier"] = models.build(c.model, time_embedding="fourier", time_scale=1.0)
  nets["scaled"] = models.build(c.model, time_embedding="positional", time_scale=600.0)
  # The U-Net compiles slowly here: its fourier branch only (the others are the
  # same fields as today's network, checked above).
  names = ("fourier",) if backbone == "unet" else ("edm", "fourier", "scaled")
  outs = jax.jit(lambda v: [old.apply(v, x, t)] + [nets[k].apply(v, x, t)
                                                    for k in names])(variables)
  assert float(jnp.abs(outs[0]).mean()) > 0
  for name, out in zip(names, outs[1:]):
    assert out.shape == outs[0].shape
    assert np.array_equal(out, outs[0]) == (name == "edm"), name


def test_resolution_by_process_and_old_configs():
  c = load_config()
  for process in ("ddpm", "edm", "flow"):   # the few-step ones add heads or a second time
    c.diffusion.process = process
    assert config_lib.time_embedding(c) == ("positional", 1.0)
  c.diffusion.process = "edm"
  c.model.time_embedding = "fourier"
  assert config_lib.time_embedding(c) == ("fourier", 1.0)
  c.model.time_scale = 600
  assert config_lib.time_embedding(c) == ("fourier", 600.0)
  # A config.json written before the keys existed: what that ddx did.
  saved = config_lib.to_dict(load_config())
  del saved["model"]["time_embedding"], saved["model"]["time_scale"]
  saved["diffusion"]["process"] = "edm"
  old = config_lib.with_defaults(saved)
  assert (old.model.time_embedding, old.model.time_scale) == ("positional", 1.0)


@pytest.mark.parametrize("key,value,words", [
    ("time_embedding", "sinusoidal", "model.time_embedding='sinusoidal' is unknown"),
    ("time_scale", 0.0, "model.time_scale=0.0 must be a number > 0"),
    ("time_scale", "big", "model.time_scale='big' must be a number > 0"),
    ("time_scale", True, "model.time_scale=True must be a number > 0"),
])
def test_bad_time_embedding_is_one_line(key, value, words):
  c = load_config()
  c.model[key] = value
  with pytest.raises(config_lib.ConfigError, match=words) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_fourier_without_an_automatic_scale_asks_for_one():
  c = load_config()
  c.model.time_embedding = "fourier"     # ddpm: the index 0..999 needs a chosen scale
  with pytest.raises(config_lib.ConfigError, match="set --config.model.time_scale"):
    config_lib.validate(c)
  c.model.time_scale = 0.004
  config_lib.validate(c)
  with pytest.raises(ValueError, match="time_embedding='x' is unknown"):
    models.build(c.model, time_embedding="x").init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))


def test_config_names_are_the_networks():
  assert config_lib.TIME_EMBEDDINGS == layers.TIME_EMBEDDINGS
  from ddx import processes
  for name in processes.names():   # every process's "auto" is an embedding the networks have
    spec = processes.spec(name)
    assert spec.time_embedding in layers.TIME_EMBEDDINGS
    assert set(spec.time_scales) <= set(layers.TIME_EMBEDDINGS)
