"""The Gluon dropout masks (kernels/dropout_sm90.py) without a GPU.

Gluon does not run in the interpreter, so here the check kernels are compiled for sm_90a
(no spills; the 6-D call tensor reshapes to the wgmma layout without data movement; the
Philox runs once per call per thread in the forward layout, not once per element), and the
NumPy statement of the generator (dropout_sm90.keep_mask_reference, which the Gluon code
mirrors line for line) is checked against the Triton kernels' masks (the interpreter or a
GPU). Bit-exactness of the Gluon masks themselves: benchmarks/gluon_dropout_check.py on a GPU.
"""

import inspect
import re

import numpy as np
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from ioattn.kernels import configs  # noqa: E402
from ioattn.kernels import dropout_sm90  # noqa: E402
from ioattn.kernels.aot import SMEM_LIMIT, ptxas_report  # noqa: E402
from ioattn.kernels.masks import DROPOUT_ROUNDS  # noqa: E402

# (name, rows, cols, transposed, Philox calls per thread)
#   forward [64 queries, N keys]: 2 * N / 64 calls (n's low bit, a); backward [64 keys, R queries]:
#   2 * R / 16 calls (r's low bit, g), one word of each
LAYOUTS = [("fwd", 64, 128, False, 4), ("fwd", 64, 64, False, 2), ("bwd", 64, 64, True, 8),
           ("bwd", 64, 128, True, 16)]


_compiles = pytest.mark.skipif(configs.interpreting(), reason="compiles for sm_90a: needs the real Triton "
                               "compiler, not TRITON_INTERPRET=1 (scripts/test.sh's second pass runs it)")


def _count(ptx, op):
    return len(re.findall(r"\b" + re.escape(op) + r"\.", ptx))


@_compiles
@pytest.mark.parametrize("name,rows,cols,transposed,calls", LAYOUTS, ids=[f"{x[0]}{x[1]}x{x[2]}" for x in LAYOUTS])
def test_mask_kernel_compiles_for_sm90a(name, rows, cols, transposed, calls):
    kernel = dropout_sm90.compile_for("mask", rows, cols, transposed)
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    rep = ptxas_report(kernel)
    assert rep["spill_bytes"] == 0, rep
    # the [.., 2, 8, .., M, 8] -> [rows, cols] reshape lands on the wgmma layout itself:
    # no shared-memory round trip, no shuffles (convert_layout(assert_trivial=True) would
    # already have refused to compile otherwise)
    assert "ttg.local_alloc" not in ttgir and "local_store" not in ttgir
    assert "shfl" not in ptx and "st.shared" not in ptx and "ld.shared" not in ptx
    assert kernel.metadata.shared == 0
    # Philox: 2 umulhi per round and call, less what the calls of a thread share (their
    # first-round products of counters that only depend on the thread): not 16x (forward)
    mulhi = _count(ptx, "mul.hi") + _count(ptx, "mad.hi")
    assert calls * DROPOUT_ROUNDS <= mulhi <= 2 * DROPOUT_ROUNDS * calls, (mulhi, calls)
    if not transposed:
        elems = rows * cols // 128  # per thread
        assert mulhi < elems  # under one multiply-high per element (a Philox per element: 14)


@_compiles
@pytest.mark.parametrize("name,rows,cols,transposed,calls", LAYOUTS, ids=[f"{x[0]}{x[1]}x{x[2]}" for x in LAYOUTS])
def test_bench_kernel_compiles_for_sm90a(name, rows, cols, transposed, calls):
    """dropout_rows / dropout_cols on an fp32 register tile in a loop: no spills."""
    for drop in (True, False):
        kernel = dropout_sm90.compile_for("bench", rows, cols, transposed, dropout=drop)
        assert ptxas_report(kernel)["spill_bytes"] == 0
        assert "shfl" not in kernel.asm["ptx"] and kernel.metadata.shared == 0


