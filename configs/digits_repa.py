"""The digits DiT (configs/digits_dit.py) with REPA: block 2's tokens aligned with DINOv2's.

  python -m ddx.main --config configs/digits_repa.py --workdir runs/digits_repa \
      --config.training.repa.encoder=encoders/dinov2_vitb14

The encoder must exist first: a converted DINOv2 folder (docs/encoders.md), e.g.

  python -m ddx.convert dinov2_vitb14_pretrain.pth --workdir encoders/dinov2_vitb14

Which encoder suits 8x8 grey digits (an ImageNet DINOv2 sees them upsampled to
56 px, or one trained on the digits) is not settled yet: nothing here has been
measured. The DiT has 6 blocks on a 4x4 token grid (patch 2); REPA aligns the
tokens after block 2 (a third of the depth, as REPA's 8 of SiT-XL's 28), with
weight 0.5 (the paper's). The encoder sees each digit at 56 px, so its 14 px
patches make the same 4x4 grid (no interpolation of its tokens). The projector
is narrower than the paper's 2048 (512; the DiT is 128 wide).
"""
import os

from ddx import config as config_lib


def get_config():
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "digits_dit.py"))
  r = c.training.repa
  r.encoder = "encoders/dinov2_vitb14"   # python -m ddx.convert ... (docs/encoders.md)
  r.depth = 2
  r.weight = 0.5
  r.projector = "mlp"
  r.projector_dim = 512
  r.resolution = 56                      # 4 x 14: the DiT's 4x4 token grid
  return c
