"""The FID Inception-v3: weight loading, preprocessing and pooling conventions.

The full network is compiled once (module fixture, batch 2 at 299x299); every
other check runs on small tensors against NumPy references. Equality with
pytorch-fid's own network was checked once with torch (README: Evaluation);
torch is not a test dependency.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx import inception


def _random_state_dict(seed: int = 0) -> dict:
  """pytorch-fid-keyed arrays with He-scaled convs and sane BatchNorm stats."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in inception.expected_shapes().items():
    if key.endswith("conv.weight"):
      fan_in = shape[1] * shape[2] * shape[3]
      v = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("running_var"):
      v = rng.uniform(0.5, 1.5, size=shape)
    elif key == "fc.weight":
      v = rng.normal(size=shape) * 0.02
    else:   # bn.weight / bn.bias / running_mean / fc.bias
      v = rng.normal(size=shape) * 0.1 + (1.0 if key.endswith("bn.weight") else 0.0)
    state[key] = v.astype(np.float32)
  return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  state = _random_state_dict()
  path = str(tmp_path_factory.mktemp("inception") / "w.npz")
  np.savez(path, **state)
  return state, path


def test_weights_round_trip_exactly_with_layout_conversion(weights, tmp_path):
  state, path = weights
  v = inception.load_weights(path)
  assert len(state) == 472   # 94 conv+BN layers x 5, fc weight and bias
  p, bs = v["params"], v["batch_stats"]
  np.testing.assert_array_equal(p["Conv2d_1a_3x3"]["conv"]["kernel"],
                                state["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
  assert p["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(p["fc"]["kernel"], state["fc.weight"].T)
  np.testing.assert_array_equal(p["Mixed_7c"]["branch_pool"]["bn"]["scale"],
                                state["Mixed_7c.branch_pool.bn.weight"])
  np.testing.assert_array_equal(bs["Mixed_5b"]["branch1x1"]["bn"]["var"],
                                state["Mixed_5b.branch1x1.bn.running_var"])
  back = inception.state_dict_from_variables(v)
  assert back.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)
  # The digest that keys cached reference stats follows the values, not the file.
  inception.save_weights(v, str(tmp_path / "again.npz"))
  digest = inception.weights_digest(v)
  assert inception.weights_digest(inception.load_weights(str(tmp_path / "again.npz"))) == digest
  v["params"]["fc"]["bias"][0] += 1.0
  assert inception.weights_digest(v) != digest


def test_bad_weights_are_one_line_errors_naming_the_key(weights, tmp_path):
  state, _ = weights
  E = inception.InceptionWeightsError
  assert issubclass(E, ValueError)
  with pytest.raises(E, match="do not exist"):
    inception.load_weights(str(tmp_path / "nope.npz"))
  with pytest.raises(E, match="eval.inception_weights"):
    inception.load_weights("")
  cases = {
      "missing": ({k: v for k, v in state.items() if k != "Mixed_6c.branch1x1.bn.bias"},
                  "lacks 1 .*'Mixed_6c.branch1x1.bn.bias'"),
      "extra": (dict(state, **{"AuxLogits.fc.weight": np.zeros(3, np.float32)}),
                "'AuxLogits.fc.weight'"),
      "shape": (dict(state, **{"fc.bias": np.zeros(1000, np.float32)}),
                r"'fc.bias' has shape \(1000,\).*\(1008,\)"),
  }
  for name, (bad, pattern) in cases.items():
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, **bad)
    with pytest.raises(E, match=pattern) as info:
      inception.load_weights(path)
    assert "\n" not in str(info.value)
  # PyTorch's BatchNorm step counters are not weights and are ignored.
  path = str(tmp_path / "counters.npz")
  np.savez(path, **state, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.array(7)})
  inception.load_weights(path)
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(E, match="cannot read"):
    inception.load_weights(str(tmp_path / "junk.npz"))


def test_convert_without_torch_is_a_clear_error(tmp_path, monkeypatch, capsys):
  import sys
  monkeypatch.setitem(sys.modules, "torch", None)   # import torch -> ImportError
  args = ["--convert", str(tmp_path / "in.pth"), str(tmp_path / "out.npz")]
  assert inception.main(args) == 2
  err = capsys.readouterr().err
  assert "needs PyTorch: pip install torch" in err and len(err.strip().splitlines()) == 1


