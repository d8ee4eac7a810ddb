"""Hopper (sm_90) forward written in Gluon: warp-specialized, with asynchronous wgmma.

Why a second forward: the Triton kernel (forward.py) compiles to a loop that waits on every
wgmma and synchronizes the whole CTA each iteration, so the softmax never overlaps a matrix
product (docs/PERF_NOTES.md). Gluon (Triton's lower-level dialect, shipped in the same
wheel) lets the kernel say what runs where:

- a producer warp issues the TMA loads of Q, K and V into rings of shared-memory stages,
  each guarded by a "ready" mbarrier (TMA byte count) and an "empty" mbarrier that the
  consumers arrive on once the tensor cores are done reading the stage;
- two consumer warpgroups (4 warps each) own 64 query rows apiece of the CTA's 128-row
  block and share the K/V stages. Each runs its own online softmax, so neither waits for the
  other; and inside a warpgroup, the scores of block j+1 (Q K^T, issued asynchronously) are
  computed by the tensor cores while the warpgroup does the softmax of block j, and P V of
  block j runs while it rescales (FlashAttention-3's intra-warpgroup overlap).

Scope: bf16/fp16 (batch, seqlen, heads, dim) tensors or packed varlen batches, head dims 64,
128 and 256 (with VALUE_DIMS also Q/K 128/192/256 with a smaller V head dim), causal
(bottom-right aligned) or not, sliding windows (left, 0) / (left, -1), GQA/MQA, dropout
(dropout_sm90's masks, equal to the Triton kernels'; by default at hdim 128 only, see DROPOUT);
the same outputs as forward.py (out, and lse in natural log), so the backward is shared;
softcap and ALiBi (SCORES). Right windows, paged K/V, other head dims and fp32 keep the Triton
kernel.
Gluon kernels do not run in the interpreter: tests/test_gpu_configs.py compiles this one for
sm_90a on the CPU, and the GPU suite (benchmarks/gpu_check.py) checks its numbers.
"""

import functools
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from . import dropout_sm90
from .configs import cdiv, tma_ok
from .launch import align, launch

HALF_M = 64  # query rows per consumer warpgroup (the CTA holds two)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# the 2-D view of a (1, rows, 1, dim) bf16/fp16 TMA tile
_TILE2 = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))

# IOATTN_GLUON=0 keeps the Triton forward on Hopper too (A/B in benchmarks); IOATTN_GLUON_VARLEN=0
# only for packed variable-length batches
ENABLED = os.environ.get("IOATTN_GLUON", "1") != "0"
VARLEN = os.environ.get("IOATTN_GLUON_VARLEN", "1") != "0"
WINDOW = os.environ.get("IOATTN_GLUON_WINDOW", "1") != "0"  # sliding windows (left, 0) / (left, -1)
# dropout (dropout_sm90's Philox masks) in the Gluon kernels (IOATTN_GLUON_DROPOUT): "auto" at the
# head dims where it measured ahead of the Triton kernels, "all" at every head dim (checks), "0"
# never. H200, 4k causal, bf16, p 0.1, same run (results/h200-session9e): hdim 128 forward 0.632 ms
# packed vs Triton 0.731, forward+backward 2.605 vs 3.298; hdim 64 forward 0.881 vs 0.986, but the
# Gluon backward under dropout is slower there (forward+backward 4.028 vs 3.797), so hdim 64 takes
# the Gluon forward and the Triton backward (the masks are the same bits in both)
DROPOUT = os.environ.get("IOATTN_GLUON_DROPOUT", "auto")
DROPOUT_HEAD_DIMS = (64, 128)
# the hdim-64 Gluon backward under softcap, ALiBi or dropout: its 128-row query blocks spill on sm_90a
# (softcap 284-684 B, ALiBi 108-448 B, dropout 184-364 B), 64-row blocks do not. H200, 4k causal,
# same run (results/h200-session13a), backward part (forward+backward - forward) at 128 / 64 rows:
# softcap 3.76 / 2.32 ms (forward+backward +89% -> +32% over plain), ALiBi 2.15 / 2.25, dropout
# (Gluon backward at 64 rows vs the Triton one) 2.76 / 2.74. H100, session 19 (results/h100-session19b,
# 4k causal, p 0.1, forward+backward): the Triton backward 3.603 ms, the Gluon one at 64 rows 3.606,
# and with each Philox call once (dropout_sm90.COLS_SHARED) 3.526 (-2.1%; masks bit-identical to
# the Triton ones, 52/52). IOATTN_GLUON_BWD64_OPTION_ROWS: "auto" (default) 64 rows under softcap or
# dropout (the Gluon backward under dropout at hdim 64), 128 under ALiBi alone; "64" under any of
# the three; "128" never (and the Triton backward under dropout at hdim 64)
OPTION_ROWS_64 = os.environ.get("IOATTN_GLUON_BWD64_OPTION_ROWS", "auto")
DROPOUT_BWD_HEAD_DIMS = (128, ) if OPTION_ROWS_64 == "128" else (128, 64)


def option_rows_64(softcap=False, alibi=False, dropout=False):
    """Query rows of the hdim-64 Gluon backward's blocks under these options (OPTION_ROWS_64)."""
    if OPTION_ROWS_64 == "64":
        return 64 if (softcap or alibi or dropout) else 128
    if OPTION_ROWS_64 == "128":
        return 128
    return 64 if (softcap or dropout) else 128


