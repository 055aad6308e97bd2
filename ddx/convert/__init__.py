"""Imports published checkpoints into ddx: `python -m ddx.convert SRC --workdir OUT`.

What SRC may be, and the module that owns each import:
  - a diffusers `UNet2DModel` folder or pipeline (google/ddpm-cifar10-32, ...):
    a ddx workdir (`ddx.convert.unet`);
  - a diffusers `AutoencoderKL` folder (stabilityai/sd-vae-ft-ema, -ft-mse, or
    the `vae/` of a pipeline): a ddx autoencoder folder that latent runs name in
    `autoencoder.path` (`ddx.convert.autoencoder`);
  - an official DiT checkpoint (facebookresearch/DiT `DiT-XL-2-256x256.pt`,
    `-512x512.pt`): a ddx workdir (`ddx.convert.dit`); `--autoencoder DIR`
    records the converted VAE that decodes its latents;
  - DINOv2: an official torch-hub state_dict (`dinov2_vitb14_pretrain.pth`,
    told from a DiT by its keys) or a transformers `Dinov2Model` /
    `Dinov2WithRegistersModel` folder: a ddx encoder folder that REPA and
    FD-DINOv2 name (`ddx.convert.dinov2`, docs/encoders.md).

Every import refuses what it cannot represent with one line naming the file,
field or weight (exit code 2). OUT must be a new or empty folder, or one an
interrupted import left (`common.check_output`): nothing else is ever written
over, and the same command redoes an import killed at any moment.
torch (and safetensors) are needed here only: pip install 'ddx[convert]'.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

from ddx.convert.common import EXIT_BAD_INPUT, ConversionError, read_json

KINDS = ("unet", "autoencoder", "dit", "dinov2")


def kind(src: str) -> str:
  """Which importer reads `src`: "unet", "autoencoder", "dit" or "dinov2" (see above)."""
  from ddx.convert import dinov2
  if os.path.isfile(src) and src.endswith((".pt", ".pth")):
    # The keys are read with weights_only (and memory-mapped): no code runs.
    return "dinov2" if dinov2.is_official_file(src) else "dit"
  if dinov2.is_transformers_folder(src):
    return "dinov2"
  for cfg in (os.path.join(src, "config.json"), os.path.join(src, "vae", "config.json")):
    if os.path.isfile(cfg) and read_json(cfg).get("_class_name") == "AutoencoderKL":
      if not os.path.isfile(os.path.join(src, "unet", "config.json")):
        return "autoencoder"
  return "unet"


def convert(src: str, workdir: str, autoencoder: Optional[str] = None) -> Any:
  """Converts `src` (any kind above) into `workdir`.

  Args:
    src: the checkpoint file or folder.
    workdir: output: a ddx workdir, or an autoencoder folder for a VAE.
    autoencoder: for a DiT, the converted VAE folder its config records
      (`autoencoder.path`); ignored otherwise.
  Returns:
    the ddx run config written (U-Net, DiT), the autoencoder's settings
    (VAE), or the `ddx.encoders.dinov2.Encoder` (DINOv2).
  Raises:
    ConversionError: one line naming what cannot be converted.
  """
  k = kind(src)
  if k == "dit":
    from ddx.convert import dit
    return dit.convert(src, workdir, autoencoder=autoencoder)
  if autoencoder:
    what = "DINOv2 checkpoint" if k == "dinov2" else f"diffusers {k} folder"
    raise ConversionError(f"--autoencoder is for an official DiT checkpoint (.pt); "
                          f"{src} is a {what}")
  if k == "dinov2":
    from ddx.convert import dinov2
    return dinov2.convert(src, workdir)
  if k == "autoencoder":
    from ddx.convert import autoencoder as ae
    return ae.convert(src, workdir)
  from ddx.convert import unet
  return unet.convert(src, workdir)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m ddx.convert",
      description="Convert a diffusers UNet2DModel or AutoencoderKL folder, an "
                  "official DiT .pt checkpoint, or DINOv2 (torch-hub .pth or "
                  "transformers folder) into ddx.")
  p.add_argument("src", help="diffusers or transformers folder (save_pretrained / "
                 "huggingface-cli download), an official DiT .pt or DINOv2 .pth file")
  p.add_argument("--workdir", required=True,
                 help="ddx workdir to write (for a VAE or DINOv2: the output folder)")
  p.add_argument("--autoencoder", default=None,
                 help="DiT only: the converted VAE folder that decodes its latents")
  args = p.parse_args(argv)
  start = time.perf_counter()
  try:
    k = kind(args.src)
    result = convert(args.src, args.workdir, autoencoder=args.autoencoder)
  except ConversionError as e:
    print(f"ddx.convert: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  from importlib import import_module
  what = import_module(f"ddx.convert.{k}").summary(result)
  print(f"wrote {args.workdir}: {what} ({time.perf_counter() - start:.1f} s)")
  return 0
