"""Helpers shared by the tests."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "test"):
  """get_config() of configs/<name>.py, loaded by path as ddx.main does."""
  from ddx import config as config_lib
  return config_lib.from_file(os.path.join(ROOT, "configs", f"{name}.py"))


def as_prediction(eps_fn, sched, kind: str):
  """The denoiser eps_fn(x, i) re-expressed as an eps, x0 or v prediction."""
  import jax.numpy as jnp

  def fn(x, i):
    a = sched.alphas_cumprod[i][:, None]
    eps = eps_fn(x, i)
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[kind]
  return fn


def gaussian_denoiser(sched, mu, s):
  """Exact ε-prediction for data x_0 ~ N(mu, s²): E[ε | x_t]."""
  import jax.numpy as jnp

  def fn(x, i):
    a = sched.alphas_cumprod[i][:, None]
    x0 = mu + jnp.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a) * (x - jnp.sqrt(a) * mu)
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
  return fn