# how the forward applies the masks (IOATTN_GLUON_DROPOUT_APPLY; the same kept entries in all three):
# "select": a select per fp32 element (dropout_sm90.dropout_rows); "packed" (default): on the
# bf16/fp16 pairs of P after the conversion (dropout_sm90.drop_packed_rows: Philox by mul.wide, a
# SIMD byte compare of its words, one prmt + AND per two scores: ~3.5 instead of ~7.5 SASS
# instructions per score); "early": the same with Philox and the compare issued while the tensor
# cores compute the scores (before the wait for them), leaving the prmt + AND after it. Measured
# (h200-session9e, hdim 128 / 64 forward over plain): select +55% / +66%, packed +32% / +27%,
# early +42% / +54%; masks bit-identical to the Triton ones (104/104)
DROPOUT_APPLY = os.environ.get("IOATTN_GLUON_DROPOUT_APPLY", "packed")
_DROPOUT_MODES = {"select": 1, "packed": 2, "early": 3}
# softcap and ALiBi in the Gluon kernels (IOATTN_GLUON_SCORES=0 keeps the Triton ones): H200,
# session 9 (results/h200-session9a): 6/6 vs fp64 with errors within 2x the Triton kernels';
# hdim 128 4k causal forward+backward +14% (softcap 30) / +15% (ALiBi) over plain, where the
# Triton kernels cost +48% / +40%
SCORES = os.environ.get("IOATTN_GLUON_SCORES", "1") == "1"
# ALiBi in the Gluon forward as a row term plus a column term wherever a key block lies wholly on
# one side of every row's diagonal (_scores_linear): -slope |i + d - j| = slope (kn - d - i) +
# slope (j - kn) left of it, so the block's scores take one FMA with a column vector (in place of
# the scale's multiply) and the row term goes into the running max (_softmax_rows), where the
# exact form costs an int add, an abs, a conversion and an FMA per score; blocks crossing the
# diagonal keep the exact form. ALiBi cost +42-47% over plain in the hdim-128 4k causal forward
# (results/h200-session13c), where fp32 positions alone (fewer conversions) gained nothing. H100,
# session 20 (results/h100-session20a): softcap/ALiBi 6/6 vs fp64; ALiBi forward 0.684 -> 0.565 ms
# (+53% -> +22% over plain), forward+backward +17% -> +12%. IOATTN_GLUON_ALIBI_LINEAR=0 keeps the exact form
ALIBI_LINEAR = gl.constexpr(os.environ.get("IOATTN_GLUON_ALIBI_LINEAR", "1") == "1")
# the forward's causal / window / length mask from each row's first and last key (relative to the
# block) against the block's column offsets (_scores_mask): two compares and a select a score
# where the general form takes ~5 SASS instructions (hdim 128 causal: ISETP, FSEL, a PLOP3 for a
# uniform predicate, ISETP, FSEL). Only the blocks that need a mask run it: the diagonal's one or
# two of each warpgroup, a window's edges, the last block. H100, session 20 (results/h100-session20a,
# CUDA graphs, causal, TFLOP/s off -> on, persistent kernel): hdim 64 1k 273 -> 291, 4k 383 -> 402;
# hdim 128 1k 373 -> 389, 4k 529 -> 540 (cuDNN drifted +3% between the two runs, so hdim 128 is level
# and hdim 64 gains ~5% against it); outputs bit-identical, checks 32/32 + 8/8 varlen + 8/8 windows.
# IOATTN_GLUON_MASK_BOUNDS=0 keeps the general form
MASK_BOUNDS = gl.constexpr(os.environ.get("IOATTN_GLUON_MASK_BOUNDS", "1") == "1")
# ping-pong between the two consumer warpgroups (FlashAttention-3's warp-scheduler barriers, here two
# mbarriers, _turn_wait / _turn_pass): a warpgroup issues its wgmmas (Q K^T of block j and P V of
# block j - 1) only after the other one has issued its own, and hands the turn back once they are
# issued, so that one warpgroup's exponentials run while the other's products occupy the tensor
# cores. Both warpgroups wait on the same K/V stages, so without it they run in lockstep: both
# issue, both wait, both do their softmax while the tensor cores idle. Level 2 also has the
# producer load each K block one block ahead of its V block (K_j, V_j-1, K_j+1, ...; _load_kv_ahead),
# so that the warpgroup half a block behind does not hold back the load of the next K. At head
# dim 64 the exponentials (MUFU, 16 a cycle per SM) take as long as the products: 1/16 cycle a
# score each at full rate. IOATTN_GLUON_PINGPONG=1|2, opt-in until an H200 run checks and times
# it (compiled only)
PINGPONG = gl.constexpr(int(os.environ.get("IOATTN_GLUON_PINGPONG", "0")))
# K/V stages of the hdim-64 forward (IOATTN_GLUON_FWD64_STAGES, 2 or 3: 82 or 114 KB of shared
# memory, one CTA per SM either way, as the consumers' registers fill the register file)
STAGES_64 = int(os.environ.get("IOATTN_GLUON_FWD64_STAGES", "2"))
# the persistent forward (_attn_fwd_sm90_persistent: a CTA per SM walking over the tiles, the next
# tile's Q loaded under the current one's last key blocks) instead of the per-tile grid
# (IOATTN_GLUON_PERSISTENT): "auto" at head dims <= 128 up to PERSISTENT_MAX_KEYS keys, causal or
# not (PERSISTENT_CAUSAL), "1" wherever it runs (head dims <= 128; no window, dropout, softcap,
# ALiBi, varlen), "0" never. H200, GPU time under CUDA graphs, 3 interleaved rounds, persistent /
# per-tile: without a mask (results/h200-session12c) hdim 128 512 1.21, 1k 1.13, 2k 1.07, 4k 1.04;
# hdim 64 1.29, 1.12, 1.05, 1.03. Causal (results/h200-session13f, HEAD_GROUP 1 with the zigzag):
# hdim 128 1k 1.14, 2k 1.06, 4k 1.05 (cuDNN 0.94, 0.98, 1.04x); hdim 64 4k 1.02 (at <= 2k keys
# hdim 64 causal keeps the Triton kernel: supported()). At 16k keys without a mask 0.95x (7b)
PERSISTENT = os.environ.get("IOATTN_GLUON_PERSISTENT", "auto")
PERSISTENT_MAX_KEYS = 4096
PERSISTENT_CAUSAL = True
# the persistent kernel's order under a causal mask: (batch, head) pairs in groups of HEAD_GROUP,
# each group's longest tiles first (_tile; IOATTN_GLUON_FWD_HEAD_GROUP, 0: one group of all
# pairs). 13f, hdim 128 1k / 2k / 4k causal TFLOP/s, G = 1 / 4 / 16 / all: 386 / 386 / 314 / 322,
# 466 / 454 / 349 / 403, 542 / 410 / 461 / 467 (per-tile 339, 438, 515)
HEAD_GROUP = int(os.environ.get("IOATTN_GLUON_FWD_HEAD_GROUP", "1"))
# dropout, softcap and ALiBi on the persistent kernel too (where use_persistent takes the call without
# them): the per-tile kernel's _attend with the same arguments (dropout: the seed, salt = batch * nheads
# + head, absolute rows and keys, so the same masks; 1 / (1 - p) in the epilogue; ALiBi: the tile's
# slope). Opt-in (IOATTN_GLUON_PERSISTENT_OPTIONS=1) until a GPU run checks it (gpu_suite s24b;
# compiled only). Reason: at 4k causal hdim 128 the persistent kernel is 1.05x the per-tile one (13f),
# and the options (dropout +35% forward, softcap +34%, ALiBi +54%; 19c) ran on the per-tile one
PERSISTENT_OPTIONS = os.environ.get("IOATTN_GLUON_PERSISTENT_OPTIONS", "0") == "1"
# the persistent kernel at head dim 256 (and the padded dims on its tiles, V's the same; up to
# PERSISTENT_MAX_KEYS keys as below), with one Q buffer (SINGLE_Q: two do not fit beside the K/V rings):
# each warpgroup's half takes the next tile's Q once its output store is done, and the producer loads
# the next tile's first K/V blocks before that. Opt-in (IOATTN_GLUON_PERSISTENT_256=1) until a GPU run
# checks it (gpu_suite s24c; compiled only). Reason: hdim 256 1k causal forward 0.88x cuDNN under CUDA
# graphs (22a), where a CTA's Q load and output store (64 KB each) sit beside ~14 us of products
PERSISTENT_256 = os.environ.get("IOATTN_GLUON_PERSISTENT_256", "0") == "1"


def dropout_ok(head_dim, backward=False):
    dims = DROPOUT_BWD_HEAD_DIMS if backward else DROPOUT_HEAD_DIMS
    return DROPOUT == "all" or (DROPOUT == "auto" and head_dim in dims)


@gluon.constexpr_function
def _wgmma_layout(n):
    """Accumulator layout of a warpgroup's m64 x n wgmma (4 warps along the rows)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, int(n), 16])


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty,
              b, h, hk, m0, n_blocks, q_off, k_off):
    # (varlen: b = 0 and the sequence's rows start at q_off / k_off of the packed tensors)
    for w in gl.static_range(2):
        mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, q_off + m0 + w * q_desc.block_type.shape[1], h, 0],
                                        q_bars.index(w), q_smem.index(w))
    if PINGPONG == 2:
        _load_kv_ahead(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, 0, n_blocks, b, k_off, hk)
    else:
        BLOCK_N: gl.constexpr = k_smem.shape[2]
        for j in range(n_blocks):
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, j, b, k_off + j * BLOCK_N,
                     hk)


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, c, b, row, hk):
    """Put keys row .. row + BLOCK_N - 1 (K, then V) into ring position c once it is free."""
    _load_block(k_desc, k_smem, k_ready, k_empty, c, b, row, hk)
    _load_block(v_desc, v_smem, v_ready, v_empty, c, b, row, hk)


@gluon.jit
def _load_block(desc, smem, ready, empty, c, b, row, hk):
    """Put rows row .. row + BLOCK_N - 1 of K or V into position c of its ring once it is free."""
    STAGES: gl.constexpr = smem.shape[0]
    s = c % STAGES
    # a fresh barrier counts as having completed the phase before its first one, so the
    # first pass over the ring does not wait
    ph = ((c // STAGES) & 1) ^ 1
    mbarrier.wait(empty.index(s), ph)
    mbarrier.expect(ready.index(s), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [b, row, hk, 0], ready.index(s), smem.index(s))


@gluon.jit
def _load_kv_ahead(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, c0, n_blocks, b, row0, hk):
    """PINGPONG 2: a tile's n_blocks K/V blocks from key row0 on, into ring positions c0, c0 + 1, ...,
    each K one block ahead of its V (K_0, K_1, V_0, K_2, V_1, ...), so that a K load never waits
    for the release of a V stage."""
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    for j in range(n_blocks):
        _load_block(k_desc, k_smem, k_ready, k_empty, c0 + j, b, row0 + j * BLOCK_N, hk)
        if j > 0:
            _load_block(v_desc, v_smem, v_ready, v_empty, c0 + j - 1, b, row0 + (j - 1) * BLOCK_N, hk)
    if n_blocks > 0:
        _load_block(v_desc, v_smem, v_ready, v_empty, c0 + n_blocks - 1, b, row0 + (n_blocks - 1) * BLOCK_N, hk)


@gluon.jit
def _kv_rings(k_desc, v_desc, STAGES: gl.constexpr):
    """The K/V rings and their ready (TMA bytes) / empty (one arrival per consumer warpgroup)
    barriers."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    return k_smem, v_smem, k_ready, k_empty, v_ready, v_empty


@gluon.jit
def _invalidate(bars):
    N: gl.constexpr = bars.shape[0]
    for i in gl.static_range(N):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _turn_wait(turn, t, WG: gl.constexpr):
    """PINGPONG: wait until the other warpgroup has issued its wgmmas of the turn before this
    warpgroup's t-th (warpgroup 0 goes first: the phase before a fresh barrier's first counts as
    completed). A warpgroup takes n_blocks + 1 turns a tile with keys: one for each block's
    scores (with the previous block's P V) and one for the last P V."""
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (t + 1 - WG) & 1)


@gluon.jit
def _turn_pass(turn, WG: gl.constexpr):
    """PINGPONG: hand the turn to the other warpgroup once this one's wgmmas are issued (the
    arrive waits for the warpgroup's four warps first)."""
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))


@gluon.jit
def _scores_mask(s, offs_m, offs_n, n0, seqlen_k, diag, causal, left):
    """-inf where key n0 + offs_n is past the end, after the query (causal) or more than
    ``left`` keys before it (a sliding window; left < 0: none), bottom-right aligned.
    (MASK_BOUNDS: the same keys from per-row bounds.)"""
    if MASK_BOUNDS:
        # each row's last and first key it may see, relative to n0, then two compares a score
        rows = offs_m + diag - n0
        last = seqlen_k - 1 - n0
        hi = gl.where(causal != 0, gl.minimum(rows, last), last)
        lo = gl.where(left >= 0, rows - left, -1)
        cols = gl.expand_dims(offs_n, 0)
        return gl.where((cols <= gl.expand_dims(hi, 1)) & (cols >= gl.expand_dims(lo, 1)), s, float("-inf"))
    keys = gl.expand_dims(n0 + offs_n, 0)
    rows = gl.expand_dims(offs_m, 1) + diag
    ok = (keys < seqlen_k) & ((keys <= rows) | (causal == 0)) & ((keys >= rows - left) | (left < 0))
    return gl.where(ok, s, float("-inf"))