def test_convert_a_pytorch_state_dict(weights, tmp_path):
  """The .pth -> .npz step, where torch happens to be installed (not a dependency)."""
  torch = pytest.importorskip("torch")
  state, _ = weights
  sd = {k: torch.from_numpy(v) for k, v in state.items()}
  sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)   # as BatchNorm2d saves
  torch.save(sd, tmp_path / "w.pth")
  assert inception.main(["--convert", str(tmp_path / "w.pth"), str(tmp_path / "w.npz")]) == 0
  back = np.load(tmp_path / "w.npz")
  assert sorted(back.files) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_convert_never_overwrites_and_refuses_unsafe_pickles(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  out = tmp_path / "w.npz"
  out.write_bytes(b"the user's file")
  torch.save({"x": torch.zeros(1)}, tmp_path / "w.pth")
  assert inception.main(["--convert", str(tmp_path / "w.pth"), str(out)]) == 2
  assert "already exists" in capsys.readouterr().err
  assert out.read_bytes() == b"the user's file"
  torch.save({"x": torch.zeros(1), "o": _NotATensor()}, tmp_path / "bad.pth")
  assert inception.main(["--convert", str(tmp_path / "bad.pth"),
                         str(tmp_path / "new.npz")]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]    # after the SHA-256 warning
  assert err.startswith("ddx.inception: error: ") and len(err) < 300, err
  assert "is not a readable pytorch-fid weight file" in err
  assert "weights_only" not in err and not (tmp_path / "new.npz").exists()


class _NotATensor:
  pass


def _torch_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """PyTorch's bilinear, align_corners=False, written out (x: [H, W])."""
  def axis(n_in):
    src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0
  y0, y1, wy = axis(x.shape[0])
  x0, x1, wx = axis(x.shape[1])
  rows = x[y0] * (1 - wy)[:, None] + x[y1] * wy[:, None]
  return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


@pytest.mark.parametrize("n_in,size", [(32, 299), (8, 299), (64, 40)])
def test_resize_matches_pytorch_bilinear_reference(n_in, size):
  x = np.random.default_rng(n_in).uniform(0, 255, (n_in, n_in)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear(jnp.asarray(x)[None, ..., None], size))
  np.testing.assert_allclose(got[0, ..., 0], _torch_bilinear(x.astype(np.float64), size),
                             rtol=0, atol=2e-3)   # float32 on values up to 255


def test_preprocess_range_and_grey_to_rgb():
  u8 = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1)).astype(np.uint8)
  u8[0, 0, 0, 0], u8[0, 0, 1, 0] = 0, 255
  grey = np.asarray(inception.preprocess(u8, size=16))
  rgb = np.asarray(inception.preprocess(np.repeat(u8, 3, -1), size=16))
  assert grey.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(grey, rgb)
  np.testing.assert_allclose(grey[..., 0], u8[..., 0] / 127.5 - 1.0, atol=1e-6)
  assert grey[0, 0, 0, 0] == -1.0 and grey[0, 0, 1, 0] == 1.0


def _pool_numpy(x: np.ndarray, kind: str) -> np.ndarray:
  """3x3 stride-1 pool; avg over in-image pixels only, max over them (x: [N,H,W,C])."""
  n, h, w, c = x.shape
  out = np.empty_like(x)
  for i in range(h):
    for j in range(w):
      win = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
      out[:, i, j] = win.mean((1, 2)) if kind == "avg" else win.max((1, 2))
  return out


def test_pools_exclude_padding():
  x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32) - 1.0
  avg = np.asarray(inception.avg_pool_3x3_same(jnp.asarray(x)))
  np.testing.assert_allclose(avg, _pool_numpy(x, "avg"), atol=1e-6)
  np.testing.assert_allclose(avg[0, 0, 0], x[0, :2, :2].mean((0, 1)), atol=1e-6)
  mx = np.asarray(inception.max_pool_3x3_same(jnp.asarray(x)))
  np.testing.assert_array_equal(mx, _pool_numpy(x, "max"))
  assert (mx < 0).any()   # padding with zeros would have clipped these at 0