def test_split_bits_mirrors_the_tile():
    """The 6-D layout of the forward's calls puts (h, m) in registers and each call index
    exactly once in the thread/register space (the docstring's claim)."""
    from triton.experimental.gluon import language as gl
    ll = gl.DistributedLinearLayout(reg_bases=[[0, 1], [8, 0], [0, 8], [0, 16], [0, 32], [0, 64]],
                                    lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                    warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 128])
    l6 = dropout_sm90._split_bits.fn(ll, [4, 2, 8], [2, 8, 8])  # (the plain function under constexpr_function)
    assert l6.shape == [4, 2, 8, 2, 8, 8]
    assert l6.reg_bases == [[0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 2, 0],
                            [0, 0, 0, 0, 4, 0], [0, 0, 0, 1, 0, 0]]
    assert l6.lane_bases == [[0, 0, 0, 0, 0, 2], [0, 0, 0, 0, 0, 4], [0, 0, 1, 0, 0, 0], [0, 0, 2, 0, 0, 0],
                             [0, 0, 4, 0, 0, 0]]
    assert l6.warp_bases == [[1, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0]]


def test_philox_constants_are_tritons():
    from triton.language import random
    src = inspect.getsource(random.philox_impl.fn)  # (the function under triton.jit)
    for name in ("PHILOX_KEY_A", "PHILOX_KEY_B", "PHILOX_ROUND_A", "PHILOX_ROUND_B"):
        value = int(getattr(dropout_sm90, name))
        assert re.search(rf"{name}: tl.constexpr = {value:#X}\b".replace("0X", "0x"), src), name
    # the mul.wide asm of the packed path multiplies by the same round constants
    for fn, name in ((dropout_sm90._mul_wide_a, "PHILOX_ROUND_A"), (dropout_sm90._mul_wide_b, "PHILOX_ROUND_B")):
        assert f"{int(getattr(dropout_sm90, name)):#X}".replace("0X", "0x") in inspect.getsource(fn.fn), name


@pytest.mark.skipif(not (configs.interpreting() or torch.cuda.is_available()),
                    reason="runs the Triton mask kernel: TRITON_INTERPRET=1 or a GPU")
def test_numpy_spec_matches_triton_masks():
    """keep_mask_reference (what the Gluon code computes) == forward.dropout_keep_mask, for
    seeds with high bits, a negative int64 seed and several salts."""
    from ioattn.kernels.forward import dropout_keep_mask
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for rng, p in (((12345, 678), 0.1), ((2 ** 61 + 3, 2 ** 40 + 9), 0.5), ((-7, 2), 0.17)):
        state = torch.tensor(rng, dtype=torch.int64, device=device)
        mask = dropout_keep_mask(1, 2, 64, 160, p, state).cpu().numpy()[0]
        for salt in range(2):
            ref = dropout_sm90.keep_mask_reference(sum(rng), salt, 0, 0, 64, 160, p)
            np.testing.assert_array_equal(mask[salt], ref)


def test_numpy_spec_keep_fraction():
    """The reference's kept fraction is 1 - ceil(256 p) / 256."""
    ref = dropout_sm90.keep_mask_reference(2 ** 40 + 5, 3, 2 ** 20, 64 * 99, 512, 512, 0.1)
    expect = 1 - 26 / 256
    assert abs(ref.mean() - expect) < 6 * np.sqrt(expect * (1 - expect) / ref.size)


# --- the forward's packed path (dropout_sm90.keep_words_rows / keep_lanes / drop_packed_rows) ---------------
# Its arithmetic restated in NumPy (the kernels cannot run here): the SIMD byte compare of _keep_bytes for
# every draw and threshold, and the prmt selectors of keep_words_rows; the GPU check of the kernels
# themselves is benchmarks/gluon_dropout_check.py --layouts fwdpacked (bit-identical masks).


def _keep_bytes_np(x, t):
    """_keep_bytes(x, s_word, k_word) with s = t - 1, as the kernel computes it (uint32 wrap-around)."""
    x = np.asarray(x, dtype=np.uint32)
    s_word = np.uint32((t - 1) * 0x01010101)
    k_word = np.uint32(0x7F7F7F7F - (int(s_word) & 0x7F7F7F7F))
    c = (x & np.uint32(0x7F7F7F7F)) + k_word  # no carry leaves a byte
    return (x & ~s_word) | (~(x ^ s_word) & c)


