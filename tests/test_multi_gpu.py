"""Tensors on a GPU other than the current one, and tensors on different devices.

Triton launches kernels on the *current* CUDA device and stream, whatever device the
tensors are on; ioattn makes the tensors' GPU current around its launches
(``interface.on_device_of``) when it is not already.

What runs without a GPU:
* the device checks, with CPU and meta tensors and with FakeTensorMode's CUDA tensors
  (cuda:0 / cuda:1 tensors that need no GPU; their checks run before the op, whose fake
  implementation answers), so "q on cuda:0, k on cuda:1" is checked for real;
* the guard's wiring: with fake cuda:1 tensors, ``torch.cuda.current_device`` answering 0
  and the launchers replaced by recorders, every launch (forward, backward, decoding,
  dropout mask) must run inside ``torch.cuda.device(1)``, and none when the device is
  already current.
With two GPUs (skipped otherwise): results computed on cuda:1 while cuda:0 is current
equal those computed on cuda:0 (forward, backward, varlen, dropout, KV cache).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ioattn
from ioattn import interface, kvcache

I32 = torch.int32

# FakeTensorMode's cuda:1 tensors stand in for a second GPU only where CUDA is absent: on a
# GPU machine they reach the real driver (a 1-GPU H100 run failed them with "invalid device
# ordinal"). There the real-GPU tests below take over (two GPUs needed).
no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="fake cuda:1 tensors need a machine without CUDA")


def _raises(call, *fragments):
    with pytest.raises(ValueError) as info:
        call()
    for f in fragments:
        assert f in str(info.value), str(info.value)


# --------------------------------------------------------------------------- device checks (no GPU)

def test_mixed_cpu_meta():
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    _raises(lambda: ioattn.flash_attn_func(q, k.to("meta"), k), "q on cpu", "k on meta", "v on cpu")
    # all on meta: shapes through the ops' fake kernels (tests/test_flop_counter.py)
    assert ioattn.flash_attn_func(q.to("meta"), k.to("meta"), k.to("meta")).is_meta
    cu = torch.tensor([0, 8], dtype=I32)
    _raises(lambda: ioattn.flash_attn_varlen_func(q[0], k[0], k[0], cu, cu.to("meta"), 8, 8),
            "cu_seqlens_k", "q's device cpu", "meta")


@no_cuda
def test_mixed_gpus_dense_and_varlen():
    with FakeTensorMode():
        q1 = torch.empty(2, 8, 4, 16, device="cuda:1")
        k0, k1 = (torch.empty(2, 8, 2, 16, device=d) for d in ("cuda:0", "cuda:1"))
        kcpu = torch.empty(2, 8, 2, 16)
        assert ioattn.flash_attn_func(q1, k1, k1).device == torch.device("cuda:1")  # checks pass
        _raises(lambda: ioattn.flash_attn_func(q1, k0, k1), "q on cuda:1", "k on cuda:0", "v on cuda:1")
        _raises(lambda: ioattn.flash_attn_func(q1, k1, k0), "v on cuda:0")
        _raises(lambda: ioattn.flash_attn_func(q1, kcpu, k1), "k on cpu")
        alibi0 = torch.empty(4, device="cuda:0")
        _raises(lambda: ioattn.flash_attn_func(q1, k1, k1, alibi_slopes=alibi0), "alibi_slopes",
                "cuda:1", "cuda:0")

        qv, kv = torch.empty(16, 4, 16, device="cuda:1"), torch.empty(16, 2, 16, device="cuda:1")
        cu1 = torch.empty(3, dtype=I32, device="cuda:1")
        cu0 = torch.empty(3, dtype=I32, device="cuda:0")
        cu_cpu = torch.tensor([0, 8, 16], dtype=I32)
        assert ioattn.flash_attn_varlen_func(qv, kv, kv, cu1, cu1, 8, 8).shape == qv.shape
        _raises(lambda: ioattn.flash_attn_varlen_func(qv, kv, kv, cu0, cu1, 8, 8),
                "cu_seqlens_q must be on q's device cuda:1, got cuda:0")
        _raises(lambda: ioattn.flash_attn_varlen_func(qv, kv, kv, cu1, cu_cpu, 8, 8),
                "cu_seqlens_k must be on q's device cuda:1, got cpu")


@no_cuda
def test_mixed_gpus_kvcache():
    with FakeTensorMode():
        q = torch.empty(2, 1, 4, 16, device="cuda:1")
        c1, c0 = (torch.empty(2, 32, 2, 16, device=d) for d in ("cuda:1", "cuda:0"))
        new1 = torch.empty(2, 1, 2, 16, device="cuda:1")
        lens1, lens0 = (torch.empty(2, dtype=I32, device=d) for d in ("cuda:1", "cuda:0"))
        fa = ioattn.flash_attn_with_kvcache
        assert fa(q, c1, c1, new1, new1, cache_seqlens=lens1).device == torch.device("cuda:1")
        _raises(lambda: fa(q, c0, c1, cache_seqlens=lens1), "k_cache", "cuda:1 (q's device), got cuda:0")
        _raises(lambda: fa(q, c1, c0, cache_seqlens=lens1), "v_cache", "got cuda:0")
        _raises(lambda: fa(q, c1, c1, new1, torch.empty(2, 1, 2, 16), cache_seqlens=lens1), "v:", "got cpu")
        _raises(lambda: fa(q, c1, c1, cache_seqlens=lens0), "cache_seqlens", "got cuda:0")
        _raises(lambda: fa(q, c1, c1, cache_seqlens=torch.zeros(2, dtype=I32)), "cache_seqlens", "got cpu")
        pages = torch.empty(4, 16, 2, 16, device="cuda:1")
        _raises(lambda: fa(q, pages, pages, cache_seqlens=lens1,
                           block_table=torch.empty(2, 2, dtype=I32, device="cuda:0")),
                "block_table", "got cuda:0")


# --------------------------------------------------------------------------- the guard's wiring (no GPU)

class _Devices:
    """Stands in for torch.cuda's current device: ``current_device()`` and ``device(i)``."""

    def __init__(self, current):
        self.current, self.entered = current, []

    def current_device(self):
        return self.current

    @contextlib.contextmanager
    def device(self, index):
        self.entered.append(index)
        before, self.current = self.current, int(index)
        try:
            yield
        finally:
            self.current = before


