"""Captures that continue a KV cache (`run_capture(..., continuation=Continuation())`), the decode steps of
`sinkscope generate`: for every causal family, a prefill then one-token steps give, at each step, the new token's row,
entropy and next-token log-probabilities of an eager forward of the whole prefix, in sequence coordinates."""

from __future__ import annotations

import copy

import pytest
import torch

from sinkscope.capture import CaptureConfig, run_capture
from sinkscope.capture.trace import Continuation
from sinkscope.errors import SinkscopeError
from sinkscope.models import TINY_FAMILIES, tiny_model

IDS = [60, 84, 104, 101, 32, 99, 97, 116, 46, 33, 63]
PREFILL = 7
STEP = CaptureConfig(rows="last", entropy=True, logprobs=True, fused=False)


@pytest.mark.parametrize("family", sorted(f for f in TINY_FAMILIES if f != "bert"))
def test_decode_steps_equal_eager_of_the_prefix(family):
    """Sliding-window families (mistral, gemma2) see their window through the mask over the full cache; gpt_oss's
    rows sum to 1 − its sink share, as eager's do."""
    lm = tiny_model(family)
    eager = copy.deepcopy(lm.model)
    eager.set_attn_implementation("eager")
    cont = Continuation()
    run_capture(lm, [IDS[:PREFILL]], STEP, continuation=cont)
    for t in range(PREFILL, len(IDS)):
        trace = run_capture(lm, [IDS[t : t + 1]], STEP, continuation=cont)
        with torch.no_grad():
            out = eager(torch.tensor([IDS[: t + 1]]), output_attentions=True)
        ref = torch.stack([a[0, :, -1].float() for a in out.attentions])  # [L, H, t + 1]
        assert cont.ids == IDS[: t + 1] and len(cont.tokens) == t + 1 and trace.tokens[0] == cont.tokens
        assert trace.lengths.tolist() == [t + 1] and trace.row_positions.tolist() == [[t]]
        torch.testing.assert_close(trace.rows[0, :, :, 0], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(trace.key_mass[0], ref, atol=1e-5, rtol=0)  # one query: its row is the key mass
        entropy = -torch.special.xlogy(ref, ref).sum(-1)
        torch.testing.assert_close(trace.entropy[0, :, :, t], entropy, atol=1e-4, rtol=0)
        assert not trace.entropy[0, :, :, :t].any()  # per-query statistics sit at the new token's position
        torch.testing.assert_close(trace.logprobs[0], torch.log_softmax(out.logits[0, -1].float(), -1), atol=1e-4,
                                   rtol=0)


def test_several_new_tokens_at_once(tiny_llama):
    """A continuation of several tokens (the mask is materialised, bottom-right aligned) equals eager's rows."""
    cont = Continuation()
    run_capture(tiny_llama, [IDS[:PREFILL]], CaptureConfig(rows=None, entropy=False), continuation=cont)
    trace = run_capture(tiny_llama, [IDS[PREFILL:]], CaptureConfig(rows=[-2, -1]), continuation=cont)
    eager = copy.deepcopy(tiny_llama.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(torch.tensor([IDS]), output_attentions=True)
    ref = torch.stack([a[0, :, -2:].float() for a in out.attentions])  # [L, H, 2, n]
    torch.testing.assert_close(trace.rows[0], ref, atol=1e-5, rtol=0)
    new = torch.stack([a[0, :, PREFILL:].float() for a in out.attentions])  # [L, H, 4, n]
    torch.testing.assert_close(trace.key_mass_sum[0], new.sum(-2), atol=1e-5, rtol=0)


def test_unsupported_continuations_are_refused(tiny_llama):
    cont = Continuation()
    with pytest.raises(SinkscopeError, match="one sequence"):
        run_capture(tiny_llama, [IDS, IDS], STEP, continuation=cont)
    with pytest.raises(SinkscopeError, match="turn off maps"):
        run_capture(tiny_llama, [IDS], CaptureConfig(maps=True), continuation=cont)
    with pytest.raises(SinkscopeError, match="context"):
        run_capture(tiny_llama, [[1] * (tiny_llama.info.max_positions + 1)], STEP, continuation=cont)
    assert len(cont) == 0 and cont.cache.get_seq_length() == 0  # nothing ran