def _prmt_np(a, b, sel):
    """PTX prmt.b32 (default mode): byte i of the result from nibble i of sel: bits 0-2 pick one of the
    8 bytes of {b, a} (a = bytes 0-3), bit 3 replicates that byte's sign bit."""
    src = [(int(a) >> (8 * i)) & 0xFF for i in range(4)] + [(int(b) >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nib = (int(sel) >> (4 * i)) & 0xF
        byte = src[nib & 7]
        out |= ((0xFF if byte & 0x80 else 0) if nib & 8 else byte) << (8 * i)
    return out


def test_keep_bytes_is_the_threshold_compare():
    """Bit 7 of each byte of _keep_bytes(x) is (byte >= ceil(256 p)) for every byte value, every byte
    position and every threshold 1..256 (p in (0, 1)), whatever the other bytes hold."""
    rng = np.random.default_rng(0)
    u = np.arange(256, dtype=np.uint32)
    for t in range(1, 257):
        for pos in range(4):
            other = rng.integers(0, 2 ** 32, size=256, dtype=np.uint64).astype(np.uint32)
            x = (other & ~np.uint32(0xFF << (8 * pos))) | (u << np.uint32(8 * pos))
            bit = (_keep_bytes_np(x, t) >> np.uint32(8 * pos + 7)) & np.uint32(1)
            np.testing.assert_array_equal(bit.astype(bool), u >= t, err_msg=f"t={t} byte {pos}")
    # the thresholds the kernels derive from p (masks._dropout_threshold): 1..256 for 0 < p < 1
    for p in (1e-6, 0.1, 0.5, 0.75, 0.999):
        assert 1 <= int(np.ceil(np.float32(p) * np.float32(256.0))) <= 256


def test_packed_lane_masks_pick_each_elements_draw():
    """keep_words_rows' selectors (byte b of the element's word: (b + 8) * 0x11 for the low lane,
    (b + 12) * 0x1100 for the high lane) OR-ed as keep_lanes does give 0xffff in each 16-bit lane
    exactly when that lane's element keeps its draw, for any two elements packed together."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        t = int(rng.integers(1, 257))
        w0, w1 = (int(x) for x in rng.integers(0, 2 ** 32, size=2, dtype=np.uint64))
        b0, b1 = (int(x) for x in rng.integers(0, 4, size=2))
        k0, k1 = int(_keep_bytes_np(w0, t)), int(_keep_bytes_np(w1, t))
        lanes = _prmt_np(k0, k1, ((b0 + 8) * 0x11) | ((b1 + 12) * 0x1100))
        assert lanes & 0xFFFF == (0xFFFF if (w0 >> (8 * b0)) & 0xFF >= t else 0)
        assert lanes >> 16 == (0xFFFF if (w1 >> (8 * b1)) & 0xFF >= t else 0)


@_compiles
@pytest.mark.parametrize("cols", [128, 64])
def test_packed_mask_kernel_compiles_for_sm90a(cols):
    """The check kernel's packed path (drop_packed_rows on a bf16 tile): no spills, no shared memory,
    Philox by mul.wide only (one per round and call, less the first round's shared products), one
    prmt per two elements."""
    kernel = dropout_sm90.compile_for("mask", 64, cols, False, packed=True)
    ptx = kernel.asm["ptx"]
    assert ptxas_report(kernel)["spill_bytes"] == 0 and kernel.metadata.shared == 0
    assert "shfl" not in ptx and "st.shared" not in ptx and _count(ptx, "mul.hi") == 0
    calls = 2 * cols // 64
    assert calls * DROPOUT_ROUNDS <= len(re.findall(r"mul\.wide\.u32", ptx)) <= 2 * DROPOUT_ROUNDS * calls
    assert len(re.findall(r"prmt\.b32 %r\d+, %r\d+, %r\d+, t;", ptx)) == 64 * cols // 128 // 2


def _inner_loop_sizes(kernel):
    """SASS instructions of the forward's key loops (a back edge over >= 60 MUFU.EX2, the smallest
    two: one per consumer warpgroup), through the nvdisasm that ships with Triton."""
    import os
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(kernel.asm["cubin"])
    text = subprocess.run([nvdisasm, "-c", fh.name], capture_output=True, text=True, check=True).stdout
    os.unlink(fh.name)
    ins, labels = [], {}
    for line in text.splitlines():
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        elif re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            ins.append(line)
    sizes = []
    for i, t in enumerate(ins):
        m = re.search(r"BRA\s.*`\(\.(L_x_\d+)\)", t)
        if m and labels.get(m.group(1), i) < i:
            body = ins[labels[m.group(1)]:i + 1]
            if len(body) < 3000 and sum("MUFU.EX2" in x for x in body) >= 60:
                sizes.append(len(body))
    return sorted(sizes)[:2]


@_compiles
def test_packed_forward_instructions_per_score():
    """The Gluon forward with the packed / early mask (IOATTN_GLUON_DROPOUT_APPLY): no spills, the
    Philox by mul.wide, and its key loop (64 scores a thread per 64 x 128 tile) at most 4 SASS
    instructions per score over the plain loop (measured, hdim 128 causal: select 7.5, packed / early
    3.6; sm_90a, ptxas 12.8), 4.25 since the mask from per-row bounds (MASK_BOUNDS, default since
    session 20) shortened the plain loop more than the masked ones (packed 3.9, early 4.0)."""
    from ioattn.kernels import forward_sm90
    plain = _inner_loop_sizes(forward_sm90.compile_for(128, "bf16", True))
    kernel = forward_sm90.compile_for(128, "bf16", True, dropout="early")
    assert ptxas_report(kernel)["spill_bytes"] == 0
    assert "mul.wide.u32" in kernel.asm["ptx"] and _count(kernel.asm["ptx"], "mul.hi") == 0
    early = _inner_loop_sizes(kernel)
    assert len(plain) == len(early) == 2, (plain, early)
    per_score = (sum(early) - sum(plain)) / 2 / 64
    assert 2.0 < per_score <= 4.25, (plain, early)
    kernel = forward_sm90.compile_for(64, "bf16", False, dropout="packed")
    assert ptxas_report(kernel)["spill_bytes"] == 0


@_compiles
@pytest.mark.parametrize("head_dim,causal", [(128, True), (128, False), (64, True)])
def test_persistent_forward_with_dropout(head_dim, causal):
    """The persistent forward with the packed mask (forward_sm90.PERSISTENT_OPTIONS, opt-in): its key
    loops grow by what the per-tile kernel's do (the same _attend; within 0.5 instructions a score),
    the Philox by mul.wide, and few spills (hdim 128: 28 B causal, 12 B without a mask, values held
    across the tile loop; the per-tile kernel 0)."""
    from ioattn.kernels import forward_sm90
    f = forward_sm90.compile_for
    kernel = f(head_dim, "bf16", causal, persistent=True, dropout="packed")
    assert ptxas_report(kernel)["spill_bytes"] <= 32
    assert "mul.wide.u32" in kernel.asm["ptx"] and kernel.metadata.shared <= SMEM_LIMIT[(9, 0)]
    grow = {}
    for persistent in (False, True):
        plain = _inner_loop_sizes(f(head_dim, "bf16", causal, persistent=persistent))
        drop = _inner_loop_sizes(f(head_dim, "bf16", causal, persistent=persistent, dropout="packed"))
        assert len(plain) == len(drop) == 2, (persistent, plain, drop)
        grow[persistent] = (sum(drop) - sum(plain)) / 2 / 64  # (64 x 128 tiles: 64 scores a thread)
    assert abs(grow[True] - grow[False]) <= 0.5 and grow[True] > 2.0, grow


@_compiles
@pytest.mark.parametrize("options,spills", [(dict(softcap=True), 8), (dict(alibi=True), 64)])
def test_persistent_forward_with_scores(options, spills):
    """Softcap / ALiBi on the persistent forward (PERSISTENT_OPTIONS): fits the shared memory; spills
    at hdim 128 (causal: softcap 0 B, ALiBi 52 B; not: 4 B, 16 B; the per-tile kernel 0) stay out of the
    shortest key loops."""
    from ioattn.kernels import forward_sm90
    for causal in (True, False):
        kernel = forward_sm90.compile_for(128, "bf16", causal, persistent=True, **options)
        assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)]
        assert ptxas_report(kernel)["spill_bytes"] <= spills, (causal, ptxas_report(kernel))
        assert ("tanh.approx.f32" in kernel.asm["ptx"]) == bool(options.get("softcap"))


@_compiles
def test_persistent_dropout_dispatch_and_arguments(monkeypatch):
    """PERSISTENT_OPTIONS off (default): dropout, softcap and ALiBi calls take the per-tile kernel; on:
    the persistent kernel where a plain call would, with the (seed, offset) tensor, p, 1 / (1 - p) and
    DROPOUT_APPLY's mode, or the score arguments of _score_args."""
    from ioattn.kernels import forward_sm90 as f
    up = f.use_persistent
    assert not f.PERSISTENT_OPTIONS and not up(128, 4096, True, -1, 2, False, False) and up(128, 4096, True, -1, 0,
                                                                                              False, False)
    monkeypatch.setattr(f, "PERSISTENT_OPTIONS", True)
    assert up(128, 4096, True, -1, 2, False, False) and up(64, 1024, False, -1, 2, False, False)
    assert up(128, 4096, True, -1, 0, True, False) and up(128, 4096, False, -1, 2, True, True)
    assert not up(256, 1024, True, -1, 2, False, False) and not up(128, 4096, True, 100, 2, False, False)
    calls = []
    monkeypatch.setattr(f, "launch", lambda kern, grid, *a, **kw: calls.append((kern, a, kw)))
    monkeypatch.setattr(f, "_num_sms", lambda device: 132)
    q, k, v = (torch.empty(2, 300, 4, 128, dtype=torch.bfloat16) for _ in range(3))
    out, lse, rng = torch.empty_like(q), torch.empty(2, 4, 300), torch.zeros(2, dtype=torch.int64)
    f.attention_forward_sm90(q, k, v, out, lse, softmax_scale=0.1, causal=True, dropout_p=0.2, rng_state=rng)
    f.attention_forward_sm90(q, k, v, out, lse, softmax_scale=0.1, causal=True)
    (k1, a1, kw1), (k2, a2, kw2) = calls
    assert k1 is k2 is f._attn_fwd_sm90_persistent
    # (the arguments end with RNG, dropout_p, o_scale, then ALIBI, stride_ab, sc_in, sc_out)
    assert a1[-7] is rng and a1[-6] == 0.2 and abs(a1[-5] - 1 / 0.8) < 1e-12
    assert kw1["HAS_DROPOUT"] == f._DROPOUT_MODES[f.DROPOUT_APPLY] and kw2["HAS_DROPOUT"] == 0
    assert a2[-7] is lse and a2[-6:-4] == (0.0, 1.0) and kw1["key"] != kw2["key"]
    assert not (kw1["HAS_SOFTCAP"] or kw1["HAS_ALIBI"]) and a1[-4] is lse and a1[-2] == 0.0  # (sc_in unused)
    slopes = torch.rand(2, 4)
    f.attention_forward_sm90(q, k, v, out, lse, softmax_scale=0.1, causal=True, softcap=30.0, alibi_slopes=slopes)
    kern, a3, kw3 = calls[-1]
    assert kern is f._attn_fwd_sm90_persistent and kw3["HAS_SOFTCAP"] and kw3["HAS_ALIBI"] and not kw3["HAS_DROPOUT"]
    qk_scale, score_args, _, _ = f._score_args(0.1, 30.0, slopes, lse)
    assert a3[-4] is slopes and a3[-3:] == score_args[1:] and qk_scale == 1.0 and a3[11] == qk_scale  # (after 4 descriptors and 7 ints)


# --------------------------------------------------------------------------- draws_cols_shared
# (IOATTN_GLUON_DROPOUT_COLS=shared: the backward's transposed tiles with each Philox call once)

@pytest.mark.parametrize("keys,rows", [(64, 64), (64, 128), (128, 64)])
def test_shared_calls_layout_covers_each_call_once(keys, rows):
    """_calls_layout puts every (a, c, g, r) call on exactly one (register, lane, warp) of the
    warpgroup: no thread computes a call twice and no call is left out."""
    lc = dropout_sm90._calls_layout.fn(keys, rows)
    bases = lc.reg_bases + lc.lane_bases + lc.warp_bases
    assert len(lc.lane_bases) == 5 and len(lc.warp_bases) == 2
    seen = set()
    for idx in range(1 << len(bases)):
        coord = [0, 0, 0, 0]
        for bit, basis in enumerate(bases):
            if idx >> bit & 1:
                coord = [x ^ y for x, y in zip(coord, basis)]
        seen.add(tuple(coord))
    a, g = keys // 64, rows // 16
    assert len(seen) == 1 << len(bases) == a * 8 * g * 8  # a bijection onto the calls


def _philox_np(c0, c1, c2, c3, seed, rounds):
    """Philox-4x32 on uint64 arrays holding uint32 values, keyed as tl.philox splits the seed."""
    u32 = np.uint64(0xFFFFFFFF)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    ra, rb = np.uint64(int(dropout_sm90.PHILOX_ROUND_A)), np.uint64(int(dropout_sm90.PHILOX_ROUND_B))
    x0, x1, x2, x3 = c0, c1, c2, c3
    for _ in range(rounds):
        p0, p2 = ra * x0, rb * x2
        x0, x1, x2, x3 = (p2 >> np.uint64(32)) ^ x1 ^ k0, p2 & u32, (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & u32
        k0 = (k0 + np.uint64(int(dropout_sm90.PHILOX_KEY_A))) & u32
        k1 = (k1 + np.uint64(int(dropout_sm90.PHILOX_KEY_B))) & u32
    return x0, x1, x2, x3


@pytest.mark.parametrize("keys,rows", [(64, 64), (64, 128), (128, 64)])
def test_shared_draws_steps_give_the_spec(keys, rows):
    """draws_cols_shared's tensor steps, replayed in NumPy with Gluon's semantics (join stacks along
    a new last axis, reshape is row-major, permute as numpy.transpose; layouts do not change
    values): the calls on (a, c, g, r), the four words joined and reordered to (a, word, c, g, r),
    broadcast over (m % 2, h), the byte of each, reshaped to [keys, rows]. Equals the spec
    (keep_mask_reference, transposed) for several seeds, salts and tile origins."""
    A, G = keys // 64, rows // 16
    for seed, salt, start_m, start_n in ((0, 0, 0, 0), (2 ** 40 + 5, 3, 16 * 77, 64 * 99), (-17, 2 ** 31 - 5, 2 ** 20, 2 ** 21)):
        a, c, g, r = np.meshgrid(np.arange(A), np.arange(8), np.arange(G), np.arange(8), indexing="ij")
        u32 = 0xFFFFFFFF
        c0 = (((start_n // 64 + a) * 8 + c) & u32).astype(np.uint64)
        c1 = (((start_m // 16 + g) * 8 + r) & u32).astype(np.uint64)
        c2 = np.full(a.shape, salt & u32, dtype=np.uint64)
        r0, r1, r2, r3 = _philox_np(c0, c1, c2, np.zeros_like(c0), seed, int(DROPOUT_ROUNDS))
        joined = np.stack([np.stack([r0, r1], -1), np.stack([r2, r3], -1)], -1)  # [..., j, i]
        words = np.transpose(joined, (0, 1, 2, 3, 5, 4)).reshape(A, 8, G, 8, 4)  # word 2 i + j
        words = np.transpose(words, (0, 4, 1, 2, 3))  # [A, 4, 8, G, 8]
        x = words[:, :, None, :, :, None, :]  # [A, 4, 1, 8, G, 1, 8]
        ml = np.arange(2).reshape(1, 1, 2, 1, 1, 1, 1)
        h = np.arange(2).reshape(1, 1, 1, 1, 1, 2, 1)
        byte = (h * 2 + ml).astype(np.uint64)
        u = (x >> (byte * np.uint64(8))) & np.uint64(0xFF)  # [A, 4, 2, 8, G, 2, 8]
        u = np.broadcast_to(u, (A, 4, 2, 8, G, 2, 8)).reshape(keys, rows)
        for p in (0.1, 0.5):
            t = np.ceil(np.float32(p) * np.float32(256.0))
            ref = dropout_sm90.keep_mask_reference(seed, salt, start_m, start_n, rows, keys, p)
            assert np.array_equal(u >= np.uint64(int(t)), ref.T), (seed, salt, start_m, start_n, p)


@_compiles
@pytest.mark.parametrize("keys,rows", [(64, 64), (64, 128)])
def test_shared_draws_compile_with_a_quarter_of_the_calls(keys, rows):
    """The check kernel with SHARED: the final layout is the wgmma one (assert_trivial compiled),
    the words go through shared memory, no spills, and a quarter of the redundant form's Philox
    multiplies (mul.wide: two a round and call; the redundant form: mul.hi + mul.lo pairs)."""
    plain = dropout_sm90.compile_for("mask", keys, rows, True)
    shared = dropout_sm90.compile_for("mask", keys, rows, True, shared=True)
    assert ptxas_report(shared)["spill_bytes"] == 0
    assert plain.metadata.shared == 0 and shared.metadata.shared > 0
    calls = 2 * rows // 16  # per thread in the redundant form
    mulhi = _count(plain.asm["ptx"], "mul.hi") + _count(plain.asm["ptx"], "mad.hi")
    wide = _count(shared.asm["ptx"], "mul.wide")
    assert calls * DROPOUT_ROUNDS <= mulhi and wide <= 2 * DROPOUT_ROUNDS * calls // 4, (mulhi, wide)
