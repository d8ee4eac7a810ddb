"""Speed, memory and first-call cost of ioattn against the attention kernels people use.

Run it (GPU):

    PYTHONPATH=src python benchmarks/bench_attention.py            # the full default run
    PYTHONPATH=src python benchmarks/bench_attention.py --quick    # hdim 128, 1k/4k/16k, fwd+bwd
    PYTHONPATH=src python benchmarks/bench_attention.py --smoke    # tiny sizes, works on CPU
    python -m ioattn bench ...                                     # same thing, same flags

What it measures, per case (mode, dtype, head dim, causal, seqlen) and provider:

* **Speed**: ``triton.testing.do_bench`` median, reported in TFLOP/s with the
  FlashAttention papers' count: forward ``4·B·H·N²·D`` (halved when causal),
  backward 2.5x that, forward+backward 3.5x.  ``fwd`` is a training forward
  (inputs require grad); ``bwd`` is the backward alone (the forward runs once
  outside the timed region, then ``torch.autograd.grad(..., retain_graph=True)``
  is timed); ``fwd_bwd`` is both.  Layout changes (SDPA and flex take
  ``(b, h, s, d)``) are views made outside the timed region.
* **Correctness, before timing**: the provider's output and gradients are
  compared with an fp32 reference on batch 0 and as many heads as fit a
  budget; a row whose relative L2 error exceeds the dtype's bound is marked
  ``FAIL`` (it is still timed, so a fast wrong kernel is visible as such).
* **Memory**: peak memory allocated during one forward+backward beyond what was
  allocated before it (the inputs q, k, v, dout), B=1, H=16, D=128, bf16, for
  seqlens up to 64k.
* **CUDA-graph forward** (``--graph-seqlen N``, off by default): for seqlens up to N,
  the forward is also timed as a CUDA graph of 10 calls replayed (no grad, no host
  in the loop), next to the eager number: short sequences can be host-bound, and
  this column shows the kernels alone (``graph_ms`` / ``graph_tflops`` on the row).
* **First-call cost**: wall time of the first forward and first backward of a
  shape (Triton compile + autotune for ioattn, torch.compile for flex) next to
  the steady-state time.

A provider that cannot run a case (unsupported head dim, OOM, not installed)
gets an ``n/a`` row with the reason; the run goes on.  Results are written to
``benchmarks/results/<device>.json`` after every case (so ``--resume`` can pick
up a run that was cut short), with a text table and, when matplotlib is
importable, PNG plots and a markdown table next to it (see ``plot.py``).

Nothing runs at import time: ``python -m ioattn bench`` calls :func:`main`.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_SRC = BENCH_DIR.parent / "src"

MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Largest relative L2 error (of out, dq, dk, dv against the fp32 reference) before a
# row is marked FAIL.  Plain PyTorch in the inputs' dtype makes 2-6e-3 (bf16) and
# 2-7e-4 (fp16) on these random inputs, about the unit roundoff 2^-8 / 2^-11 of P;
# the bounds sit ~4-8x above that, far below what a masking or indexing bug gives.
REL_TOL = {"bf16": 2e-2, "fp16": 4e-3}
# FLOPs of each mode relative to the forward (the FlashAttention papers' convention).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}

# Presets.  Flags given on the command line override the preset's value.
# hdim 128 first: if a run is cut short, the most-quoted shapes are already measured.
# flex_seqlen: torch.compile costs flex ~5 s per new shape; the full run compiles it at the
# seqlens of ANCHORS.md only (None = every seqlen), which keeps the run near 5 minutes.
FULL = dict(hdim=[128, 64, 256], seqlen=[512, 1024, 2048, 4096, 8192, 16384], causal=[False, True],
            mode=list(MODES), dtype=["bf16"], tokens=16384, hidden=2048,
            memory_seqlen=[2048, 8192, 16384, 32768, 65536], memory_nheads=16, memory_hdim=128,
            warmup=25, rep=100, standard_max_seqlen=4096, flex_seqlen=[1024, 4096, 16384])
QUICK = dict(FULL, hdim=[128], seqlen=[1024, 4096, 16384], mode=["fwd", "bwd"],
             memory_seqlen=[2048, 8192, 16384], warmup=10, rep=50, flex_seqlen=None)
SMOKE = dict(FULL, hdim=[32, 64], seqlen=[64, 128], mode=list(MODES), dtype=["bf16", "fp16"],
             tokens=256, hidden=128, memory_seqlen=[128, 256], memory_nheads=2, memory_hdim=64,
             warmup=2, rep=5, standard_max_seqlen=4096, flex_seqlen=None)


# --------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
    """One shape: q, k, v are ``(batch, seqlen, nheads, headdim)``, self-attention."""
    dtype: str
    headdim: int
    causal: bool
    seqlen: int
    batch: int
    nheads: int

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.batch * self.nheads * self.seqlen * self.seqlen * self.headdim
        if self.causal:
            fwd /= 2
        return fwd * MODE_FLOP_FACTOR[mode]

    def label(self) -> str:
        return (f"{self.dtype} d={self.headdim} {'causal' if self.causal else 'full'} "
                f"N={fmt_len(self.seqlen)} B={self.batch} H={self.nheads}")


def fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def parse_len(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


# --------------------------------------------------------------------------- providers
#
# A provider turns (q, k, v, dout) in the canonical (b, s, h, d) layout into a
# `Prepared`: a forward closure over tensors in the provider's own layout, the
# tensors to differentiate, dout in the same layout as the output, and a way back
# to (b, s, h, d) for the correctness check.  All per-shape setup (transposes,
# block masks) happens here, outside the timed region.

class Unavailable(Exception):
    """The provider cannot run this case; the message says why (it becomes the n/a reason)."""


@dataclasses.dataclass
class Prepared:
    forward: object                     # () -> out
    inputs: tuple                       # tensors the gradients are taken with respect to
    dout: torch.Tensor                  # same layout as out
    layout: str = "bshd"                # "bshd" or "bhsd": how to read out and grads back
    context: object = contextlib.nullcontext  # entered around every call (SDPA backend choice)

    def to_bshd(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2) if self.layout == "bhsd" else x


def _first(x):
    """Some FlashAttention builds return (out, lse); keep out."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _bhsd_leaves(q, k, v, dout):
    """(b, h, s, d) views of the canonical tensors, as leaves of their own graph."""
    leaves = tuple(x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    return leaves, dout.transpose(1, 2)


def _prep_ioattn(case, q, k, v, dout):
    try:
        from ioattn import flash_attn_func
    except Exception as e:  # the kernels may not exist yet
        raise Unavailable(f"ioattn.flash_attn_func not importable: {_short(e)}")
    causal = case.causal
    return Prepared(lambda: _first(flash_attn_func(q, k, v, causal=causal)), (q, k, v), dout)


def _prep_standard(case, q, k, v, dout):
    from ioattn.reference import standard_attention
    causal = case.causal
    return Prepared(lambda: standard_attention(q, k, v, causal=causal), (q, k, v), dout)


def _make_sdpa(backend_name):
    def prep(case, q, k, v, dout):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name)
        (qt, kt, vt), dout_t = _bhsd_leaves(q, k, v, dout)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        causal = case.causal
        return Prepared(lambda: sdpa(qt, kt, vt, is_causal=causal), (qt, kt, vt), dout_t,
                        layout="bhsd", context=lambda: sdpa_kernel(backend))
    return prep


