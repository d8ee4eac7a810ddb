"""The cached launch path of the Gluon kernels (kernels/launch.py), checked on the CPU against
Triton's own argument binder with a stand-in driver (no GPU): its key never puts two argument
sets together that Triton compiles apart, and a cached launch passes the kernel the same
arguments as Triton's full path."""

import itertools

import pytest
import torch

forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
backward_sm90 = pytest.importorskip("ioattn.kernels.backward_sm90")
from ioattn.kernels import launch as launch_mod  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime import jit  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


class _Compiled:
    """Stands in for a CompiledKernel: records what a launch passes it."""

    def __init__(self, log):
        self.log = log
        self.function = self.packed_metadata = None
        self.via = "jit"

    def _init_handles(self):
        pass

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):  # the C launcher's arguments: grid, stream, ... then the kernel's
        self.log.append((self.via, args[:3], args[9:]))
        self.via = "jit"

    def __getitem__(self, grid):  # launch.launch's cached path: Triton's own CompiledKernel launcher
        self.via = "cached"
        return CompiledKernel.__getitem__(self, grid)


@pytest.fixture
def stand_in(monkeypatch):
    saved = driver._active
    driver.set_active(_Driver())
    log = []
    kernels = (forward_sm90._attn_fwd_sm90, forward_sm90._attn_fwd_sm90_persistent, backward_sm90._attn_bwd_sm90)
    monkeypatch.setattr(forward_sm90, "_num_sms", lambda device: 132)  # (the persistent grid; CPU tensors here)
    for kern in kernels:
        kern.device_caches.clear()
        monkeypatch.setattr(kern, "_do_compile", lambda key, *a, kern=kern, **kw: kern.device_caches[0][0].setdefault(
            key, _Compiled(log)), raising=False)
    monkeypatch.setattr(launch_mod, "_cache", {})
    yield log
    driver._active = saved
    for kern in kernels:
        kern.device_caches.clear()


def _norm(x):
    if hasattr(x, "block_shape"):
        return ("desc", x.base.data_ptr(), tuple(x.shape), tuple(x.strides), tuple(x.block_shape), id(x.layout))
    if isinstance(x, torch.Tensor):
        return ("tensor", x.data_ptr(), x.dtype)
    return x


def _launches(monkeypatch):
    """(kernel, args, kwargs) of the Gluon kernels' launches over a grid of shapes and options."""
    calls = []
    rec = lambda kern, grid, *a, **kw: calls.append((kern, a, kw))  # noqa: E731
    monkeypatch.setattr(forward_sm90, "launch", rec)
    monkeypatch.setattr(backward_sm90, "launch", rec)
    rng = torch.zeros(2, dtype=torch.int64)
    for (b, n, h, hk, d), causal, left, p in itertools.product(
            [(1, 1, 1, 1, 64), (2, 17, 2, 1, 64), (1, 16, 16, 16, 128), (3, 1000, 4, 2, 128), (1, 32, 3, 1, 256)],
            (False, True), (-1, 0, 1, 16, 100), (0.0, 0.1)):
        q = torch.empty(b, n, h, d, dtype=torch.bfloat16)
        kv = torch.empty(b, n, hk, d, dtype=torch.bfloat16)
        for lse in (torch.empty(b, h, n), torch.empty(b * h * n + 1)[1:].view(b, h, n)):  # aligned or not
            forward_sm90.attention_forward_sm90(q, kv, kv, torch.empty_like(q), lse, softmax_scale=0.1,
                                                causal=causal, window_left=left, dropout_p=p, rng_state=rng)
        cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)
        qv, kvv = q[0].repeat(2, 1, 1), kv[0].repeat(2, 1, 1)
        forward_sm90.attention_forward_sm90(qv, kvv, kvv, torch.empty_like(qv), torch.empty(h, 2 * n),
                                            softmax_scale=0.1, causal=causal, window_left=left, dropout_p=p,
                                            rng_state=rng, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n,
                                            max_seqlen_k=n)
        if d > 128:
            continue
        for with_dq in (True, False):
            stats = backward_sm90.new_stats(b, h, n, "cpu")
            backward_sm90.attention_backward_sm90(
                q, q, kv, kv, stats, torch.zeros(q.shape) if with_dq else None, torch.empty_like(kv),
                torch.empty_like(kv), softmax_scale=0.1, causal=causal, window_left=left, dropout_p=p, rng_state=rng)
            # a dense batch of the packed view's shape (1, 2n, heads, dim): a key must tell them apart
            stats = backward_sm90.new_stats(1, h, 2 * n, "cpu")
            backward_sm90.attention_backward_sm90(
                qv[None], qv[None], kvv[None], kvv[None], stats, torch.zeros(qv[None].shape) if with_dq else None,
                torch.empty_like(kvv[None]), torch.empty_like(kvv[None]), softmax_scale=0.1, causal=causal,
                window_left=left, dropout_p=p, rng_state=rng)
            stats = backward_sm90.new_stats_varlen(h, 2 * n, 2, "cpu")
            backward_sm90.attention_backward_sm90(
                qv, qv, kvv, kvv, stats, torch.zeros(qv.shape) if with_dq else None, torch.empty_like(kvv),
                torch.empty_like(kvv), softmax_scale=0.1, causal=causal, window_left=left, dropout_p=p,
                rng_state=rng, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_k=n)
    # softcap and ALiBi ((nheads,) or (batch, nheads) slopes, aligned or not)
    for (b, n, h, hk, d), causal, softcap, alibi in itertools.product(
            [(2, 17, 2, 1, 64), (3, 1000, 4, 2, 128)], (False, True), (0.0, 30.0), (None, "1d", "2d", "2d+1")):
        q = torch.empty(b, n, h, d, dtype=torch.bfloat16)
        kv = torch.empty(b, n, hk, d, dtype=torch.bfloat16)
        slopes = {None: None, "1d": torch.rand(h), "2d": torch.rand(b, h),
                  "2d+1": torch.rand(b * h + 1)[1:].view(b, h)}[alibi]
        forward_sm90.attention_forward_sm90(q, kv, kv, torch.empty_like(q), torch.empty(b, h, n), softmax_scale=0.1,
                                            causal=causal, softcap=softcap, alibi_slopes=slopes)
        backward_sm90.attention_backward_sm90(
            q, q, kv, kv, backward_sm90.new_stats(b, h, n, "cpu"), torch.zeros(q.shape), torch.empty_like(kv),
            torch.empty_like(kv), softmax_scale=0.1, causal=causal, softcap=softcap, alibi_slopes=slopes)
    return calls


