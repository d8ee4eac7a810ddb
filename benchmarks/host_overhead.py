"""Host (Python) overhead of one ioattn forward call and one backward call.

At short sequences the GPU waits for Python: this script times what one call costs
on the host, layer by layer, from ``flash_attn_func`` down to the Triton launch.

    PYTHONPATH=src python benchmarks/host_overhead.py [--json out.json]

Without a GPU (any CPU machine): ``TRITON_INTERPRET=1`` is set so that CPU tensors
take the Triton path, and every Triton kernel is replaced by a stub that records
its launch and does nothing; so the numbers are the Python cost of a call without
the kernel body (and without Triton's own launch path). That launch path is
timed separately, in a child process without the interpreter: the real
``JITFunction.run`` (argument binding and specialization, cache lookup, grid)
against a stand-in driver and an already "compiled" stand-in kernel, so all of
Triton's Python runs except the C launcher (``cuLaunchKernel``), which needs a GPU.

With a GPU: the same layers are timed with real launches on CUDA tensors of a tiny
shape (the kernels take a few microseconds, so the loop is host-bound), with
``torch.cuda.synchronize`` only at the end of each timed batch of calls; the
stubbed table is printed too.

Each number is the median over ``--repeat`` batches of ``--number`` calls
(time.perf_counter), in microseconds per call. Layer costs are differences of
these: "checks" = flash_attn_func minus the op call below it, and so on.
"""

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "--jit-probe" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before ioattn (and triton.jit) is imported

import ioattn  # noqa: E402
from ioattn import interface  # noqa: E402
from ioattn.kernels import backward, configs, forward  # noqa: E402

KERNELS = ((forward, "_attn_fwd"), (backward, "_attn_bwd_preprocess"), (backward, "_attn_bwd_dkdv"),
           (backward, "_attn_bwd_dq"))


# --------------------------------------------------------------------------- timing

