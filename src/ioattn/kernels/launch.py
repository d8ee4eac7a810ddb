"""A cheaper launch path for the Gluon kernels (default; IOATTN_FAST_LAUNCH=0 turns it off).

``kernel[grid](*args, **kw)`` goes through JITFunction.run on every call: it binds and
specializes every argument (a C++ call each, plus the repr of every descriptor's layout) and
hashes the result, ~100 us per Gluon forward launch and ~140 us per backward launch on a
2-core CPU (benchmarks/launch_overhead.py), where the Triton kernels, with fewer and plainer
arguments, cost ~13 us. At 1k tokens per sequence that is as long as the kernel itself.

``launch`` keeps, per kernel, the compiled kernels it has seen under a key built from what
Triton's specialization looks at (and nothing finer): per tensor its dtype and whether its
address is 16-byte aligned; per int whether it is 1 (then Triton makes it a constant), a
multiple of 16, and fits 32 bits; per descriptor its dtype, block shape and layout; the
constexprs, the options (num_warps) and the device. A miss takes the full path (which
compiles, or finds Triton's cached kernel) and remembers the kernel; a hit launches it
directly with CompiledKernel's own ``kernel[grid](*args)``, the arguments in the kernel's
parameter order as JITFunction.run passes them. tests/test_launch.py checks on the CPU, against
Triton's binder and a stand-in driver, that the key never merges two argument sets that
Triton would compile apart and that both paths pass the same arguments.

Checked on an H200 in session 9 (results/h200-session9a: the Gluon backward 4/4 and varlen
15/15 against fp32 through it); hdim 128 1k causal backward 228 -> 318 TFLOP/s.
"""

import os

import torch
from triton.runtime.driver import driver

FAST = os.environ.get("IOATTN_FAST_LAUNCH", "1") == "1"
_cache = {}


def _spec_tensor(x):
    return (x.dtype, x.data_ptr() & 15 == 0)


def _spec_int(x):
    return (x == 1) + 2 * (x & 15 == 0) + 4 * (-2 ** 31 <= x < 2 ** 31)


def _spec_desc(x):  # (forward_sm90._layout caches one layout object per (block, dtype): id() is stable)
    return (x.base.dtype, tuple(x.block_shape), id(x.layout), x.padding)


def _spec(x):
    """What Triton's specialization of one argument depends on (see the module docstring)."""
    f = _SPEC.get(type(x))
    if f is not None:
        return f(x)
    if isinstance(x, torch.Tensor):
        return _spec_tensor(x)
    if isinstance(x, bool):
        return ("b", x)
    if isinstance(x, int):
        return _spec_int(x)
    if x is None:
        return None
    if hasattr(x, "block_shape") and hasattr(x, "base"):  # a host TensorDescriptor
        return _spec_desc(x)
    raise TypeError(f"launch: no key for an argument of type {type(x).__name__}")


_SPEC = {torch.Tensor: _spec_tensor, torch.nn.Parameter: _spec_tensor, int: _spec_int, float: lambda x: 0}
try:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _GluonDesc
    _SPEC[_GluonDesc] = _spec_desc
except ImportError:
    pass
_names = {}


def generic_key(kernel, args, kwargs):
    """(cache key, every argument in the kernel's parameter order) of a launch. The positional
    arguments are the kernel's leading run-time parameters, the keyword ones its constexprs
    (their values go into the key as they are) and options such as num_warps."""
    names = _names.get(id(kernel))
    if names is None:
        names = _names[id(kernel)] = kernel.arg_names
    k = (id(kernel), driver.active.get_current_device(), tuple([_spec(a) for a in args]), tuple(kwargs.items()))
    return k, [*args, *[kwargs[n] for n in names[len(args):]]]


def align(*tensors):
    """The 16-byte alignment bits of tensors' addresses, for a call site's key."""
    return tuple([t.data_ptr() & 15 == 0 for t in tensors])


def launch(kernel, grid, *args, key=None, **kwargs):
    """``kernel[grid](*args, **kwargs)``, through the kernel cache above when FAST. ``key``: the
    call site's own key (cheaper than the generic one): values that determine every int argument
    (the ints themselves are finer than Triton's specialization), the tensors' align() bits and
    everything the descriptors' types and the constexprs depend on."""
    if not FAST:
        return kernel[grid](*args, **kwargs)
    if key is None:
        k, full = generic_key(kernel, args, kwargs)
    else:
        k = (id(kernel), driver.active.get_current_device(), key)
        names = _names.get(id(kernel))
        if names is None:
            names = _names[id(kernel)] = kernel.arg_names
        full = [*args, *[kwargs[n] for n in names[len(args):]]]
    compiled = _cache.get(k)
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)
        _cache[k] = compiled
        return compiled
    # CompiledKernel's launcher reads grid[0], grid[1], grid[2] (JITFunction.run pads it)
    compiled[(*grid, 1, 1)[:3]](*full)
    return compiled