@pytest.fixture
def fake_gpus(monkeypatch):
    """(devices, launches): torch.cuda's current device simulated (cuda:0 current), and the
    launchers replaced by recorders of the current device at launch."""
    from ioattn.kernels import backward, decode, forward
    devices, launches = _Devices(0), []
    monkeypatch.setattr(torch.cuda, "current_device", devices.current_device)
    monkeypatch.setattr(torch.cuda, "device", devices.device)

    def recorder(name, result):
        def launch(*args, **kwargs):
            launches.append((name, devices.current))
            return result(*args)
        return launch

    monkeypatch.setattr(forward, "attention_forward", recorder(
        "fwd", lambda q, k, v: (torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1]))))
    monkeypatch.setattr(backward, "attention_backward", recorder(
        "bwd", lambda do, q, k, v, *_: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))))
    monkeypatch.setattr(decode, "decode_attention", recorder(
        "decode", lambda q, *_: (torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1]))))
    monkeypatch.setattr(forward, "dropout_keep_mask", recorder(
        "dropout_mask", lambda b, h, sq, sk, p, rng: torch.empty(b, h, sq, sk, dtype=torch.bool,
                                                                 device=rng.device)))
    return devices, launches


def _every_launch(device):
    """Calls every launcher's entry point once on fake tensors of ``device``."""
    with FakeTensorMode():
        q = torch.empty(2, 8, 4, 16, device=device)
        k = torch.empty(2, 8, 2, 16, device=device)
        lse = torch.empty(2, 4, 8, device=device)
        params = (None, None, 8, 8, 0.25, -1, 0, 0.0, None, 0.0, None)
        interface._forward_impl(q, k, k, *params)
        interface._backward_impl(torch.empty_like(q), q, k, k, torch.empty_like(q), lse, *params)
        op_args = kvcache._op_args(
            kvcache._check_and_normalize(torch.empty(2, 1, 4, 16, device=device),
                                         torch.empty(2, 32, 2, 16, device=device),
                                         torch.empty(2, 32, 2, 16, device=device), None, None, None, None,
                                         torch.empty(2, dtype=I32, device=device), None, None, None, None,
                                         True, (-1, -1), 0.0, None, 1),
            rotary_interleaved=False, validate_values=False)
        kvcache._fwd_kvcache(*op_args)
        rng = torch.empty(2, dtype=torch.int64, device=device)
        interface.dropout_keep_mask(2, 4, 8, 8, 0.5, rng, rng.device)


@no_cuda
def test_guard_other_gpu(fake_gpus):
    """cuda:1 tensors while cuda:0 is current: every launch runs with cuda:1 current, and the
    current device is cuda:0 again afterwards."""
    devices, launches = fake_gpus
    _every_launch("cuda:1")
    assert launches == [("fwd", 1), ("bwd", 1), ("decode", 1), ("dropout_mask", 1)]
    assert devices.entered == [1, 1, 1, 1] and devices.current == 0


@no_cuda
def test_guard_current_gpu(fake_gpus):
    """Tensors on the current GPU: no context manager at all (host overhead)."""
    devices, launches = fake_gpus
    devices.current = 1
    _every_launch("cuda:1")
    assert [d for _, d in launches] == [1, 1, 1, 1] and devices.entered == []


