"""The dropout keep-mask of masks.dropout_keep, in Gluon, for Hopper wgmma accumulator tiles.

Bit-identical to the Triton kernels (masks._dropout_words / dropout_keep): Philox-4x32 with
masks.DROPOUT_ROUNDS rounds keyed by the 64-bit ``seed`` (low word k0, high word k1, exactly
as tl.philox splits it), called once per (g, r, a, n) with counters

    (8*a + n, 8*g + r, salt, 0)   for query i = 16*g + 8*h + r and key c = 64*a + 8*m + n

(g, a absolute: start_m // 16 + tile g, start_n // 64 + tile a); the draw of (i, c) is byte
2*h + m % 2 of word m // 2, and the probability is kept when that byte >= ceil(256 p).

How the tiles map to the calls. A [R, C] wgmma accumulator (NVMMADistributedLayout v3,
warps_per_cta [4, 1], instr_shape [16, C, 16]) is, as a linear layout over (row, col) bits:

    registers  col 1, row 8, col 8, col 16, col 32, (col 64 | row 64 ...)
    lanes      col 2, col 4, row 1, row 2, row 4
    warps      row 16, row 32

Every basis moves one bit of the row or the column index, i.e. one bit of one of the six
coordinates (g, h, r) / (a, m, n), so the same layout, rewritten basis by basis, is a layout
of the 6-D tensor whose row-major reshape is the tile (``_split_bits``; any wgmma tile of
whole 16-row slabs and 64-key groups works, e.g. 128 rows on 4 warps too):

- forward, P [ROWS, N], queries as rows: [G, 2, 8, A, M, 8] = (g, h, r, a, m, n). h, m and
  n's low bit (and a, for N = 128) are registers, r and n's two high bits lanes, g warps:
  the 16 draws (h, m) of a call are the registers of one thread, the other call indices
  (g, r, a, n) are spread over threads/registers without repetition. The Philox runs on
  [G, 1, 8, A, 1, 8] tensors (the h and m bases of the layout are then broadcast
  registers, which LLVM folds into one computation), once per call per thread: 2 * A calls
  (4 for 64 x 128, 2 for 64 x 64), and word m // 2 / byte 2h + m % 2 are constants.
- backward, S^T [KEYS, ROWS], keys as rows: [A, M, 8, G, 2, 8] = (a, m, n, g, h, r). n is
  lanes, m's low bit a register and its two high bits (= the word index m // 2) the warps;
  r's low bit, h and g registers, r's high bits lanes. A thread needs one word (its warp's)
  of each of 2 * G calls (8 for 64 x 64, 16 for 64 x 128); the four warps of the warpgroup
  recompute each call (accepted: the dK/dV tile has 4x fewer calls per thread than elements).

The final reshape of the 6-D result to [R, C] infers a linear layout equal to the wgmma
layout, so ``gl.convert_layout(..., assert_trivial=True)`` costs nothing (no shared memory,
no shuffles; the compiler refuses otherwise).

Requirements: start_m % 16 == 0 and start_n % 64 == 0 (the Triton helper also handles
start_n % 64 != 0 for tiles narrower than 64 keys, via (start_n // 8) % 8; the Gluon tiles
are 64 or 128 keys wide and start on a multiple of 64). ``seed`` should be the same int64
scalar as the Triton kernels' (tl.load(RNG) + tl.load(RNG + 1)); ``salt`` batch * nheads +
head (int32). Gluon does not run in the interpreter: benchmarks/gluon_dropout_check.py
compares these masks with the Triton ones on a GPU, tests/test_dropout_sm90.py compiles them.
"""

import math
import os

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .masks import DROPOUT_ROUNDS

# how the backward's transposed tiles (keep_cols) get their draws (IOATTN_GLUON_DROPOUT_COLS):
# "redundant": every warp of the warpgroup runs each Philox call its threads need a word
# of (4x the calls of the tile); "shared" (default): each call runs once (a warp per quarter of the query
# rows), and its four words reach the warps that use them through shared memory (a layout
# conversion: 4 KB of shared memory a warpgroup for a 64 x 64 tile). Static SASS of the hdim-64
# backward on 64-row blocks under dropout: 2,968 -> 2,512 instructions (plain 1,872), no spills,
# 133 -> 140 KB of shared memory. The hdim-128 backward would need 239 KB (beyond sm_90's 227), so
# the backward takes it at hdim 64 only (keep_cols's SHARED). H100, session 19 (results/h100-session19b):
# masks bit-identical to the Triton ones (52/52), the mask's cost 0.574 -> 0.269 ps per element, the
# hdim-64 dropout forward+backward (4k causal) 3.606 -> 3.526 ms. (A plain bool: kernels take it as a constexpr of their
# own module or as an argument, which Triton's compile cache keys on; a global of this module read
# from a kernel of another is not part of that key.)
COLS_SHARED = os.environ.get("IOATTN_GLUON_DROPOUT_COLS", "shared") == "shared"

