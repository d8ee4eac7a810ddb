"""Host cost of one Gluon kernel launch (descriptors + Triton's launch path), full path vs the
cached path of kernels/launch.py (IOATTN_FAST_LAUNCH=1), on any machine: Triton's driver is
replaced by a stand-in and the compiled kernel by one whose launch does nothing, so what is
timed is all the Python of a launch except the C launcher (cuLaunchKernel needs a GPU).

    PYTHONPATH=src python benchmarks/launch_overhead.py [--json out.json]
"""

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import triton
from triton.runtime.driver import driver

from ioattn.kernels import backward_sm90, forward_sm90, launch


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


class _Compiled:
    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        pass

    def __getitem__(self, grid):
        return lambda *args: None


def per_call_us(fn, number=300, repeat=7):
    for _ in range(30):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(samples)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    driver.set_active(_Driver())
    for kern in (forward_sm90._attn_fwd_sm90, backward_sm90._attn_bwd_sm90):
        kern._do_compile = lambda key, *a, kern=kern, **kw: kern.device_caches[0][0].setdefault(key, _Compiled())
    b, n, h, d = 16, 1024, 16, 128
    q, k, v = (torch.empty(b, n, h, d, dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(b, h, n)
    stats = backward_sm90.new_stats(b, h, n, "cpu")
    dq, dk, dv = torch.zeros(q.shape), torch.empty_like(k), torch.empty_like(v)
    fwd = lambda: forward_sm90.attention_forward_sm90(q, k, v, out, lse, softmax_scale=0.088, causal=True)  # noqa: E731
    bwd = lambda: backward_sm90.attention_backward_sm90(q, q, k, v, stats, dq, dk, dv, softmax_scale=0.088,  # noqa: E731
                                                        causal=True)
    desc = lambda: forward_sm90._descriptor(q, [1, 64, 1, d], q.dtype)  # noqa: E731
    res = {}
    for fast in (False, True):
        launch.FAST = fast
        tag = "cached" if fast else "full"
        res[f"forward launch, {tag} path"] = per_call_us(fwd)
        res[f"backward launch, {tag} path"] = per_call_us(bwd)
    res["one TMA descriptor"] = per_call_us(desc)
    for name, us in res.items():
        print(f"{name:34s} {us:7.1f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(us=res, triton=triton.__version__, torch=torch.__version__, python=sys.version.split()[0],
                           machine=platform.processor() or platform.machine(), shape=[b, n, h, d]), fh, indent=1)


if __name__ == "__main__":
    main()
