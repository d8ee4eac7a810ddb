"""unpad_input / pad_input / index_first_axis (ioattn.padding): FlashAttention-2's bert_padding
helpers, and a padded batch through them and flash_attn_varlen_func against dense attention of
each sequence alone."""

import pytest
import torch

import ioattn
from ioattn.reference import attention_ref

from helpers import assert_close


def _mask(lengths, seqlen, left=False):
    cols = torch.arange(seqlen)
    lens = torch.tensor(lengths)[:, None]
    return cols >= seqlen - lens if left else cols < lens


@pytest.mark.parametrize("left", [False, True])
def test_unpad_pad_roundtrip(left):
    lengths, seqlen = [5, 0, 9, 3], 9
    mask = _mask(lengths, seqlen, left)
    x = torch.randn(4, seqlen, 3, 2, requires_grad=True)
    packed, indices, cu, max_seqlen, seqused = ioattn.unpad_input(x, mask.int())
    assert packed.shape == (sum(lengths), 3, 2) and indices.dtype == torch.int64
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 5, 14, 17]
    assert max_seqlen == 9 and isinstance(max_seqlen, int) and seqused.tolist() == lengths
    rows = [x[b][mask[b]] for b in range(4)]
    assert torch.equal(packed, torch.cat(rows))
    back = ioattn.pad_input(packed, indices, 4, seqlen)
    assert torch.equal(back, x * mask[..., None, None])
    back.sum().backward()  # gradients reach the tokens, not the padding
    assert torch.equal(x.grad, mask[..., None, None].expand_as(x).float())


def test_unused_mask_counts_in_cu_seqlens_not_in_seqused():
    mask = _mask([2, 4], 6)
    unused = torch.zeros(2, 6, dtype=torch.bool)
    unused[0, 2:4] = True
    packed, indices, cu, max_seqlen, seqused = ioattn.unpad_input(torch.arange(12.).view(2, 6), mask, unused)
    assert cu.tolist() == [0, 4, 8] and seqused.tolist() == [2, 4] and max_seqlen == 4
    assert packed.tolist() == [0, 1, 2, 3, 6, 7, 8, 9]


def test_padded_batch_through_varlen(device):
    lengths, seqlen, h, d = [7, 13, 1], 13, 2, 16
    mask = _mask(lengths, seqlen).to(device)
    q, k, v = (torch.randn(3, seqlen, h, d, device=device, requires_grad=True) for _ in range(3))
    flat = [ioattn.unpad_input(t, mask) for t in (q, k, v)]
    _, indices, cu, max_seqlen, _ = flat[0]
    out = ioattn.flash_attn_varlen_func(flat[0][0], flat[1][0], flat[2][0], cu, cu, max_seqlen, max_seqlen,
                                        causal=True)
    out = ioattn.pad_input(out, indices, 3, seqlen)
    out.sum().backward()
    for b, n in enumerate(lengths):
        qb, kb, vb = (t.detach()[b:b + 1, :n].double().requires_grad_() for t in (q, k, v))
        ref = attention_ref(qb, kb, vb, causal=True)
        ref = ref[0] if isinstance(ref, tuple) else ref
        assert_close("out", out[b:b + 1, :n], ref, ref.float(), torch.float32)
        ref.sum().backward()
        assert_close("dq", q.grad[b:b + 1, :n], qb.grad, qb.grad.float(), torch.float32)
        assert torch.count_nonzero(out[b, n:]) == 0 and torch.count_nonzero(q.grad[b, n:]) == 0


def test_errors():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 5\)"):
        ioattn.unpad_input(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or integer"):
        ioattn.unpad_input(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="2 dims"):
        ioattn.unpad_input(x, torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="one row per index"):
        ioattn.pad_input(torch.randn(3, 4), torch.arange(2), 1, 5)