# tl.philox_impl's uint32 constants (triton/language/random.py)
PHILOX_KEY_A = gl.constexpr(0x9E3779B9)
PHILOX_KEY_B = gl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = gl.constexpr(0xD2511F53)
PHILOX_ROUND_B = gl.constexpr(0xCD9E8D57)


@gluon.constexpr_function
def wgmma_layout(n):
    """A warpgroup's m64 x n wgmma accumulator layout (forward_sm90._wgmma_layout)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, int(n), 16])


@gluon.constexpr_function
def _split_bits(ll, row_sizes, col_sizes):
    """The 2-D linear layout ll of a [R, C] tile as a layout of the [*row_sizes, *col_sizes]
    tensor whose row-major reshape is the tile: each basis (a power of two along the rows or
    the columns) becomes the same bit of the coordinate that holds it."""
    row_sizes = [int(s) for s in row_sizes]
    col_sizes = [int(s) for s in col_sizes]
    sizes = row_sizes + col_sizes

    def coord(v, dims, first):
        # the (coordinate, value) of bit v (a power of two) of an index split row-major by dims
        out = [0] * len(sizes)
        if v == 0:
            return out
        stride = 1
        for d in reversed(range(len(dims))):
            if v < stride * dims[d]:
                assert v % stride == 0
                out[first + d] = v // stride
                return out
            stride *= dims[d]
        raise ValueError(f"basis {v} outside {dims}")

    def conv(bases):
        res = []
        for row, col in bases:
            assert row == 0 or col == 0, "a basis of a wgmma layout moves along one axis"
            a = coord(row, row_sizes, 0)
            b = coord(col, col_sizes, len(row_sizes))
            res.append([x + y for x, y in zip(a, b)])
        return res

    assert list(ll.shape) == [math.prod(row_sizes), math.prod(col_sizes)], (ll.shape, row_sizes, col_sizes)
    return gl.DistributedLinearLayout(reg_bases=conv(ll.reg_bases), lane_bases=conv(ll.lane_bases),
                                      warp_bases=conv(ll.warp_bases), block_bases=conv(ll.block_bases),
                                      shape=sizes)


@gluon.constexpr_function
def _axis_layout(layout, axis):
    """The 1-D layout that gl.expand_dims, at every other axis in increasing order, turns
    into ``layout`` (a linear layout of any rank)."""
    axis = int(axis)
    res = layout
    for k in reversed([k for k in range(_rank(layout)) if k != axis]):
        res = gl.SliceLayout(k, res)
    return res


@gluon.constexpr_function
def _rank(layout):
    return len(layout.shape)


@gluon.jit
def _index(layout: gl.constexpr, AXIS: gl.constexpr, SIZE: gl.constexpr):
    """arange(SIZE) along AXIS of a tensor of the given linear layout's rank (size 1 elsewhere),
    like ``tl.arange(0, SIZE)[None, ..., :, ..., None]``."""
    x = gl.arange(0, SIZE, layout=_axis_layout(layout, AXIS))
    for k in gl.static_range(_rank(layout)):
        if k != AXIS:
            x = gl.expand_dims(x, k)
    return x


@gluon.jit
def _mul_wide_a(x):
    """(high, low) 32 bits of x * PHILOX_ROUND_A (uint32 x): one mul.wide.u32 (IMAD.WIDE.U32)
    instead of a mul.hi and a mul.lo (two IMADs)."""
    return gl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, 0xD2511F53; mov.b64 {$1, $0}, t; }",
                                     "=r,=r,r", [x], dtype=(gl.uint32, gl.uint32), is_pure=True, pack=1)


@gluon.jit
def _mul_wide_b(x):
    """(high, low) 32 bits of x * PHILOX_ROUND_B, as _mul_wide_a."""
    return gl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, 0xCD9E8D57; mov.b64 {$1, $0}, t; }",
                                     "=r,=r,r", [x], dtype=(gl.uint32, gl.uint32), is_pure=True, pack=1)


@gluon.jit
def philox(seed, c0, c1, c2, c3, n_rounds: gl.constexpr, WIDE: gl.constexpr = False):
    """tl.philox(seed, c0, c1, c2, c3, n_rounds) for uint32 counters: the same key split of
    the seed (to uint64, low / high 32 bits) and the same rounds, in the same order. WIDE: each
    round's two products as mul.wide.u32 (inline PTX; the same bits: the high and low halves of
    the 64-bit product), one IMAD.WIDE.U32 each instead of an IMAD.HI and an IMAD."""
    seed = seed.to(gl.uint64)
    k1 = ((seed >> 32) & 0xffffffff).to(gl.uint32)
    k0 = (seed & 0xffffffff).to(gl.uint32)
    c0 = c0.to(gl.uint32, bitcast=True)
    c1 = c1.to(gl.uint32, bitcast=True)
    c2 = c2.to(gl.uint32, bitcast=True)
    c3 = c3.to(gl.uint32, bitcast=True)
    for _ in gl.static_range(n_rounds):
        A = PHILOX_ROUND_A
        B = PHILOX_ROUND_B
        _c0, _c2 = c0, c2
        if WIDE:
            hi_b, lo_b = _mul_wide_b(_c2)
            hi_a, lo_a = _mul_wide_a(_c0)
            c0 = hi_b ^ c1 ^ k0
            c2 = hi_a ^ c3 ^ k1
            c1 = lo_b
            c3 = lo_a
        else:
            c0 = gl.umulhi(B, _c2) ^ c1 ^ k0
            c2 = gl.umulhi(A, _c0) ^ c3 ^ k1
            c1 = gl.mul(B, _c2, sanitize_overflow=False)
            c3 = gl.mul(A, _c0, sanitize_overflow=False)
        k0 = gl.add(k0, PHILOX_KEY_A, sanitize_overflow=False)
        k1 = gl.add(k1, PHILOX_KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@gluon.jit
def threshold(dropout_p):
    """masks._dropout_threshold: keep a draw u (0..255) when u >= ceil(256 p)."""
    return gl.ceil(dropout_p * 256.0).to(gl.uint32)


@gluon.jit
def _select_word(word, r0, r1, r2, r3):
    return gl.where(word == 0, r0, gl.where(word == 1, r1, gl.where(word == 2, r2, r3)))


@gluon.jit
def draws_rows(seed, salt, start_m, start_n, ROWS: gl.constexpr, N: gl.constexpr):
    """The 8-bit draws (uint32, 0..255) of the [ROWS, N] tile at (start_m, start_n), queries
    as rows, in the wgmma accumulator layout wgmma_layout(N) (forward P, dQ program)."""
    gl.static_assert(ROWS % 16 == 0, "dropout tiles need a multiple of 16 query rows")
    gl.static_assert(N % 64 == 0, "key tiles of a multiple of 64")
    G: gl.constexpr = ROWS // 16
    A: gl.constexpr = N // 64
    M: gl.constexpr = 8
    L2: gl.constexpr = wgmma_layout(N)
    L6: gl.constexpr = _split_bits(gl.to_linear_layout(L2, [ROWS, N]), [G, 2, 8], [A, M, 8])
    # masks._dropout_words, line for line ([G, 2, 8, A, M, 8] = (g, h, r, a, m, c))
    g = _index(L6, 0, G)
    h = _index(L6, 1, 2)
    r = _index(L6, 2, 8)
    a = _index(L6, 3, A)
    m = _index(L6, 4, M)
    c = _index(L6, 5, 8)
    zero = (g * 0 + r * 0 + a * 0 + c * 0).to(gl.uint32)  # [G, 1, 8, A, 1, 8]: one call each
    c0 = ((start_n // 64 + a) * 8 + c).to(gl.uint32) + zero
    c1 = ((start_m // 16 + g) * 8 + r).to(gl.uint32) + zero
    c2 = zero + salt.to(gl.uint32)
    r0, r1, r2, r3 = philox(seed, c0, c1, c2, zero, DROPOUT_ROUNDS)
    mm = m  # (start_n // 8) % 8 + m with start_n % 64 == 0
    word = mm // 2
    x = _select_word(word, r0, r1, r2, r3)
    byte = h * 2 + mm % 2  # [1, 2, 1, 1, M, 1]
    u = (x >> (byte * 8).to(gl.uint32)) & 0xFF  # [G, 2, 8, A, M, 8]
    u = gl.reshape(u, [ROWS, N])
    return gl.convert_layout(u, L2, assert_trivial=True)


@gluon.jit
def keep_rows(seed, salt, start_m, start_n, dropout_p, ROWS: gl.constexpr, N: gl.constexpr):
    """masks.dropout_keep(seed, salt, start_m, start_n, dropout_p, ROWS, N) as an i1 [ROWS, N]
    tensor in wgmma_layout(N): True where the probability of (query start_m + row, key
    start_n + col) is kept. start_m % 16 == 0, start_n % 64 == 0."""
    return draws_rows(seed, salt, start_m, start_n, ROWS, N) >= threshold(dropout_p)


@gluon.jit
def _keep_bytes(x, s_word, k_word):
    """Four draws at once: bit 7 of each byte of the result is set when that byte u of x is
    kept, u > s (s = ceil(256 p) - 1, i.e. u >= ceil(256 p)); the other bits are garbage.
    s_word = s in all four bytes, k_word = 0x7f - (s & 0x7f) in all four bytes. Per byte, with
    u = 128 u_hi + u_lo and s likewise: c = u_lo + 0x7f - s_lo (0..254: no carry into the next
    byte) has bit 7 = (u_lo > s_lo), and u > s <=> u_hi > s_hi, or u_hi == s_hi and u_lo > s_lo
    (one LOP3 of x, s_word, c). Three instructions per four draws instead of an extract and a
    compare per draw."""
    c = (x & 0x7F7F7F7F) + k_word
    return (x & ~s_word) | (~(x ^ s_word) & c)


@gluon.jit
def keep_words_rows(seed, salt, start_m, start_n, dropout_p, ROWS: gl.constexpr, N: gl.constexpr):
    """The keep mask of keep_rows as (words, sel_lo, sel_hi): uint32 [ROWS, N] tensors in
    wgmma_layout(N). words: the element's Philox word after _keep_bytes (bit 7 of byte b =
    whether draw b is kept); sel_lo / sel_hi: prmt selector nibbles that replicate bit 7 of the
    element's byte over a 16-bit lane, taken from the first / second operand of the prmt, as
    the low / high lane (see drop_packed_rows). Same draws and threshold as keep_rows."""
    gl.static_assert(ROWS % 16 == 0, "dropout tiles need a multiple of 16 query rows")
    gl.static_assert(N % 64 == 0, "key tiles of a multiple of 64")
    G: gl.constexpr = ROWS // 16
    A: gl.constexpr = N // 64
    M: gl.constexpr = 8
    L2: gl.constexpr = wgmma_layout(N)
    L6: gl.constexpr = _split_bits(gl.to_linear_layout(L2, [ROWS, N]), [G, 2, 8], [A, M, 8])
    g = _index(L6, 0, G)
    h = _index(L6, 1, 2)
    r = _index(L6, 2, 8)
    a = _index(L6, 3, A)
    m = _index(L6, 4, M)
    c = _index(L6, 5, 8)
    zero = (g * 0 + r * 0 + a * 0 + c * 0).to(gl.uint32)  # [G, 1, 8, A, 1, 8]: one call each
    c0 = ((start_n // 64 + a) * 8 + c).to(gl.uint32) + zero
    c1 = ((start_m // 16 + g) * 8 + r).to(gl.uint32) + zero
    c2 = zero + salt.to(gl.uint32)
    r0, r1, r2, r3 = philox(seed, c0, c1, c2, zero, DROPOUT_ROUNDS, True)
    s = threshold(dropout_p) - 1  # 0..255 for 0 < p < 1 (keep u > s)
    s_word = s * 0x01010101
    k_word = 0x7F7F7F7F - (s_word & 0x7F7F7F7F)
    # the SIMD compare on the call's four words (once per call, not per element)
    r0 = _keep_bytes(r0, s_word, k_word)
    r1 = _keep_bytes(r1, s_word, k_word)
    r2 = _keep_bytes(r2, s_word, k_word)
    r3 = _keep_bytes(r3, s_word, k_word)
    mm = m  # start_n % 64 == 0
    byte = h * 2 + mm % 2  # [1, 2, 1, 1, M, 1]
    x = _select_word(mm // 2, r0, r1, r2, r3) + (byte * 0).to(gl.uint32)  # [G, 2, 8, A, M, 8] (compile-time picks)
    # prmt selector nibbles: bit 3 replicates the sign (bit 7) of byte (nibble & 7) of {b, a}
    sel_lo = ((byte + 8) * 0x11).to(gl.uint32) + x * 0  # lane 0 from the first operand's byte
    sel_hi = ((byte + 12) * 0x1100).to(gl.uint32) + x * 0  # lane 1 from the second operand's byte
    x = gl.convert_layout(gl.reshape(x, [ROWS, N]), L2, assert_trivial=True)
    sel_lo = gl.convert_layout(gl.reshape(sel_lo, [ROWS, N]), L2, assert_trivial=True)
    sel_hi = gl.convert_layout(gl.reshape(sel_hi, [ROWS, N]), L2, assert_trivial=True)
    return x, sel_lo, sel_hi


@gluon.jit
def drop_packed_rows(p16, seed, salt, start_m, start_n, dropout_p):
    """p16 (a bf16/fp16 [ROWS, N] tile in wgmma_layout(N), queries as rows: P after its
    conversion for the P V product) with the entries that keep_rows drops zeroed. Per 64 x 128
    tile and thread (64 scores): the 4 Philox calls with mul.wide (~100 instructions, part of
    the first two rounds hoisted out of the key loop), _keep_bytes on their 16 words (48),
    then per key pair (the neighbours 2j, 2j + 1 of one query sit in one 32-bit register, their
    draws at the same byte of two calls' words) one prmt that builds both 16-bit lane masks
    (keep_lanes) and one AND (64): ~3.4 instructions per score against ~7.9 for dropout_rows'
    extract, compare and select of fp32 P (tests/test_dropout_sm90.py counts them). Keeps
    exactly what keep_rows keeps. CUDA only (inline PTX)."""
    words, sel_lo, sel_hi = keep_words_rows(seed, salt, start_m, start_n, dropout_p, p16.shape[0], p16.shape[1])
    # the AND stays outside the asm: an asm that returns the masked pair makes ptxas copy every
    # packed register once more on its way to the wgmma operand (32 PRMTs per 64 x 128 tile)
    return apply_lanes(p16, keep_lanes(words, sel_lo, sel_hi))


@gluon.jit
def keep_lanes_rows(seed, salt, start_m, start_n, dropout_p, ROWS: gl.constexpr, N: gl.constexpr):
    """keep_rows as int16 masks (-1 kept, 0 dropped) for apply_lanes: keep_words_rows, keep_lanes."""
    words, sel_lo, sel_hi = keep_words_rows(seed, salt, start_m, start_n, dropout_p, ROWS, N)
    return keep_lanes(words, sel_lo, sel_hi)


@gluon.jit
def apply_lanes(p16, m16):
    """p16 AND the int16 masks m16 (one LOP3 per 32-bit register of two elements)."""
    return (p16.to(gl.int16, bitcast=True) & m16).to(p16.dtype, bitcast=True)


@gluon.jit
def keep_lanes(words, sel_lo, sel_hi):
    """int16 masks (-1 kept, 0 dropped) of keep_words_rows' output, two per prmt: the asm gets
    two elements at a time and puts the first one's in the low 16-bit lane (whichever two they
    are: each lane reads its own element's word and selector)."""
    return gl.inline_asm_elementwise("{ .reg .b32 t; or.b32 t, $3, $6; prmt.b32 $0, $1, $2, t; }",
                                     "=r,r,r,r,r,r,r", [words, sel_lo, sel_hi], dtype=gl.int16, is_pure=True,
                                     pack=2)


@gluon.jit
def draws_cols(seed, salt, start_m, start_n, KEYS: gl.constexpr, ROWS: gl.constexpr):
    """The 8-bit draws of the transposed [KEYS, ROWS] tile (keys start_n.. as rows, queries
    start_m.. as columns) in wgmma_layout(ROWS) (the dK/dV program's S^T)."""
    gl.static_assert(ROWS % 16 == 0, "dropout tiles need a multiple of 16 query rows")
    gl.static_assert(KEYS % 64 == 0, "key tiles of a multiple of 64")
    G: gl.constexpr = ROWS // 16
    A: gl.constexpr = KEYS // 64
    M: gl.constexpr = 8
    L2: gl.constexpr = wgmma_layout(ROWS)
    L6: gl.constexpr = _split_bits(gl.to_linear_layout(L2, [KEYS, ROWS]), [A, M, 8], [G, 2, 8])
    # masks._dropout_words with the axes in key-major order ([A, M, 8, G, 2, 8] = (a, m, c, g, h, r))
    a = _index(L6, 0, A)
    m = _index(L6, 1, M)
    c = _index(L6, 2, 8)
    g = _index(L6, 3, G)
    h = _index(L6, 4, 2)
    r = _index(L6, 5, 8)
    zero = (g * 0 + r * 0 + a * 0 + c * 0).to(gl.uint32)  # [A, 1, 8, G, 1, 8]: one call each
    c0 = ((start_n // 64 + a) * 8 + c).to(gl.uint32) + zero
    c1 = ((start_m // 16 + g) * 8 + r).to(gl.uint32) + zero
    c2 = zero + salt.to(gl.uint32)
    r0, r1, r2, r3 = philox(seed, c0, c1, c2, zero, DROPOUT_ROUNDS)
    mm = m  # start_n % 64 == 0
    word = mm // 2  # [1, M, 1, 1, 1, 1]: m // 2 is the warp, one word per thread and call
    x = _select_word(word, r0, r1, r2, r3)
    byte = h * 2 + mm % 2  # [1, M, 1, 1, 2, 1]
    u = (x >> (byte * 8).to(gl.uint32)) & 0xFF  # [A, M, 8, G, 2, 8]
    u = gl.reshape(u, [KEYS, ROWS])
    return gl.convert_layout(u, L2, assert_trivial=True)


@gluon.constexpr_function
def _calls_layout(KEYS, ROWS):
    """draws_cols_shared's layout of the tile's Philox calls, [A, 8, G, 8] = (a, c, g, r), one call
    per element and none twice: lanes as in the words' layout (c, then r's two high bits), the
    warps on g's two high bits, registers r's low bit and the rest of g and a."""
    A, G = int(KEYS) // 64, int(ROWS) // 16
    g_bits = [1 << i for i in range(G.bit_length() - 1)]
    a_bits = [1 << i for i in range(A.bit_length() - 1)]
    assert len(g_bits) >= 2, "dropout tiles of at least 64 query rows"
    lanes = [[0, 0, 0, 2], [0, 0, 0, 4], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]]
    warps = [[0, 0, g, 0] for g in g_bits[-2:]]
    regs = [[0, 0, 0, 1]] + [[0, 0, g, 0] for g in g_bits[:-2]] + [[a, 0, 0, 0] for a in a_bits]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=warps, block_bases=[],
                                      shape=[A, 8, G, 8])


@gluon.jit
def draws_cols_shared(seed, salt, start_m, start_n, KEYS: gl.constexpr, ROWS: gl.constexpr):
    """draws_cols with each Philox call run once per warpgroup (COLS_SHARED): the calls in
    _calls_layout (2 a thread for a 64 x 64 tile, against 8), their four words joined and moved
    by a layout conversion (through shared memory) to the warps that read them, then the same
    byte selection. The same draws, element for element."""
    gl.static_assert(ROWS % 64 == 0, "dropout tiles of a multiple of 64 query rows here")
    gl.static_assert(KEYS % 64 == 0, "key tiles of a multiple of 64")
    G: gl.constexpr = ROWS // 16
    A: gl.constexpr = KEYS // 64
    L2: gl.constexpr = wgmma_layout(ROWS)
    L7: gl.constexpr = _split_bits(gl.to_linear_layout(L2, [KEYS, ROWS]), [A, 4, 2, 8], [G, 2, 8])
    LW: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(5, L7))  # [A, 4, 8, G, 8]
    LC: gl.constexpr = _calls_layout(KEYS, ROWS)  # [A, 8, G, 8]
    a = _index(LC, 0, A)
    c = _index(LC, 1, 8)
    g = _index(LC, 2, G)
    r = _index(LC, 3, 8)
    zero = (a * 0 + c * 0 + g * 0 + r * 0).to(gl.uint32)  # [A, 8, G, 8]: one call each
    c0 = ((start_n // 64 + a) * 8 + c).to(gl.uint32) + zero
    c1 = ((start_m // 16 + g) * 8 + r).to(gl.uint32) + zero
    c2 = zero + salt.to(gl.uint32)
    r0, r1, r2, r3 = philox(seed, c0, c1, c2, zero, DROPOUT_ROUNDS, True)
    # [A, 8, G, 8, 2 (j), 2 (i)] -> [..., i, j] -> [A, 8, G, 8, 4]: word 2 i + j, then word second
    words = gl.permute(gl.join(gl.join(r0, r1), gl.join(r2, r3)), (0, 1, 2, 3, 5, 4))
    words = gl.permute(gl.reshape(words, [A, 8, G, 8, 4]), (0, 4, 1, 2, 3))  # [A, 4, 8, G, 8]
    x = gl.convert_layout(words, LW)
    x = gl.expand_dims(gl.expand_dims(x, 2), 5)  # [A, 4, 1, 8, G, 1, 8] in L7
    ml = _index(L7, 2, 2)
    h = _index(L7, 5, 2)
    byte = h * 2 + ml  # [1, 1, 2, 1, 1, 2, 1]
    u = (x >> (byte * 8).to(gl.uint32)) & 0xFF  # [A, 4, 2, 8, G, 2, 8]
    u = gl.reshape(u, [KEYS, ROWS])
    return gl.convert_layout(u, L2, assert_trivial=True)


@gluon.jit
def keep_cols(seed, salt, start_m, start_n, dropout_p, KEYS: gl.constexpr, ROWS: gl.constexpr,
              SHARED: gl.constexpr = False):
    """The transpose of keep_rows(seed, salt, start_m, start_n, dropout_p, ROWS, KEYS): an i1
    [KEYS, ROWS] tensor in wgmma_layout(ROWS), element (key start_n + row, query start_m +
    col). start_m % 16 == 0, start_n % 64 == 0. SHARED: by draws_cols_shared (ROWS % 64 == 0)."""
    if SHARED:
        return draws_cols_shared(seed, salt, start_m, start_n, KEYS, ROWS) >= threshold(dropout_p)
    return draws_cols(seed, salt, start_m, start_n, KEYS, ROWS) >= threshold(dropout_p)


@gluon.jit
def dropout_rows(p, seed, salt, start_m, start_n, dropout_p):
    """p (an fp32 [ROWS, N] tile in wgmma_layout(N), queries as rows) with dropped entries 0."""
    keep = keep_rows(seed, salt, start_m, start_n, dropout_p, p.shape[0], p.shape[1])
    return gl.where(keep, p, 0.0)


@gluon.jit
def dropout_cols(pt, seed, salt, start_m, start_n, dropout_p, SHARED: gl.constexpr = False):
    """pt (an fp32 [KEYS, ROWS] tile in wgmma_layout(ROWS), keys as rows) with dropped entries 0."""
    keep = keep_cols(seed, salt, start_m, start_n, dropout_p, pt.shape[0], pt.shape[1], SHARED)
    return gl.where(keep, pt, 0.0)


# ---------------------------------------------------------------------------------------------
# check kernels (benchmarks/gluon_dropout_check.py runs them, tests/test_dropout_sm90.py compiles
# them): the full (batch * nheads, seqlen_q, seqlen_k) int8 keep mask, tile by tile


@gluon.jit
def _mask_kernel(MASK, RNG, seqlen_q, seqlen_k, dropout_p, m_base, n_base, salt_base,
                 TR: gl.constexpr, TC: gl.constexpr, TRANSPOSED: gl.constexpr, PACKED: gl.constexpr,
                 SHARED: gl.constexpr = False):
    """Program (i, j, bh) writes MASK[bh, q, k] (salt salt_base + bh) for the queries/keys of
    its tile, q and k relative to (m_base, n_base) (multiples of 16 / 64): TRANSPOSED = False
    a [TR, TC] = [queries, keys] tile from keep_rows (PACKED: which entries of a bf16 tile of
    ones drop_packed_rows leaves nonzero, the forward's packed path), True a [TR, TC] = [keys,
    queries] one from keep_cols (SHARED: its draws_cols_shared). seqlen_q, seqlen_k: multiples of the tile."""
    bh = gl.program_id(2)
    salt = salt_base + bh
    seed = gl.load(RNG) + gl.load(RNG + 1)  # as forward.py
    L: gl.constexpr = wgmma_layout(TC)
    rows = gl.program_id(0) * TR + gl.arange(0, TR, layout=gl.SliceLayout(1, L))
    cols = gl.program_id(1) * TC + gl.arange(0, TC, layout=gl.SliceLayout(0, L))
    base = MASK + bh.to(gl.int64) * seqlen_q * seqlen_k
    if TRANSPOSED:
        keep = keep_cols(seed, salt, m_base + gl.program_id(1) * TC, n_base + gl.program_id(0) * TR, dropout_p, TR, TC,
                         SHARED)
        ptrs = base + gl.expand_dims(cols, 0) * seqlen_k + gl.expand_dims(rows, 1)
    elif PACKED:
        ones = gl.full([TR, TC], 1.0, gl.bfloat16, layout=L)
        kept = drop_packed_rows(ones, seed, salt, m_base + gl.program_id(0) * TR, n_base + gl.program_id(1) * TC,
                                dropout_p)
        keep = kept != 0.0
        ptrs = base + gl.expand_dims(rows, 1) * seqlen_k + gl.expand_dims(cols, 0)
    else:
        keep = keep_rows(seed, salt, m_base + gl.program_id(0) * TR, n_base + gl.program_id(1) * TC, dropout_p, TR, TC)
        ptrs = base + gl.expand_dims(rows, 1) * seqlen_k + gl.expand_dims(cols, 0)
    gl.store(ptrs, keep.to(gl.int8))


@gluon.jit
def _bench_kernel(OUT, RNG, dropout_p, iters, TR: gl.constexpr, TC: gl.constexpr, TRANSPOSED: gl.constexpr,
                  DROPOUT: gl.constexpr, SHARED: gl.constexpr = False):
    """iters tiles per program (distinct start_n), the kept fp32 ones summed per element and
    stored once: the cost of the mask per tile (DROPOUT = False: the same loop without it)."""
    L: gl.constexpr = wgmma_layout(TC)
    seed = gl.load(RNG) + gl.load(RNG + 1)
    bh = gl.program_id(1)
    acc = gl.zeros([TR, TC], gl.float32, layout=L)
    start = gl.program_id(0) * TR
    for j in range(iters):
        one = gl.full([TR, TC], 1.0, gl.float32, layout=L) + j.to(gl.float32)
        if DROPOUT:
            if TRANSPOSED:
                one = dropout_cols(one, seed, bh, j * 16 * (TC // 16), start, dropout_p, SHARED)
            else:
                one = dropout_rows(one, seed, bh, start, j * 64 * (TC // 64), dropout_p)
        acc += one
    rows = gl.arange(0, TR, layout=gl.SliceLayout(1, L))
    cols = gl.arange(0, TC, layout=gl.SliceLayout(0, L))
    pid = gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)
    gl.store(OUT + pid.to(gl.int64) * TR * TC + gl.expand_dims(rows, 1) * TC + gl.expand_dims(cols, 0), acc)


def compile_for(kernel="mask", tr=64, tc=128, transposed=False, capability=(9, 0), dropout=True, packed=False,
                shared=False):
    """Compile a check kernel for a target without a GPU (tests/test_dropout_sm90.py)."""
    from . import aot
    if kernel == "mask":
        fn = _mask_kernel
        sig = dict(MASK="*i8", RNG="*i64", seqlen_q="i32", seqlen_k="i32", dropout_p="fp32", m_base="i32",
                   n_base="i32", salt_base="i32")
        constexprs = dict(TR=tr, TC=tc, TRANSPOSED=transposed, PACKED=packed, SHARED=shared)
    else:
        fn = _bench_kernel
        sig = dict(OUT="*fp32", RNG="*i64", dropout_p="fp32", iters="i32")
        constexprs = dict(TR=tr, TC=tc, TRANSPOSED=transposed, DROPOUT=dropout, SHARED=shared)
    return aot.compile_gluon(fn, sig, constexprs, 4, capability)


def keep_mask_reference(seed, salt, start_m, start_n, rows, cols, dropout_p, rounds=None):
    """The keep mask of queries start_m .. + rows, keys start_n .. + cols from the spec in
    masks.dropout_keep's docstring, in NumPy (Philox-4x32 per element: a slow reference for
    tests). seed: the int64 the kernels compute (RNG[0] + RNG[1]), salt: batch * nheads + head."""
    import numpy as np
    rounds = int(DROPOUT_ROUNDS) if rounds is None else rounds
    u32 = np.uint64(0xFFFFFFFF)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF  # int64 -> uint64 bits, as tl.philox's seed.to(tl.uint64)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    i = (start_m + np.arange(rows, dtype=np.int64))[:, None]
    c = (start_n + np.arange(cols, dtype=np.int64))[None, :]
    g, h, r = i // 16, (i // 8) % 2, i % 8
    a, m, n = c // 64, (c // 8) % 8, c % 8
    shape = (rows, cols)
    x0 = np.broadcast_to((8 * a + n).astype(np.uint64) & u32, shape)
    x1 = np.broadcast_to((8 * g + r).astype(np.uint64) & u32, shape)
    x2 = np.full(shape, int(salt) & 0xFFFFFFFF, dtype=np.uint64)
    x3 = np.zeros(shape, dtype=np.uint64)
    ra, rb = np.uint64(int(PHILOX_ROUND_A)), np.uint64(int(PHILOX_ROUND_B))
    for _ in range(rounds):
        p0, p2 = ra * x0, rb * x2  # < 2^64: exact
        x0, x1, x2, x3 = (p2 >> np.uint64(32)) ^ x1 ^ k0, p2 & u32, (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & u32
        k0 = (k0 + np.uint64(int(PHILOX_KEY_A))) & u32
        k1 = (k1 + np.uint64(int(PHILOX_KEY_B))) & u32
    words = np.stack([x0, x1, x2, x3])
    word = np.broadcast_to(m // 2, shape)
    x = np.take_along_axis(words, word[None], 0)[0]
    byte = np.broadcast_to(2 * h + m % 2, shape).astype(np.uint64)
    u = (x >> (byte * np.uint64(8))) & np.uint64(0xFF)
    t = np.ceil(np.float32(dropout_p) * np.float32(256.0))
    return u >= np.uint64(int(t))
