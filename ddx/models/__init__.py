"""Denoising networks."""

from ddx.models.unet import UNet

__all__ = ["UNet"]
