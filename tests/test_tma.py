"""The forward's TMA path (K/V tiles through tensor descriptors; by default on sm_90+ for
bf16/fp16 with head dims padded to 128), forced on under the Triton interpreter so CI runs
it: same results as the fp64 reference, zero-filled tails past the sequence and past a
padded head dim."""

import pytest
import torch

import ioattn
from ioattn.kernels import configs, forward
from ioattn.reference import attention_ref

from helpers import randn

pytestmark = pytest.mark.skipif(not (configs.interpreting() or torch.cuda.is_available()),
                                reason="the TMA path runs in the Triton kernels (GPU or interpreter)")


@pytest.fixture
def tma(monkeypatch):
    monkeypatch.setattr(configs, "TMA", "1")
    made = []
    real = forward._kv_descriptors

    def spy(k, v, box):
        made.append(box)
        return real(k, v, box)
    monkeypatch.setattr(forward, "_kv_descriptors", spy)
    return made


def _rel_l2(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _run(q, k, v, **kw):
    out = ioattn.flash_attn_func(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return (out, *grads)


def _check(q, k, v, tma, monkeypatch, **kw):
    """TMA loads give what pointer loads give (bit for bit under the interpreter) and what the
    fp64 reference gives (relative L2 error within 2x plain PyTorch's in the same dtype)."""
    with_tma = _run(q, k, v, **kw)
    assert tma, "the forward did not take the TMA path"
    monkeypatch.setattr(configs, "TMA", "0")
    without = _run(q, k, v, **kw)
    exact = configs.interpreting()
    for a, b in zip(with_tma, without):
        torch.testing.assert_close(a, b, rtol=0 if exact else 1e-2, atol=0 if exact else 1e-2)
    ref = attention_ref(q, k, v, **kw)[0]
    low = attention_ref(q, k, v, upcast=False, **kw)[0]
    assert _rel_l2(with_tma[0], ref) <= 2 * _rel_l2(low, ref) + 1e-3


@pytest.mark.parametrize("shape", [(2, 37, 45, 4, 2, 128, 128), (1, 64, 64, 2, 2, 72, 72), (2, 50, 19, 2, 1, 96, 96),
                                   (1, 1, 70, 4, 4, 128, 128), (1, 30, 41, 2, 1, 128, 80)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_tma_forward(shape, causal, tma, monkeypatch, device):
    b, sq, sk, h, hk, d, dv = shape  # (dv: V's head dim; the same box as K's where it pads to 128 too)
    dt = torch.bfloat16
    q, k, v = (randn(b, sq, h, d, dtype=dt, device=device), randn(b, sk, hk, d, dtype=dt, device=device),
               randn(b, sk, hk, dv, dtype=dt, device=device))
    _check(q, k, v, tma, monkeypatch, causal=causal)
    assert tma[0] == [1, configs.forward_config(d, q.dtype, q.device)["BLOCK_N"], 1, 128]


def test_tma_skips_broadcast_kv(tma, monkeypatch, device):
    # MQA through expand(): stride-0 heads cannot be a TMA stride, the pointer path runs
    q = randn(1, 30, 4, 128, dtype=torch.bfloat16, device=device, requires_grad=False)
    k = randn(1, 30, 1, 128, dtype=torch.bfloat16, device=device, requires_grad=False).expand(1, 30, 4, 128)
    out = ioattn.flash_attn_func(q, k, k)
    assert not tma
    ref = attention_ref(q, k, k)[0]
    low = attention_ref(q, k, k, upcast=False)[0]
    assert _rel_l2(out, ref) <= 2 * _rel_l2(low, ref) + 1e-3


def test_tma_window_softcap_strided(tma, monkeypatch, device):
    # k, v as views into a packed kv tensor: strides that are not the contiguous ones
    q = randn(2, 41, 4, 128, dtype=torch.float16, device=device)
    kv = randn(2, 53, 2, 2, 128, dtype=torch.float16, device=device)
    k, v = kv[:, :, 0], kv[:, :, 1]
    _check(q, k, v, tma, monkeypatch, window_size=(9, 3), softcap=2.0)


def test_tma_not_for_fp32_or_other_head_dims(tma, device):
    for d, dv, dt in ((128, 128, torch.float32), (64, 64, torch.bfloat16), (128, 64, torch.bfloat16)):
        q = randn(1, 20, 2, d, dtype=dt, device=device, requires_grad=False)
        ioattn.flash_attn_func(q, q, q[..., :dv])
    assert not tma


def test_tma_rules():
    t = torch.zeros(2, 8, 2, 64)
    assert forward._tma_ok(t, 64)
    assert not forward._tma_ok(torch.zeros(2, 8, 2, 3), 3)           # rows of 12 bytes
    assert not forward._tma_ok(torch.zeros(2, 8, 2, 65)[..., :63], 63)  # strides not 16-byte multiples
    assert not forward._tma_ok(t.transpose(-1, -2), 8)               # last dim not contiguous
    assert not forward._tma_ok(torch.zeros(1, 8, 1, 64).expand(2, 8, 4, 64), 64)  # broadcast heads
    assert forward._tma_ok(torch.zeros(1, 8, 1, 64), 64)              # size-1 dims: any stride