_FLEX = {}  # the torch.compile'd flex_attention and block masks, built on first use


def _prep_flex(case, q, k, v, dout):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        # One compiled function, specialized (dynamic=False) and recompiled per shape:
        # raise the recompile limits so that every shape of the sweep gets compiled.
        for name in ("recompile_limit", "cache_size_limit"):
            _set_config(torch._dynamo.config, name, 4096)
        for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
            _set_config(torch._dynamo.config, name, 1 << 16)
        # Donated buffers forbid backward(retain_graph=True), which the bwd timing needs.
        _set_config(torch._functorch.config, "donated_buffer", False)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    block_mask = None
    if case.causal:
        key = (case.seqlen, str(q.device))
        if key not in _FLEX:
            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
            _FLEX[key] = create_block_mask(causal_mask, None, None, case.seqlen, case.seqlen,
                                           device=q.device)
        block_mask = _FLEX[key]
    (qt, kt, vt), dout_t = _bhsd_leaves(q, k, v, dout)
    return Prepared(lambda: flex(qt, kt, vt, block_mask=block_mask), (qt, kt, vt), dout_t,
                    layout="bhsd")


def _make_flash_attn(module, label):
    def prep(case, q, k, v, dout):
        try:
            mod = importlib.import_module(module)
            fn = mod.flash_attn_func
        except Exception as e:
            raise Unavailable(f"{label} not importable: {_short(e)}")
        causal = case.causal
        return Prepared(lambda: _first(fn(q, k, v, causal=causal)), (q, k, v), dout)
    return prep


PROVIDERS = {
    "ioattn": _prep_ioattn,
    "sdpa_flash": _make_sdpa("FLASH_ATTENTION"),
    "sdpa_cudnn": _make_sdpa("CUDNN_ATTENTION"),
    "sdpa_efficient": _make_sdpa("EFFICIENT_ATTENTION"),
    "sdpa_math": _make_sdpa("MATH"),
    "flex": _prep_flex,
    "standard": _prep_standard,
    "flash_attn": _make_flash_attn("flash_attn", "flash-attn 2 (flash_attn)"),
    "fa3": _make_flash_attn("flash_attn_interface", "FlashAttention-3 (flash_attn_interface)"),
    "fa4": _make_flash_attn("flash_attn.cute", "FlashAttention-4 (flash_attn.cute)"),
}
# Providers that need a package which may be absent: in the default set only when installed.
OPTIONAL_MODULES = {"flash_attn": "flash_attn", "fa3": "flash_attn_interface", "fa4": "flash_attn.cute"}
DEFAULT_GPU = ["ioattn", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "standard",
               "flash_attn", "fa3", "fa4"]