@no_cuda
def test_guard_exceptions_restore_device(fake_gpus, monkeypatch):
    devices, _ = fake_gpus
    from ioattn.kernels import forward

    def failing(*args, **kwargs):
        assert devices.current == 1
        raise RuntimeError("launch failed")
    monkeypatch.setattr(forward, "attention_forward", failing)
    with FakeTensorMode(), pytest.raises(RuntimeError, match="launch failed"):
        q = torch.empty(1, 4, 1, 16, device="cuda:1")
        interface._forward_impl(q, q, q, None, None, 4, 4, 0.25, -1, -1, 0.0, None, 0.0, None)
    assert devices.current == 0


# --------------------------------------------------------------------------- two real GPUs

two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA GPUs")


@pytest.fixture
def current_gpu0():
    before = torch.cuda.current_device()
    torch.cuda.set_device(0)
    yield
    torch.cuda.set_device(before)


def _fwd_bwd(device, fn, inputs, seed=0):
    """fn(*inputs) and the gradients of its (first) output, with inputs copied to device."""
    xs = [x.to(device).requires_grad_(x.is_floating_point()) for x in inputs]
    torch.manual_seed(seed)  # same dropout seed/offset on both devices
    out = fn(*xs)
    out = out[0] if isinstance(out, tuple) else out
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, [x for x in xs if x.requires_grad], dout)
    torch.cuda.synchronize(device)
    return [out, *grads]


@two_gpus
@pytest.mark.parametrize("case", ["dense", "varlen", "dropout"])
def test_second_gpu_matches_first(case, current_gpu0):
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    if case == "varlen":
        lens = [5, 0, 130, 77]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=I32)
        total = int(cu[-1])
        inputs = [torch.randn(total, 8, 64, generator=g).to(dt), torch.randn(total, 2, 64, generator=g).to(dt),
                  torch.randn(total, 2, 64, generator=g).to(dt), cu]

        def fn(q, k, v, cu):
            return ioattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    else:
        inputs = [torch.randn(2, 300, 8, 128, generator=g).to(dt)] + \
                 [torch.randn(2, 300, 2, 128, generator=g).to(dt) for _ in range(2)]
        p = 0.2 if case == "dropout" else 0.0

        def fn(q, k, v):
            return ioattn.flash_attn_func(q, k, v, dropout_p=p, causal=True, window_size=(100, 0),
                                          return_attn_probs=p > 0)
    on1 = _fwd_bwd("cuda:1", fn, inputs)
    assert torch.cuda.current_device() == 0
    on0 = _fwd_bwd("cuda:0", fn, inputs)
    for a, b in zip(on1, on0):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0)
    if case == "dropout":  # the mask helper (a kernel of its own) on the right GPU too
        torch.manual_seed(0)
        rng = interface._rng_state(0.2, torch.device("cuda:1"))
        m1 = interface.dropout_keep_mask(2, 8, 300, 300, 0.2, rng, rng.device)
        m0 = interface.dropout_keep_mask(2, 8, 300, 300, 0.2, rng.to("cuda:0"), torch.device("cuda:0"))
        assert m1.device == torch.device("cuda:1") and torch.equal(m1.cpu(), m0.cpu())


@two_gpus
@pytest.mark.parametrize("paged", [False, True])
def test_second_gpu_kvcache(paged, current_gpu0):
    g = torch.Generator().manual_seed(0)
    dt = torch.float16
    b, cap, hk, d = 3, 256, 2, 128
    q = torch.randn(b, 2, 8, d, generator=g).to(dt)
    knew, vnew = (torch.randn(b, 2, hk, d, generator=g).to(dt) for _ in range(2))
    lens = torch.tensor([0, 100, 254], dtype=I32)
    cos, sin = torch.randn(cap, 32, generator=g), torch.randn(cap, 32, generator=g)
    if paged:
        kc, vc = (torch.randn(b * cap // 64, 64, hk, d, generator=g).to(dt) for _ in range(2))
        table = torch.randperm(b * cap // 64, generator=g).to(I32).view(b, -1)
    else:
        kc, vc = (torch.randn(b, cap, hk, d, generator=g).to(dt) for _ in range(2))
        table = None
    results = []
    for dev in ("cuda:1", "cuda:0"):
        args = [x.to(dev) if x is not None else None for x in (q, kc, vc, knew, vnew, cos, sin, lens, table)]
        out, lse = ioattn.flash_attn_with_kvcache(*args[:7], cache_seqlens=args[7], block_table=args[8],
                                                  causal=True, return_softmax_lse=True, num_splits=3)
        torch.cuda.synchronize(dev)
        results.append([out.cpu(), lse.cpu(), args[1].cpu(), args[2].cpu()])  # caches appended in place
        assert torch.cuda.current_device() == 0
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