def per_call_us(fn, number, repeat, sync):
    """Median over `repeat` batches of the wall time per call of `number` calls, in us."""
    for _ in range(max(3, number // 10)):
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(samples)


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the call, nothing else."""

    def __init__(self):
        self.last = None

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **kwargs):
        self.last = (grid, args, kwargs)


@contextlib.contextmanager
def stubbed_kernels():
    """Every kernel of the dense forward and backward replaced by a _Recorder."""
    saved = [(mod, name, getattr(mod, name)) for mod, name in KERNELS]
    stubs = {}
    for mod, name, _ in saved:
        stubs[name] = _Recorder()
        setattr(mod, name, stubs[name])
    try:
        yield stubs
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)


# --------------------------------------------------------------------------- the calls

def make_inputs(args, device):
    dtype = getattr(torch, args.dtype)
    shape_q = (args.batch, args.seqlen, args.nheads, args.hdim)
    q, k, v = (torch.randn(shape_q, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v


def op_args(q, k, causal):
    """The positional arguments of torch.ops.ioattn.fwd after q, k, v for a plain dense call."""
    return (None, None, q.shape[1], k.shape[1], 1.0 / q.shape[-1] ** 0.5, -1, 0 if causal else -1,
            0.0, None, 0.0, None)


def calls(args, device):
    """(name, fn) pairs from the top of the stack down, forward then backward."""
    q, k, v = make_inputs(args, device)
    causal = args.causal
    params = op_args(q, k, causal)
    kwargs = dict(zip(interface._PATH_KWARGS, params))
    head_dim = q.shape[-1]
    out = ioattn.flash_attn_func(q, k, v, causal=causal)
    out_op, _ = torch.ops.ioattn.fwd(q, k, v, *params)
    dout = torch.randn_like(out)
    fast = getattr(interface, "_EagerAttention", None)  # the eager fast path, where it exists
    with torch.no_grad():
        out_ng, lse_ng = interface._forward_impl(q, k, v, *params)
    fwd = [
        ("flash_attn_func", lambda: ioattn.flash_attn_func(q, k, v, causal=causal)),
        ("flash_attn_func, no_grad", _no_grad(lambda: ioattn.flash_attn_func(q, k, v, causal=causal))),
        ("_check_common", lambda: interface._check_common(q, k, v, None, (-1, -1), 0.0, 0.0, None, q.shape[0])),
        ("torch.ops.ioattn.fwd", lambda: torch.ops.ioattn.fwd(q, k, v, *params)),
    ]
    if fast is not None:
        fwd.append(("_EagerAttention.apply", lambda: fast.apply(q, k, v, *params)))
    fwd += [
        ("_forward_impl", lambda: interface._forward_impl(q, k, v, *params)),
        ("attention_forward", lambda: forward.attention_forward(q, k, v, **kwargs)),
        ("forward_config", lambda: configs.forward_config(head_dim, q.dtype, q.device)),
    ]
    bwd = [
        ("autograd.grad", lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)),
        ("autograd.grad, custom-op graph",
         lambda: torch.autograd.grad(out_op, (q, k, v), dout, retain_graph=True)),
        ("torch.ops.ioattn.bwd", lambda: torch.ops.ioattn.bwd(dout, q, k, v, out_ng, lse_ng, *params, None)),
        ("_backward_impl", lambda: interface._backward_impl(dout, q, k, v, out_ng, lse_ng, *params)),
        ("attention_backward",
         lambda: backward.attention_backward(dout, q, k, v, out_ng, lse_ng, **kwargs)),
        ("backward_config", lambda: configs.backward_config(head_dim, q.dtype, q.device)),
    ]
    return fwd, bwd


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def launch_calls(stubs):
    """Replay each kernel's recorded launch on the object now bound to its name."""
    out = []
    for mod, name in KERNELS:
        grid, a, kw = stubs[name].last
        out.append((name, lambda mod=mod, name=name, grid=grid, a=a, kw=kw: getattr(mod, name)[grid](*a, **kw)))
    return out


def time_all(pairs, args, sync):
    return {name: per_call_us(fn, args.number, args.repeat, sync) for name, fn in pairs}


# --------------------------------------------------------------------------- derived layers

def layers(t):
    """Per-layer costs (us) as differences of the cumulative timings in t.

    Where the eager fast path exists (_EagerAttention), flash_attn_func and its
    backward go through it instead of the custom ops; the custom-op costs are
    listed separately ("instead").
    """
    eager = "_EagerAttention.apply" in t
    op = t["_EagerAttention.apply"] if eager else t["torch.ops.ioattn.fwd"]
    bwd_op = 0.0 if eager else t["torch.ops.ioattn.bwd"] - t["_backward_impl"]
    stub_fwd = t["launch _attn_fwd"]
    stub_bwd = sum(t[f"launch {n}"] for n in ("_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"))
    rows = [
        ("fwd: flash_attn_func total", t["flash_attn_func"]),
        ("fwd:   checks + arg handling (above the op)", t["flash_attn_func"] - op),
        ("fwd:   op dispatch + autograd (op call - _forward_impl)", op - t["_forward_impl"]),
        ("fwd:   _forward_impl -> attention_forward", t["_forward_impl"] - t["attention_forward"]),
        ("fwd:   launcher arg prep (excl. config, launch)", t["attention_forward"] - t["forward_config"] - stub_fwd),
        ("fwd:   config lookup", t["forward_config"]),
        ("fwd:   kernel launch", stub_fwd),
        ("bwd: autograd.grad total", t["autograd.grad"]),
        ("bwd:   autograd.grad + engine + node", t["autograd.grad"] - t["_backward_impl"] - bwd_op),
        ("bwd:   bwd op dispatch (op - _backward_impl)", bwd_op),
        ("bwd:   _backward_impl -> attention_backward", t["_backward_impl"] - t["attention_backward"]),
        ("bwd:   launcher arg prep (excl. config, launches)",
         t["attention_backward"] - t["backward_config"] - stub_bwd),
        ("bwd:   config lookup", t["backward_config"]),
        ("bwd:   3 kernel launches", stub_bwd),
    ]
    if eager:
        rows.insert(3, ("fwd:   (custom op instead: op dispatch + autograd)",
                        t["torch.ops.ioattn.fwd"] - t["_forward_impl"]))
        rows.insert(10, ("bwd:   (custom-op graph instead: autograd.grad total)",
                         t["autograd.grad, custom-op graph"]))
    return rows


# --------------------------------------------------------------------------- Triton's launch path

class _FakeDriver:
    """Enough of a Triton driver for JITFunction.run to bind arguments without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


class _FakeCompiled:
    """A compiled kernel whose launch does nothing (the C launcher needs a GPU)."""
    function = None
    packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        pass


def jit_probe(args):
    """Run in a child without TRITON_INTERPRET: Triton's per-launch host path, minus the C launch."""
    import triton
    from triton.runtime.driver import driver

    driver.set_active(_FakeDriver())
    for mod, name in KERNELS:
        kernel = getattr(mod, name)

        def fake_compile(key, *a, kernel=kernel, **kw):
            kernel.device_caches[0][0][key] = _FakeCompiled()  # what a real compile would cache
            return kernel.device_caches[0][0][key]
        kernel._do_compile = fake_compile
    q, k, v = make_inputs(args, "cpu")
    params = op_args(q, k, args.causal)
    kwargs = dict(zip(interface._PATH_KWARGS, params))
    with torch.no_grad():
        with stubbed_kernels() as stubs:  # record each kernel's launch arguments
            out, lse = forward.attention_forward(q, k, v, **kwargs)
            backward.attention_backward(torch.randn_like(out), q, k, v, out, lse, **kwargs)
        pairs = launch_calls(stubs)  # now against the real JITFunctions
        dout = torch.randn_like(out)
        pairs += [
            ("attention_forward", lambda: forward.attention_forward(q, k, v, **kwargs)),
            ("attention_backward", lambda: backward.attention_backward(dout, q, k, v, out, lse, **kwargs)),
            ("forward_config (table)", lambda: configs.forward_config(q.shape[-1], q.dtype, q.device)),
            ("backward_config (table)", lambda: configs.backward_config(q.shape[-1], q.dtype, q.device)),
        ]
        t = time_all(pairs, args, lambda: None)
    t["triton"] = triton.__version__
    return t


def run_jit_probe(args):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    argv = [sys.executable, __file__, "--jit-probe"] + [a for a in sys.argv[1:] if a != "--jit-probe"]
    argv = [a for i, a in enumerate(argv) if not (a == "--json" or (i > 0 and argv[i - 1] == "--json"))]
    res = subprocess.run(argv, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main

def print_table(title, rows):
    print(f"\n{title}")
    width = max(len(n) for n, _ in rows)
    for name, us in rows:
        print(f"  {name:<{width}}  {us:8.2f} us")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--nheads", type=int, default=2)
    ap.add_argument("--hdim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--causal", type=int, default=1)
    ap.add_argument("--number", type=int, default=200, help="calls per timed batch")
    ap.add_argument("--repeat", type=int, default=25, help="timed batches; the median is reported")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--jit-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.causal = bool(args.causal)

    if args.jit_probe:
        print(json.dumps(jit_probe(args)))
        return

    device = "cuda" if HAS_CUDA else "cpu"
    sync = torch.cuda.synchronize if HAS_CUDA else (lambda: None)
    result = dict(machine=platform.node(), processor=platform.processor() or platform.machine(),
                  device=torch.cuda.get_device_name() if HAS_CUDA else "cpu (TRITON_INTERPRET=1, stubbed kernels)",
                  torch=torch.__version__, python=platform.python_version(), args=vars(args))
    print(f"device: {result['device']}; torch {torch.__version__}; shape b={args.batch} s={args.seqlen} "
          f"h={args.nheads} d={args.hdim} {args.dtype} causal={args.causal}; "
          f"median of {args.repeat} x {args.number} calls")

    with stubbed_kernels() as stubs:
        fwd, bwd = calls(args, device)
        fwd[0][1](), bwd[0][1]()  # a forward and a backward record every kernel's launch
        pairs = fwd + bwd + [(f"launch {n}", fn) for n, fn in launch_calls(stubs)]
        stubbed = time_all(pairs, args, sync)
    result["stubbed"] = stubbed
    print_table("Cumulative, kernels stubbed (us per call)", list(stubbed.items()))
    print_table("Layers, kernels stubbed (differences)", layers(stubbed))

    if HAS_CUDA:
        fwd, bwd = calls(args, device)
        # the launches recorded in the stubbed run (CUDA tensors), replayed on the real kernels
        real = time_all(fwd + bwd + [(f"launch {n}", fn) for n, fn in launch_calls(stubs)], args, sync)
        result["real"] = real
        print_table("Cumulative, real launches on the GPU (wall us per call)", list(real.items()))
        print_table("Layers, real launches (differences)", layers(real))
    else:
        jit = run_jit_probe(args)
        result["triton_jit"] = jit
        if "error" in jit:
            print(f"\nTriton launch path: could not be measured here ({jit['error']})")
        else:
            print_table(f"Triton {jit.pop('triton')} JIT host path per launch, no interpreter, stand-in "
                        "driver, C launcher excluded (us)", list(jit.items()))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
