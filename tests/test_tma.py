"""The forward's TMA path (K/V tiles through tensor descriptors, sm_90+ by default),
forced on under the Triton interpreter so CI runs it: same results as the fp64 reference,
zero-filled tails past the sequence and past a padded head dim."""

import pytest
import torch

import ioattn
from ioattn.kernels import configs, forward

from helpers import check_fwd_bwd, randn

pytestmark = pytest.mark.skipif(not (configs.interpreting() or torch.cuda.is_available()),
                                reason="the TMA path runs in the Triton kernels (GPU or interpreter)")


@pytest.fixture
def tma(monkeypatch):
    monkeypatch.setattr(configs, "TMA", "1")
    made = []
    from triton.tools import tensor_descriptor
    real = tensor_descriptor.TensorDescriptor

    def spy(*args, **kwargs):
        made.append(args[3] if len(args) > 3 else kwargs["block_shape"])
        return real(*args, **kwargs)
    monkeypatch.setattr(tensor_descriptor, "TensorDescriptor", spy)
    return made


@pytest.mark.parametrize("shape", [(2, 37, 45, 4, 2, 32), (1, 64, 64, 2, 2, 40), (2, 50, 19, 2, 1, 64),
                                   (1, 1, 70, 4, 4, 16)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_tma_forward_matches_reference(shape, causal, tma, device):
    b, sq, sk, h, hk, d = shape
    q, k, v = randn(b, sq, h, d, device=device), randn(b, sk, hk, d, device=device), randn(b, sk, hk, d, device=device)
    check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=causal), q, k, v, dict(causal=causal))
    assert tma, "the forward did not take the TMA path"
    assert tma[0][1] == configs.forward_config(d, q.dtype, q.device)["BLOCK_N"]


def test_tma_window_softcap_strided(tma, device):
    # k, v as views into a packed kv tensor: strides that are not the contiguous ones
    q = randn(2, 41, 4, 32, device=device)
    kv = randn(2, 53, 2, 2, 32, device=device)
    k, v = kv[:, :, 0], kv[:, :, 1]
    kw = dict(window_size=(9, 3), softcap=2.0)
    check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, **kw), q, k, v, kw)
    assert tma


def test_tma_rules():
    t = torch.zeros(2, 8, 2, 64)
    assert forward._tma_ok(t, 64)
    assert not forward._tma_ok(torch.zeros(2, 8, 2, 3), 3)           # rows of 12 bytes
    assert not forward._tma_ok(torch.zeros(2, 8, 2, 65)[..., :63], 63)  # strides not 16-byte multiples
    assert not forward._tma_ok(t.transpose(-1, -2), 8)               # last dim not contiguous
