"""The compiler's view of the kernels without a GPU: compile for a target ahead of time.

Triton can compile for an NVIDIA target on any machine (its wheel ships ptxas), so
shared memory, registers, spills and whether wgmma is used can be read before a
kernel ever runs. The tests use it to check that every default tile configuration
fits the shared memory of the GPUs it is meant for.

    python -m ioattn.kernels.aot            # report for the default configs, sm_90
"""

import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

# usable shared memory per block (bytes) by compute capability
SMEM_LIMIT = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376, (8, 9): 101376}

_TENSOR_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_PTR_ARGS = {"LSE", "DELTA", "ALIBI"}


def compile_kernel(fn, dtype, constexprs, num_warps, num_stages, capability=(9, 0)):
    """Compile a kernel of this package for a target. dtype: 'bf16', 'fp16' or 'fp32'.

    Pointers, strides and sequence lengths are assumed divisible by 16 (what Triton
    specializes on for the usual shapes), so the result matches a real launch.
    """
    names = fn.arg_names
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in constexprs:
            sig[n] = "constexpr"
            continue
        if n in ("K_DESC", "V_DESC"):  # TMA descriptors: 4-D boxes (1, BLOCK_N, 1, BLOCK_D)
            sig[n] = f"tensordesc<{dtype}[1,{constexprs['BLOCK_N']},1,{constexprs['BLOCK_D']}]>"
        elif n in _TENSOR_ARGS:
            sig[n] = "*" + dtype
        elif n in _FP32_PTR_ARGS:
            sig[n] = "*fp32"
        elif n.startswith("CU_SEQLENS") or n == "BLOCK_TABLE":
            sig[n] = "*i32"
        elif n == "RNG":
            sig[n] = "*i64"
        elif n in ("sm_scale", "softcap", "dropout_p"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
        if sig[n].startswith("*") or n.startswith(("stride_q", "stride_k", "stride_v", "stride_o", "stride_d", "seqlen")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, attrs=attrs,
                                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    cc = capability[0] * 10 + capability[1]
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_gluon(fn, sig, constexprs, num_warps, capability=(9, 0)):
    """Compile a Gluon kernel for a target: ``sig`` gives its run-time parameters' Triton types
    (entries for parameters fn does not have are ignored), ``constexprs`` its compile-time values."""
    from triton.experimental.gluon._runtime import GluonASTSource
    names = fn.arg_names
    full = {n: "constexpr" if n in constexprs else sig[n] for n in names}
    src = GluonASTSource(fn=fn, signature=full, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    cc = capability[0] * 10 + capability[1]
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})


def ptxas_report(kernel, capability=(9, 0)):
    """Registers and spill bytes as ptxas reports them."""
    from triton.backends.nvidia.compiler import get_ptxas
    cc = capability[0] * 10 + capability[1]
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(kernel.asm["ptx"])
    out = subprocess.run([get_ptxas(cc).path, "-v", "--gpu-name", arch, fh.name, "-o", "/dev/null"],
                         capture_output=True, text=True).stderr
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", out)]
    return dict(regs=max(regs, default=0), spill_bytes=max(spills, default=0))


def default_launches(head_dim, dtype, capability=(9, 0), **flags):
    """(name, kernel, constexprs, num_warps, num_stages) of each launch a call would make.
    ``head_dim_v`` (a flag): V's head dim, if not head_dim."""
    import torch

    from . import configs
    from .backward import _attn_bwd_dkdv, _attn_bwd_dq
    from .forward import _attn_fwd, dropout_mode
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    head_dim_v = flags.get("head_dim_v", head_dim)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=configs.block_d(head_dim), HEAD_DIM_V=head_dim_v,
                  BLOCK_DV=configs.block_d(head_dim_v), IS_VARLEN=flags.get("varlen", False),
                  HAS_LEFT=flags.get("window", False), HAS_RIGHT=flags.get("causal", True) or flags.get("window", False),
                  HAS_SOFTCAP=(1 if dtype == "fp32" else 2) if flags.get("softcap") else 0, HAS_ALIBI=flags.get("alibi", False),
                  HAS_DROPOUT=flags.get("dropout", False),
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    tiles = configs.tile_head_dim(head_dim, head_dim_v)
    f = configs.forward_config(tiles, torch_dtype, capability, dropout=common["HAS_DROPOUT"],
                               seqlen_k=flags.get("seqlen_k"))
    gqa = flags.get("gqa", False)
    b = configs.backward_config(tiles, torch_dtype, capability, dropout=common["HAS_DROPOUT"], gqa=gqa)
    # the forward's K/V descriptors (dense batches on sm_90+), else constexpr None
    use_tma = flags.get("tma", capability[0] >= 9 and common["BLOCK_DV"] == common["BLOCK_D"]
                        and configs.tma_tiles(common["BLOCK_D"], torch_dtype.itemsize, common["IS_VARLEN"]))
    tma = dict(USE_TMA=True) if use_tma else dict(USE_TMA=False, K_DESC=None, V_DESC=None)
    # paged K/V (flash_attn_varlen_func's block_table, varlen only): a pointer and the page size
    tma.update(dict(PAGE_SIZE=flags["page_size"]) if flags.get("page_size") else dict(BLOCK_TABLE=None, PAGE_SIZE=0))
    # without GQA the launch passes group == 1, which Triton specializes as a constant
    group = {} if gqa else {"group": 1}
    return [
        ("fwd", _attn_fwd, dict(common, BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"], **tma,
                                HAS_DROPOUT=dropout_mode(0.1 if common["HAS_DROPOUT"] else 0.0, torch_dtype)),
         f["num_warps"], f["num_stages"]),
        ("dkdv", _attn_bwd_dkdv, dict(common, BLOCK_M=b["dkdv"]["BLOCK_M"], BLOCK_N=b["dkdv"]["BLOCK_N"],
                                      RELOAD_KV=b["dkdv"].get("RELOAD_KV", False),
                                      QROWS=b["dkdv"].get("QROWS", False), **group),
         b["dkdv"]["num_warps"], b["dkdv"]["num_stages"]),
        ("dq", _attn_bwd_dq, dict(common, BLOCK_M=b["dq"]["BLOCK_M"], BLOCK_N=b["dq"]["BLOCK_N"]),
         b["dq"]["num_warps"], b["dq"]["num_stages"]),
    ]


def main():
    print(f"{'kernel':5} {'dtype':5} {'hdim':>4} {'flags':24} {'smem':>7} {'regs':>4} {'spill B':>7} wgmma")
    for dtype in ("bf16", "fp32"):
        for d in (64, 128, 256):
            for flags in ({}, {"gqa": True}, {"dropout": True, "gqa": True},
                          {"window": True, "softcap": True, "alibi": True, "varlen": True}):
                for name, fn, consts, warps, stages in default_launches(d, dtype, **flags):
                    k = compile_kernel(fn, dtype, consts, warps, stages)
                    rep = ptxas_report(k)
                    print(f"{name:5} {dtype:5} {d:4d} {','.join(flags) or '-':24} {k.metadata.shared:7d} "
                          f"{rep['regs']:4d} {rep['spill_bytes']:7d} {'wgmma' in k.asm['ptx']}", flush=True)


if __name__ == "__main__":
    main()
