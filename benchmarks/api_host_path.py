"""Host time of one call through the public API on the Gluon (sm_90) path, on any machine:
Triton's driver replaced by a stand-in, the Gluon kernels' compiled kernels and the Triton
preprocess by no-ops, the dispatch told it runs on sm_90 (so flash_attn_func on small CPU
tensors runs exactly the Python of a Hopper call, minus the C launcher). Prints us per
forward (inputs require grad) and per forward+backward; --fast: with kernels/launch.py's
cached launch; --prof: a cProfile of the forward+backward (--fwd: of the forward).

    PYTHONPATH=src python benchmarks/api_host_path.py [--fast] [--prof [--fwd]]
"""

import cProfile
import os
import pstats
import sys

import torch
from triton.runtime.driver import driver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_overhead  # noqa: E402  (the stand-in driver and compiled kernel)

driver.set_active(launch_overhead._Driver())

import ioattn  # noqa: E402
from ioattn import interface  # noqa: E402
from ioattn.kernels import backward, backward_sm90, configs, forward_sm90, launch  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def main():
    for kern in (forward_sm90._attn_fwd_sm90, forward_sm90._attn_fwd_sm90_persistent, backward_sm90._attn_bwd_sm90):
        kern._do_compile = lambda key, *a, kern=kern, **kw: kern.device_caches[0][0].setdefault(
            key, launch_overhead._Compiled())
    backward._attn_bwd_preprocess = _NoLaunch()
    interface._use_triton = lambda t: True
    configs._capability = lambda dev: (9, 0)
    forward_sm90._num_sms = lambda dev: 132  # (the persistent grid; CPU tensors here)
    launch.FAST = "--fast" in sys.argv
    b, n, h, d = 1, 128, 2, 128
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, n, h, d, dtype=torch.bfloat16)

    def fwd():
        return ioattn.flash_attn_func(q, k, v, causal=True)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (q, k, v), dout)

    per_call_us = launch_overhead.per_call_us
    print(f"{'cached' if launch.FAST else 'full'} launch: forward {per_call_us(fwd):.0f} us, "
          f"forward+backward {per_call_us(fwd_bwd):.0f} us per call")
    if "--prof" in sys.argv:
        what = fwd if "--fwd" in sys.argv else fwd_bwd
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(1000):
            what()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
