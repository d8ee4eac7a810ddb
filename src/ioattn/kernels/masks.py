"""Triton helpers shared by the forward and backward kernels.

Scores are kept in log2 units inside the kernels (``exp2`` is one instruction,
``exp`` is ``exp2`` plus a multiply), so the softmax scale is folded together
with ``log2(e)`` before the first multiply.

Every helper takes the tile's row indices ``offs_m`` (queries) and column
indices ``offs_n`` (keys) as 2-D broadcastable tensors, so the same code serves
``[BM, BN]`` tiles (forward, dQ) and transposed ``[BN, BM]`` tiles (dK/dV).
"""

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # 1 / ln(2)
LN2 = 0.6931471805599453


@triton.jit
def sequence_bounds(CU_SEQLENS, b, seqlen_dense, IS_VARLEN: tl.constexpr):
    """(start, length) of sequence b: from the int32 prefix sums (varlen) or the dense length."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + b)
        return start, tl.load(CU_SEQLENS + b + 1) - start
    return b * 0, seqlen_dense  # b * 0: an int32 scalar like the loaded start


@triton.jit
def scores_log2(qk, rows, cols, seqlen_q, seqlen_k, sm_scale, softcap, slope,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Raw ``q·k`` -> scores in log2 units, plus tanh(.) for the softcap gradient.

    softcap:  s = softcap * tanh(q·k * scale / softcap)
    ALiBi:    s += -slope * |i + seqlen_k - seqlen_q - j|   (after softcap, as FA2)

    HAS_SOFTCAP: 0 off; 1 tanh through an exp and a division (fp32-accurate, any backend);
    2 the GPU's tanh.approx.f32 (one MUFU instruction, relative error ~2^-11: below
    bf16/fp16 rounding, so used for those dtypes on CUDA; see forward.softcap_mode).
    """
    if HAS_SOFTCAP == 2:
        x = qk * (sm_scale / softcap)
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
        s = t * (softcap * 1.4426950408889634)
    elif HAS_SOFTCAP:
        x = qk * (sm_scale / softcap)
        t = 2.0 * tl.sigmoid(2.0 * x) - 1.0  # tanh(x), overflow-safe
        s = t * (softcap * 1.4426950408889634)
    else:
        t = qk  # unused
        s = qk * (sm_scale * 1.4426950408889634)
    if HAS_ALIBI:
        dist = rows + (seqlen_k - seqlen_q) - cols
        dist = tl.where(dist < 0, -dist, dist)
        s = s - (slope * 1.4426950408889634) * dist.to(tl.float32)
    return s, t


@triton.jit
def visible(rows, cols, seqlen_q, seqlen_k, window_left, window_right,
            CHECK_COLS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Which (query row, key col) pairs are visible, bottom-right aligned.

    Query i sees key j when  i + sk - sq - left <= j <= i + sk - sq + right.
    """
    ok = cols < seqlen_k
    if not CHECK_COLS:
        ok = cols >= 0  # all true, right shape
    diag = rows + (seqlen_k - seqlen_q)
    if HAS_RIGHT:
        ok = ok & (cols <= diag + window_right)
    if HAS_LEFT:
        ok = ok & (cols >= diag - window_left)
    return ok


# Dropout generator (docs/PERF_NOTES.md, benchmarks/results/h100-dropout2): Philox-4x32 with
# 7 rounds (the fewest its authors found to pass BigCrush with no failures; FlashAttention-2's
# count too), each call cut into 128 / 8 = 16 draws of 8 bits. The environment variables exist
# for benchmarks/dropout_variants.py only.
DROPOUT_ROUNDS = tl.constexpr(int(os.environ.get("IOATTN_DROPOUT_ROUNDS", "7")))
DROPOUT_BITS = tl.constexpr(int(os.environ.get("IOATTN_DROPOUT_BITS", "8")))
_DRAW_MASK = tl.constexpr((1 << DROPOUT_BITS.value) - 1)
# where the forward draws the mask: 1 before its QK^T product (overlapping it), 0 after the softmax
DROPOUT_EARLY = tl.constexpr(int(os.environ.get("IOATTN_DROPOUT_EARLY", "0")))


@triton.jit
def dropout_keep(seed, salt, offs_m, start_n, dropout_p,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Counter-based dropout mask of a [BLOCK_M, BLOCK_N] tile: True where a probability is kept.

    Philox is keyed by the seed; its counters are (key position // KEYS, query position,
    batch*nheads + head, 0). One call yields four 32-bit words, cut into KEYS = 128 / BITS
    draws for KEYS neighbouring keys: key k of the group reads word k // (32 / BITS),
    bits from (k % (32 / BITS)) * BITS up. So the generator costs 1 / KEYS of a call per
    element. A probability is kept when its draw u satisfies u >= dropout_p * 2**BITS, i.e.
    with probability 1 - ceil(dropout_p * 2**BITS) / 2**BITS (dropout_p is rounded up to a
    multiple of 1/256; the kept values are still scaled by 1 / (1 - dropout_p), as
    FlashAttention-2 does with its 8-bit draws). The mask depends only on (seed,
    batch*head, query, key), never on the tile shape, so the forward and both backward
    programs draw the same one. start_n: a multiple of KEYS.

    Each word is broadcast over its keys and shifted in place (rather than interleaving
    the fields with tl.join), which keeps the tile in one register layout: triton 3.6
    inserts a shared-memory layout conversion after every join (20 conversions in the
    forward instead of 5).
    """
    BITS: tl.constexpr = DROPOUT_BITS
    KEYS: tl.constexpr = 128 // BITS
    PER_WORD: tl.constexpr = 32 // BITS
    G: tl.constexpr = BLOCK_N // KEYS
    groups = start_n // KEYS + tl.arange(0, G)  # [G]
    zero = (offs_m[:, None] * 0 + groups[None, :] * 0).to(tl.uint32)  # [BM, G]
    c0 = groups[None, :].to(tl.uint32) + zero
    c1 = offs_m[:, None].to(tl.uint32) + zero
    c2 = zero + salt.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, c2, DROPOUT_ROUNDS)
    i = tl.arange(0, KEYS)[None, None, :]  # key position in the group
    word = i // PER_WORD
    x = tl.where(word == 0, r0[:, :, None], tl.where(word == 1, r1[:, :, None],
                 tl.where(word == 2, r2[:, :, None], r3[:, :, None])))  # [BM, G, KEYS]
    x = (x >> ((i % PER_WORD) * BITS).to(tl.uint32)) & _DRAW_MASK
    u = tl.reshape(x, (BLOCK_M, BLOCK_N))
    # u >= dropout_p * 2**BITS  <=>  u >= ceil(dropout_p * 2**BITS): compared as integers, no
    # int->float conversion (a quarter-rate instruction). H100, 4k (benchmarks/results/h100-ab):
    # dropout 0.1 costs +78/+68% fwd (hdim 128 / causal) this way vs +87/+87% comparing floats,
    # fwd+bwd 75/68% vs 78/72%; hdim 64 fwd +112% vs +99% (fwd+bwd 123% vs 128%).
    threshold = tl.math.ceil(dropout_p * (2.0 ** BITS)).to(tl.uint32)
    return u >= threshold


