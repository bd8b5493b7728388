"""fmjax/perf/dcn_traffic.py on a hand-written HLO text: sends found in every computation, runs per step
from the while-loop bounds (nested loops multiply), recv/done ops and attribute continuations ignored."""

from fmjax.perf import dcn_traffic

HLO = '''HloModule jit_step, is_scheduled=true

%cond.inner (p: (s32[], f32[4])) -> pred[] {
  %c = s32[]{:T(128)} constant(16)
  %g = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%g, %c), direction=LT
}

%body.inner (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %send.1 = (f32[8,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%x, %t), channel_id=1, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv.1 = (f32[8,8,128]{2,1,0:T(8,128)}, u32[], token[]) recv(%t), channel_id=1, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %y = f32[4] add(%a, %b), backend_config={"x":{"y":1
}}, metadata={op_name="continued"}
  %send.2 = (bf16[4,128]{1,0}, u32[], token[]) send(%x, %t), channel_id=2, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
}

%cond.outer (p: (s32[], f32[4])) -> pred[] {
  %c = s32[] constant(2)
  ROOT %lt = pred[] compare(%g, %c), direction=LT
}

%body.outer (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %w = (s32[], f32[4]) while(%p), condition=%cond.inner, body=%body.inner
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w2 = (s32[], f32[4]) while(%t0), condition=%cond.outer, body=%body.outer
  %send.3 = (f32[1000]{0}, u32[], token[]) send(%x, %t), channel_id=3, frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}
}
'''


def test_sends_with_their_runs_per_step():
  sent = sorted(dcn_traffic.dcn_transfers(HLO), key=lambda t: t.elements)
  assert [(t.kind, t.dtype, t.elements, t.runs) for t in sent] == [
      ('ALL_REDUCE', 'bf16', 512, 32), ('ALL_GATHER', 'f32', 1000, 1), ('ALL_REDUCE', 'f32', 8192, 32)]
  assert dcn_traffic.summary(sent) == {'ALL_REDUCE': 8192 * 32 * 4 + 512 * 32 * 2, 'ALL_GATHER': 4000}


def test_one_slice_sends_nothing():
  assert dcn_traffic.dcn_transfers('HloModule m\n\nENTRY %main () -> f32[] {\n  ROOT %c = f32[] constant(0)\n}\n') == []
