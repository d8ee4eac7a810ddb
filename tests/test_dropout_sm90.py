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
from ioattn.kernels.aot import ptxas_report  # noqa: E402
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
