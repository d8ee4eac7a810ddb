"""Comparison with an error bound derived from the dtype.

The kernel's error against the fp64 reference must be at most twice the error
that plain PyTorch makes in the same dtype (the reference run with
``upcast=False``), plus a floor of one unit in the last place (fp16/bf16) at the
reference's largest magnitude.
"""

import torch

from ioattn.reference import attention_ref

# fp16/bf16: one unit in the last place at the reference's largest magnitude (results stored in
# the dtype are compared with a reference rounded to it: two roundings can differ by a unit;
# bf16 2e-3, a quarter unit, failed 1 run in many on dq, 3.1e-2 = one unit at |x| in [4, 8))
FLOOR = {torch.float32: 2e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_close(name, x, ref, low, dtype):
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values (unwritten or NaN)"
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    err, err_low = max_err(x, ref), max_err(low, ref)
    bound = 2 * err_low + FLOOR[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (plain torch {err_low:.3e})"


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=True):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def compare_grads(out, ref, low, inputs, dtype):
    """dq, dk, dv of out against those of the fp64 reference ref (and plain-torch low)."""
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref, inputs, dout.double())
    lowg = torch.autograd.grad(low, inputs, dout)
    for name, g, r, lg in zip(("dq", "dk", "dv"), got, want, lowg):
        assert_close(name, g, r, lg, dtype)


def check_fwd_bwd(fn, q, k, v, ref_kwargs, grads=True):
    """Run fn(q, k, v) -> out and compare out and dq, dk, dv with the fp64 reference."""
    dtype = q.dtype
    out = fn(q, k, v)
    ref, _ = attention_ref(q, k, v, **ref_kwargs)
    low, _ = attention_ref(q, k, v, upcast=False, **ref_kwargs)
    assert_close("out", out, ref, low, dtype)
    if grads:
        compare_grads(out, ref, low, (q, k, v), dtype)
    return out
