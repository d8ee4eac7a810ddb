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

A hit then calls the kernel's C launcher itself (``_Direct``; IOATTN_DIRECT_LAUNCH=0 keeps
CompiledKernel's ``kernel[grid](*args)``). Triton's chain from there to cuLaunchKernel is Python:
the runner looks up the stream, builds a launch-metadata dict for the launch hooks (a HookChain
in triton 3.6, never None, so always), CudaLauncher allocates no scratch, and its tensor-descriptor
wrapper encodes every TMA descriptor again on each call (fill_tma_descriptor, a driver call per
descriptor) and rebuilds the argument list. _Direct keeps the encoded descriptors per (address,
shape, strides) (a TMA descriptor holds nothing else, so one encoded for a freed tensor is right
for a new one at the same address), passes no hooks while none are registered, and falls back
to Triton's chain when hooks are registered, the kernel needs scratch memory, or the installed
Triton's launcher is not built the way _unwrap expects.
"""

import os

import torch
from triton import knobs
from triton.runtime.driver import driver

FAST = os.environ.get("IOATTN_FAST_LAUNCH", "1") == "1"
DIRECT = os.environ.get("IOATTN_DIRECT_LAUNCH", "1") == "1"
_cache = {}
_MAX_MAPS = 1024  # encoded descriptors kept per kernel variant (cleared when full)


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


def generic_key(kernel, args, kwargs, device=None):
    """(cache key, every argument in the kernel's parameter order) of a launch. The positional
    arguments are the kernel's leading run-time parameters, the keyword ones its constexprs
    (their values go into the key as they are) and options such as num_warps."""
    names = _names.get(id(kernel))
    if names is None:
        names = _names[id(kernel)] = kernel.arg_names
    if device is None:
        device = driver.active.get_current_device()
    k = (id(kernel), device, tuple([_spec(a) for a in args]), tuple(kwargs.items()))
    return k, [*args, *[kwargs[n] for n in names[len(args):]]]


def align(*tensors):
    """The 16-byte alignment bits of tensors' addresses, for a call site's key."""
    return tuple([t.data_ptr() & 15 == 0 for t in tensors])


def _hooks_idle():
    """Whether no launch hook is registered (the C launcher then gets None for them)."""
    for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if h is not None and getattr(h, "calls", True):
            return False
    return True


def _unwrap(launcher):
    """(the C launch function, ((position, metadata), ...) of the tensor-descriptor arguments) of a
    CudaLauncher's ``launch``: the C function itself without descriptor arguments, else the one
    that triton's wrap_handle_tensordesc closes over. None when it is not built that way or a
    descriptor is one _Direct does not encode (no metadata, fp4 padding)."""
    fn = getattr(launcher, "launch", None)
    code = getattr(fn, "__code__", None)
    if fn is None or code is None:
        return (fn, ()) if callable(fn) else None
    cells = dict(zip(code.co_freevars, [c.cell_contents for c in fn.__closure__ or ()]))
    if not {"launcher", "tensordesc_indices", "tensordesc_meta"} <= cells.keys():
        return None
    metas = cells["tensordesc_meta"]
    if any(m is None or m.get("fp4_padded") for m in metas) or len(metas) != len(cells["tensordesc_indices"]):
        return None
    return cells["launcher"], tuple(zip(sorted(cells["tensordesc_indices"]), metas))


class _Direct:
    """One compiled kernel's launch by its C launcher (see the module docstring)."""

    def __init__(self, compiled, c_launch, descs, fill, dtype_map):
        run = compiled.run
        self.c_launch, self.function, self.packed = c_launch, compiled.function, compiled.packed_metadata
        self.coop, self.pdl = run.launch_cooperative_grid, run.launch_pdl
        self.descs = tuple((pos, (m["swizzle"], m["elem_size"], dtype_map[m["elem_type"]], m["block_size"]))
                           for pos, m in descs)
        self.fill, self.maps = fill, {}

    @classmethod
    def of(cls, compiled):
        """A _Direct for ``compiled``, or None where Triton's own chain has to launch it."""
        try:
            run = compiled.run
            if run.global_scratch_size or run.profile_scratch_size:
                return None
            parts = _unwrap(run)
            if parts is None:
                return None
            from triton.backends.nvidia import driver as nv
            return cls(compiled, parts[0], parts[1], driver.active.utils.fill_tma_descriptor,
                       nv.TMA_DTYPE_DEVICE_TO_HOST)
        except (AttributeError, ImportError, KeyError, TypeError):
            return None

    def args(self, full):
        """The C launcher's kernel arguments: ``full`` with each descriptor as Triton's wrapper
        expands it (the encoded map, then the shape and the strides)."""
        out, prev = [], 0
        for j, (pos, meta) in enumerate(self.descs):
            out += full[prev:pos]
            d = full[pos]
            ptr = d.base.data_ptr()
            k = (j, ptr, *d.shape, *d.strides, d.padding)
            m = self.maps.get(k)
            if m is None:
                if len(self.maps) >= _MAX_MAPS:
                    self.maps.clear()
                swizzle, elem_size, elem_type, block = meta
                m = self.maps[k] = [self.fill(ptr, swizzle, elem_size, elem_type, block, d.shape, d.strides,
                                              1 if d.padding == "nan" else 0), *d.shape, *d.strides]
            out += m
            prev = pos + 1
        out += full[prev:]
        return out

    def __call__(self, grid, full, device):
        self.c_launch(*grid, driver.active.get_current_stream(device), self.function, self.coop, self.pdl, None,
                      None, self.packed, None, None, None, *self.args(full))


def launch(kernel, grid, *args, key=None, **kwargs):
    """``kernel[grid](*args, **kwargs)``, through the kernel cache above when FAST. ``key``: the
    call site's own key (cheaper than the generic one): values that determine every int argument
    (the ints themselves are finer than Triton's specialization), the tensors' align() bits and
    everything the descriptors' types and the constexprs depend on."""
    if not FAST:
        return kernel[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    if key is None:
        k, full = generic_key(kernel, args, kwargs, device)
    else:
        k = (id(kernel), device, key)
        names = _names.get(id(kernel))
        if names is None:
            names = _names[id(kernel)] = kernel.arg_names
        full = [*args, *[kwargs[n] for n in names[len(args):]]]
    hit = _cache.get(k)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        _cache[k] = (compiled, _Direct.of(compiled) if DIRECT else None)
        return compiled
    compiled, direct = hit
    # (both launchers read grid[0], grid[1], grid[2]; JITFunction.run pads it)
    if direct is not None and _hooks_idle():
        direct((*grid, 1, 1)[:3], full, device)
    else:
        compiled[(*grid, 1, 1)[:3]](*full)
    return compiled