def _conv_bn_relu_1x1(x, p, s):
  w = p["conv"]["kernel"][0, 0]
  y = x @ w
  y = (y - s["bn"]["mean"]) / np.sqrt(s["bn"]["var"] + inception.BN_EPS)
  return np.maximum(y * p["bn"]["scale"] + p["bn"]["bias"], 0)


@pytest.mark.parametrize("block,pool", [(inception.InceptionA(32), "avg"),
                                        (inception.InceptionE("max"), "max")])
def test_pool_branch_of_blocks_matches_numpy(block, pool):
  """The pool branch (the last channels) pools the block input as the FID graph does."""
  x = np.random.default_rng(1).normal(size=(1, 5, 5, 16)).astype(np.float32)
  v = jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x))
  rng = np.random.default_rng(2)
  v = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.3 + 1.0).astype(np.float32), v)
  out = np.asarray(block.apply(v, jnp.asarray(x)))
  p, s = v["params"]["branch_pool"], v["batch_stats"]["branch_pool"]
  width = p["conv"]["kernel"].shape[-1]
  want = _conv_bn_relu_1x1(_pool_numpy(x, pool), p, s)
  np.testing.assert_allclose(out[..., -width:], want, rtol=1e-4, atol=1e-4)


def test_inception_c_starts_with_branch1x1():
  """sFID reads Mixed_6d's first channels as its branch1x1 (the concat's first part)."""
  x = np.random.default_rng(4).normal(size=(1, 5, 5, 16)).astype(np.float32)
  block = inception.InceptionC(8)
  v = jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x))
  rng = np.random.default_rng(5)
  v = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.3 + 1.0).astype(np.float32), v)
  out = np.asarray(block.apply(v, jnp.asarray(x)))
  want = _conv_bn_relu_1x1(x, v["params"]["branch1x1"], v["batch_stats"]["branch1x1"])
  np.testing.assert_allclose(out[..., :192], want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def network_outputs(weights):
  """One compiled forward (batch 2 at 299x299, with sFID's features) used below."""
  state, path = weights
  v = inception.load_weights(path)
  imgs = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  pool3, spatial, logits = inception.features(v, imgs, batch_size=2, spatial=True)
  swapped = inception.features(v, imgs[[2, 0]], batch_size=2, spatial=True)
  return state, v, imgs, pool3, spatial, logits, swapped


@pytest.mark.slow
def test_features_shapes_batching_and_logits(network_outputs):
  state, v, _, pool3, spatial, logits, (pool_sw, spatial_sw, logits_sw) = network_outputs
  assert pool3.shape == (3, 2048) and logits.shape == (3, 1008)
  assert spatial.shape == (3, inception.SPATIAL_DIM) == (3, 2023)
  assert pool3.dtype == np.float32 and logits.dtype == np.float32
  assert np.all(pool3 >= 0) and pool3.std() > 0   # a mean of ReLU outputs
  assert np.all(spatial >= 0) and spatial.std() > 0   # ReLU outputs
  # Padding the last batch and the batch position change nothing.
  np.testing.assert_allclose(pool_sw, pool3[[2, 0]], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(spatial_sw, spatial[[2, 0]], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits_sw, logits[[2, 0]], rtol=1e-4, atol=1e-4)
  # Logits are fc applied to pool3, with PyTorch's (out, in) weight.
  want = pool3.astype(np.float64) @ state["fc.weight"].T.astype(np.float64) + state["fc.bias"]
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  # ADM's IS logits leave the bias out.
  np.testing.assert_allclose(inception.adm_logits(v, pool3), logits - state["fc.bias"],
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(pool3[0], pool3[1])


@pytest.mark.slow
def test_spatial_features_are_mixed_6d_branch1x1(network_outputs):
  """Perturbing weights (same shapes, so the compiled program is reused) shows
  which layer the spatial features are: Mixed_6d.branch1x1's ReLU output,
  first 7 channels, flattened [17, 17, 7] in NHWC order."""
  _, v, imgs, pool3, spatial, _, _ = network_outputs
  old = spatial.reshape(3, 17, 17, 7)
  # The channel (of the 7) nearest half active, to see both sides of the ReLU.
  c = int(np.argmin(np.abs((old > 1e-3).mean((0, 1, 2)) - 0.5)))
  v = jax.tree.map(np.array, v)   # a private copy to edit
  v["params"]["Mixed_6d"]["branch1x1"]["bn"]["bias"][c] += 0.5   # before its ReLU
  v["params"]["Mixed_6d"]["branch1x1"]["bn"]["bias"][100] += 5.0   # past the 7
  v["params"]["Mixed_6d"]["branch7x7_1"]["bn"]["bias"] += 1.0      # a sibling branch
  v["params"]["Mixed_6e"]["branch1x1"]["bn"]["bias"] += 1.0        # a later block
  pool_new, spatial_new, _ = inception.features(v, imgs, batch_size=2, spatial=True)
  assert not np.allclose(pool_new, pool3, atol=1e-3)
  new = spatial_new.reshape(3, 17, 17, 7)
  others = [o for o in range(7) if o != c]
  np.testing.assert_allclose(new[..., others], old[..., others], rtol=1e-5, atol=1e-5)
  # Post-ReLU: where the unit was active it moves by exactly the bias shift.
  active = old[..., c] > 1e-3
  assert active.sum() >= 10 and (~active).sum() >= 10
  np.testing.assert_allclose(new[..., c][active], old[..., c][active] + 0.5, atol=1e-4)
  inactive = new[..., c][~active]   # was clipped at 0: now between 0 and the shift
  assert np.all(inactive >= 0) and np.all(inactive <= 0.5 + 1e-4) and inactive.max() > 0


@pytest.mark.slow
def test_evaluate_cli_on_the_real_network(weights, network_outputs, tmp_path, capsys,
                                          monkeypatch):
  """python -m ddx.evaluate end to end (ADM protocol), reusing the compiled network.

  The Fréchet distance is recorded instead of computed (2048-wide
  eigendecompositions cost seconds here; tests/test_adm_metrics.py checks
  the formula and the CLI's arithmetic): this checks what the CLI feeds it.
  """
  from ddx import batch_files, evaluate, evaluation
  _, path = weights
  rng = np.random.default_rng(9)
  samples = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  ref = rng.integers(0, 128, (4, 32, 32, 3)).astype(np.uint8)
  s_path, r_path = str(tmp_path / "s.npz"), str(tmp_path / "r.npz")
  batch_files.write_batch(s_path, samples)
  batch_files.write_batch(r_path, ref)
  seen, calls, real_features = [], [], inception.features
  monkeypatch.setattr(evaluation, "frechet_distance",
                      lambda mu1, s1, mu2, s2: seen.append((mu1, mu2)) or float(len(seen)))
  monkeypatch.setattr(inception, "features",
                      lambda *a, **kw: calls.append((kw, real_features(*a, **kw))) or calls[-1][1])
  assert evaluate.main([s_path, r_path, "--inception_weights", path,
                        "--batch_size", "2"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split(": ")[0] for line in lines] == list(evaluate.LABELS)
  got = {line.split(": ")[0]: float(line.split(": ")[1]) for line in lines}
  assert got["FID"] == 1.0 and got["sFID"] == 2.0 and 0 <= got["Recall"] <= 1
  assert [kw for kw, _ in calls] == [dict(batch_size=2, protocol="adm", spatial=True)] * 2
  (sp, ss, _), (rp, _, _) = calls[0][1], calls[1][1]
  (pool_mu, pool_ref_mu), (spatial_mu, _) = seen
  assert pool_mu.shape == (2048,) and spatial_mu.shape == (2023,)
  np.testing.assert_allclose(pool_mu, sp.mean(0), rtol=1e-6)
  np.testing.assert_allclose(pool_ref_mu, rp.mean(0), rtol=1e-6)
  np.testing.assert_allclose(spatial_mu, ss.mean(0), rtol=1e-6)
  v = inception.load_weights(path)
  assert got["Inception Score"] == pytest.approx(
      evaluation.inception_score_adm(inception.adm_logits(v, sp)), rel=1e-9)
  assert (got["Precision"], got["Recall"]) == evaluation.precision_recall(rp, sp)
