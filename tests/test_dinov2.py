"""ddx.encoders.dinov2 and its importer, against transformers and torch.

The reference networks are transformers' own `Dinov2Model` and
`Dinov2WithRegistersModel`, built from tiny configs with every weight
perturbed (so no zero, unit or identity init hides a mis-mapped weight),
saved with `save_pretrained` and as a torch-hub state_dict (official
facebookresearch/dinov2 names, mapped here independently of the importer),
converted with `python -m ddx.convert`, and compared with transformers'
last_hidden_state. Nothing is downloaded.

Tolerances: the networks are compared in float64 on both sides (torch
`.double()`, JAX x64), where the two implementations differ only in the
order of roundings: a few hundred ulps of float64 (~1e-13 relative) after a
2-block network, against which 1e-10 of the output scale leaves margin on any
CPU while a wrong weight, order or resize moves outputs by > 1e-3.
transformers resizes the position table in float32 even in a float64 model;
the tests run its code with F.interpolate given float64 (the table's values
are float32 numbers, so that cast loses nothing). The float32 resize check
uses the forward error bound of a dot product (Higham, Thm 3.5).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ddx import convert
from ddx.convert import dinov2 as convert_dinov2
from ddx.encoders import dinov2

F = torch.nn.functional
HIDDEN, LAYERS, HEADS, PATCH, IMAGE = 128, 2, 2, 14, 42   # 3x3 position grid
F64_RTOL = 1e-10
EPS32 = float(np.finfo(np.float32).eps)

MODELS = {
    "plain": (transformers.Dinov2Model, transformers.Dinov2Config, {}),
    "registers": (transformers.Dinov2WithRegistersModel,
                  transformers.Dinov2WithRegistersConfig, dict(num_register_tokens=4)),
    "swiglu": (transformers.Dinov2Model, transformers.Dinov2Config,
               dict(use_swiglu_ffn=True)),
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def _hf_model(name, seed=0):
  cls, config_cls, extra = MODELS[name]
  torch.manual_seed(seed)
  config = config_cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, patch_size=PATCH, image_size=IMAGE,
                      **extra)
  model = cls(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def official_state_dict(model) -> dict:
  """transformers' in-memory names -> facebookresearch/dinov2's (vision_transformer.py:
  DinoVisionTransformer, NestedTensorBlock, MemEffAttention, LayerScale,
  Mlp / SwiGLUFFNFused)."""
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  out = {"cls_token": sd.pop("embeddings.cls_token"),
         "mask_token": sd.pop("embeddings.mask_token"),
         "pos_embed": sd.pop("embeddings.position_embeddings"),
         "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
         "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
         "norm.weight": sd.pop("layernorm.weight"), "norm.bias": sd.pop("layernorm.bias")}
  if "embeddings.register_tokens" in sd:
    out["register_tokens"] = sd.pop("embeddings.register_tokens")
  for i in range(LAYERS):
    hf, o = f"encoder.layer.{i}.", f"blocks.{i}."
    swiglu = hf + "mlp.gate_proj.weight" in sd
    for leaf in ("weight", "bias"):
      out[o + f"norm1.{leaf}"] = sd.pop(hf + f"norm1.{leaf}")
      out[o + f"norm2.{leaf}"] = sd.pop(hf + f"norm2.{leaf}")
      out[o + f"attn.qkv.{leaf}"] = torch.cat(
          [sd.pop(hf + f"attention.{n}_proj.{leaf}") for n in "qkv"])
      out[o + f"attn.proj.{leaf}"] = sd.pop(hf + f"attention.o_proj.{leaf}")
      if not swiglu:
        out[o + f"mlp.fc1.{leaf}"] = sd.pop(hf + f"mlp.fc1.{leaf}")
        out[o + f"mlp.fc2.{leaf}"] = sd.pop(hf + f"mlp.fc2.{leaf}")
      else:   # SwiGLUFFNFused: w12 = [gate; value], w3 out
        out[o + f"mlp.w12.{leaf}"] = torch.cat(
            [sd.pop(hf + f"mlp.gate_proj.{leaf}"), sd.pop(hf + f"mlp.up_proj.{leaf}")])
        out[o + f"mlp.w3.{leaf}"] = sd.pop(hf + f"mlp.down_proj.{leaf}")
    out[o + "ls1.gamma"] = sd.pop(hf + "layer_scale1.lambda1")
    out[o + "ls2.gamma"] = sd.pop(hf + "layer_scale2.lambda1")
  assert not sd, sorted(sd)
  return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """{name: (transformers model, transformers folder, .pth, {"hf": dir, "pth": dir})}."""
  root = tmp_path_factory.mktemp("dinov2")
  out = {}
  for name in MODELS:
    model = _hf_model(name)
    folder = str(root / f"{name}_hf")
    model.save_pretrained(folder)
    pth = str(root / f"{name}.pth")
    torch.save(official_state_dict(model), pth)
    dirs = {}
    for kind, src in (("hf", folder), ("pth", pth)):
      dirs[kind] = str(root / f"{name}_{kind}_ddx")
      assert convert.main([src, "--workdir", dirs[kind]]) == 0
    out[name] = (model, folder, pth, dirs)
  return out


def _float64_interpolate(monkeypatch):
  """transformers' position resize in float64 (it casts the table to float32)."""
  orig = F.interpolate
  monkeypatch.setattr(F, "interpolate", lambda x, *a, **k: orig(x.double(), *a, **k))


