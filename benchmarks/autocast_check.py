"""torch.autocast on CUDA (short output: PASS/FAIL lines, exit status 1 on a failure).

Under ``torch.autocast("cuda", dtype)`` flash_attn_func and flash_attn_varlen_func with fp32
inputs must run the kernels in ``dtype`` (as autocast runs SDPA): the output in ``dtype`` and
bit-equal to calling with inputs cast by hand, fp32 gradients bit-equal to those of the cast call
(cast back), and the whole within bf16/fp16 rounding of an fp64 reference.

    PYTHONPATH=src python benchmarks/autocast_check.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import ioattn  # noqa: E402


def reference(q, k, v, causal):
    """fp64 attention, (batch, seqlen, nheads, headdim), causal bottom-right aligned."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        sq, sk = s.shape[-2:]
        i = torch.arange(sq, device=s.device)[:, None]
        j = torch.arange(sk, device=s.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def one(dtype, causal, varlen):
    torch.manual_seed(0)
    b, sq, sk, h, hk, d = 2, 300, 517, 8, 2, 128
    q = torch.randn(b, sq, h, d, device="cuda", requires_grad=True)
    k = torch.randn(b, sk, hk, d, device="cuda", requires_grad=True)
    v = torch.randn(b, sk, hk, d, device="cuda", requires_grad=True)
    go = torch.randn(b, sq, h, d, device="cuda")

    def call(q, k, v):
        if not varlen:
            return ioattn.flash_attn_func(q, k, v, causal=causal)
        cq = torch.arange(0, (b + 1) * sq, sq, device="cuda", dtype=torch.int32)
        ck = torch.arange(0, (b + 1) * sk, sk, device="cuda", dtype=torch.int32)
        o = ioattn.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cq, ck, sq, sk,
                                          causal=causal)
        return o.view(b, sq, h, d)

    with torch.autocast("cuda", dtype=dtype):
        out = call(q, k, v)
    out.backward(go)
    grads = [t.grad.clone() for t in (q, k, v)]
    qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out_c = call(qc, kc, vc)
    out_c.backward(go.to(dtype))
    ref = reference(q.detach(), k.detach(), v.detach(), causal)
    err = (out.double() - ref).abs().max().item()
    ok = (out.dtype == dtype and torch.equal(out, out_c) and all(g.dtype == torch.float32 for g in grads)
          and all(torch.equal(g, c.grad.float()) for g, c in zip(grads, (qc, kc, vc)))
          and err < (2e-2 if dtype == torch.bfloat16 else 4e-3))
    name = f"autocast {str(dtype)[6:]} causal={causal} varlen={varlen}: out {out.dtype}, max err vs fp64 {err:.2e}"
    print(("PASS " if ok else "FAIL ") + name)
    return ok


def main():
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    oks = [one(dt, c, vl) for dt in (torch.bfloat16, torch.float16) for c in (False, True) for vl in (False, True)]
    print(f"{sum(oks)} passed, {len(oks) - sum(oks)} failed")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