@pytest.mark.parametrize("which", ["generic", "call site"])
def test_launch_key_never_merges_what_triton_compiles_apart(stand_in, monkeypatch, which):
    calls = _launches(monkeypatch)
    assert len(calls) > 300
    seen = {}
    for kern, a, kw in calls:
        kw = dict(kw)
        site_key = kw.pop("key")
        # (launch.generic_key's contract: positional = the leading run-time parameters, keywords =
        # constexprs and options)
        assert all(kern.arg_names.index(n) in kern.constexprs for n in kw if n in kern.arg_names)
        assert not any(i in kern.constexprs for i in range(len(a)))
        _, _, _, _, binder = kern.device_caches[0]
        _, specialization, options = binder(*a, **kw)
        triton_key = jit.compute_cache_key(kern.device_caches[0][1], specialization, options)
        mine = launch_mod.generic_key(kern, a, kw)[0] if which == "generic" else (id(kern), site_key)
        assert seen.setdefault(mine, triton_key) == triton_key, (mine, triton_key)
    assert len(set(seen.values())) > 20  # (the grid does exercise many specializations)


def test_cached_launch_passes_what_triton_passes(stand_in, monkeypatch):
    monkeypatch.setattr(launch_mod, "FAST", True)
    log = stand_in
    q = torch.empty(2, 300, 4, 128, dtype=torch.bfloat16)
    kv = torch.empty(2, 300, 2, 128, dtype=torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(2, 4, 300)
    per_tile = dict(forward_sm90.config(128), PERSISTENT=False)
    for _ in range(3):
        forward_sm90.attention_forward_sm90(q, kv, kv, out, lse, softmax_scale=0.1, causal=True, cfg=per_tile)
    for _ in range(3):  # (without a mask at 300 keys: the persistent kernel)
        forward_sm90.attention_forward_sm90(q, kv, kv, out, lse, softmax_scale=0.1, causal=False)
    stats = backward_sm90.new_stats(2, 4, 300, "cpu")
    dq, dk, dv = torch.zeros(q.shape), torch.empty_like(kv), torch.empty_like(kv)
    for _ in range(3):
        backward_sm90.attention_backward_sm90(q, q, kv, kv, stats, dq, dk, dv, softmax_scale=0.1, causal=True)
    assert [e[0] for e in log] == ["jit", "cached", "cached"] * 3
    assert tuple(log[0][1]) == (3, 8, 1) and tuple(log[3][1]) == (24, 1, 1)  # per-tile grid, then persistent (24 tiles)
    for first, later in ((0, 1), (0, 2), (3, 4), (3, 5), (6, 7), (6, 8)):
        assert log[first][1] == log[later][1]  # grid
        assert [_norm(x) for x in log[first][2]] == [_norm(x) for x in log[later][2]]


def test_persistent_forward_dispatch(monkeypatch):
    """Which dense forwards take the persistent kernel (forward_sm90.use_persistent)."""
    use = forward_sm90.use_persistent
    monkeypatch.setattr(forward_sm90, "PERSISTENT", "auto")
    assert use(128, 1024, False, -1, 0, False, False) and use(64, 4096, False, -1, 0, False, False)
    assert not use(128, 4097, False, -1, 0, False, False)  # long keys: the per-tile grid
    assert use(128, 1024, True, -1, 0, False, False) == forward_sm90.PERSISTENT_CAUSAL  # causal
    assert not use(128, 8192, True, -1, 0, False, False)
    assert not use(256, 1024, False, -1, 0, False, False)  # does not fit at head dim 256
    for extra in ((0, 2, False, False), (-1, 2, False, False), (-1, 0, True, False), (-1, 0, False, True)):
        assert not use(128, 1024, False, *extra)  # window (0, -1), dropout, softcap, ALiBi
    assert use(128, 1024, False, -1, 0, False, False, cfg={"PERSISTENT": True})
    assert not use(128, 1024, False, -1, 0, False, False, cfg={"PERSISTENT": False})
    assert not use(128, 1024, False, 5, 0, False, False, cfg={"PERSISTENT": True})
    monkeypatch.setattr(forward_sm90, "PERSISTENT", "1")
    assert use(128, 16384, True, -1, 0, False, False) and not use(256, 128, False, -1, 0, False, False)
    monkeypatch.setattr(forward_sm90, "PERSISTENT", "0")
    assert not use(128, 1024, False, -1, 0, False, False)


class _Utils:
    """The driver utils' fill_tma_descriptor, recording its calls and returning what it was given."""

    def __init__(self):
        self.calls = 0

    def fill_tma_descriptor(self, ptr, swizzle, elem_size, elem_type, block, shape, strides, padding):
        self.calls += 1
        return ("map", ptr, swizzle, elem_size, elem_type, tuple(block), tuple(shape), tuple(strides), padding)


def _wrapped_launcher(kern, metas):
    """A CompiledKernel stand-in whose CudaLauncher.launch is triton's own tensor-descriptor wrapper
    (wrap_handle_tensordesc of the installed triton) around a recording C launcher."""
    from types import SimpleNamespace

    from triton.backends.nvidia.driver import wrap_handle_tensordesc
    log = []
    sig = {n: ("tensordesc<bf16[1,64,1,128]>" if n.endswith("_desc") else "i32") for n in kern.arg_names}
    run = SimpleNamespace(launch=wrap_handle_tensordesc(lambda *a: log.append(a), sig, metas),
                          launch_cooperative_grid=False, launch_pdl=False, global_scratch_size=0,
                          profile_scratch_size=0)
    return SimpleNamespace(run=run, function=1234, packed_metadata=(8, 1)), log


def _same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def test_direct_launch_passes_what_triton_passes(monkeypatch):
    """launch._Direct's C-launcher arguments equal those of triton's descriptor wrapper (the same
    encoded maps, shapes, strides and plain arguments), and it encodes a descriptor once per
    address, shape and strides."""
    pytest.importorskip("triton.backends.nvidia.driver")
    saved = driver._active
    utils = _Utils()
    stand = _Driver()
    stand.utils = utils
    driver.set_active(stand)
    try:
        calls = []
        monkeypatch.setattr(forward_sm90, "launch", lambda kern, grid, *a, **kw: calls.append((kern, grid, a, kw)))
        monkeypatch.setattr(forward_sm90, "_num_sms", lambda device: 132)
        q = torch.empty(2, 300, 4, 128, dtype=torch.bfloat16)
        kv = torch.empty(2, 300, 2, 128, dtype=torch.bfloat16)
        out, lse = torch.empty_like(q), torch.empty(2, 4, 300)
        per_tile = dict(forward_sm90.config(128), PERSISTENT=False)
        forward_sm90.attention_forward_sm90(q, kv, kv, out, lse, softmax_scale=0.1, causal=True, cfg=per_tile)
        forward_sm90.attention_forward_sm90(q, kv, kv, out, lse, softmax_scale=0.1, causal=False)
        q2 = torch.empty(2, 300, 4, 128, dtype=torch.bfloat16)
        forward_sm90.attention_forward_sm90(q2, kv, kv, out, lse, softmax_scale=0.1, causal=True, cfg=per_tile)
        metas = [dict(swizzle=128, elem_size=2, elem_type=10, block_size=[1, 64 + i, 1, 128], fp4_padded=False)
                 for i in range(4)]
        for kern, grid, a, kw in calls:
            kw = {n: v for n, v in kw.items() if n != "key"}
            full = launch_mod.generic_key(kern, a, kw)[1]
            compiled, log = _wrapped_launcher(kern, metas)
            direct = launch_mod._Direct.of(compiled)
            assert direct is not None
            grid3 = (*grid, 1, 1)[:3]
            compiled.run.launch(*grid3, 0, 1234, False, False, None, None, (8, 1), None, None, None, *full)
            before = utils.calls
            direct(grid3, full, 0)
            assert utils.calls == before + 4  # (a new _Direct: four descriptors encoded)
            direct(grid3, full, 0)
            assert utils.calls == before + 4  # the same tensors again: none encoded
            assert len(log) == 3
            for got in log[1:]:
                assert len(got) == len(log[0])
                assert all(_same(x, y) for x, y in zip(got, log[0]))
            assert sum(isinstance(x, tuple) and x[:1] == ("map",) for x in log[0]) == 4
        # a different Q tensor (address) gets its own map; K, V and the output keep theirs
        compiled, log = _wrapped_launcher(calls[0][0], metas)
        direct = launch_mod._Direct.of(compiled)
        for kern, grid, a, kw in (calls[0], calls[2]):
            kw = {n: v for n, v in kw.items() if n != "key"}
            before = utils.calls
            direct((*grid, 1, 1)[:3], launch_mod.generic_key(kern, a, kw)[1], 0)
        assert utils.calls == before + 1 and log[0][13][1] != log[1][13][1] and log[0][14] == log[1][14]
    finally:
        driver._active = saved


def test_direct_launch_falls_back(monkeypatch):
    """Triton's own chain launches where _Direct cannot: descriptors without metadata, scratch
    memory, a launcher not built by triton's wrapper, registered launch hooks."""
    pytest.importorskip("triton.backends.nvidia.driver")
    kern = forward_sm90._attn_fwd_sm90
    compiled, _ = _wrapped_launcher(kern, None)
    assert launch_mod._Direct.of(compiled) is None  # (metadata None: the frontend decomposes them)
    meta = [dict(swizzle=128, elem_size=2, elem_type=10, block_size=[1, 64, 1, 128], fp4_padded=False)] * 4
    compiled, _ = _wrapped_launcher(kern, meta)
    compiled.run.global_scratch_size = 64
    assert launch_mod._Direct.of(compiled) is None
    compiled.run.global_scratch_size = 0
    compiled.run.launch = lambda *a, **kw: None  # some other wrapper
    assert launch_mod._Direct.of(compiled) is None
    assert launch_mod._Direct.of(object()) is None
    assert launch_mod._hooks_idle()
    from triton import knobs
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not launch_mod._hooks_idle()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert launch_mod._hooks_idle()


def test_preprocess_launch_key_never_merges_what_triton_compiles_apart(stand_in):
    """The backward's Triton preprocess (launched through launch.launch on a GPU): the generic key
    over the argument sets attention_backward passes (dense or varlen, with dlse and the Gluon
    stats or without, strides of 1, multiples of 16 and others)."""
    from ioattn.kernels import backward, configs
    kern = backward._attn_bwd_preprocess
    if configs.interpreting() or not hasattr(kern, "device_caches"):
        pytest.skip("the interpreter launches the preprocess directly")
    kern.device_caches.clear()
    seen = {}
    for (b, n, h, d), varlen, dlse, stats in itertools.product(
            [(1, 1, 1, 64), (2, 17, 3, 64), (2, 64, 16, 128), (1, 300, 2, 256)], (False, True), (False, True),
            (False, True)):
        out = torch.empty(b, n, h, d, dtype=torch.bfloat16)
        o = out.view(b * n, h, d) if varlen else out
        lse = torch.empty(h, b * n) if varlen else torch.empty(b, h, n)
        delta = torch.empty_like(lse)
        st = torch.empty(b, h, 2, n) if stats else None
        strides = (0, o.stride(0), o.stride(1)) if varlen else (o.stride(0), o.stride(1), o.stride(2))
        lstr = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
        sstr = (0, 0, 0) if st is None else st.stride()[:3]
        cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)[:b + 1] if varlen else None
        args = (o, o, delta, delta if dlse else None, lse, st if st is not None else delta, *strides, *strides, *lstr,
                *sstr, cu, n, h)
        kw = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=64, IS_VARLEN=varlen, HAS_DLSE=dlse, HAS_STATS=stats)
        _, _, _, _, binder = kern.device_caches[0]
        _, specialization, options = binder(*args, **kw)
        triton_key = jit.compute_cache_key(kern.device_caches[0][1], specialization, options)
        mine = launch_mod.generic_key(kern, args, kw)[0]
        assert seen.setdefault(mine, triton_key) == triton_key, (mine, triton_key)
    kern.device_caches.clear()
    assert len(set(seen.values())) > 8
