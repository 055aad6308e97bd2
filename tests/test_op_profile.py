"""Tests for benchmarks/op_profile.py: HLO parsing, categories, self times, a real run."""
import os
import sys

import pytest

from testutils import ROOT, load_config

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import op_profile  # noqa: E402

# A hand-written optimised module: a conv fusion, an attention-core dot, a
# q projection (a matmul, not attention), a norm fusion, an all-reduce, a copy,
# a Pallas kernel in a norm module and a cuDNN attention call.
HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_conv (p0: f32[1,4,4,8], p1: f32[3,3,8,8]) -> f32[1,4,4,8] {
  %p0 = f32[1,4,4,8]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,8,8]{3,2,1,0} parameter(1)
  %c = f32[1,4,4,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}
  ROOT %a = f32[1,4,4,8]{3,2,1,0} add(%c, %c)
}

%fused_norm (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %r = f32[8]{0} rsqrt(%p0)
}

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %conv_fusion = f32[1,4,4,8]{3,2,1,0} fusion(%a, %a), kind=kOutput, calls=%fused_conv, """ \
    """metadata={op_name="jit(step)/UNet/down_0_block_0/conv1/conv_general_dilated"}
  %dot.1 = f32[2,16,16]{2,1,0} dot(%a, %a), lhs_batch_dims={0}, """ \
    """metadata={op_name="jit(step)/UNet/mid_attn/bqc,bkc->bqk/dot_general"}
  %dot.2 = f32[32,8]{1,0} dot(%a, %a), """ \
    """metadata={op_name="jit(step)/DiT/blocks_0/attn/qkv/dot_general"}
  %norm_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_norm
  %all-reduce.3 = f32[4]{0} all-reduce(%a), to_apply=%sum
  %custom-call.5 = f32[4]{0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", """ \
    """metadata={op_name="jit(step)/UNet/down_0_block_0/norm1/pallas_call"}
  %custom-call.6 = f32[4]{0} custom-call(%a), custom_call_target="__cudnn$fmha", """ \
    """metadata={op_name="jit(step)/DiT/blocks_0/attn/dot_product_attention"}
  ROOT %copy.4 = (f32[4]{0}, /*index=1*/f32[4]{0}) copy(%a)
}
"""


def test_parse_and_categorise_a_module():
  instrs, comps, module = op_profile.parse_hlo(HLO)
  assert module == "jit_step"
  assert instrs["conv_fusion"].opcode == "fusion"
  assert instrs["conv_fusion"].calls == ("fused_conv",)
  assert instrs["copy.4"].opcode == "copy"
  kinds = op_profile.categorise(instrs, comps)
  assert {k: kinds[k] for k in ("conv_fusion", "dot.1", "dot.2", "norm_fusion",
                                "all-reduce.3", "copy.4", "custom-call.5",
                                "custom-call.6")} == {
      "conv_fusion": "matmul/conv", "dot.1": "attention", "dot.2": "matmul/conv",
      "norm_fusion": "norm/elementwise", "all-reduce.3": "communication",
      "copy.4": "other", "custom-call.5": "norm/elementwise",
      "custom-call.6": "attention"}


def test_self_times_subtract_nested_events_and_skip_other_modules():
  instrs, _, module = op_profile.parse_hlo(HLO)
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "XLA"}}]
  ev = lambda op, ts, dur, mod="jit_step": {
      "ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": dur, "name": "ev",
      "args": {"hlo_op": op, "hlo_module": mod}}
  events = meta + [ev("conv_fusion", 0, 10), ev("copy.4", 2, 3), ev("dot.1", 20, 4),
                   ev("dot.1", 30, 100, mod="jit_other"), ev("not_an_op", 40, 9)]
  assert op_profile.op_self_times(events, instrs, module) == {
      "conv_fusion": 7.0, "copy.4": 3.0, "dot.1": 4.0}


@pytest.mark.slow
def test_profile_a_tiny_training_step_on_cpu():
  config = load_config("test")   # one U-Net level, attention kept: a quarter of the compile
  config.model.ch_mult, config.model.attn_resolutions = (1,), (8,)
  report = op_profile.profile(config, "train", batch=2, reps=1)
  cats = report["categories"]
  assert set(cats) == set(op_profile.CATEGORIES)
  assert all(us >= 0 for us in cats.values())
  assert abs(sum(cats.values()) / report["total_us"] - 1) < 1e-9
  assert cats["matmul/conv"] > 0 and cats["attention"] > 0
  assert any(opcode in ("convolution", "dot") for _, _, opcode, _ in report["ops"])
  assert "| matmul/conv |" in op_profile.table(report)


def test_speed_sampler_helper_lowers_the_program_sample_fn_runs():
  """benchmarks/speed.ddx_sampler (used by speed.py, gpu.py and gpu_speed.py)
  lowers `sample_jit` itself; its arguments must follow sample_fn's (they once
  drifted when SampleOptions arrived, and every GPU sampling row crashed)."""
  import speed
  import ddx
  config = load_config("test")
  model = speed.ddx_model(config)
  compile_s, mem, run_s = speed.ddx_sampler(model, 2, 3, 1, sampler="ddim")
  image_bytes = 2 * 4 * config.data.image_size ** 2 * config.data.channels
  assert compile_s > 0 and run_s > 0 and mem >= image_bytes
  assert ddx.model.sample_jit._cache_size() >= 1
