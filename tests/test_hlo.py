"""mft_jax.hlo on hand-written optimized HLO: loop trip counts (recorded by the GPU compiler, or read from a
counted loop as the TPU compiler writes it), flops of dots and 1x1 convolutions, ring bytes of collectives in
both replica-group notations, the TPU compiler's reduce-scatter fusion, and attention kernels. A compiled
program's summary is checked against XLA's own cost analysis in tests/test_compile_targets.py."""

import pytest

from mft_jax import hlo

MODULE = """HloModule jit_step, is_scheduled=true

%fused_dot (p0: bf16[8,16], p1: bf16[16,32]) -> bf16[8,32] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,32]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.clone (input.1: bf16[64,32]) -> bf16[16,32] {
  %input.1 = bf16[64,32]{1,0} parameter(0)
  %all-reduce.9 = bf16[64,32]{1,0} all-reduce(%input.1), channel_id=1, replica_groups=mesh['x'=2,'y'=4] {'y'}, to_apply=%add
  %c0 = u32[] constant(0)
  %pid = u32[] partition-id()
  ROOT %ds = bf16[16,32]{1,0} dynamic-slice(%all-reduce.9, %pid, %c0), dynamic_slice_sizes={16,32}
}

%body.known (param.1: (s32[], bf16[8,16], bf16[16,32])) -> (s32[], bf16[8,16], bf16[16,32]) {
  %param.1 = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param.1), index=0
  %x = bf16[8,16]{1,0} get-tuple-element(%param.1), index=1
  %w = bf16[16,32]{1,0} get-tuple-element(%param.1), index=2
  %f = bf16[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %ag = bf16[64,32]{1,0} all-gather(%f), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %rs = bf16[16,32]{1,0} fusion(%ag), kind=kCustom, calls=%all-reduce-scatter.clone
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) tuple(%next, %x, %w)
}

%cond.known (param.2: (s32[], bf16[8,16], bf16[16,32])) -> pred[] {
  %param.2 = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%param.2), index=0
  %n = s32[] constant(99)
  ROOT %lt = pred[] compare(%i.2, %n), direction=LT
}

%body.counted (param.3: (s32[], f32[8,16], f32[16,32])) -> (s32[], f32[8,16], f32[16,32]) {
  %param.3 = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%param.3), index=0
  %j.copy = s32[] copy(%j)
  %y = f32[8,16]{1,0} get-tuple-element(%param.3), index=1
  %v = f32[16,32]{1,0} get-tuple-element(%param.3), index=2
  %conv = f32[8,32]{1,0} convolution(%y, %v), window={size=1}, dim_labels=bf_io->bf
  %two = s32[] constant(2)
  %next.2 = s32[] add(%j.copy, %two)
  ROOT %t.2 = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%next.2, %y, %v)
}

%cond.counted (param.4: (s32[], f32[8,16], f32[16,32])) -> pred[] {
  %param.4 = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %j.2 = s32[] get-tuple-element(%param.4), index=0
  %seven = s32[] constant(7)
  ROOT %lt.2 = pred[] compare(%j.2, %seven), direction=LT
}

ENTRY %main (x.1: bf16[8,16], w.1: bf16[16,32], y.1: f32[8,16], v.1: f32[16,32], q: bf16[2,256,4,64]) -> f32[] {
  %x.1 = bf16[8,16]{1,0} parameter(0)
  %w.1 = bf16[16,32]{1,0} parameter(1)
  %y.1 = f32[8,16]{1,0} parameter(2)
  %v.1 = f32[16,32]{1,0} parameter(3)
  %q = bf16[2,256,4,64]{3,2,1,0} parameter(4)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) tuple(%zero, %x.1, %w.1)
  %loop = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) while(%init), condition=%cond.known, body=%body.known, backend_config={"known_trip_count":{"n":"4"}}
  %one.e = s32[] constant(1)
  %one.copy = s32[] copy(%one.e)
  %init.2 = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%one.copy, %y.1, %v.1)
  %loop.2 = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) while(%init.2), condition=%cond.counted, body=%body.counted
  %fmha = (bf16[2,4,256,64]{3,1,2,0}, f32[2,4,256]{2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "4", "256", "256"]}, "mask_type": "CAUSAL"}}
  %ar = f32[128]{0} all-reduce(%y.1), channel_id=3, replica_groups={{0,1},{2,3}}, to_apply=%add
  ROOT %r = f32[] constant(0)
}
"""


def test_loops_flops_and_kernels():
    s = hlo.summarize(MODULE)
    assert s.loops == [4, 3]  # the recorded trip count; (7 - 1) / 2 rounded up from the counted loop's shape
    dot = 2 * 8 * 32 * 16
    fmha = 4 * 2 * 4 * 256 * 256 * 64 * 0.5  # causal: half the blocks
    assert s.flops == 4 * dot + 3 * dot + fmha and s.attention_flops == fmha
    assert dict(s.attention) == {"forward": 1} and s.custom_calls["__cudnn$fmhaSoftmax"] == 1


def test_collectives_count_ring_bytes_per_device():
    rows = {(r["kind"], r["dtype"], tuple(r["shape"])): r for r in hlo.summarize(MODULE).collective_rows()}
    gather = rows[("all-gather", "bf16", (64, 32))]
    assert (gather["group"], gather["count"], gather["bytes_sent"]) == (4, 4, 4 * 64 * 32 * 2 * 3 / 4)
    scatter = rows[("reduce-scatter", "bf16", (16, 32))]  # the fusion, not its inner all-reduce
    assert (scatter["group"], scatter["count"], scatter["bytes_sent"]) == (4, 4, 4 * 16 * 32 * 2 * 3)
    reduce = rows[("all-reduce", "f32", (128,))]
    assert (reduce["group"], reduce["count"], reduce["bytes_sent"]) == (2, 1, 128 * 4 * 2 * 1 / 2)
    assert len(rows) == 3


@pytest.mark.parametrize("name, factor", [("splash_mha_fwd_segmented_residuals.3", 4),
                                          ("splash_mha_dq_segmented_no_residuals", 6),
                                          ("splash_mha_dkv_segmented_no_residuals.1", 8)])
def test_splash_kernels_by_name_with_and_without_the_batch_dim(name, factor):
    for q, k, b in (("bf16[2,8,512,128]", "bf16[2,4,512,128]", 2), ("bf16[8,512,128]", "bf16[4,512,128]", 1)):
        line = (f'  %{name} = (f32[8,512,128]) custom-call(%a, %b), custom_call_target="tpu_custom_call", '
                f"operand_layout_constraints={{s8[1,1,1]{{2,1,0}}, {q}{{2,1,0}}, {k}{{2,1,0}}, s32[512]{{0}}}}, "
                'frontend_attributes={x="y"}')
        kind, flops = hlo.attention_kernel(hlo.parse("ENTRY %m () -> f32[] {\n" + line + "\n}")[0]["m"][0])
        assert kind == ("forward" if factor == 4 else "backward")
        assert flops == factor * b * 8 * 512 * 512 * 128 * 0.5