DEFAULT_CPU = ["ioattn", "sdpa_math", "flex", "standard"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # find_spec imports the parent package
        return False


def default_providers(device: str) -> list[str]:
    names = DEFAULT_GPU if device == "cuda" else DEFAULT_CPU
    return [p for p in names if p not in OPTIONAL_MODULES or _installed(OPTIONAL_MODULES[p])]


def _set_config(cfg, name, value):
    try:
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    except Exception:
        pass


# --------------------------------------------------------------------------- reference

def check_heads(case_nheads: int, seqlen: int) -> int:
    """How many heads of batch 0 to check: all of them up to ~2^30 score entries in total."""
    return max(1, min(case_nheads, (1 << 30) // (seqlen * seqlen)))


def reference_fp32(q, k, v, dout, causal: bool, nheads: int, need_grad: bool):
    """fp32 attention and its gradients on batch 0, heads [0, nheads), head by head.

    Explicit formulas rather than autograd, so that memory stays at a few N x N
    fp32 matrices for one head (4 GiB at N=16k):
        S = Q Kᵀ·scale, P = softmax(S), O = P V,
        dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = dS K·scale, dK = dSᵀ Q·scale.
    Returns a dict name -> (seqlen, nheads, headdim) float32 tensor.
    """
    n, d = q.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(d)
    masked = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1) if causal else None
    names = ("out", "dq", "dk", "dv") if need_grad else ("out",)
    result = {name: [] for name in names}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference, not TF32
    try:
        with torch.no_grad():
            for h in range(nheads):
                qh, kh, vh = (x[0, :, h].float() for x in (q, k, v))   # [N, D]
                s = (qh @ kh.T).mul_(scale)                             # [N, N]
                if masked is not None:
                    s.masked_fill_(masked, float("-inf"))
                p = torch.softmax(s, dim=-1)
                del s
                oh = p @ vh
                result["out"].append(oh)
                if need_grad:
                    doh = dout[0, :, h].float()
                    result["dv"].append(p.T @ doh)
                    ds = doh @ vh.T                                     # dP
                    ds.sub_((doh * oh).sum(-1, keepdim=True)).mul_(p)   # dS
                    del p
                    result["dq"].append((ds @ kh).mul_(scale))
                    result["dk"].append((ds.T @ qh).mul_(scale))
                    del ds
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {name: torch.stack(ts, dim=1) for name, ts in result.items()}


def compare(got: dict, ref: dict) -> dict:
    """Per tensor: max abs error and relative L2 error, on the reference's slice."""
    errors = {}
    for name, r in ref.items():
        if name not in got:
            continue
        g = got[name][0, :, : r.shape[1]].float()
        diff = g - r
        rel = (diff.norm() / r.norm().clamp_min(1e-30)).item()
        errors[name] = {"max_abs": diff.abs().max().item(), "rel_l2": rel}
    return errors


# --------------------------------------------------------------------------- timing, memory

def bench_ms(fn, device: str, warmup: int, rep: int) -> float:
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    # CPU (smoke tests only): the same idea with a wall clock.
    fn()
    t_end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str, collect: bool = True):
    """Return cached blocks to the device; `collect` also breaks reference cycles (slower)."""
    if collect:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak bytes allocated inside the block beyond what was allocated on entry (CUDA only).

    ``peak_mib()`` may be called inside the block for the peak so far.
    """

    def __init__(self, device):
        self.device = device
        self.mib = None

    def peak_mib(self):
        if self.device != "cuda":
            return None
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.base) / 2**20

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.mib = self.peak_mib()
        return False


def _short(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        m = re.search(r"Tried to allocate ([\d.]+ [GMK]iB)", text)
        return "OOM" + (f" (tried to allocate {m.group(1)})" if m else "")
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ContextBroken(RuntimeError):
    """The CUDA context is unusable (illegal address, device assert): stop the run."""


def _is_fatal(reason: str) -> bool:
    return any(s in reason for s in ("illegal memory access", "device-side assert",
                                     "unspecified launch failure", "illegal instruction",
                                     "misaligned address"))


@contextlib.contextmanager
def _collect_warnings(store: list):
    """SDPA explains *why* a backend refuses a shape only through warnings: keep them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    store.extend(" ".join(str(w.message).split()) for w in caught)


# --------------------------------------------------------------------------- one case

def make_inputs(case: Case, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case.batch, case.seqlen, case.nheads, case.headdim)
    dtype = DTYPES[case.dtype]
    q, k, v, dout = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    return q, k, v, dout


def _row(provider, mode, case, **fields):
    row = dict(provider=provider, mode=mode, dtype=case.dtype, seqlen=case.seqlen,
               headdim=case.headdim, causal=case.causal, batch=case.batch, nheads=case.nheads,
               ms=None, tflops=None, peak_mib=None, max_err=None, rel_err=None, status="n/a",
               reason=None)
    row.update(fields)
    return row


def _timed(fn, device):
    """(fn(), wall milliseconds), synchronized: for first calls, which include compilation."""
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return value, (time.perf_counter() - t0) * 1e3


def _failure(what: str, e: BaseException, notes: list) -> str:
    """The n/a reason for an exception; stops the run if the CUDA context is broken.

    Callers free memory after their `except` block: inside it, the traceback still
    holds the failed call's frames and their tensors.
    """
    reason = str(e) if isinstance(e, Unavailable) else _short(e)
    if notes and not isinstance(e, Unavailable):
        reason += " | " + " ".join(notes[:3])[:300]
    if _is_fatal(reason):
        raise ContextBroken(f"{what}: {reason}")
    return reason


def run_provider(name, case, tensors, ref, args, device):
    """Check, then time, one provider on one case.  Returns (rows, first_call or None)."""
    rows, first = _run_provider(name, case, tensors, ref, args, device)
    # The provider's frames are gone now; after a failure, also break cycles (tracebacks).
    free_memory(device, collect=any(r["status"] == "n/a" for r in rows))
    return rows, first


def _run_provider(name, case, tensors, ref, args, device):
    q, k, v, dout = tensors
    modes = args.mode
    if name == "standard" and case.seqlen > args.standard_max_seqlen:
        reason = (f"skipped: materializes N x N (raise --standard-max-seqlen above "
                  f"{args.standard_max_seqlen} to time it)")
        return [_row(name, m, case, reason=reason) for m in modes], None
    if name == "flex" and args.flex_seqlen is not None and case.seqlen not in args.flex_seqlen:
        reason = ("skipped: torch.compile per shape costs run time; --flex-seqlen all "
                  "(or a list) to time it")
        return [_row(name, m, case, reason=reason) for m in modes], None
    what = f"{name} on {case.label()}"

    # 1. Prepare; first forward (its wall time includes compilation and autotuning).
    notes = []
    try:
        with _collect_warnings(notes):
            p = PROVIDERS[name](case, q, k, v, dout)
            with p.context():
                out, first_fwd = _timed(p.forward, device)
        got = {"out": p.to_bshd(out.detach())}
    except Exception as e:
        reason = _failure(what, e, notes)
        return [_row(name, m, case, reason=reason) for m in modes], None

    # 2. First backward.  A provider without a backward for this case still gets its forward timed.
    bwd_reason, first_bwd = None, None
    if any(m != "fwd" for m in modes):
        notes = []
        try:
            with _collect_warnings(notes), p.context():
                grads, first_bwd = _timed(lambda: torch.autograd.grad(out, p.inputs, p.dout), device)
            got.update(zip(("dq", "dk", "dv"), (p.to_bshd(g) for g in grads)))
            grads = None
        except Exception as e:
            grads = None
            bwd_reason = "backward: " + _failure(what + " (backward)", e, notes)
    out = None
    if bwd_reason is not None:
        free_memory(device)
    errors = compare(got, ref)
    got = None

    # 3. Memory of a training forward and of forward+backward: a second call, so that
    #    compilation and autotuning scratch is not counted.
    peaks = {}
    try:
        with p.context(), PeakMemory(device) as pm:
            out = p.forward()
            peaks["fwd"] = pm.peak_mib()
            if bwd_reason is None and "dq" in errors:
                torch.autograd.grad(out, p.inputs, p.dout)
            out = None
        if bwd_reason is None and "dq" in errors:
            peaks["bwd"] = peaks["fwd_bwd"] = pm.mib
    except Exception as e:
        peaks = {"failure": _failure(what + " (memory)", e, [])}
    out = None
    if "failure" in peaks:
        free_memory(device)

    # 4. Timing, mode by mode, each marked FAIL if the tensors it produces are off.
    rows = []
    for mode in modes:
        if mode != "fwd" and bwd_reason is not None:
            rows.append(_row(name, mode, case, reason=bwd_reason))
            continue
        checked = {n: e for n, e in errors.items() if mode != "fwd" or n == "out"}
        max_err = max(e["max_abs"] for e in checked.values())
        rel_err = max(e["rel_l2"] for e in checked.values())
        ok = math.isfinite(max_err) and math.isfinite(rel_err) and rel_err <= args.tol[case.dtype]
        fail_reason = None if ok else (
            f"error above bound {args.tol[case.dtype]:.0e}: "
            + ", ".join(f"{n} rel {e['rel_l2']:.2e}" for n, e in checked.items()))
        fields = dict(max_err=max_err, rel_err=rel_err, status="ok" if ok else "FAIL",
                      reason=fail_reason, errors=checked)
        failure = None
        try:
            with p.context():
                if mode == "fwd":
                    fn = p.forward
                elif mode == "bwd":
                    out = p.forward()  # once, outside the timed region

                    def fn(out=out):
                        return torch.autograd.grad(out, p.inputs, p.dout, retain_graph=True)
                else:
                    def fn():
                        return torch.autograd.grad(p.forward(), p.inputs, p.dout)
                ms = bench_ms(fn, device, args.warmup, args.rep)
        except Exception as e:
            failure = _failure(f"{what} ({mode})", e, [])
        fn = out = None
        if failure is None and mode == "fwd" and device == "cuda" and case.seqlen <= getattr(args, "graph_seqlen", 0):
            try:
                from bench_decode import graph_ms  # (benchmarks/ is on sys.path: the script's folder)
                with p.context(), torch.no_grad():
                    gms = graph_ms(p.forward, warmup=args.warmup, rep=args.rep)
                fields.update(graph_ms=gms, graph_tflops=case.flops(mode) / gms / 1e9)
            except Exception as e:  # noqa: BLE001  (a provider that cannot be captured: said, not fatal)
                fields.update(graph_reason=_short(e))
                sync(device)
        if failure is None:
            rows.append(_row(name, mode, case, ms=ms, tflops=case.flops(mode) / ms / 1e9,
                             peak_mib=peaks.get(mode), **fields))
        else:
            rows.append(_row(name, mode, case, reason=failure))
            free_memory(device)  # the next mode may fit once the failed one's memory is back

    steady = {r["mode"]: r["ms"] for r in rows}
    first = dict(provider=name, dtype=case.dtype, headdim=case.headdim, causal=case.causal,
                 seqlen=case.seqlen, batch=case.batch, nheads=case.nheads,
                 first_fwd_ms=first_fwd, first_bwd_ms=first_bwd,
                 steady_fwd_ms=steady.get("fwd"), steady_bwd_ms=steady.get("bwd"))
    return rows, first


def run_memory(name, seqlen, args, device):
    """Peak memory of one forward+backward, B=1, H=args.memory_nheads, D=args.memory_hdim, bf16."""
    case = Case("bf16", args.memory_hdim, False, seqlen, 1, args.memory_nheads)
    row = _row(name, "memory", case)
    if device != "cuda":
        row["reason"] = "no CUDA allocator statistics on CPU"
        return row
    notes = []
    try:
        tensors = make_inputs(case, device)
        q, k, v, dout = tensors
        with _collect_warnings(notes):
            p = PROVIDERS[name](case, q, k, v, dout)
            with p.context():
                # Warm-up call: compilation and autotuning allocate scratch memory we do not count.
                torch.autograd.grad(p.forward(), p.inputs, p.dout)
                free_memory(device)
                with PeakMemory(device) as pm:
                    torch.autograd.grad(p.forward(), p.inputs, p.dout)
        row.update(peak_mib=pm.mib, status="ok")
    except Exception as e:
        row["reason"] = _failure(f"{name} memory at N={fmt_len(seqlen)}", e, notes)
    tensors = q = k = v = dout = p = None
    free_memory(device, collect=row["status"] != "ok")
    return row


# --------------------------------------------------------------------------- the run

def build_cases(args) -> list[Case]:
    cases = []
    for dtype in args.dtype:
        for hdim in args.hdim:
            nheads = max(1, args.hidden // hdim)
            for causal in args.causal:
                for seqlen in args.seqlen:
                    batch = max(1, args.tokens // seqlen)
                    cases.append(Case(dtype, hdim, causal, seqlen, batch, nheads))
    return cases


def environment(device: str, argv) -> dict:
    import triton
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_attention.py " + shlex.join(argv),
    }
    try:
        import ioattn
        env["ioattn"] = getattr(ioattn, "__version__", None)
    except Exception:
        env["ioattn"] = None
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Progress:
    """tqdm when installed, else a counter on stderr."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm
            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, unit="job",
                            mininterval=0.5 if interactive else 15.0)
        except ImportError:
            self.bar = None

    def step(self, text: str):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def write(self, text: str):
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _timing_key(r):
    return (r["provider"], r["mode"], r["dtype"], r["seqlen"], r["headdim"], r["causal"],
            r["batch"], r["nheads"])


def run(args, argv) -> dict:
    device = args.device
    env = environment(device, argv)
    result = dict(env, fake=False, config=dict(
        warmup_ms=args.warmup, rep_ms=args.rep, tokens=args.tokens, hidden=args.hidden,
        graph_seqlen=getattr(args, "graph_seqlen", 0),
        rel_tol=args.tol, providers=args.providers, standard_max_seqlen=args.standard_max_seqlen,
        flex_seqlen=args.flex_seqlen,
        memory=dict(batch=1, nheads=args.memory_nheads, headdim=args.memory_hdim, dtype="bf16",
                    causal=False)),
        rows=[], first_call=[], elapsed_s={}, complete=False)
    done = set()
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        # Rows skipped by a limit (--flex-seqlen, --standard-max-seqlen) are redone: the
        # limits of this run may differ.
        result["rows"] = [r for r in old.get("rows", [])
                          if not (r.get("reason") or "").startswith("skipped:")]
        result["first_call"] = old.get("first_call", [])
        done = {_timing_key(r) for r in result["rows"]}
        print(f"resuming: {len(result['rows'])} rows already in {args.out}", file=sys.stderr)

    cases = [] if args.memory_only else build_cases(args)
    todo = [(c, p) for c in cases for p in args.providers
            if any(_timing_key(_row(p, m, c)) not in done for m in args.mode)]
    mem_case = lambda n: Case("bf16", args.memory_hdim, False, n, 1, args.memory_nheads)  # noqa: E731
    if device != "cuda" and not args.no_memory:
        print("memory: skipped (no CUDA allocator statistics on CPU)", file=sys.stderr)
    mem_todo = [] if args.no_memory or device != "cuda" else [
        (n, p) for n in args.memory_seqlen for p in args.providers
        if _timing_key(_row(p, "memory", mem_case(n))) not in done]
    print(plan_text(args, cases, todo, mem_todo), file=sys.stderr, flush=True)

    elapsed = result["elapsed_s"]
    t_start = time.perf_counter()
    progress = Progress(len(todo) + len(mem_todo))
    try:
        by_case = {}
        for case, prov in todo:
            by_case.setdefault(case, []).append(prov)
        for case, provs in by_case.items():
            tensors = make_inputs(case, device)
            q, k, v, dout = tensors
            ref = reference_fp32(q, k, v, dout, case.causal, check_heads(case.nheads, case.seqlen),
                                 need_grad=any(m != "fwd" for m in args.mode))
            for prov in provs:
                t0 = time.perf_counter()
                rows, first = run_provider(prov, case, tensors, ref, args, device)
                elapsed[prov] = elapsed.get(prov, 0.0) + time.perf_counter() - t0
                rows = [r for r in rows if _timing_key(r) not in done]
                result["rows"].extend(rows)
                if first is not None:
                    result["first_call"].append(first)
                if args.verbose:
                    progress.write(f"{case.label():40s} {prov:15s} " + "  ".join(
                        f"{r['mode']}={_cell(r)}" for r in rows))
                progress.step(f"{case.label()} {prov}")
            del tensors, q, k, v, dout, ref
            free_memory(device, collect=False)
            save(result, args.out)
        for seqlen, prov in mem_todo:
            t0 = time.perf_counter()
            result["rows"].append(run_memory(prov, seqlen, args, device))
            elapsed[prov] = elapsed.get(prov, 0.0) + time.perf_counter() - t0
            progress.step(f"memory N={fmt_len(seqlen)} {prov}")
            save(result, args.out)
        result["complete"] = True
        result["ioattn_kernels"] = ioattn_kernel_report()
    except ContextBroken as e:
        progress.write(f"\nFATAL: {e}\nThe CUDA context is unusable; results so far are in "
                       f"{args.out}. Rerun with --resume and without the culprit in --providers.")
        result["fatal"] = str(e)
    except KeyboardInterrupt:
        progress.write(f"\ninterrupted; results so far are in {args.out} (use --resume)")
    finally:
        progress.close()
        elapsed["total"] = elapsed.get("total", 0.0) + time.perf_counter() - t_start
        save(result, args.out)
    return result


def ioattn_kernel_report() -> dict:
    """The compiler's view of ioattn's last compiled kernels (registers, spills, shared memory)."""
    try:
        from ioattn.kernels import configs
        report = {}
        for name, ck in getattr(configs, "last_compiled", {}).items():
            md = ck.metadata
            report[name] = dict(n_regs=getattr(ck, "n_regs", None), n_spills=getattr(ck, "n_spills", None),
                                shared=getattr(md, "shared", None), num_warps=getattr(md, "num_warps", None),
                                num_stages=getattr(md, "num_stages", None),
                                wgmma="wgmma" in ck.asm.get("ptx", "") if hasattr(ck, "asm") else None)
        return report
    except Exception as e:
        return {"error": _short(e)}


def plan_text(args, cases, todo, mem_todo) -> str:
    def skipped(c, p):
        return ((p == "standard" and c.seqlen > args.standard_max_seqlen)
                or (p == "flex" and args.flex_seqlen is not None and c.seqlen not in args.flex_seqlen))
    timed = [(c, p) for c, p in todo if not skipped(c, p)]
    n_timings = len(timed) * len(args.mode)
    # Per timing: warmup + rep + do_bench's first and estimate runs + Python (~50 ms);
    # per case and provider: the first call, the check and the memory pass (~0.1 s).
    est = 15 + n_timings * (args.warmup + args.rep + 50) / 1e3 + len(timed) * 0.1
    # torch.compile of flex: ~5 s per new shape (forward + backward), more for the first.
    flex_shapes = {(c.dtype, c.headdim, c.causal, c.seqlen, c.batch) for c, p in timed if p == "flex"}
    flex_shapes |= {("bf16", args.memory_hdim, False, n, 1) for n, p in mem_todo if p == "flex"}
    est += 5 * len(flex_shapes) + (20 if flex_shapes else 0)
    est += 0.5 * len(mem_todo)
    return (f"device: {args.device}; providers: {', '.join(args.providers)}\n"
            f"{len(cases)} cases x {len(args.providers)} providers x {len(args.mode)} modes: "
            f"{n_timings} timings ({len(todo) * len(args.mode) - n_timings} skipped, see "
            f"--standard-max-seqlen, --flex-seqlen) + {len(mem_todo)} memory runs; "
            f"{len(flex_shapes)} flex compiles; rough estimate {est / 60:.1f} min\n"
            f"results -> {args.out} (written after every case; --resume continues a cut-short run)")


def save(result: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- report

def _cell(r) -> str:
    if r["status"] == "n/a" or r.get("tflops") is None:
        reason = r.get("reason") or ""
        return "OOM" if reason.startswith("OOM") else "n/a"
    text = f"{r['tflops']:.0f}" if r["tflops"] >= 10 else f"{r['tflops']:.2g}"
    return text + ("!" if r["status"] == "FAIL" else "")


def format_report(result: dict) -> str:
    """The text report; the speed table comes last, where a truncated log still shows it."""
    sections = [f"{result['device']} | torch {result['torch']} | triton {result['triton']} | "
                f"CUDA {result['cuda']} | {result['date']}"]
    for section in (_first_call_text, _memory_text, _not_ok_text, _speed_text):
        text = section(result)
        if text:
            sections.append(text)
    el = result.get("elapsed_s", {})
    if el:
        sections.append("Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in el.items()))
    return "\n\n".join(sections)


def _speed_text(result) -> str:
    rows = [r for r in result["rows"] if r["mode"] in MODES]
    if not rows:
        return ""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = {p: max(6, len(p)) for p in providers}
    head = f"{'mode':7s} {'dtype':5s} {'hdim':>4s} {'causal':6s} {'seqlen':>6s} | " + " ".join(
        f"{p:>{width[p]}s}" for p in providers)
    lines = ["TFLOP/s (median; '!' = FAIL: output or gradients off the fp32 reference; "
             "n/a, OOM: see 'Not ok')", head, "-" * len(head)]
    table = {}
    for r in rows:
        key = (MODES.index(r["mode"]), r["dtype"], r["headdim"], r["causal"], r["seqlen"])
        table.setdefault(key, {})[r["provider"]] = r
    for key in sorted(table):
        mode, dtype, hdim, causal, seqlen = key
        cells = " ".join(f"{_cell(table[key][p]) if p in table[key] else '':>{width[p]}s}"
                         for p in providers)
        lines.append(f"{MODES[mode]:7s} {dtype:5s} {hdim:4d} {'yes' if causal else 'no':6s} "
                     f"{fmt_len(seqlen):>6s} | {cells}")
    return "\n".join(lines)


def _memory_text(result) -> str:
    mem = [r for r in result["rows"] if r["mode"] == "memory"]
    if not mem:
        return ""
    lines = ["Peak memory of one forward+backward beyond q, k, v, dout (MiB), "
             + "B=1, H={nheads}, D={headdim}, {dtype}".format(**mem[0])]
    table = {}
    for r in mem:
        table.setdefault(r["seqlen"], {})[r["provider"]] = r
    providers = list(dict.fromkeys(r["provider"] for r in mem))
    width = max(8, *(len(p) for p in providers))
    lines.append(f"{'seqlen':>6s} | " + " ".join(f"{p:>{width}s}" for p in providers))
    for n in sorted(table):
        cells = []
        for p in providers:
            r = table[n].get(p)
            cells.append("" if r is None else f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None
                         else ("OOM" if (r["reason"] or "").startswith("OOM") else "n/a"))
        lines.append(f"{fmt_len(n):>6s} | " + " ".join(f"{c:>{width}s}" for c in cells))
    return "\n".join(lines)


def _first_call_text(result) -> str:
    firsts = result.get("first_call", [])
    mine = [f for f in firsts if f["provider"] == "ioattn"]
    lines = []
    if mine:
        lines += ["ioattn: first call of a new shape (Triton compile + autotune) vs steady state, ms",
                  f"{'dtype':5s} {'hdim':>4s} {'causal':6s} {'seqlen':>6s} | "
                  f"{'1st fwd':>9s} {'fwd':>8s} | {'1st bwd':>9s} {'bwd':>8s}"]
        for f in mine:
            lines.append(f"{f['dtype']:5s} {f['headdim']:4d} {'yes' if f['causal'] else 'no':6s} "
                         f"{fmt_len(f['seqlen']):>6s} | "
                         f"{_ms(f['first_fwd_ms']):>9s} {_ms(f['steady_fwd_ms']):>8s} | "
                         f"{_ms(f['first_bwd_ms']):>9s} {_ms(f['steady_bwd_ms']):>8s}")
    others = {}
    for f in firsts:
        if f["provider"] != "ioattn":
            others.setdefault(f["provider"], []).append(f)
    if others:
        lines.append("first call per shape, median over shapes (fwd / bwd, ms): " + ", ".join(
            f"{p} {_ms(_median(f['first_fwd_ms'] for f in fs))} / "
            f"{_ms(_median(f['first_bwd_ms'] for f in fs))}" for p, fs in others.items()))
    return "\n".join(lines)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _not_ok_text(result) -> str:
    fails, reasons = {}, {}
    for r in result["rows"]:
        if r["status"] == "FAIL":
            fails.setdefault(r["provider"], []).append(r)
        elif r["status"] != "ok":
            reasons.setdefault((r["provider"], r.get("reason") or "?"), []).append(r)
    if not (fails or reasons):
        return ""
    lines = ["Not ok:"]
    for prov, rs in fails.items():
        worst = max(rs, key=lambda r: r["rel_err"] if r["rel_err"] is not None else math.inf)
        lines.append(f"  {prov} FAIL x{len(rs)} [{_where(rs)}]; worst: {worst['mode']} "
                     f"d={worst['headdim']} N={fmt_len(worst['seqlen'])} {worst['reason']}")
    for (prov, reason), rs in reasons.items():
        lines.append(f"  {prov} n/a x{len(rs)} [{_where(rs)}]: {reason}")
    if "fatal" in result:
        lines.append(f"  FATAL (run stopped): {result['fatal']}")
    return "\n".join(lines)


def _where(rows) -> str:
    where = sorted({(r["headdim"], r["seqlen"]) for r in rows})
    text = ", ".join(f"d={d} N={fmt_len(n)}" for d, n in where[:4])
    return text + (f" +{len(where) - 4} more" if len(where) > 4 else "")


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3g}" if x < 100 else f"{x:.0f}"


# --------------------------------------------------------------------------- CLI

def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="bench_attention.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Lists are comma-separated; seqlens accept 1k, 16k, ...  Flags override the preset "
               "(full by default, or --quick / --smoke).")
    preset = ap.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="hdim 128, seqlen 1k,4k,16k, fwd+bwd, memory to 16k, shorter timing")
    preset.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU")
    ap.add_argument("--providers", help="comma list; default: all that can run here "
                    f"(known: {', '.join(PROVIDERS)})")
    ap.add_argument("--hdim", help="head dims (default 128,64,256)")
    ap.add_argument("--seqlen", help="seqlens (default 512,1k,2k,4k,8k,16k)")
    ap.add_argument("--mode", help="fwd,bwd,fwd_bwd (default all)")
    ap.add_argument("--dtype", help="bf16,fp16 (default bf16)")
    ap.add_argument("--causal", choices=["both", "yes", "no", "true", "false", "1", "0"],
                    help="default both")
    ap.add_argument("--tokens", type=int, help="batch = tokens // seqlen (default 16384)")
    ap.add_argument("--hidden", type=int, help="nheads = hidden // hdim (default 2048)")
    ap.add_argument("--graph-seqlen", type=int, default=0,
                    help="also time the forward as a replayed CUDA graph up to this seqlen (default 0: off)")
    ap.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--memory-seqlen", help="default 2k,8k,16k,32k,64k")
    ap.add_argument("--warmup", type=int, help="do_bench warmup, ms (default 25)")
    ap.add_argument("--rep", type=int, help="do_bench repetition time, ms (default 100)")
    ap.add_argument("--standard-max-seqlen", type=int,
                    help="time standard attention only up to this seqlen (default 4096; memory "
                         "runs are not limited)")
    ap.add_argument("--flex-seqlen",
                    help="seqlens at which flex is compiled and timed, or 'all' (default: "
                         "1k,4k,16k in the full run, all in --quick/--smoke)")
    ap.add_argument("--rtol", type=float, help="override the FAIL bound on relative L2 error")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<device>.json)")
    ap.add_argument("--resume", action="store_true", help="keep rows already in --out, run the rest")
    ap.add_argument("--no-plot", action="store_true", help="skip PNG plots and markdown")
    ap.add_argument("--cold-cache", action="store_true",
                    help="fresh Triton/Inductor caches, so first calls include compilation")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    ap.add_argument("--list", action="store_true", help="list providers and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case and provider")
    args = ap.parse_args(argv)

    preset_values = SMOKE if args.smoke else QUICK if args.quick else FULL
    split = lambda s: [x for x in s.split(",") if x.strip()]  # noqa: E731
    args.hdim = [int(x) for x in split(args.hdim)] if args.hdim else preset_values["hdim"]
    args.seqlen = [parse_len(x) for x in split(args.seqlen)] if args.seqlen else preset_values["seqlen"]
    args.mode = split(args.mode) if args.mode else preset_values["mode"]
    args.dtype = split(args.dtype) if args.dtype else preset_values["dtype"]
    args.causal = ({"both": [False, True], "yes": [True], "true": [True], "1": [True]}.get(
        args.causal, [False]) if args.causal else preset_values["causal"])
    args.memory_seqlen = ([parse_len(x) for x in split(args.memory_seqlen)] if args.memory_seqlen
                          else preset_values["memory_seqlen"])
    if args.flex_seqlen is None:
        args.flex_seqlen = preset_values["flex_seqlen"]
    elif args.flex_seqlen.strip().lower() == "all":
        args.flex_seqlen = None
    else:
        args.flex_seqlen = [parse_len(x) for x in split(args.flex_seqlen)]
    for name in ("tokens", "hidden", "warmup", "rep", "standard_max_seqlen"):
        if getattr(args, name) is None:
            setattr(args, name, preset_values[name])
    args.memory_nheads = preset_values["memory_nheads"]
    args.memory_hdim = preset_values["memory_hdim"]
    args.tol = {d: (args.rtol if args.rtol is not None else REL_TOL[d]) for d in DTYPES}
    for m in args.mode:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for d in args.dtype:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    args.mode = [m for m in MODES if m in args.mode]
    return ap, args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap, args = parse_args(argv)
    if str(REPO_SRC) not in sys.path and importlib.util.find_spec("ioattn") is None:
        sys.path.insert(0, str(REPO_SRC))  # running from a checkout without PYTHONPATH=src

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.list:
        defaults = default_providers(args.device)
        for p in PROVIDERS:
            missing = p in OPTIONAL_MODULES and not _installed(OPTIONAL_MODULES[p])
            print(f"{p:15s} {'not installed' if missing else ''}"
                  f"{'default on ' + args.device if p in defaults else ''}")
        return 0
    if args.device == "cpu" and not args.smoke:
        ap.error("no CUDA device: the full-size benchmark needs a GPU; use --smoke for a CPU smoke test")
    args.providers = (args.providers.split(",") if args.providers else default_providers(args.device))
    unknown = [p for p in args.providers if p not in PROVIDERS]
    if unknown:
        ap.error(f"unknown provider(s) {unknown}; known: {', '.join(PROVIDERS)}")
    if args.out is None:
        name = slug(torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
        if args.smoke:  # smoke output is not a result: keep it out of benchmarks/results/
            args.out = Path(tempfile.gettempdir()) / f"ioattn-bench-{name}-smoke.json"
        else:
            args.out = BENCH_DIR / "results" / f"{name}.json"
    if args.cold_cache:
        cache = tempfile.mkdtemp(prefix="ioattn-bench-cache-")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")

    result = run(args, argv)
    report = format_report(result)
    args.out.with_suffix(".txt").write_text(report + "\n")
    if not args.no_plot:
        try:
            spec = importlib.util.spec_from_file_location("ioattn_bench_plot", BENCH_DIR / "plot.py")
            plot = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(plot)
            written = plot.write_all(result, args.out)
            report += "\nplots/markdown: " + ", ".join(str(p) for p in written)
        except ImportError as e:
            report += f"\nno plots ({_short(e)}); run benchmarks/plot.py {args.out} elsewhere"
        except Exception as e:  # a plotting bug must not lose a finished run
            report += f"\nplotting failed: {_short(e)}"
    print(report)
    print(f"\nresults: {args.out} (+ {args.out.with_suffix('.txt').name})")
    return 0 if result.get("complete") else 1


if __name__ == "__main__":
    sys.exit(main())
