"""The MeanFlow process's config half (no JAX): keys, checks, sampler, defaults.

Its keys carry an `mf_` prefix: flow's logit_mean/logit_std have other
defaults (SD3's 0, 1; MeanFlow's −0.4, 1), and a key two processes share
must have one default (`ddx.processes.fields`).
"""
from __future__ import annotations

from ddx.processes import base

SAMPLERS = ("meanflow",)   # n uniform steps z_r = z_t − (t − r)·u (ddx.processes.meanflow.core.sample)


class MeanFlowSpec(base.Spec):
  """MeanFlow (Geng et al. 2025): the network predicts the average velocity
  u(z_t, r, t) over [r, t] of flow matching's path; one step maps noise to data."""
  name = "meanflow"
  fields = (
      base.Field("mf_logit_mean", -0.4, "MeanFlow: (r, t) are two logit-normal draws, "
                 "ordered; their mean (paper: -0.4)"),
      base.Field("mf_logit_std", 1.0, "MeanFlow: the logit-normal std (paper: 1.0)"),
      base.Field("mf_ratio", 0.25, "MeanFlow: the share of examples with r != t; the "
                 "others train u(z, t, t) = v, flow matching (paper: 0.25)"),
      base.Field("mf_power", 1.0, "MeanFlow: adaptive loss weight 1/(Δ² + 1e-3)^p; "
                 "0 = plain squared error (paper: 1.0)"),
      base.Field("mf_omega", 1.0, "MeanFlow: guidance folded into training, the "
                 "target velocity ω·v + κ·u(c) + (1-ω-κ)·u(∅); 1 = none"),
      base.Field("mf_kappa", 0.0, "MeanFlow: κ of the guided velocity (above)"),
      base.Field("mf_guidance_tmin", 0.0, "MeanFlow: training guidance applies for "
                 "t in [mf_guidance_tmin, mf_guidance_tmax]"),
      base.Field("mf_guidance_tmax", 1.0, "MeanFlow: upper end of that t-range"),
  )
  predictions = ()               # the network's output is u itself
  samplers = SAMPLERS
  default_sampler = "meanflow"
  bpd_estimators = ()            # a few-step model has no likelihood ODE here
  # The network is built with a second time input (t − r), and the trainer
  # passes the (dropped-out) labels and the null label for training guidance.
  second_time = True
  loss_inputs = ("labels", "null_label")
  # The target holds the network's time derivative, which the 1000·t input
  # multiplies by 1000: at time_scale 1 its error grew without bound on the
  # digits, at 0.02 it stayed small (docs/meanflow.md; sCM's reason too).
  time_embedding = "positional"
  time_scales = {"positional": 0.02}
  implementation = "ddx.processes.meanflow.process:MeanFlowProcess"
  repa = True   # REPA aligns the aux of u(z_t, r, t), the JVP's primal call (the guidance calls are not aligned)

  def check(self, f) -> None:
    base.finite(f, "mf_logit_mean", "mf_logit_std", "mf_ratio", "mf_power", "mf_omega",
                "mf_kappa", "mf_guidance_tmin", "mf_guidance_tmax")
    if f["mf_logit_std"] <= 0:
      raise ValueError(f"diffusion.mf_logit_std={f['mf_logit_std']} must be > 0 "
                       "(paper: 1.0)")
    if not 0 <= f["mf_ratio"] <= 1:
      raise ValueError(f"diffusion.mf_ratio={f['mf_ratio']} must lie in [0, 1] (the "
                       "share of examples with r != t; paper: 0.25)")
    if f["mf_power"] < 0:
      raise ValueError(f"diffusion.mf_power={f['mf_power']} must be >= 0 (0 = plain "
                       "squared error; paper: 1.0)")
    if f["mf_omega"] <= 0:
      raise ValueError(f"diffusion.mf_omega={f['mf_omega']} must be > 0 (1 = no "
                       "guidance in training)")
    if not 0 <= f["mf_kappa"] < 1:
      raise ValueError(f"diffusion.mf_kappa={f['mf_kappa']} must lie in [0, 1) "
                       "(0 = the paper's plain CFG form)")
    if not 0 <= f["mf_guidance_tmin"] < f["mf_guidance_tmax"] <= 1:
      raise ValueError(f"diffusion.mf_guidance_tmin={f['mf_guidance_tmin']}, "
                       f"mf_guidance_tmax={f['mf_guidance_tmax']}: need 0 <= tmin < "
                       "tmax <= 1")

  def check_run(self, config) -> None:
    check_guidance(config.diffusion, config.model.num_classes,
                   config.training.label_dropout)


def check_guidance(f, num_classes: int, label_dropout: float) -> None:
  """Training guidance (mf_omega != 1 or mf_kappa != 0) mixes the network's
  conditional and unconditional velocities: it needs a class-conditional
  model whose null label is trained.

  Raises:
    ValueError: one line naming the key and the fix.
  """
  if f["mf_omega"] == 1 and f["mf_kappa"] == 0:
    return
  if num_classes <= 0:
    raise ValueError(f"diffusion.mf_omega={f['mf_omega']}, mf_kappa={f['mf_kappa']} "
                     "guide with class labels, but model.num_classes=0; set "
                     "--config.diffusion.mf_omega=1 --config.diffusion.mf_kappa=0")
  if label_dropout <= 0:
    raise ValueError(f"diffusion.mf_omega={f['mf_omega']} needs the unconditional "
                     "velocity, but training.label_dropout=0 never trains the null "
                     "label; set --config.training.label_dropout=0.1 (paper)")


SPEC = MeanFlowSpec()
