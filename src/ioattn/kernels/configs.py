"""Tile sizes per head dim and device.

Chosen once per (head dim, dtype, device) from a small table, so a new sequence
length never triggers autotuning. Under the Triton interpreter (CPU) the tiles
are small so that tests exercise many blocks, ragged edges and masks quickly.

Everything here runs on every call, so lookups are cached (benchmarks/host_overhead.py).
"""

import functools
import os
from types import MappingProxyType

import torch


# Run-time integers the forward kernel does not specialize on: Triton compiles a separate
# variant when an int argument equals 1 or is divisible by 16; for sequence lengths and
# LSE strides that only multiplies compiles (seqlen 1, 513 and 4096 share one binary).
# A/B on the H100 (benchmarks/results/h100-ab, hdim 128, 1k-16k): the forward is the same
# speed either way, the backward is 4-7% faster when specialized, so the backward kernels
# specialize (a second compile when a sequence length changes divisibility class).
NO_SPECIALIZE = ["seqlen_q_dense", "seqlen_k_dense", "stride_lb", "stride_lh"]

# the last compiled kernel of each launcher, for the compiler's-view report in benchmarks
last_compiled = {}


def kernels_ran():
    """last_compiled as sorted "launcher:kernel" names (GPU checks record which kernels a case ran)."""
    return sorted(f"{n}:{getattr(c, 'name', type(c).__name__)}" for n, c in last_compiled.items())


# tests set this to fill every kernel output with NaN before launch, so an element
# the kernel forgets to write cannot pass
poison_outputs = False


def new_empty(shape, dtype, device):
    if poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # (read by triton at import too)


def interpreting() -> bool:
    return _INTERPRETING


def tma_ok(t, head_dim):
    """Whether a (batch, seqlen, heads, dim) tensor meets the TMA's rules: 16-byte aligned base
    and strides, contiguous last dim, rows of at least 16 bytes, no broadcast (stride 0) dims.
    (Here rather than in forward.py: the Gluon launchers call it on every call, and a
    function-level import of forward costs ~16 us.)"""
    size = t.element_size()
    strides, shape = t.stride(), t.shape
    if strides[-1] != 1 or t.data_ptr() % 16 or head_dim * size < 16 or 0 in shape:
        return False
    for s, n in zip(strides[:-1], shape):
        if (s * size) % 16 or (s <= 0 and n != 1):
            return False
    return True


# CUDA's cap on a launch grid's y (and z) axis; every attention kernel puts its (batch, head) pairs on y
MAX_GRID_Y = 65535


