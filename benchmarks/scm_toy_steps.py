"""sCM's step count on a toy: does ddx's consistency training improve with steps?

Issue #36 item 4. Consistency training (`ConsistencyProcess.loss`, no teacher,
adaptive weighting off) of a 3-layer MLP on 16-dim data of 4 modes (corners
±0.8 plus N(0, 0.05²) noise), then `ddx.sample` at 1, 2, 4 and 8 steps, scored
by the RMS distance of each sample to its nearest mode (the data: 0.049).
Also f(x_t, t) on noised *real* data at π/2 and the 4-step grid's times: the
network's own error there, with the sampler's compounding taken out.

  python benchmarks/scm_toy_steps.py STEPS WARMUP    # e.g. 3000 300, 12000 1000

CPU, 2 shared cores: 19-38 s for 3,000 steps, 83 s for 12,000 (docs/consistency.md).
"""
import math
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddx.processes import common
from ddx.processes.consistency import core
from ddx.processes.consistency.process import ConsistencyProcess

D, K, SD, N = 16, 4, 0.5, 4000
PROTOS = jnp.asarray(np.random.default_rng(0).choice([-0.8, 0.8], size=(K, D)), jnp.float32)


def data(key, n):
  k1, k2 = jax.random.split(key)
  return PROTOS[jax.random.randint(k1, (n,), 0, K)] + 0.05 * jax.random.normal(k2, (n, D))


class Net(nn.Module):
  """F(x/σ_d, time): an MLP on x and sin/cos of TrigFlow t at 0.1-10 rad per unit t
  (slow, as sCM asks of the time embedding)."""

  @nn.compact
  def __call__(self, xs, time):
    e = (time[:, None] * core.T_MAX / 1000.0) * jnp.exp(jnp.linspace(0, math.log(100), 16)) / 10
    h = jnp.concatenate([xs, jnp.sin(e), jnp.cos(e)], -1)
    for _ in range(3):
      h = nn.silu(nn.Dense(256)(h))
    return nn.Dense(D)(h)


def nearest_mode(x):
  """RMS distance of each sample to its nearest mode, averaged."""
  d = jnp.sqrt(jnp.mean((x[:, None] - PROTOS[None]) ** 2, -1))
  return float(jnp.mean(jnp.min(d, 1)))


def main(steps, warmup):
  net = Net()
  params = net.init(jax.random.key(0), jnp.zeros((1, D)), jnp.zeros((1,)))
  proc = ConsistencyProcess(sigma_data=SD, scm_warmup_steps=warmup, scm_adaptive=False)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0, 1e-3, 200, steps))
  opt = tx.init(params)

  @jax.jit
  def step(p, opt, i, key):
    k1, k2 = jax.random.split(key)
    g = jax.grad(lambda p: proc.loss(net.apply, p, data(k1, 512), k2, step=i)[0])(p)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt

  t0 = time.time()
  for i in range(steps):
    params, opt = step(params, opt, i, jax.random.key(i + 1))
  print(f"trained {steps} steps in {time.time() - t0:.0f} s; data {nearest_mode(data(jax.random.key(99), N)):.4f}")
  F = lambda xs, t: net.apply(params, xs, core.time_input(t))
  for n in (1, 2, 4, 8):
    x = common.sample(F, proc, jax.random.key(5), (N, D), steps=n)
    print(f"{n} steps: nearest-mode {nearest_mode(x):.4f}")
  x0 = data(jax.random.key(7), N)
  z = SD * jax.random.normal(jax.random.key(8), x0.shape)
  for t in (core.T_MAX,) + core.mid_times(4, proc.scm_mid_t):
    tt = jnp.full((N,), t, jnp.float32)
    f = core.consistency_fn(F, core.interpolate(x0, z, tt), tt, SD)
    print(f"f(noised data, t={t:.3f}): nearest-mode {nearest_mode(f):.4f}, "
          f"RMS to its x_0 {float(jnp.sqrt(jnp.mean((f - x0) ** 2))):.4f}, "
          f"noise added σ_d·tan t = {float(core.noise_level(t, SD)):.3f}")


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
