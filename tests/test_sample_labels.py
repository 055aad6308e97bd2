"""sampling.labels: which classes a class-conditional model's sample batch holds."""
import os

import jax
import numpy as np
import pytest

from ddx import config as config_lib
from ddx import eval_run
from ddx import model as model_lib
from testutils import load_config, random_model


def test_balanced_labels_cycle_over_the_whole_batch():
  got = np.concatenate([model_lib.class_labels("balanced", 3, s, 4) for s in (0, 4, 8)])
  np.testing.assert_array_equal(got, np.arange(12) % 3)
  assert np.bincount(model_lib.class_labels("balanced", 1000, 0, 50_000)).tolist() == [50] * 1000


def test_random_labels_are_uniform_draws_fixed_by_seed_and_offset():
  a = model_lib.class_labels("random", 10, 0, 20_000, seed=3)
  assert a.dtype == np.int32 and a.min() == 0 and a.max() == 9
  # Uniform: each count within 5 standard deviations of 2,000 (sd = sqrt(N p (1-p)) = 42.4).
  assert np.all(np.abs(np.bincount(a, minlength=10) - 2000) < 5 * np.sqrt(20_000 * 0.09))
  np.testing.assert_array_equal(a, model_lib.class_labels("random", 10, 0, 20_000, seed=3))
  assert not np.array_equal(a[:50], model_lib.class_labels("random", 10, 0, 50, seed=4))
  assert not np.array_equal(a[:50], model_lib.class_labels("random", 10, 50, 50, seed=3))
  with pytest.raises(ValueError, match="sampling.labels='uniform' is unknown"):
    model_lib.class_labels("uniform", 10, 0, 5)


def test_an_unknown_rule_is_a_one_line_config_error():
  c = load_config()
  c.sampling.labels = "even"
  with pytest.raises(config_lib.ConfigError, match=r"sampling.labels='even' is unknown"):
    config_lib.validate(c)


def test_eval_chunks_carry_the_rules_labels_and_the_rule_keys_them(tmp_path, monkeypatch):
  """A 3-class model, 6 samples in chunks of 4: balanced labels run on across the
  chunks (0 1 2 0 | 1 2), each chunk file stores its labels, sample i is drawn
  on label i, and another rule never reuses a chunk."""
  c = load_config()
  c.model.ch_mult, c.model.attn_resolutions, c.model.num_classes = (1,), (), 3
  c.eval.num_samples, c.eval.batch_size, c.eval.steps = 6, 4, 2
  model = random_model(c)
  out = str(tmp_path / "chunks")
  seen = []
  real = model_lib.sample_fn
  monkeypatch.setattr(model_lib, "sample_fn",
                      lambda *a, **k: seen.append(np.asarray(k["labels"])) or real(*a, **k))
  images, labels = eval_run.sample_batch(model, c, out, progress=False)
  np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])
  np.testing.assert_array_equal(seen[1], [1, 2, 0, 1])    # the last chunk's full batch
  np.testing.assert_array_equal(np.load(eval_run.chunk_path(out, 1))["labels"], [1, 2])
  x = real(model, jax.random.fold_in(jax.random.key(c.eval.seed), 1), steps=2,
           labels=np.array([1, 2, 0, 1]), sampler=c.eval.sampler, eta=0.0)
  np.testing.assert_array_equal(images[4:], model_lib.to_uint8(x)[:2])

  seen.clear()
  c.sampling.labels = "random"
  _, drawn = eval_run.sample_batch(model, c, out, progress=False)
  assert len(seen) == 2   # no chunk reused across rules
  np.testing.assert_array_equal(drawn[:4], model_lib.class_labels("random", 3, 0, 4,
                                                                  seed=c.eval.seed))
  seen.clear()
  again, drawn_again = eval_run.sample_batch(model, c, out, progress=False)
  assert not seen and np.array_equal(drawn_again, drawn)   # resumed from disk
  assert sorted(os.listdir(out)) == ["samples_00000.npz", "samples_00001.npz"]
