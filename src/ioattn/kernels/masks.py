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


# Dropout generator (docs/PERF_NOTES.md; benchmarks/results/h100-dropout2, h100-session3*):
# Philox-4x32 with 7 rounds (the fewest its authors found to pass BigCrush with no failures;
# FlashAttention-2's count too), each call cut into 16 draws of 8 bits. IOATTN_DROPOUT_ROUNDS
# exists for benchmarks/dropout_variants.py only.
DROPOUT_ROUNDS = tl.constexpr(int(os.environ.get("IOATTN_DROPOUT_ROUNDS", "7")))


@triton.jit
def _dropout_words(seed, salt, start_m, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The Philox word holding each element's draw, and the draw's byte index (0..3) in that
    word, as [G, 2, 8, A, M, 8] tensors (see dropout_keep); reshaped row-major they are the
    [BLOCK_M, BLOCK_N] tile. start_m must be a multiple of 16."""
    tl.static_assert(BLOCK_M % 16 == 0, "dropout tiles need a multiple of 16 query rows")
    G: tl.constexpr = BLOCK_M // 16
    A: tl.constexpr = BLOCK_N // 64 if BLOCK_N >= 64 else 1
    M: tl.constexpr = 8 if BLOCK_N >= 64 else BLOCK_N // 8
    g = tl.arange(0, G)[:, None, None, None, None, None]
    h = tl.arange(0, 2)[None, :, None, None, None, None]
    r = tl.arange(0, 8)[None, None, :, None, None, None]
    a = tl.arange(0, A)[None, None, None, :, None, None]
    m = tl.arange(0, M)[None, None, None, None, :, None]
    c = tl.arange(0, 8)[None, None, None, None, None, :]
    zero = (g * 0 + r * 0 + a * 0 + c * 0).to(tl.uint32)  # [G, 1, 8, A, 1, 8]: one call each
    c0 = ((start_n // 64 + a) * 8 + c).to(tl.uint32) + zero
    c1 = ((start_m // 16 + g) * 8 + r).to(tl.uint32) + zero
    c2 = zero + salt.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero, DROPOUT_ROUNDS)
    mm = (start_n // 8) % 8 + m  # [1, 1, 1, 1, M, 1]: 0..7 within the 64-key group
    word = mm // 2
    x = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    byte = h * 2 + mm % 2  # [1, 2, 1, 1, M, 1]
    return x, byte


@triton.jit
def dropout_keep(seed, salt, start_m, start_n, dropout_p,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Counter-based dropout mask of the [BLOCK_M, BLOCK_N] tile at (start_m, start_n): True
    where a probability is kept.

    Which draw each (query i, key c) gets is fixed by absolute positions, never by the tile
    shape, so the forward and both backward programs (and dropout_keep_mask) agree. Write
    i = 16*g + 8*h + r and c = 64*a + 8*m + n (h < 2; r, m, n < 8). Philox, keyed by the
    seed, is called once per (g, r, a, n) with counters (8*a + n, 8*g + r, batch*nheads +
    head, 0): 16 bytes for the 2 x 8 elements (i, i + 8) x (c + 8*m). Word m // 2 of the
    call holds the 2 x 2 block (i, i + 8) x (c, c + 8) of key pair m; byte 2*h + m % 2 is the
    draw. A probability is kept when its byte u satisfies u >= ceil(dropout_p * 256), i.e.
    with probability 1 - ceil(256 dropout_p) / 256 (the kept values are still scaled by
    1 / (1 - dropout_p), as FlashAttention-2 does with its 8-bit draws).

    Why this grouping: in the tensor-core (wgmma/mma) accumulator layout of a [rows, cols]
    tile a thread holds rows (x, x + 8) of a 16-row slab and the columns y, y + 1 (mod 8)
    for every group of 8. With queries as rows (forward, dQ program) the 16 draws of a call
    sit in one thread and every byte pick is a compile-time constant; with keys as rows
    (dK/dV program, S^T) a thread holds keys (c, c + 8) and query pairs (i, i + 8): exactly
    one word of each call, so four warps recompute a call but no thread discards a draw of
    the word it computes for. A call of consecutive keys of one query (session 2/3's
    grouping) was 4x redundant in the forward or 8x with keys as rows.
    """
    x, byte = _dropout_words(seed, salt, start_m, start_n, BLOCK_M, BLOCK_N)
    u = (x >> (byte * 8).to(tl.uint32)) & 0xFF  # [G, 2, 8, A, M, 8]
    u = tl.reshape(u, (BLOCK_M, BLOCK_N))
    return u >= _dropout_threshold(dropout_p)


@triton.jit
def _dropout_threshold(dropout_p):
    # u >= dropout_p * 256  <=>  u >= ceil(dropout_p * 256): compared as integers, no
    # int->float conversion (a quarter-rate instruction; A/B in benchmarks/results/h100-ab)
    return tl.math.ceil(dropout_p * 256.0).to(tl.uint32)


@triton.jit
def dropout_pairs(seed, salt, start_m, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per element, its Philox word and the prmt selector that moves its draw (byte b) and
    its key neighbour's (the same byte of the next element's word) into bytes 0 and 1:
    the operands of drop_packed. The neighbours (keys 2j, 2j + 1) sit in adjacent registers
    of a thread and in calls n = 2j, 2j + 1 with the same byte index."""
    x, byte = _dropout_words(seed, salt, start_m, start_n, BLOCK_M, BLOCK_N)
    sel = (byte + (byte + 4) * 16).to(tl.uint32) + x * 0  # d.b0 = a.b, d.b1 = b.b
    x = x + sel * 0
    return tl.reshape(x, (BLOCK_M, BLOCK_N)), tl.reshape(sel, (BLOCK_M, BLOCK_N))


@triton.jit
def drop_packed(p16, words, sel, dropout_p):
    """p16 (bf16/fp16) with the dropped entries zeroed, two elements (key neighbours) per
    instruction group: prmt gathers the pair's two draws from their words, a second prmt
    spreads them to the low bytes of the 16-bit lanes, one add per pair sets each lane's
    bit 15 when its draw >= ceil(256 dropout_p) (the lanes cannot carry into each other),
    prmt replicates those bits over the lanes, and an AND clears the dropped halves of the
    packed pair. Keeps exactly what dropout_keep keeps. CUDA only (inline PTX)."""
    lanes = ((0x8000 - _dropout_threshold(dropout_p)) * 0x10001).to(tl.uint32)  # (0x8000 - t) in both 16-bit lanes
    c = words * 0 + lanes
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t, z; mov.b32 z, 0; prmt.b32 t, $2, $3, $4; prmt.b32 t, t, z, 0x4140; "
        "add.u32 t, t, $6; prmt.b32 t, t, z, 0xBB99; and.b32 $0, $1, t; }",
        "=r,r,r,r,r,r,r,r", [p16, words, sel, c], dtype=p16.dtype, is_pure=True, pack=2)


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
