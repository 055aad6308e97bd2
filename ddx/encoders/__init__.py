"""Frozen representation encoders: pretrained networks whose features ddx reads.

They are never trained by ddx: REPA (2410.06940) aligns a diffusion
transformer's hidden states to an encoder's patch tokens, and FD-DINOv2
(dgm-eval, 2306.04675) is the Fréchet distance of an encoder's CLS features.
Each encoder is one module holding its network (Flax linen), its
preprocessing as pure functions, and a folder format written once by
`python -m ddx.convert` from a local weights file; nothing downloads. A run
records an encoder by its folder's path and its weights digest, never a copy
of its weights (it is in neither the optimizer nor the EMA).

  dinov2   DINOv2 ViT-S/B/L/g 14, with or without registers (2304.07193, 2309.16588)
"""