@gluon.jit
def _tanh(x):
    """The GPU's tanh.approx.f32 (one MUFU instruction), as the Triton kernels use for bf16/fp16."""
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _scores(s, rows, cols, diag, sc_in, sc_out, slope2, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr):
    """Raw q.k -> (scores in log2 units, t) under softcap (s = softcap t, t = tanh(q.k scale /
    softcap), the GPU's tanh.approx as the Triton kernels use for bf16/fp16; the backward's dS
    takes a factor 1 - t^2) and/or ALiBi (- slope |i + sk - sq - j|, after the softcap, as
    FlashAttention-2). rows, cols: the query and key indices, broadcastable to s (either
    orientation: S or S^T); sc_in = scale / softcap, sc_out = softcap log2e (without softcap:
    scale log2e), slope2 = slope log2e. (masks.scores_log2 in Gluon.)"""
    if HAS_SOFTCAP:
        t = _tanh(s * sc_in)
        s = t * sc_out
    else:
        t = s
        s = s * sc_out
    if HAS_ALIBI:
        dist = rows + diag - cols
        s = s - slope2 * gl.where(dist < 0, -dist, dist).to(gl.float32)
    return s, t


@gluon.jit
def _scores_linear(s, offs_m, colb, kn, r0, diag, sc_in, sc_out, slope2, ROWS: gl.constexpr,
                   BLOCK_N: gl.constexpr, HAS_SOFTCAP: gl.constexpr):
    """ALIBI_LINEAR: _scores of the key block from kn for rows r0.. as (scores less a row term,
    the row term), colb = slope2 * (0 .. BLOCK_N - 1). With r = slope2 (kn - d - i) per row,
    the bias - slope2 |i + d - j| is r + colb for keys all at or before every row's diagonal
    (j <= i + d), - r - colb for keys all at or after it: one FMA a score, the row term apart;
    across the diagonal - |r + colb| (an add and an abs a score, no int work), row term 0."""
    if HAS_SOFTCAP:
        s = _tanh(s * sc_in)
    r = slope2 * (kn - diag - offs_m).to(gl.float32)
    left = kn + BLOCK_N - 1 <= r0 + diag
    if left | (kn >= r0 + ROWS - 1 + diag):
        sign = gl.where(left, 1.0, -1.0)
        s = s * sc_out + gl.expand_dims(colb * sign, 0)
        rterm = r * sign
    else:
        s = s * sc_out - gl.abs(gl.expand_dims(r, 1) + gl.expand_dims(colb, 0))
        rterm = r * 0.0
    return s, rterm


@gluon.jit
def _softmax_rows(s, rterm, m_i, l_i, qk_scale):
    """_softmax of the scores s + rterm, the row term kept apart (ALIBI_LINEAR): it enters the
    running max, and each score's exponent through its row's (max - rterm)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) + rterm)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims((m_use - rterm) * qk_scale, 1))
    alpha = gl.exp2((m_i - m_use) * qk_scale)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _softmax(s, m_i, l_i, qk_scale):
    """Online softmax of one block of raw scores: (P, new max, new sum, rescale factor)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    # rows that have seen no key yet keep m = -inf: use 0 so exp2 gives 0, never NaN
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use * qk_scale, 1))
    alpha = gl.exp2((m_i - m_use) * qk_scale)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _keep_early(seed, salt, r0, n0, dropout_p, ROWS: gl.constexpr, N: gl.constexpr, HAS_DROPOUT: gl.constexpr):
    """HAS_DROPOUT 3: dropout_sm90.keep_words_rows of queries r0.., keys n0.. (Philox and the byte
    compare: ~3/4 of the mask's instructions), called between issuing the scores' wgmma and
    waiting for it, so that it runs in the shadow of the tensor cores; otherwise a placeholder.
    (Its words, 16 registers a thread, wait there; the int16 lane masks themselves, 32, spilled
    at hdim 128.)"""
    if HAS_DROPOUT == 3:
        keep = dropout_sm90.keep_words_rows(seed, salt, r0, n0, dropout_p, ROWS, N)
    else:
        keep = 0
    return keep


@gluon.jit
def _dropout(p32, keep, seed, salt, r0, n0, dropout_p, dtype: gl.constexpr, HAS_DROPOUT: gl.constexpr):
    """P (fp32, wgmma layout) -> the P V operand in ``dtype`` with the dropped entries zeroed
    (HAS_DROPOUT 1: a select per fp32 element; 2: on the converted 16-bit pairs,
    dropout_sm90.drop_packed_rows, the same kept entries in about half the instructions; 3: as 2
    with the masks drawn before the scores' wait, ``keep`` from _keep_early). Queries r0.., keys n0.."""
    if HAS_DROPOUT == 3:
        words, sel_lo, sel_hi = keep
        return dropout_sm90.apply_lanes(p32.to(dtype), dropout_sm90.keep_lanes(words, sel_lo, sel_hi))
    if HAS_DROPOUT == 2:
        return dropout_sm90.drop_packed_rows(p32.to(dtype), seed, salt, r0, n0, dropout_p)
    if HAS_DROPOUT:
        p32 = dropout_sm90.dropout_rows(p32, seed, salt, r0, n0, dropout_p)
    return p32.to(dtype)


@gluon.jit
def _block_probs(s, keep, kn, m_i, l_i, offs_m, offs_n, colb, r0, diag, full_hi, win_lo, seqlen_k, causal, left,
                 qk_scale, sc_in, sc_out, slope2, seed, salt, dropout_p, dtype: gl.constexpr, p_layout: gl.constexpr,
                 HAS_DROPOUT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr):
    """The raw scores s of the key block from kn -> (P, the P V operand in p_layout; the new running
    max and sum; the rescale factor): softcap / ALiBi (_scores, or _scores_linear), the mask where
    the block needs one, the online softmax, dropout."""
    ROWS: gl.constexpr = s.shape[0]
    BLOCK_N: gl.constexpr = s.shape[1]
    if ALIBI_LINEAR and HAS_ALIBI:
        s, rterm = _scores_linear(s, offs_m, colb, kn, r0, diag, sc_in, sc_out, slope2, ROWS, BLOCK_N, HAS_SOFTCAP)
    elif HAS_SOFTCAP or HAS_ALIBI:
        s, _ = _scores(s, gl.expand_dims(offs_m, 1), gl.expand_dims(kn + offs_n, 0), diag, sc_in, sc_out,
                       slope2, HAS_SOFTCAP, HAS_ALIBI)
    if (kn + BLOCK_N > full_hi) | (kn < win_lo):
        s = _scores_mask(s, offs_m, offs_n, kn, seqlen_k, diag, causal, left)
    if ALIBI_LINEAR and HAS_ALIBI:
        p32, m_i, l_i, alpha = _softmax_rows(s, rterm, m_i, l_i, qk_scale)
    else:
        p32, m_i, l_i, alpha = _softmax(s, m_i, l_i, qk_scale)
    p = gl.convert_layout(_dropout(p32, keep, seed, salt, r0, kn, dropout_p, dtype, HAS_DROPOUT), p_layout)
    return p, m_i, l_i, alpha