def _compare(model, folder, h, w, blocks=()):
  """ddx's tokens and transformers' last_hidden_state, float64, for [2, h, w, 3] images."""
  x = np.random.default_rng(h * 100 + w).standard_normal((2, h, w, 3))
  with torch.no_grad():
    ref = model.double()(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                         output_hidden_states=bool(blocks))
  model.float()
  with jax.enable_x64():
    enc = dinov2.load(folder)
    enc = enc.replace(params=jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), enc.params))
    out = jax.tree.map(np.asarray, dinov2.features(enc, jnp.asarray(x), blocks=blocks))
  assert out["patch"].dtype == np.float64
  lhs = ref.last_hidden_state.numpy()
  r = enc.config.num_registers
  assert out["patch"].shape == (2, (h // PATCH) * (w // PATCH), HIDDEN)
  scale = np.abs(lhs).max()
  assert scale > 0.5
  for got, want in ((out["cls"], lhs[:, 0]), (out["registers"], lhs[:, 1:1 + r]),
                    (out["patch"], lhs[:, 1 + r:])):
    np.testing.assert_allclose(got, want, rtol=0, atol=F64_RTOL * scale)
  for i, hid in zip(blocks, out.get("hidden", ())):
    want = ref.hidden_states[i + 1].numpy()   # [0] is the embedding output
    np.testing.assert_allclose(hid, want, rtol=0, atol=F64_RTOL * np.abs(want).max())
  return enc


@pytest.mark.parametrize("name", list(MODELS))
def test_tokens_match_transformers_at_base_size(converted, name):
  model, _, _, dirs = converted[name]
  enc = _compare(model, dirs["hf"], IMAGE, IMAGE, blocks=(1, 0))
  assert enc.config.num_registers == (4 if name == "registers" else 0)
  assert enc.config.mlp == ("swiglu" if name == "swiglu" else "gelu")
  with pytest.raises(ValueError, match="block 2 does not exist"):
    dinov2.forward(enc, jnp.zeros((1, IMAGE, IMAGE, 3)), blocks=(2,))


@pytest.mark.parametrize("name,h,w", [("plain", 56, 28), ("plain", 70, 70),
                                      ("registers", 28, 28), ("registers", 70, 42)])
def test_tokens_match_transformers_at_other_sizes(converted, monkeypatch, name, h, w):
  """Other patch grids than the 3x3 table, non-square too: the position table is
  resized as transformers does (antialiased for the with-registers model)."""
  model, _, _, dirs = converted[name]
  _float64_interpolate(monkeypatch)
  _compare(model, dirs["hf"], h, w)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_hub_file_gives_the_same_weights(converted, name):
  model, _, _, dirs = converted[name]
  hf, hub = dinov2.load(dirs["hf"]), dinov2.load(dirs["pth"])
  assert hub.digest == hf.digest == dinov2.weights_digest(hf.params)
  # Only the resize convention differs: torch hub's offset without registers.
  assert hub.config.interpolate_offset == (0.0 if name == "registers" else 0.1)
  assert hub.config == hf.config.__class__(**{
      **hf.config.to_dict(), "interpolate_offset": hub.config.interpolate_offset})
  _compare(model, dirs["pth"], IMAGE, IMAGE)


@pytest.mark.parametrize("name", ["plain", "swiglu"])
def test_transformers_current_names_and_a_classifier_prefix(converted, tmp_path, name):
  """transformers 5's in-memory names (q_proj, gate_proj/up_proj, ...), under a
  classification model's "dinov2." prefix with its classifier, give the same weights."""
  from safetensors.torch import save_file
  model, folder, _, dirs = converted[name]
  src = tmp_path / "cls"
  src.mkdir()
  (src / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  sd = {f"dinov2.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  sd["classifier.weight"] = torch.zeros(5, 2 * HIDDEN)
  save_file(sd, str(src / "model.safetensors"))
  out = str(tmp_path / "out")
  assert convert.main([str(src), "--workdir", out]) == 0
  assert dinov2.load(out).digest == dinov2.load(dirs["hf"]).digest


def test_the_hub_offset_resizes_as_the_official_code(converted):
  """facebookresearch/dinov2's interpolate_pos_encoding: scale_factor (g + 0.1) / M."""
  _, _, pth, dirs = converted["plain"]
  enc = dinov2.load(dirs["pth"])
  pos = torch.load(pth, weights_only=True)["pos_embed"].double()
  m, gh, gw = 3, 5, 2
  table = pos[:, 1:].reshape(1, m, m, HIDDEN).permute(0, 3, 1, 2)
  ref = F.interpolate(table, mode="bicubic", antialias=False,
                      scale_factor=((gh + 0.1) / m, (gw + 0.1) / m))
  ref = torch.cat([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, -1, HIDDEN)], 1).numpy()
  with jax.enable_x64():
    got = np.asarray(dinov2.pos_embed_for_grid(jnp.asarray(pos.numpy()), enc.config,
                                               (gh, gw)))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
  plain = dinov2.pos_embed_for_grid(jnp.asarray(pos.numpy(), jnp.float32),
                                    enc.config.__class__(**{**enc.config.to_dict(),
                                                            "interpolate_offset": 0.0}),
                                    (gh, gw))
  assert np.abs(np.asarray(plain) - ref).max() > 1e-3   # the offset is not a no-op


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("src,dst,offset", [((37, 37), (16, 16), 0.0), ((5, 3), (3, 7), 0.0),
                                            ((4, 4), (9, 2), 0.0), ((6, 6), (6, 6), 0.0),
                                            ((37, 37), (16, 16), 0.1), ((3, 3), (5, 2), 0.1)])
def test_resize_matrices_match_torch_interpolate(src, dst, offset, antialias):
  x = np.random.default_rng(0).standard_normal((1, 2) + src)
  kw = (dict(scale_factor=tuple((d + offset) / s for d, s in zip(dst, src))) if offset
        else dict(size=dst))
  ref = F.interpolate(torch.from_numpy(x), mode="bicubic", align_corners=False,
                      antialias=antialias, **kw).numpy().transpose(0, 2, 3, 1)
  assert ref.shape[1:3] == dst
  with jax.enable_x64():
    got = np.asarray(dinov2.resize_bicubic(jnp.asarray(x.transpose(0, 2, 3, 1)), dst,
                                           antialias=antialias,
                                           scale_factor=kw.get("scale_factor")))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_jax_image_resize_is_not_torch_bicubic():
  """Why the matrices exist: jax.image.resize's cubic is Keys a = -0.5."""
  x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x), size=(5, 5), mode="bicubic",
                      align_corners=False).numpy()[0, 0]
  jx = np.asarray(jax.image.resize(jnp.asarray(x[0, 0]), (5, 5), "cubic", antialias=False))
  assert np.abs(jx - ref).max() > 1e-3


def _float32_resize_bound(x, size):
  """A bound on ddx's float32 error: |fl(M_h X M_w^T) - M_h X M_w^T| <= c u
  |M_h| |X| |M_w|^T with c = 2 gamma_4 / u (two 4-tap dot products) + 2 (each
  side's weights rounded to float32) + 3 (x / 255, - mean, / std each rounded,
  relative to (|x| + mean) / std, passed as x) < 16."""
  mh = np.abs(dinov2.resize_matrix(x.shape[1], size))
  mw = np.abs(dinov2.resize_matrix(x.shape[2], size))
  return 16 * EPS32 * np.einsum("oh,bhwc,pw->bopc", mh, np.abs(x), mw)


@pytest.mark.parametrize("side", [32, 20])   # down and up to 28
def test_repa_preprocess_matches_torch(side):
  """REPA's preprocess_raw_image: x / 255, Normalize, F.interpolate(bicubic).

  The reference runs in float64. uint8 images are prepared in float32 by
  ddx; torch's own float32 resize computes its sampling positions in float32
  (an error of ~eps * H in each tap's weight), so float32 is compared with the
  exact result, within ddx's own float32 rounding only.
  """
  rng = np.random.default_rng(side)
  mean = torch.tensor(dinov2.IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
  std = torch.tensor(dinov2.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)

  def torch_ref(x01):   # [B, H, W, 3] float64 in [0, 1]
    x = (torch.from_numpy(x01.transpose(0, 3, 1, 2).copy()) - mean) / std
    # |x - mean| / std can cancel: the rounding of x - mean is relative to
    # (|x| + mean) / std, which bounds |X| too.
    scale = (torch.from_numpy(x01.transpose(0, 3, 1, 2).copy()).abs() + mean) / std
    return (F.interpolate(x, 28, mode="bicubic").numpy().transpose(0, 2, 3, 1),
            scale.numpy())
  u8 = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
  ref, magnitude = torch_ref(u8 / 255.0)
  got = np.asarray(dinov2.preprocess(jnp.asarray(u8), size=28))
  assert got.dtype == np.float32
  bound = _float32_resize_bound(magnitude.transpose(0, 2, 3, 1), 28)
  assert np.all(np.abs(got - ref) <= bound)
  # Float images in [-1, 1], float64 on both sides.
  f = rng.uniform(-1, 1, (2, side, side, 3))
  ref, _ = torch_ref((f + 1) / 2)
  with jax.enable_x64():
    got = np.asarray(dinov2.preprocess(jnp.asarray(f), size=28))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_fd_dinov2_preprocess_matches_pil_and_torchvision_steps():
  """dgm-eval: Resize((224, 224), BICUBIC) on a PIL image, ToTensor, Normalize."""
  from PIL import Image
  u8 = np.random.default_rng(0).integers(0, 256, (2, 40, 30, 3), dtype=np.uint8)
  got = dinov2.preprocess_pil(u8, size=28)
  for img, out in zip(u8, got):
    pil = Image.fromarray(img).resize((28, 28), Image.BICUBIC)
    t = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float().div(255)   # ToTensor
    t = (t - torch.tensor(dinov2.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        dinov2.IMAGENET_STD).view(3, 1, 1)                                  # Normalize
    np.testing.assert_array_equal(out, t.numpy().transpose(1, 2, 0))
  grey = u8[..., :1]
  np.testing.assert_array_equal(dinov2.preprocess_pil(grey, size=28),
                                dinov2.preprocess_pil(np.repeat(grey, 3, -1), size=28))


# --------------------------------------------------------------------------
# The importer's choices and refusals.


def test_kind_tells_dinov2_from_dit(converted, tmp_path):
  _, folder, pth, _ = converted["plain"]
  assert convert.kind(pth) == "dinov2"
  assert convert.kind(folder) == "dinov2"
  dit = str(tmp_path / "dit.pt")
  torch.save({"x_embedder.proj.weight": torch.zeros(4, 4, 2, 2),
              "blocks.0.attn.qkv.weight": torch.zeros(12, 4)}, dit)
  assert convert.kind(dit) == "dit"


def _error(capsys, argv):
  assert convert.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def test_refuses_a_users_folder_untouched(converted, tmp_path, capsys):
  _, _, pth, _ = converted["plain"]
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep")
  err = _error(capsys, [pth, "--workdir", str(out)])
  assert "is not empty" in err and "notes.txt" in err
  assert sorted(os.listdir(out)) == ["notes.txt"]
  assert (out / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("edit,needle", [
    ("drop", "weight blocks.1.attn.proj.weight is missing"),
    ("shape", "weight blocks.0.norm2.weight"),
    ("extra", "weight head.weight"),
    ("no_cls", "cls_token"),
])
def test_refuses_a_bad_state_dict_naming_the_key(converted, tmp_path, capsys, edit, needle):
  _, _, pth, _ = converted["plain"]
  sd = torch.load(pth, weights_only=True)
  if edit == "drop":
    del sd["blocks.1.attn.proj.weight"]
  elif edit == "shape":
    sd["blocks.0.norm2.weight"] = torch.zeros(HIDDEN + 1)
  elif edit == "extra":
    sd["head.weight"] = torch.zeros(10, HIDDEN)
  else:
    del sd["cls_token"]
  bad = str(tmp_path / "bad.pth")
  torch.save(sd, bad)
  if edit == "no_cls":   # no longer looks like DINOv2: the DINOv2 importer itself refuses it
    with pytest.raises(convert.ConversionError, match="cls_token"):
      convert_dinov2.convert(bad, str(tmp_path / "out"))
    return
  out = tmp_path / "out"
  assert needle in _error(capsys, [bad, "--workdir", str(out)])
  assert not out.exists()


def test_refuses_a_transformers_folder_without_weights(converted, tmp_path, capsys):
  _, folder, _, _ = converted["plain"]
  src = tmp_path / "noweights"
  src.mkdir()
  (src / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  assert "model.safetensors" in _error(capsys, [str(src), "--workdir", str(tmp_path / "o")])


def test_an_interrupted_import_is_redone(converted, tmp_path):
  _, _, pth, dirs = converted["plain"]
  out = tmp_path / "out"
  out.mkdir()
  (out / ".ddx-convert-unfinished").write_text("")
  (out / "params.npz").write_bytes(b"half")
  assert convert.main([pth, "--workdir", str(out)]) == 0
  assert sorted(os.listdir(out)) == ["encoder.json", "params.npz"]
  assert dinov2.load(str(out)).digest == dinov2.load(dirs["pth"]).digest


def test_load_refuses_a_damaged_folder(converted, tmp_path):
  _, _, _, dirs = converted["plain"]
  enc = dinov2.load(dirs["pth"])
  params = jax.tree.map(np.array, enc.params)
  folder = str(tmp_path / "enc")
  dinov2.save(folder, enc.config, params)
  params["norm"]["bias"][0] += 1.0
  np.savez(os.path.join(folder, "params.npz"),
           **{"/".join(k.key for k in p): v
              for p, v in jax.tree_util.tree_flatten_with_path(params)[0]})
  with pytest.raises(dinov2.EncoderWeightsError, match="digest"):
    dinov2.load(folder)
  with pytest.raises(dinov2.EncoderWeightsError, match="does not exist"):
    dinov2.load(str(tmp_path / "nothing"))
  with pytest.raises(dinov2.EncoderWeightsError, match="already holds an encoder"):
    dinov2.save(folder, enc.config, params)


def test_presets_are_the_released_architectures():
  g = dinov2.PRESETS["dinov2_vitg14"]
  assert (g.hidden_size, g.depth, g.num_heads, g.mlp, g.mlp_hidden) == (
      1536, 40, 24, "swiglu", 4096)
  assert dinov2.PRESETS["dinov2_vitl14"].mlp_hidden == 4096
  reg = dinov2.PRESETS["dinov2_vitb14_reg"]
  assert (reg.num_registers, reg.interpolate_antialias, reg.interpolate_offset,
          reg.base_size) == (4, True, 0.0, 518)
  assert dinov2.preset_name(dinov2.Dinov2Config(hidden_size=384, num_heads=6)) == (
      "dinov2_vits14")
  # SwiGLU's width is transformers' rounding.
  cfg = transformers.Dinov2Config(hidden_size=HIDDEN, use_swiglu_ffn=True)
  hf = transformers.models.dinov2.modeling_dinov2.Dinov2SwiGLUFFN(cfg)
  assert hf.gate_proj.out_features == dinov2.Dinov2Config(
      hidden_size=HIDDEN, num_heads=2, mlp="swiglu").mlp_hidden
