"""Sample grids (and, later, sample-quality metrics)."""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 1,
              scale: Optional[int] = None) -> np.ndarray:
  """Tiles images into one picture.

  Args:
    images: [N, H, W, C] uint8.
    ncols: images per row (default: the smallest square that fits N).
    pad: pixels of black between images.
    scale: integer nearest-neighbour upscaling; default makes each tile at
      least 32 px so 8x8 digits are visible.
  Returns:
    [rows·(H·scale+pad)+pad, ncols·(W·scale+pad)+pad, C] uint8.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  if scale is None:
    scale = max(1, 32 // max(h, w))
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
  for k in range(n):
    r, q = divmod(k, ncols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    grid[y:y + h, x:x + w] = images[k]
  return grid


def save_grid(images: np.ndarray, path: Optional[str], **kwargs) -> np.ndarray:
  """Writes make_grid(images) as a PNG (atomically) and returns the grid.

  path None only builds the grid (e.g. on processes other than 0).
  """
  grid = make_grid(images, **kwargs)
  if path is not None:
    tmp = path + ".tmp.png"
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp)
    os.replace(tmp, path)
  return grid