def cdiv(a: int, b: int) -> int:
    """ceil(a / b); triton.cdiv does the same at ~1.5 us a call (a constexpr_function wrapper)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1); as triton.next_power_of_2, without its ~1.5 us."""
    return 1 << (n - 1).bit_length()


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16, what tl.dot needs)."""
    return max(16, next_pow2(head_dim))


def tile_head_dim(head_dim: int, head_dim_v: int) -> int:
    """The head dim whose tiles (forward_config, backward_config) a call takes where V's head
    dim differs from Q/K's: the larger, whose tiles leave shared memory for the smaller; of two
    that pad to the same power of two, the smaller, so that a padded one (129..255) keeps the
    tiles _forward_config gives padded head dims."""
    if block_d(head_dim) == block_d(head_dim_v):
        return min(head_dim, head_dim_v)
    return max(head_dim, head_dim_v)


@functools.cache
def _cuda_capability(index):
    return torch.cuda.get_device_capability(index)


# IOATTN_PORTABLE=1 picks the Ampere/Ada (sm_80) tile table on any GPU: the configuration
# that older GPUs get automatically, made testable on a Hopper GPU too.
PORTABLE = os.environ.get("IOATTN_PORTABLE", "0") == "1"


def _capability(device_or_capability):
    """(major, minor) of a CUDA device; a tuple passes through (ahead-of-time compiles)."""
    if isinstance(device_or_capability, tuple):
        return device_or_capability
    if device_or_capability.type != "cuda":
        return (0, 0)
    index = device_or_capability.index
    cap = _cuda_capability(torch.cuda.current_device() if index is None else index)
    return min(cap, (8, 0)) if PORTABLE else cap


def _frozen(cfg):
    """A read-only view: the cached configs are shared by every call."""
    return MappingProxyType({k: _frozen(v) if isinstance(v, dict) else v for k, v in cfg.items()})


# The forward loads K and V tiles with the TMA (tensor descriptors) on Hopper and newer, dense
# batches only. IOATTN_TMA=0 turns it off, IOATTN_TMA=1 forces it (tests run it under the
# interpreter); IOATTN_PORTABLE=1 (capability treated as sm_80) turns it off too.
TMA = os.environ.get("IOATTN_TMA")


def use_tma(device):
    if TMA is not None:
        return TMA == "1"
    return not interpreting() and device.type == "cuda" and _capability(device)[0] >= 9


def tma_tiles(block_d, element_size, varlen):
    """Whether the forward's TMA variant applies to these tiles (H100 A/B in
    benchmarks/results/h100-tma: +2-5% at head dims padded to 128 in bf16, mixed at 64).
    Not for fp32 (its tiles plus the TMA buffers exceed shared memory), nor at 256 (ptxas
    crashes on it), nor for varlen batches (rows past a sequence belong to the next one)."""
    return not varlen and block_d == 128 and element_size == 2


# benchmarks/sweep_configs.py sets these to time other tiles; None = the table below
forward_override = None
backward_override = None


# key-sequence length up to which hdim 128 runs the forward on 64 x 64 tiles (see below)
SHORT_FORWARD_SEQLEN = int(os.environ.get("IOATTN_SHORT_FORWARD_SEQLEN", "2048"))  # 0: never (A/B)


def forward_config(head_dim, dtype, device, dropout=False, seqlen_k=None):
    """BLOCK_M, BLOCK_N, num_warps, num_stages of the forward kernel (a read-only mapping).

    dropout: part of the key for tables that may differ; since the session-2 generator
    (masks.dropout_keep) needs no extra shared memory, dropout runs with the same tiles.
    seqlen_k: the (maximum) key length; None means long sequences.
    """
    if forward_override is not None:
        return dict(forward_override)
    short = seqlen_k is not None and seqlen_k <= SHORT_FORWARD_SEQLEN
    return _forward_config(head_dim, dtype, _capability(device), dropout, interpreting(), short)


@functools.cache
def _forward_config(head_dim, dtype, capability, dropout, interpreter, short=False):
    if interpreter:
        return _frozen(dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1))
    d = block_d(head_dim)
    big = dtype == torch.float32
    # H100 sweeps (benchmarks/results/h100-sweep1, -sweep2): bf16, 16k tokens, seqlen 4k
    if d <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    elif d <= 128:
        cfg = dict(BLOCK_M=128, BLOCK_N=64 if big else 128, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64 if big else 128, BLOCK_N=32 if big else 64, num_warps=8, num_stages=2)
    if d == 128 and not big and short and capability[0] >= 9:
        # short keys: 64 x 64 tiles and 4 warps (two CTAs per SM, so one's prologue and epilogue
        # overlap the other's loop) beat 128 x 128. H100, 16k tokens, TFLOP/s non-causal /
        # causal. Sweep 11 (benchmarks/results/h100-session4e): 512 353 / 229 vs 304 / 181,
        # 1k 441 / 334 vs 391 / 268, 2k 494 / 411 vs 458 / 344. A/B through the default path,
        # two rounds (h100-session4h): 512 338-352 / 230 vs 301-303 / 180-181, 1k 412-415 /
        # 277-327 vs 391 / 270; at 4k and 8k 128 x 128 won there (473-478 vs 458, 494-496 vs
        # 474-478) although sweep 11 had 64 x 64 ahead, so the switch stops at 2k
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if d > 128 and head_dim != d and not big:
        # hdim 129..255 padded to 256: with 128x64 tiles, 8 warps, triton 3.6 emits a load that
        # faults ("misaligned address") under a causal mask at hdim 160 on the H100
        # (benchmarks/diag_case.py); these smaller tiles run correctly
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if capability[0] < 9:  # Ampere/Ada: less shared memory per SM
        cfg.update(BLOCK_N=min(cfg["BLOCK_N"], 64), num_stages=2)
    return _frozen(cfg)


def backward_config(head_dim, dtype, device, dropout=False, gqa=False):
    """Tiles of the two backward programs.

    dkdv: BLOCK_N keys (and their dK, dV accumulators) stay on chip, BLOCK_M queries stream.
    dq:   BLOCK_M queries (and dQ) stay on chip, BLOCK_N keys stream.

    Returns ``{"dkdv": cfg, "dq": cfg}`` (read-only mappings).
    """
    if backward_override is not None:
        return {k: dict(v) for k, v in backward_override.items()}
    return _backward_config(head_dim, dtype, _capability(device), dropout, gqa, interpreting())


@functools.cache
def _backward_config(head_dim, dtype, capability, dropout, gqa, interpreter):
    if interpreter:
        small = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        return _frozen(dict(dkdv=dict(small, QROWS=dropout), dq=small))
    d = block_d(head_dim)
    big = dtype == torch.float32
    if d <= 64:
        dkdv = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3)
        dq = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    elif d <= 128:
        dkdv = dict(BLOCK_M=32 if big else 64, BLOCK_N=128, num_warps=8, num_stages=2 if big else 3)
        dq = dict(BLOCK_M=128, BLOCK_N=32 if big else 64, num_warps=8, num_stages=2 if big else 3)
    else:
        # S with queries as rows and 128 of them per step (sweep 4, 4k: 200 -> 227, causal
        # 173 -> 236 TFLOP/s); with that layout K and V held in registers beat re-reading them
        # from L2 (session 1's fix for the S^T layout), 270 vs 249, causal 285 vs 279 together
        # with the 3-stage dQ program below (sweeps 6-7; 512 vs 752 bytes of spills)
        dkdv = dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=1) if big else \
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=1, QROWS=True)
        if gqa and not big:  # the group loop doubles the shared memory (344 KiB with the above)
            dkdv = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)
        # 3 stages: sweep 6 (4k) 222 -> 254, causal 237 -> 272 TFLOP/s with the dK/dV above
        dq = dict(BLOCK_M=64, BLOCK_N=16 if big else 32, num_warps=4, num_stages=2 if big else 3)
    if dropout:
        # hdim <= 64: S with queries as rows (the layout the forward draws the mask in) on 64 x 64
        # tiles; H100 4k (benchmarks/results/h100-session4a) 271 TFLOP/s (causal 248) vs 184-228
        # for S^T. hdim 128 keeps the plain tiles and S^T: since the generator's words are 2 x 2
        # blocks (masks.dropout_keep) a thread there needs one word per call (four warps share
        # a call, 5600 sm_90a instructions and no spills, against 6984 and 352 bytes of spills
        # before): 303 vs 295 TFLOP/s for queries as rows at 128 x 64 (causal 259 vs 251).
        if d <= 64 and not big:
            dkdv = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, QROWS=True)
        elif d > 128 and not big:
            dkdv["QROWS"] = dkdv["BLOCK_M"] >= 64  # a wgmma needs 64 rows
    if capability[0] < 9:
        for c in (dkdv, dq):
            c.update(BLOCK_M=min(c["BLOCK_M"], 64), BLOCK_N=min(c["BLOCK_N"], 64), num_stages=1)
    return _frozen(dict(dkdv=dkdv, dq=dq))