@triton.jit
def key_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks a query block [start_m, start_m + BLOCK_M) must visit.

    Returns (lo, full_lo, full_hi, hi): blocks in [full_lo, full_hi) are fully
    visible to every row of the query block (no mask needed); blocks in
    [lo, full_lo) and [full_hi, hi) need the mask. All but hi are multiples of
    BLOCK_N; blocks wholly outside the window are never visited.
    """
    diag = seqlen_k - seqlen_q
    m_last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    hi = seqlen_k
    if HAS_RIGHT:
        hi = tl.minimum(hi, m_last + diag + window_right + 1)
    lo = 0
    if HAS_LEFT:
        lo = tl.maximum(lo, start_m + diag - window_left)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = lo
    if HAS_LEFT:
        # every row r <= start_m + BLOCK_M - 1 sees j >= r + diag - left
        first = start_m + BLOCK_M - 1 + diag - window_left
        full_lo = tl.maximum(full_lo, ((first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    end = seqlen_k
    if HAS_RIGHT:
        # every row r >= start_m sees j <= r + diag + right
        end = tl.minimum(end, start_m + diag + window_right + 1)
    full_hi = lo + tl.maximum(end - lo, 0) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def query_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see any key of [start_n, start_n + BLOCK_N) (for dK/dV).

    Returns (lo, full_lo, full_hi, hi) in query positions, like key_range.
    Query i sees key j iff j - diag - right <= i <= j - diag + left.
    """
    diag = seqlen_k - seqlen_q
    n_last = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    lo = 0
    if HAS_RIGHT:
        lo = tl.maximum(lo, start_n - diag - window_right)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = seqlen_q
    if HAS_LEFT:
        hi = tl.minimum(hi, n_last - diag + window_left + 1)
    hi = tl.maximum(hi, lo)
    full_lo = lo
    if HAS_RIGHT:
        # every key c <= start_n + BLOCK_N - 1 seen by rows i >= c - diag - right
        first = start_n + BLOCK_N - 1 - diag - window_right
        full_lo = tl.maximum(full_lo, ((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    if start_n + BLOCK_N > seqlen_k:  # ragged key block: every query block needs the mask
        full_lo = hi
    full_lo = tl.minimum(full_lo, hi)
    end = seqlen_q
    if HAS_LEFT:
        # every key c >= start_n seen by rows i <= c - diag + left
        end = tl.minimum(end, start_n - diag + window_left + 1)
    full_hi = lo + tl.maximum(end - lo, 0) // BLOCK_M * BLOCK_M
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST works around the Triton interpreter's bf16 tl.dot (it
    multiplies the raw bits); the operands are already rounded to bf16, so the
    fp32 product is what the tensor cores compute."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
