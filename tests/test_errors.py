"""Bad input gets a ValueError/TypeError saying what was expected and what was received."""

import pytest
import torch

import ioattn


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


Q, K, V = t(2, 8, 4, 32), t(2, 8, 2, 32), t(2, 8, 2, 32)

CASES = [
    ("rank", lambda: ioattn.flash_attn_func(t(8, 4, 32), K, V), ValueError, "must have 4 dims"),
    ("batch", lambda: ioattn.flash_attn_func(Q, t(3, 8, 2, 32), t(3, 8, 2, 32)), ValueError, "same batch size"),
    ("seqlen k/v", lambda: ioattn.flash_attn_func(Q, K, t(2, 9, 2, 32)), ValueError, "same seqlen"),
    ("heads k/v", lambda: ioattn.flash_attn_func(Q, K, t(2, 8, 1, 32)), ValueError, "same number of heads"),
    ("gqa", lambda: ioattn.flash_attn_func(Q, t(2, 8, 3, 32), t(2, 8, 3, 32)), ValueError, "multiple of nheads"),
    ("headdim k", lambda: ioattn.flash_attn_func(Q, t(2, 8, 2, 16), V), ValueError, "head dim of q"),
    ("headdim v max", lambda: ioattn.flash_attn_func(Q, K, t(2, 8, 2, 300)), ValueError,
     "v's head dim must be between 1 and 256, got 300"),
    ("headdim v varlen", lambda: ioattn.flash_attn_varlen_func(t(8, 4, 32), t(8, 2, 32), t(8, 2, 0),
                                                                torch.tensor([0, 8], dtype=torch.int32),
                                                                torch.tensor([0, 8], dtype=torch.int32), 8, 8),
     ValueError, "v's head dim must be between 1 and 256, got 0"),
    ("headdim max", lambda: ioattn.flash_attn_func(t(1, 4, 1, 300), t(1, 4, 1, 300), t(1, 4, 1, 300)),
     ValueError, "between 1 and 256"),
    ("dtype", lambda: ioattn.flash_attn_func(Q.double(), K.double(), V.double()), TypeError, "float16, bfloat16 or float32"),
    ("int dtype", lambda: ioattn.flash_attn_func(Q.int(), K, V), TypeError, "float16, bfloat16 or float32"),
    ("mixed dtypes", lambda: ioattn.flash_attn_func(Q.half(), K, V), TypeError, "same dtype"),
    ("not a tensor", lambda: ioattn.flash_attn_func([1.0], K, V), TypeError, "torch.Tensor"),
    ("window", lambda: ioattn.flash_attn_func(Q, K, V, window_size=(-2, 0)), ValueError, "window_size"),
    ("softcap", lambda: ioattn.flash_attn_func(Q, K, V, softcap=-1.0), ValueError, "softcap"),
    ("dropout", lambda: ioattn.flash_attn_func(Q, K, V, dropout_p=1.0), ValueError, "dropout_p"),
    ("scale", lambda: ioattn.flash_attn_func(Q, K, V, softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("alibi shape", lambda: ioattn.flash_attn_func(Q, K, V, alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes must have shape"),
    ("alibi dtype", lambda: ioattn.flash_attn_func(Q, K, V, alibi_slopes=torch.rand(4).double()), TypeError, "float32"),
    ("qkv packed", lambda: ioattn.flash_attn_qkvpacked_func(t(2, 8, 2, 4, 32)), ValueError, "(batch, seqlen, 3"),
    ("varlen rank", lambda: ioattn.flash_attn_varlen_func(Q, K, V, torch.tensor([0, 8], dtype=torch.int32),
                                                           torch.tensor([0, 8], dtype=torch.int32), 8, 8),
     ValueError, "must have 3 dims"),
    ("cu dtype", lambda: ioattn.flash_attn_varlen_func(t(8, 4, 32), t(8, 2, 32), t(8, 2, 32), torch.tensor([0, 8]),
                                                        torch.tensor([0, 8], dtype=torch.int32), 8, 8),
     TypeError, "int32"),
    ("cu values", lambda: ioattn.flash_attn_varlen_func(t(8, 4, 32), t(8, 2, 32), t(8, 2, 32),
                                                         torch.tensor([0, 9], dtype=torch.int32),
                                                         torch.tensor([0, 8], dtype=torch.int32), 9, 8),
     ValueError, "prefix sums"),
    ("cu lengths", lambda: ioattn.flash_attn_varlen_func(t(8, 4, 32), t(8, 2, 32), t(8, 2, 32),
                                                          torch.tensor([0, 4, 8], dtype=torch.int32),
                                                          torch.tensor([0, 8], dtype=torch.int32), 4, 8),
     ValueError, "same length"),
    ("max_seqlen", lambda: ioattn.flash_attn_varlen_func(t(8, 4, 32), t(8, 2, 32), t(8, 2, 32),
                                                          torch.tensor([0, 8], dtype=torch.int32),
                                                          torch.tensor([0, 8], dtype=torch.int32), -1, 8),
     ValueError, "max_seqlen_q"),
    ("max_seqlen short", lambda: ioattn.flash_attn_varlen_func(t(8, 4, 32), t(8, 2, 32), t(8, 2, 32),
                                                                torch.tensor([0, 3, 8], dtype=torch.int32),
                                                                torch.tensor([0, 4, 8], dtype=torch.int32), 4, 4),
     ValueError, "max_seqlen_q must be at least the longest sequence in cu_seqlens_q (5), got 4"),
    ("max_seqlen_k short", lambda: ioattn.flash_attn_varlen_func(t(8, 4, 32), t(8, 2, 32), t(8, 2, 32),
                                                                  torch.tensor([0, 3, 8], dtype=torch.int32),
                                                                  torch.tensor([0, 2, 8], dtype=torch.int32), 5, 5),
     ValueError, "max_seqlen_k must be at least the longest sequence in cu_seqlens_k (6), got 5"),
]


@pytest.mark.parametrize("name,call,exc,fragment", CASES, ids=[c[0] for c in CASES])
def test_clear_errors(name, call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value), str(info.value)


def test_double_backward_is_a_clear_error():
    """create_graph=True gives the usual first-order gradients; a backward through them raises
    NotImplementedError naming what is unsupported (not PyTorch's 'no autograd formula')."""
    q, k, v = (x.clone().requires_grad_() for x in (Q, K, V))
    first = torch.autograd.grad(ioattn.flash_attn_func(q, k, v, causal=True).sum(), (q, k, v), create_graph=True)
    plain = torch.autograd.grad(ioattn.flash_attn_func(q, k, v, causal=True).sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(first, plain))
    with pytest.raises(NotImplementedError, match="gradients of gradients"):
        first[0].sum().backward()