@gluon.jit
def _attend(q2, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, c0, n_blocks, r0, seqlen_q, seqlen_k, qk_scale,
            causal, left, n_lo, seed, salt, dropout_p, HAS_DROPOUT: gl.constexpr, sc_in, sc_out, slope2,
            HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, turn, t0, WG: gl.constexpr):
    """One warpgroup's 64 query rows (from row r0) against the n_blocks key blocks from key
    n_lo on (n_lo > 0 only under a sliding window of ``left`` keys), which the producer puts
    in the K/V rings as blocks c0, c0 + 1, ... of this CTA: the unnormalized output, the
    running max and the running sum. With HAS_DROPOUT the dropped probabilities are left out
    of P V (the sum keeps them; the 1 / (1 - p) comes in the epilogue): the masks of
    masks.dropout_keep, drawn by dropout_sm90 for (seed, salt = batch * nheads + head). With
    HAS_SOFTCAP / HAS_ALIBI the scores go through _scores first (then qk_scale is 1). PINGPONG:
    warpgroup WG issues its wgmmas in turns with the other one, t0 its turns before this tile."""
    dtype: gl.constexpr = q2.dtype
    ROWS: gl.constexpr = q2.shape[0]
    HEAD_DIM: gl.constexpr = q2.shape[1]
    HEAD_DIM_V: gl.constexpr = v_smem.shape[4]  # (VALUE_DIMS: V's own, <= HEAD_DIM)
    STAGES: gl.constexpr = k_smem.shape[0]
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N)
    o_layout: gl.constexpr = _wgmma_layout(HEAD_DIM_V)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    kv2_layout: gl.constexpr = _TILE2
    diag = seqlen_k - seqlen_q
    # keys every row of this warpgroup sees: [win_lo, full_hi); blocks inside need no mask
    full_hi = seqlen_k
    if causal != 0:
        full_hi = gl.minimum(full_hi, r0 + diag + 1)
    win_lo = 0
    if left >= 0:
        win_lo = r0 + ROWS - 1 + diag - left
    offs_m = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    o = gl.zeros([ROWS, HEAD_DIM_V], gl.float32, o_layout)
    s_init = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    p = gl.zeros([ROWS, BLOCK_N], dtype, p_layout)
    if ALIBI_LINEAR and HAS_ALIBI:
        colb = slope2 * offs_n.to(gl.float32)
    else:
        colb = 0.0  # (not read)

    if n_blocks > 0:
        st = c0 % STAGES
        mbarrier.wait(k_ready.index(st), (c0 // STAGES) & 1)
        k0 = k_smem.index(st)._reinterpret(dtype, [BLOCK_N, HEAD_DIM], kv2_layout)
        _turn_wait(turn, t0, WG)
        s_tok = warpgroup_mma(q2, k0.permute((1, 0)), s_init, use_acc=False, is_async=True)
        _turn_pass(turn, WG)
        keep = _keep_early(seed, salt, r0, n_lo, dropout_p, ROWS, BLOCK_N, HAS_DROPOUT)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(st))
        p, m_i, l_i, alpha = _block_probs(s, keep, n_lo, m_i, l_i, offs_m, offs_n, colb, r0, diag, full_hi, win_lo,
                                          seqlen_k, causal, left, qk_scale, sc_in, sc_out, slope2, seed, salt,
                                          dropout_p, dtype, p_layout, HAS_DROPOUT, HAS_SOFTCAP, HAS_ALIBI)

    for j in range(1, n_blocks):
        c = c0 + j
        st = c % STAGES
        mbarrier.wait(k_ready.index(st), (c // STAGES) & 1)
        kj = k_smem.index(st)._reinterpret(dtype, [BLOCK_N, HEAD_DIM], kv2_layout)
        _turn_wait(turn, t0 + j, WG)
        s_tok = warpgroup_mma(q2, kj.permute((1, 0)), s_init, use_acc=False, is_async=True)
        # P V of the previous block runs on the tensor cores behind the scores
        sp = (c - 1) % STAGES
        mbarrier.wait(v_ready.index(sp), ((c - 1) // STAGES) & 1)
        vp = v_smem.index(sp)._reinterpret(dtype, [BLOCK_N, HEAD_DIM_V], kv2_layout)
        o_tok = warpgroup_mma(p, vp, o, is_async=True)
        _turn_pass(turn, WG)
        kn = n_lo + j * BLOCK_N
        # (HAS_DROPOUT 3: the keep masks while the tensor cores compute the scores)
        keep = _keep_early(seed, salt, r0, kn, dropout_p, ROWS, BLOCK_N, HAS_DROPOUT)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))  # groups retire in order: the scores are done
        mbarrier.arrive(k_empty.index(st))
        p_next, m_i, l_i, alpha = _block_probs(s, keep, kn, m_i, l_i, offs_m, offs_n, colb, r0, diag, full_hi,
                                               win_lo, seqlen_k, causal, left, qk_scale, sc_in, sc_out, slope2, seed,
                                               salt, dropout_p, dtype, p_layout, HAS_DROPOUT, HAS_SOFTCAP, HAS_ALIBI)
        o, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        mbarrier.arrive(v_empty.index(sp))
        o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p = p_next

    if n_blocks > 0:
        c = c0 + n_blocks - 1
        sl = c % STAGES
        mbarrier.wait(v_ready.index(sl), (c // STAGES) & 1)
        vl = v_smem.index(sl)._reinterpret(dtype, [BLOCK_N, HEAD_DIM_V], kv2_layout)
        _turn_wait(turn, t0 + n_blocks, WG)
        o_tok = warpgroup_mma(p, vl, o, is_async=True)
        _turn_pass(turn, WG)
        o, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        mbarrier.arrive(v_empty.index(sl))
    return o, m_i, l_i


@gluon.jit
def _out_views(q_tile, o_desc):
    """The buffer of a warpgroup's output tile: its Q tile's (free once the last product has
    retired), as o_desc's 4-D TMA tile and as the 2-D view the consumer writes; with V's own head
    dim (VALUE_DIMS, smaller than Q's) the front of that buffer, in the output's layout."""
    ROWS: gl.constexpr = o_desc.block_type.shape[1]
    HEAD_DIM_V: gl.constexpr = o_desc.block_type.shape[3]
    if HEAD_DIM_V == q_tile.shape[3]:
        o_tile = q_tile
    else:
        o_tile = q_tile._reinterpret(o_desc.dtype, o_desc.block_type.shape, o_desc.layout)
    return o_tile, o_tile._reinterpret(o_desc.dtype, [ROWS, HEAD_DIM_V], _TILE2)


@gluon.jit
def _epilogue(o, m_i, l_i, o2, o_tile, o_desc, LSE, b, h, r0, seqlen_q, stride_lb, stride_lh, qk_scale, o_scale):
    """Normalize a warpgroup's output and start its TMA store from the Q tile's buffer (o_tile
    and its 2-D view o2, _out_views; the store drops rows past seqlen_q); rows that saw no key
    get out = 0 and lse = -inf; o_scale: 1, or 1 / (1 - p) under dropout. The caller waits for
    the store (tma.store_wait)."""
    ROWS: gl.constexpr = o2.shape[0]
    o_layout: gl.constexpr = o.type.layout
    s_layout: gl.constexpr = m_i.type.layout.parent
    offs_m = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    empty = l_i == 0.0
    inv_l = o_scale / gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i * qk_scale + gl.log2(gl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    gl.store(LSE + b.to(gl.int64) * stride_lb + h * stride_lh + offs_m, lse, mask=offs_m < seqlen_q)
    o = o * gl.expand_dims(gl.convert_layout(inv_l, gl.SliceLayout(1, o_layout)), 1)
    o2.store(o.to(o2.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, r0, h, 0], o_tile)


@gluon.jit
def _consumer(o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
              b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal,
              O, stride_os, stride_oh, left, n_lo, drop_smem, seed, salt, dropout_p, o_scale, sc_in, sc_out, slope2,
              turn, WG: gl.constexpr, VARLEN: gl.constexpr):
    ROWS: gl.constexpr = o_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[4]
    r0 = m0 + WG * ROWS
    q_tile = q_smem.index(WG)
    # 2-D view of the (1, rows, 1, dim) TMA tile: rows of 128 or 256 bytes, 128-byte swizzle
    q2 = q_tile._reinterpret(o_desc.dtype, [ROWS, HEAD_DIM], _TILE2)
    # whether dropout applies: a compile-time fact carried by the shape of a placeholder
    # allocation (gl.warp_specialize would make a constexpr argument a run-time value)
    # (1 + HAS_DROPOUT + 4 HAS_SOFTCAP + 8 HAS_ALIBI, HAS_DROPOUT in 0..3)
    HAS_DROPOUT: gl.constexpr = (drop_smem.shape[0] - 1) % 4
    HAS_SOFTCAP: gl.constexpr = (drop_smem.shape[0] - 1) // 4 % 2 == 1
    HAS_ALIBI: gl.constexpr = (drop_smem.shape[0] - 1) // 8 == 1
    mbarrier.wait(q_bars.index(WG), 0)
    o, m_i, l_i = _attend(q2, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, 0, n_blocks, r0, seqlen_q,
                          seqlen_k, qk_scale, causal, left, n_lo, seed, salt, dropout_p, HAS_DROPOUT, sc_in, sc_out,
                          slope2, HAS_SOFTCAP, HAS_ALIBI, turn, 0, WG)
    o_tile, o2 = _out_views(q_tile, o_desc)
    if VARLEN:
        # a TMA store of the tile would write into the next sequence: a masked store instead
        # (a run-time branch between the two epilogues crashes the compiler's LLVM lowering)
        # (o_desc.shape[3]: the output's own head dim, less than the tile's when padded, PAD_DIMS)
        _epilogue_masked(o, m_i, l_i, o2, O, LSE, h, r0, seqlen_q, stride_os, stride_oh, stride_lh, qk_scale,
                         o_scale, o_desc.shape[3])
    else:
        _epilogue(o, m_i, l_i, o2, o_tile, o_desc, LSE, b, h, r0, seqlen_q, stride_lb, stride_lh, qk_scale, o_scale)
        tma.store_wait(0)


@gluon.jit
def _epilogue_masked(o, m_i, l_i, o2, O, LSE, h, r0, seqlen_q, stride_os, stride_oh, stride_lh, qk_scale, o_scale,
                     n_cols):
    """The varlen epilogue (O and LSE point at the sequence's first row): the normalized tile
    goes through the Q tile's buffer (o2, _out_views) into a row-major layout, then to memory by
    a store that drops the rows past the sequence (a TMA store would write into the next one)
    and the columns from n_cols on (a padded head dim's, a multiple of 8: tested per group of 8
    columns, so that the mask is constant over each thread's 8 contiguous columns)."""
    ROWS: gl.constexpr = o2.shape[0]
    HEAD_DIM: gl.constexpr = o2.shape[1]
    o_layout: gl.constexpr = o.type.layout
    s_layout: gl.constexpr = m_i.type.layout.parent
    offs_m = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    empty = l_i == 0.0
    inv_l = o_scale / gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i * qk_scale + gl.log2(gl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    gl.store(LSE + h * stride_lh + offs_m, lse, mask=offs_m < seqlen_q)
    o = o * gl.expand_dims(gl.convert_layout(inv_l, gl.SliceLayout(1, o_layout)), 1)
    o2.store(o.to(o2.dtype))
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
    ot = o2.load(rows_layout)
    rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, rows_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_layout))
    ptrs = O + gl.expand_dims(rows.to(gl.int64) * stride_os, 1) + h * stride_oh + gl.expand_dims(cols, 0)
    gl.store(ptrs, ot, mask=gl.expand_dims(rows < seqlen_q, 1) & gl.expand_dims(cols // 8 < n_cols // 8, 0))


# one wrapper per (warpgroup, varlen): constexprs do not pass through gl.warp_specialize
@gluon.jit
def _consumer_wg0(o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
              b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal, O, stride_os, stride_oh,
              left, n_lo, drop_smem, seed, salt, dropout_p, o_scale, sc_in, sc_out, slope2, turn):
    _consumer(o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
              b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal,
              O, stride_os, stride_oh, left, n_lo, drop_smem, seed, salt, dropout_p, o_scale, sc_in, sc_out, slope2,
              turn, 0, False)


@gluon.jit
def _consumer_wg0_varlen(o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
              b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal, O, stride_os, stride_oh,
              left, n_lo, drop_smem, seed, salt, dropout_p, o_scale, sc_in, sc_out, slope2, turn):
    _consumer(o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
              b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal,
              O, stride_os, stride_oh, left, n_lo, drop_smem, seed, salt, dropout_p, o_scale, sc_in, sc_out, slope2,
              turn, 0, True)


@gluon.jit
def _consumer_wg1(o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
              b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal, O, stride_os, stride_oh,
              left, n_lo, drop_smem, seed, salt, dropout_p, o_scale, sc_in, sc_out, slope2, turn):
    _consumer(o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
              b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal,
              O, stride_os, stride_oh, left, n_lo, drop_smem, seed, salt, dropout_p, o_scale, sc_in, sc_out, slope2,
              turn, 1, False)


@gluon.jit
def _consumer_wg1_varlen(o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
              b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal, O, stride_os, stride_oh,
              left, n_lo, drop_smem, seed, salt, dropout_p, o_scale, sc_in, sc_out, slope2, turn):
    _consumer(o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
              b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal,
              O, stride_os, stride_oh, left, n_lo, drop_smem, seed, salt, dropout_p, o_scale, sc_in, sc_out, slope2,
              turn, 1, True)


@gluon.jit
def _turn_barriers(placeholder):
    """PINGPONG's two turn barriers (one arrival each: the other warpgroup's), else ``placeholder``
    (any shared memory; not used)."""
    if PINGPONG:
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
    else:
        turn = placeholder
    return turn


@gluon.jit
def _attn_fwd_sm90(q_desc, k_desc, v_desc, o_desc, LSE, stride_lb, stride_lh,
                   seqlen_q, seqlen_k, nheads, group, qk_scale, O, stride_os, stride_oh, CU_Q, CU_K, left,
                   RNG, dropout_p, o_scale, ALIBI, stride_ab, sc_in, sc_out,
                   CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, IS_VARLEN: gl.constexpr,
                   HAS_DROPOUT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr):
    ROWS: gl.constexpr = q_desc.block_type.shape[1]
    # the last query blocks have the most keys to visit under a causal mask: start them first
    m0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * (2 * ROWS)
    bh = gl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // group
    seed = 0
    if HAS_DROPOUT:  # rng_state = (seed, offset), as the Triton kernels read it
        seed = gl.load(RNG) + gl.load(RNG + 1)
    slope2 = 0.0
    if HAS_ALIBI:  # (b: the sequence, also under varlen)
        slope2 = gl.load(ALIBI + b * stride_ab + h).to(gl.float32) * 1.4426950408889634
    q_off = 0
    k_off = 0
    if IS_VARLEN:
        # packed (1, total, heads, dim) tensors: sequence b's rows from cu_seqlens
        q_off = gl.load(CU_Q + b)
        seqlen_q = gl.load(CU_Q + b + 1) - q_off
        k_off = gl.load(CU_K + b)
        seqlen_k = gl.load(CU_K + b + 1) - k_off
        LSE += q_off
        O += q_off.to(gl.int64) * stride_os
        b = 0
        if m0 >= seqlen_q:
            return
    hi = seqlen_k
    if CAUSAL:
        hi = gl.minimum(hi, gl.minimum(m0 + 2 * ROWS, seqlen_q) + seqlen_k - seqlen_q)
    # a sliding window of `left` keys (left < 0: none): start at the block of the first row's first key
    lo = 0
    if left >= 0:
        lo = gl.maximum(m0 + seqlen_k - seqlen_q - left, 0) // BLOCK_N
    n_blocks = gl.maximum((gl.maximum(hi, 0) + BLOCK_N - 1) // BLOCK_N - lo, 0)
    n_lo = lo * BLOCK_N
    causal = 1 if CAUSAL else 0

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    k_smem, v_smem, k_ready, k_empty, v_ready, v_empty = _kv_rings(k_desc, v_desc, STAGES)
    # (unused: its shape tells the consumers HAS_DROPOUT, HAS_SOFTCAP and HAS_ALIBI)
    drop_smem = gl.allocate_shared_memory(gl.int64, [1 + HAS_DROPOUT + 4 * HAS_SOFTCAP + 8 * HAS_ALIBI],
                                          mbarrier.MBarrierLayout())
    turn = _turn_barriers(q_bars)

    consumer_args = (o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty, LSE,
                     b, h, m0, n_blocks, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal,
                     O, stride_os, stride_oh, left, n_lo, drop_smem, seed, bh, dropout_p, o_scale, sc_in, sc_out, slope2,
                     turn)
    producer_args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_ready, k_empty, v_ready, v_empty,
                     b, h, hk, m0, n_blocks, q_off, k_off + n_lo)
    if IS_VARLEN:
        gl.warp_specialize([(_consumer_wg0_varlen, consumer_args), (_consumer_wg1_varlen, consumer_args),
                            (_producer, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(_consumer_wg0, consumer_args), (_consumer_wg1, consumer_args),
                            (_producer, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    _invalidate(q_bars)
    if PINGPONG:
        _invalidate(turn)
    _invalidate(k_ready)
    _invalidate(v_ready)
    _invalidate(k_empty)
    _invalidate(v_empty)


# Persistent variant: one CTA per SM walks over (128-row block, batch x head) tiles, so the
# producer loads the next tile's Q and first K/V blocks while the consumers finish the current
# one, and a tile's output store overlaps the next tile's products. Q is double-buffered
# across tiles (2 x 2 warpgroup halves); the K/V rings run on across tile boundaries.


@gluon.jit
def _tile(tile, n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k, ROWS2: gl.constexpr, BLOCK_N: gl.constexpr,
          causal, head_group):
    """Coordinates of a tile (which tiles a CTA takes: _cta_tile). Without a mask the 128-row
    blocks of one (batch, head) are consecutive (CTAs running together share its K/V in L2);
    under a causal mask the (batch, head) pairs go in groups of head_group, each group's tiles by
    decreasing work (its pairs' last row blocks first). head_group = all pairs was the order of
    sessions 7-12: the per-tile grid lost 5-20% to it (the K/V of every head at once, beyond the
    L2: results/h200-session13e); by (batch, head) first with CTA p taking tiles p, p + grid, ...
    a grid of 132 against 128 row blocks gave one CTA three times the work of another (0.78x
    cuDNN at 16k, results/h200-session7b), which the zigzag of _cta_tile evens out."""
    if causal != 0:
        n_bh = n_tiles // n_mblocks
        grp = tile // (head_group * n_mblocks)
        r = tile - grp * head_group * n_mblocks
        g_size = gl.minimum(head_group, n_bh - grp * head_group)
        bh = grp * head_group + r % g_size
        m0 = (n_mblocks - 1 - r // g_size) * ROWS2
    else:
        bh = tile // n_mblocks
        m0 = (n_mblocks - 1 - tile % n_mblocks) * ROWS2
    b = bh // nheads
    h = bh % nheads
    hi = seqlen_k
    if causal != 0:
        hi = gl.minimum(hi, gl.minimum(m0 + ROWS2, seqlen_q) + seqlen_k - seqlen_q)
    return b, h, h // group, m0, (gl.maximum(hi, 0) + BLOCK_N - 1) // BLOCK_N


@gluon.jit
def _cta_tiles(n_tiles, causal):
    """How many tiles this CTA takes (the k-th: _cta_tile)."""
    n_cta = gl.num_programs(0)
    rounds = n_tiles // n_cta
    pos = gl.program_id(0)
    if (causal != 0) & (rounds % 2 == 1):
        pos = n_cta - 1 - pos
    return rounds + (pos < n_tiles - rounds * n_cta).to(gl.int32)


@gluon.jit
def _cta_tile(k, causal):
    """The k-th tile of this CTA: p, p + grid, p + 2 grid, ... without a mask; under a causal
    mask a zigzag (round k from the other end when k is odd: p, 2 grid - 1 - p, 2 grid + p, ...),
    so that a CTA that took one of a round's longest tiles takes one of the next round's shortest."""
    n_cta = gl.num_programs(0)
    pos = gl.program_id(0)
    if (causal != 0) & (k % 2 == 1):
        pos = n_cta - 1 - pos
    return k * n_cta + pos


@gluon.jit
def _producer_persistent(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                         v_ready, v_empty, n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k, causal,
                         head_group):
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    ROWS: gl.constexpr = q_smem.shape[2]
    STAGES: gl.constexpr = k_smem.shape[0]
    SINGLE_Q: gl.constexpr = q_smem.shape[0] == 2  # (one Q buffer: the kernel's SINGLE_Q)
    c = 0  # K/V blocks loaded by this CTA so far (position in the rings)
    i = 0  # tiles so far (Q buffer i % 2)
    for kt in range(_cta_tiles(n_tiles, causal)):
        b, h, hk, m0, n_blocks = _tile(_cta_tile(kt, causal), n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k,
                                       2 * ROWS, BLOCK_N, causal, head_group)
        if SINGLE_Q:
            # one Q buffer (head dim 256): each warpgroup's half of it is free once that warpgroup's output
            # store has read it (q_empty of that warpgroup). The tile's first K/V blocks go first: their ring
            # slots free up as the consumers finish the previous tile, before its output stores
            n_first = gl.minimum(n_blocks, STAGES)
            for j in range(n_first):
                _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, c + j, b, j * BLOCK_N,
                         hk)
            for w in gl.static_range(2):
                mbarrier.wait(q_empty.index(w), (i & 1) ^ 1)
                mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [b, m0 + w * ROWS, h, 0], q_ready.index(w), q_smem.index(w))
            for j in range(n_first, n_blocks):
                _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, c + j, b, j * BLOCK_N,
                         hk)
            c += n_blocks
        else:
            qb = i % 2
            mbarrier.wait(q_empty.index(qb), ((i // 2) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qb), 2 * q_desc.block_type.nbytes)
            for w in gl.static_range(2):
                tma.async_copy_global_to_shared(q_desc, [b, m0 + w * ROWS, h, 0], q_ready.index(qb),
                                                q_smem.index(2 * qb + w))
            if PINGPONG == 2:
                _load_kv_ahead(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, c, n_blocks, b, 0,
                               hk)
                c += n_blocks
            else:
                for j in range(n_blocks):
                    _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, c, b, j * BLOCK_N,
                             hk)
                    c += 1
        i += 1


@gluon.jit
def _consumer_persistent(o_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                         LSE, n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k, stride_lb, stride_lh,
                         qk_scale, causal, head_group, turn, drop_smem, seed, dropout_p, o_scale, ALIBI, stride_ab,
                         sc_in, sc_out, WG: gl.constexpr):
    ROWS: gl.constexpr = o_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[4]
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    # the options from the placeholder's shape, as in _consumer (1 + HAS_DROPOUT + 4 HAS_SOFTCAP + 8 HAS_ALIBI)
    HAS_DROPOUT: gl.constexpr = (drop_smem.shape[0] - 1) % 4
    HAS_SOFTCAP: gl.constexpr = (drop_smem.shape[0] - 1) // 4 % 2 == 1
    HAS_ALIBI: gl.constexpr = (drop_smem.shape[0] - 1) // 8 == 1
    SINGLE_Q: gl.constexpr = q_smem.shape[0] == 2  # (one Q buffer: the kernel's SINGLE_Q)
    c = 0
    i = 0
    t = 0  # (PINGPONG: turns taken, n_blocks + 1 a tile with keys)
    for kt in range(_cta_tiles(n_tiles, causal)):
        b, h, hk, m0, n_blocks = _tile(_cta_tile(kt, causal), n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k,
                                       2 * ROWS, BLOCK_N, causal, head_group)
        r0 = m0 + WG * ROWS
        if SINGLE_Q:  # (one Q buffer, this warpgroup's half: its own barriers)
            q_tile = q_smem.index(WG)
            mbarrier.wait(q_ready.index(WG), i & 1)
        else:
            qb = i % 2
            q_tile = q_smem.index(2 * qb + WG)
            mbarrier.wait(q_ready.index(qb), (i // 2) & 1)
            if i > 0:
                # the previous tile's output store has read the other Q buffer: give it back
                tma.store_wait(0)
                mbarrier.arrive(q_empty.index(1 - qb))
        q2 = q_tile._reinterpret(o_desc.dtype, [ROWS, HEAD_DIM], _TILE2)
        slope2 = 0.0
        if HAS_ALIBI:  # this tile's (batch, head) slope, as the per-tile kernel loads it
            slope2 = gl.load(ALIBI + b * stride_ab + h).to(gl.float32) * 1.4426950408889634
        # (dropout: the per-tile kernel's salt, batch * nheads + head, and absolute rows / keys)
        o, m_i, l_i = _attend(q2, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, c, n_blocks, r0, seqlen_q,
                              seqlen_k, qk_scale, causal, -1, 0, seed, b * nheads + h, dropout_p, HAS_DROPOUT, sc_in,
                              sc_out, slope2, HAS_SOFTCAP, HAS_ALIBI, turn, t, WG)
        o_tile, o2 = _out_views(q_tile, o_desc)
        _epilogue(o, m_i, l_i, o2, o_tile, o_desc, LSE, b, h, r0, seqlen_q, stride_lb, stride_lh, qk_scale, o_scale)
        if SINGLE_Q:  # the next tile's Q comes into this buffer once the store has read it
            tma.store_wait(0)
            mbarrier.arrive(q_empty.index(WG))
        if PINGPONG:
            t += n_blocks + (n_blocks > 0).to(gl.int32)
        c += n_blocks
        i += 1
    tma.store_wait(0)


@gluon.jit
def _consumer_persistent_wg0(o_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                             LSE, n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k, stride_lb, stride_lh,
                             qk_scale, causal, head_group, turn, drop_smem, seed, dropout_p, o_scale, ALIBI,
                             stride_ab, sc_in, sc_out):
    _consumer_persistent(o_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                         LSE, n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k, stride_lb, stride_lh,
                         qk_scale, causal, head_group, turn, drop_smem, seed, dropout_p, o_scale, ALIBI, stride_ab,
                         sc_in, sc_out, 0)


@gluon.jit
def _consumer_persistent_wg1(o_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                             LSE, n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k, stride_lb, stride_lh,
                             qk_scale, causal, head_group, turn, drop_smem, seed, dropout_p, o_scale, ALIBI,
                             stride_ab, sc_in, sc_out):
    _consumer_persistent(o_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                         LSE, n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k, stride_lb, stride_lh,
                         qk_scale, causal, head_group, turn, drop_smem, seed, dropout_p, o_scale, ALIBI, stride_ab,
                         sc_in, sc_out, 1)


@gluon.jit
def _attn_fwd_sm90_persistent(q_desc, k_desc, v_desc, o_desc, LSE, stride_lb, stride_lh,
                              seqlen_q, seqlen_k, nheads, group, qk_scale, n_tiles, n_mblocks, head_group,
                              RNG, dropout_p, o_scale, ALIBI, stride_ab, sc_in, sc_out,
                              CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                              HAS_DROPOUT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
                              SINGLE_Q: gl.constexpr):
    causal = 1 if CAUSAL else 0
    seed = 0
    if HAS_DROPOUT:  # rng_state = (seed, offset), as the Triton kernels read it (PERSISTENT_OPTIONS)
        seed = gl.load(RNG) + gl.load(RNG + 1)
    dtype: gl.constexpr = q_desc.dtype
    # Q buffers: two (a tile's two warpgroup halves each, the next tile's loaded under the current one),
    # or with SINGLE_Q one (head dim 256, where two do not fit beside the K/V rings: PERSISTENT_256), each
    # half with barriers of its own (ready: the TMA's bytes; empty: its warpgroup's output store is done)
    q_smem = gl.allocate_shared_memory(dtype, [2 if SINGLE_Q else 4] + q_desc.block_type.shape, q_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1 if SINGLE_Q else 2)  # (two: one arrival per consumer warpgroup)
    k_smem, v_smem, k_ready, k_empty, v_ready, v_empty = _kv_rings(k_desc, v_desc, STAGES)
    turn = _turn_barriers(q_ready)
    # (unused: its shape tells the consumers HAS_DROPOUT, HAS_SOFTCAP and HAS_ALIBI)
    drop_smem = gl.allocate_shared_memory(gl.int64, [1 + HAS_DROPOUT + 4 * HAS_SOFTCAP + 8 * HAS_ALIBI],
                                          mbarrier.MBarrierLayout())

    consumer_args = (o_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, LSE,
                     n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k, stride_lb, stride_lh, qk_scale, causal,
                     head_group, turn, drop_smem, seed, dropout_p, o_scale, ALIBI, stride_ab, sc_in, sc_out)
    gl.warp_specialize([
        (_consumer_persistent_wg0, consumer_args),
        (_consumer_persistent_wg1, consumer_args),
        (_producer_persistent, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                                v_ready, v_empty, n_tiles, n_mblocks, nheads, group, seqlen_q, seqlen_k, causal,
                                head_group)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    _invalidate(q_ready)
    _invalidate(q_empty)
    if PINGPONG:
        _invalidate(turn)
    _invalidate(k_ready)
    _invalidate(v_ready)
    _invalidate(k_empty)
    _invalidate(v_empty)


HEAD_DIMS = (64, 128, 256)
# V with a head dim of its own (DeepSeek's MLA: q/k 192, v 128): V's tiles, the P V products and
# the output take dv, and the output tile goes out through the front of the Q tile's buffer
# (_out_views), so dv < d; Q/K head dims VALUE_QK_DIMS, V's one of HEAD_DIMS. Gluon's tiles need
# power-of-two shapes: Q/K head dim 192 runs as 256 (_kernel_dim), the TMA filling the columns past
# the tensor's 192 with zeros, which add nothing to Q K^T (the scores' products grow by a third,
# the forward's by a fifth at 192/128). Shared memory (bf16, 2 stages; sm_90a compiles, no
# spills): 192/128 and 256/128 164 KB with 64-key blocks (128 would not fit), 128/64 131 KB
# with 128, 256/64 and 192/64 148 KB with 128. H100, session 19 (results/h100-session19a): 60/60
# kernel checks vs fp64, 12/12 public-API forward+backward checks next to the Triton path; 192/128
# bf16 forward 490-537 TFLOP/s vs the Triton forward's 237-280 (1.9-2.1x) and cuDNN's 543-612
# (0.86-0.93x). IOATTN_GLUON_VALUE_DIMS=0 sends dv != d to the Triton forward
VALUE_DIMS = os.environ.get("IOATTN_GLUON_VALUE_DIMS", "1") == "1"
VALUE_QK_DIMS = (128, 192, 256)
_SMEM_BUDGET = 220 * 1024  # of sm_90's 227 KB a CTA, the rest for barriers and the compiler's scratch


def _smem_bytes(head_dim, head_dim_v, block_n, stages):
    """Shared memory of the per-tile kernel's buffers (16-bit elements): two Q tiles (one per
    warpgroup, later the output tiles) and the K/V rings."""
    return 2 * (2 * HALF_M * head_dim + stages * block_n * (head_dim + head_dim_v))


# head dims between the kernel's (multiples of 8 from 40 to 248: 40, 80, 96, 160, ...) run on the tiles of
# the next one of HEAD_DIMS, as 192 does: the TMA fills Q's, K's and V's columns past the tensor's with
# zeros (adding nothing to Q K^T and giving zero output columns) and the output's TMA store drops them.
# (The packed-varlen epilogue, a store through pointers, drops those columns by a mask.)
# The products grow by kernel dim / head dim (96: 4/3). The Triton kernels pad too (their blocks are
# powers of two), and this won at each dim timed (80, 96, 160 forward; 80, 96 backward). Checked against
# fp64 and timed on the H100 in gpu_suite s22c (benchmarks/results/h100-session24a): hdim 96 forward
# 1.26-1.72x, backward 1.30-1.33x the Triton kernels. Not 32, which the Triton kernels run unpadded:
# padded to 64 it ran at 0.77-0.83x of them forward, 0.81-1.0x backward.
# IOATTN_GLUON_PAD_DIMS=0 sends all of them to the Triton kernels
PAD_DIMS = os.environ.get("IOATTN_GLUON_PAD_DIMS", "1") == "1"


def padded_dim(head_dim):
    """The one of HEAD_DIMS a padded head dim runs as (PAD_DIMS), else None: multiples of 8 from 40 to
    248 that are not powers of two."""
    if head_dim in HEAD_DIMS or head_dim % 8 or not 32 < head_dim <= 256 or head_dim & (head_dim - 1) == 0:
        return None
    return next(d for d in HEAD_DIMS if d >= head_dim)


def _kernel_dim(head_dim):
    """The head dim the kernel's tiles take: head_dim, 256 for 192 (VALUE_QK_DIMS), or a padded
    head dim's (padded_dim)."""
    if head_dim == 192:
        return 256
    return (PAD_DIMS and padded_dim(head_dim)) or head_dim


def config(head_dim, head_dim_v=None):
    """Tiles and register split of the Gluon forward for a head dim (and V's, if its own). Key
    blocks of 128 (64 where V's head dim is 256, where a 64 x 256 fp32 output accumulator already
    takes 128 registers a thread, or where 128 would not fit the shared memory); key blocks of
    256 at head dim 64 spill. Shared memory on sm_90a (bf16): 82 KB (hdim 64), 164 KB (128),
    197 KB (256) with 2 stages."""
    kd = _kernel_dim(head_dim)
    dv = kd if head_dim_v in (None, head_dim) else _kernel_dim(head_dim_v)
    stages = STAGES_64 if kd == 64 else 2
    block_n = 64 if dv > 128 or _smem_bytes(kd, dv, 128, stages) > _SMEM_BUDGET else 128
    return dict(BLOCK_N=block_n, STAGES=stages, CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4)


def head_dims_ok(head_dim, head_dim_v):
    """Whether the kernel takes these Q/K and V head dims (VALUE_DIMS for unequal ones)."""
    if head_dim_v == head_dim:
        return head_dim in HEAD_DIMS or bool(PAD_DIMS and padded_dim(head_dim))
    return VALUE_DIMS and head_dim in VALUE_QK_DIMS and head_dim_v in HEAD_DIMS and head_dim_v < head_dim


def supported(q, k, v, *, varlen, window_left, window_right, softcap, alibi_slopes, dropout_p, block_table,
              capability, max_seqlen_k=None):
    """Whether a forward call can take this kernel (else the Triton one runs). ``capability``
    is the device's (major, minor) as configs sees it (IOATTN_PORTABLE=1 reports sm_80).
    varlen: packed (total, heads, dim) tensors (not a paged cache), ``max_seqlen_k`` given."""
    if not ENABLED or block_table is not None or (varlen and not VARLEN):
        return False
    if ((softcap > 0 or alibi_slopes is not None) and not SCORES) or (
            dropout_p > 0 and not dropout_ok(q.shape[-1])) or window_right > 0 or (
            window_left >= 0 and not WINDOW):
        return False  # (sliding windows (left, 0) and (left, -1) run here; a right window does not)
    if q.dtype not in (torch.bfloat16, torch.float16) or not head_dims_ok(q.shape[-1], v.shape[-1]):
        return False
    if capability[0] != 9:
        return False
    # at head dim 64 the causal Triton kernel is faster than the per-tile Gluon grid at 1k keys (H200,
    # results/h200-session6b: 294 vs 253 TFLOP/s; H100, results/h100-session20a: 266-271 vs 235-242), so
    # up to 2k keys it keeps the calls that the persistent kernel does not take (windows, options,
    # varlen); the persistent one with the per-row mask bounds measured 291 there (1.09x Triton)
    keys = max_seqlen_k if varlen else k.shape[1]
    if _kernel_dim(q.shape[-1]) == 64 and window_right == 0 and keys <= 2048 and (
            varlen or not MASK_BOUNDS.value or not use_persistent(64, keys, True, window_left, dropout_p > 0, softcap > 0,
                                                            alibi_slopes is not None)):
        return False
    d, dv = q.shape[-1], v.shape[-1]
    return tma_ok(q, d) and tma_ok(k, d) and tma_ok(v, dv)


@functools.cache
def _layout_cached(block, dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
                                                         torch.float32: gl.float32}[dtype])


def _layout(block, dtype):
    # get_default_for takes ~16 us: cached (a forward call needs four)
    return _layout_cached(tuple(block), dtype)


def _descriptor(t, block, dtype):
    """A TMA descriptor of t without TensorDescriptor's ~6 us of re-validation: supported()
    has checked what it asserts (16-byte aligned base and strides, contiguous last dim, no
    empty dims) through configs.tma_ok."""
    d = object.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape = t, list(t.shape), list(t.stride()), block
    d.layout, d.padding = _layout(block, dtype), "zero"
    return d


@functools.cache
def _num_sms_cached(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device):
    return _num_sms_cached(device.index if device.index is not None else torch.cuda.current_device())


def _dropout_args(dropout_p, rng_state, lse):
    """(RNG, dropout_p, o_scale) kernel arguments and HAS_DROPOUT (RNG: any pointer without):
    0 without dropout, else DROPOUT_APPLY's mode (1 select, 2 packed, 3 early; see _dropout)."""
    if dropout_p > 0:
        return (rng_state, dropout_p, 1.0 / (1.0 - dropout_p)), _DROPOUT_MODES[DROPOUT_APPLY]
    return (lse, 0.0, 1.0), 0


def _score_args(softmax_scale, softcap, alibi_slopes, lse):
    """(qk_scale, (ALIBI, stride_ab, sc_in, sc_out) kernel arguments, HAS_SOFTCAP, HAS_ALIBI): see _scores."""
    has_softcap, has_alibi = softcap > 0, alibi_slopes is not None
    sc_in, sc_out = (softmax_scale / softcap, softcap * LOG2E) if has_softcap else (0.0, softmax_scale * LOG2E)
    stride_ab = alibi_slopes.stride(0) if has_alibi and alibi_slopes.dim() == 2 else 0
    qk_scale = 1.0 if has_softcap or has_alibi else softmax_scale * LOG2E
    return qk_scale, (alibi_slopes if has_alibi else lse, stride_ab, sc_in, sc_out), has_softcap, has_alibi


def _descriptors(q, k, v, out, block_n):
    """TMA descriptors of (batch, seqlen, heads, dim) q, k, v, out: HALF_M-row tiles of Q and the
    output, block_n-row tiles of K and V, V and out with their own head dim."""
    d = _kernel_dim(q.shape[-1])  # (a tile wider than the tensor: the TMA fills the rest with zeros)
    dv = _kernel_dim(v.shape[-1])  # (and the output's TMA store drops the columns past it)
    blocks = ([1, HALF_M, 1, d], [1, block_n, 1, d], [1, block_n, 1, dv], [1, HALF_M, 1, dv])
    return [_descriptor(t, blk, q.dtype) for t, blk in zip((q, k, v, out), blocks)]


def use_persistent(head_dim, seqlen_k, causal, window_left, has_dropout, has_softcap, has_alibi, cfg=None,
                   head_dim_v=None):
    """Whether a dense forward takes the persistent kernel (PERSISTENT; a ``cfg`` with a
    PERSISTENT entry decides for benchmarks' A/B runs, where the kernel can run: head dims <= 128,
    where its four Q tiles fit beside the K/V rings, and with PERSISTENT_256 the equal head dims on the
    256-wide tiles with one Q buffer)."""
    kd = _kernel_dim(head_dim)
    if kd > 128 and not (PERSISTENT_256 and kd == 256 and head_dim_v in (None, head_dim)):
        return False
    if window_left >= 0 or ((has_dropout or has_softcap or has_alibi) and not PERSISTENT_OPTIONS):
        return False
    if cfg is not None and "PERSISTENT" in cfg:
        return bool(cfg["PERSISTENT"])
    if PERSISTENT != "auto":
        return PERSISTENT == "1"
    return seqlen_k <= PERSISTENT_MAX_KEYS and (not causal or PERSISTENT_CAUSAL)


def attention_forward_sm90(q, k, v, out, lse, *, softmax_scale, causal, cfg=None, cu_seqlens_q=None,
                           cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, window_left=-1,
                           dropout_p=0.0, rng_state=None, softcap=0.0, alibi_slopes=None):
    """Run the Gluon forward into out (batch, seqlen_q, heads, dim) and lse (batch, heads, seqlen_q);
    varlen (cu_seqlens_q given): packed (total, heads, dim) tensors and lse (heads, total_q).
    dropout_p > 0: rng_state the (seed, offset) int64 tensor (the masks of masks.dropout_keep).
    ``cfg`` overrides config(head_dim) (benchmarks' A/B runs)."""
    drop, has_dropout = _dropout_args(dropout_p, rng_state, lse)
    scores = _score_args(softmax_scale, softcap, alibi_slopes, lse)
    if cu_seqlens_q is not None:
        return _forward_varlen(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal, cfg, window_left, drop, has_dropout, scores)
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    cfg = cfg or config(head_dim, v.shape[-1])
    descs = _descriptors(q, k, v, out, cfg["BLOCK_N"])
    n_mblocks = cdiv(seqlen_q, 2 * HALF_M)
    if use_persistent(head_dim, seqlen_k, causal, window_left, has_dropout, scores[2], scores[3], cfg, v.shape[-1]):
        n_tiles = n_mblocks * batch * nheads
        grid = (min(n_tiles, _num_sms(q.device)), )
        head_group = min(HEAD_GROUP or batch * nheads, batch * nheads)
        qk_scale, score_args, has_softcap, has_alibi = scores
        key = ("persistent", q.shape, k.shape, v.shape[-1], lse.stride(), q.dtype, causal, grid, head_group,
               has_dropout, has_softcap, has_alibi, score_args[1], tuple(cfg.values()),
               align(lse, drop[0], score_args[0]))
        return launch(_attn_fwd_sm90_persistent, grid,
            *descs, lse, lse.stride(0), lse.stride(1), seqlen_q, seqlen_k, nheads, nheads // nheads_k,
            qk_scale, n_tiles, n_mblocks, head_group, *drop, *score_args, CAUSAL=causal,
            HEAD_DIM=_kernel_dim(head_dim), BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"],
            CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"], HAS_DROPOUT=has_dropout,
            HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi, SINGLE_Q=_kernel_dim(head_dim) > 128,
            num_warps=cfg["num_warps"], key=key)
    grid = (n_mblocks, batch * nheads)
    qk_scale, score_args, has_softcap, has_alibi = scores
    key = (q.shape, k.shape, v.shape[-1], lse.stride(), window_left, q.dtype, causal, has_dropout, has_softcap,
           has_alibi, score_args[1], tuple(cfg.values()), align(lse, out, drop[0], score_args[0]))
    return launch(_attn_fwd_sm90, grid,
        *descs, lse, lse.stride(0), lse.stride(1), seqlen_q, seqlen_k, nheads, nheads // nheads_k,
        qk_scale, out, 0, 0, lse, lse, window_left, *drop, *score_args, CAUSAL=causal, HEAD_DIM=_kernel_dim(head_dim),
        BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"], CONSUMER_REGS=cfg["CONSUMER_REGS"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"], IS_VARLEN=False, HAS_DROPOUT=has_dropout, HAS_SOFTCAP=has_softcap,
        HAS_ALIBI=has_alibi, num_warps=cfg["num_warps"], key=key)


def _forward_varlen(q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, cfg,
                    window_left, drop, has_dropout, scores):
    """The per-tile kernel over packed sequences: descriptors on (1, total, heads, dim) views
    (a tile that runs past its sequence reads the next one's rows: masked keys, unused query
    rows), per-sequence bounds from cu_seqlens in the kernel (no host synchronization)."""
    total_q, nheads, head_dim = q.shape
    nheads_k = k.shape[1]
    batch = cu_q.shape[0] - 1
    cfg = cfg or config(head_dim, v.shape[-1])
    # (the output's descriptor only gives the kernel its tile shape and layout: varlen stores
    # through pointers, _epilogue_masked)
    descs = _descriptors(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), out.unsqueeze(0), cfg["BLOCK_N"])
    grid = (cdiv(max_seqlen_q, 2 * HALF_M), batch * nheads)
    qk_scale, score_args, has_softcap, has_alibi = scores
    key = ("varlen", q.shape, k.shape, v.shape[-1], lse.stride(0), out.stride(), window_left, q.dtype, causal,
           has_dropout, has_softcap, has_alibi, score_args[1], tuple(cfg.values()),
           align(lse, out, cu_q, cu_k, drop[0], score_args[0]))
    return launch(_attn_fwd_sm90, grid,
        *descs, lse, 0, lse.stride(0), 0, 0, nheads, nheads // nheads_k, qk_scale,
        out, out.stride(0), out.stride(1), cu_q, cu_k, window_left, *drop, *score_args, CAUSAL=causal,
        HEAD_DIM=_kernel_dim(head_dim), BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"],
        CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"], IS_VARLEN=True,
        HAS_DROPOUT=has_dropout, HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi, num_warps=cfg["num_warps"], key=key)


def compile_for(head_dim, dtype="bf16", causal=True, capability=(9, 0), persistent=False, varlen=False,
                dropout=False, softcap=False, alibi=False, head_dim_v=None):
    """Compile the kernel for a target without a GPU (the compiler's view: aot.py, tests).
    dropout: False, True (= "select"), or "select" / "packed" / "early" (DROPOUT_APPLY).
    head_dim_v: V's own head dim (VALUE_DIMS), else head_dim."""
    from . import aot
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dv = head_dim if head_dim_v is None else head_dim_v
    cfg = config(head_dim, dv)
    fn = _attn_fwd_sm90_persistent if persistent else _attn_fwd_sm90
    kd, kdv = _kernel_dim(head_dim), _kernel_dim(dv)
    q_block, o_block = [1, HALF_M, 1, kd], [1, HALF_M, 1, kdv]
    kv_block, v_block = [1, cfg["BLOCK_N"], 1, kd], [1, cfg["BLOCK_N"], 1, kdv]

    def desc(block):
        return f"tensordesc<{dtype}[{','.join(map(str, block))}],{_layout(block, tdtype)!r}>"

    sig = dict(q_desc=desc(q_block), k_desc=desc(kv_block), v_desc=desc(v_block), o_desc=desc(o_block),
               LSE="*fp32", stride_lb="i32", stride_lh="i32", seqlen_q="i32", seqlen_k="i32", nheads="i32",
               group="i32", qk_scale="fp32", n_tiles="i32", n_mblocks="i32", head_group="i32", O=f"*{dtype}", stride_os="i32",
               stride_oh="i32", CU_Q="*i32", CU_K="*i32", left="i32", RNG="*i64", dropout_p="fp32", o_scale="fp32",
               ALIBI="*fp32", stride_ab="i32", sc_in="fp32", sc_out="fp32")
    constexprs = dict(CAUSAL=causal, HEAD_DIM=kd, BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"],
                      CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"])
    constexprs["HAS_DROPOUT"] = _DROPOUT_MODES[dropout] if isinstance(dropout, str) else int(dropout)
    constexprs["HAS_SOFTCAP"] = softcap
    constexprs["HAS_ALIBI"] = alibi
    if persistent:
        constexprs["SINGLE_Q"] = kd > 128
    else:
        constexprs["IS_VARLEN"] = varlen
    return aot.compile_gluon(fn, sig, constexprs, cfg["num_warps"], capability)
