"""Multi-GPU checks (needs 2 CUDA GPUs), short output: PASS/FAIL lines and a JSON file.

1. The device guard: with cuda:0 current, calls on tensors that live on cuda:1 (dense,
   varlen, dropout + its mask helper, paged KV cache) must give bit-identical results to
   the same calls on cuda:0, leave cuda:0 current, and mixed-device inputs must raise.
   (Triton launches on the current device; ioattn makes the tensors' GPU current.)
2. Data parallel: 2 processes (torch.multiprocessing.spawn, NCCL), one GPU each, train a
   tiny attention model that calls ioattn (GQA, causal) under DistributedDataParallel for
   a few steps. The all-reduced gradients must be identical on both ranks, equal (to fp32
   rounding) the single-GPU gradients of the whole batch, and the parameters must stay
   identical across ranks after each optimizer step.
3. Context parallel: 2 processes, one 8k-token sequence (bf16, GQA 16/4 heads of 128) sharded
   zigzag; flash_attn_cp_func's output and gradients on each rank's shard against
   flash_attn_func over the whole sequence (relative error < 2e-2, bf16 rounding).

    PYTHONPATH=src python benchmarks/multi_gpu_check.py --out multi_gpu.json

Exit status 0 when everything passes, 1 otherwise, 2 without two GPUs. ``--cpu`` runs parts
2 and 3 on the CPU (gloo, ioattn's plain-PyTorch path): a check of the script itself.
``--one-gpu`` runs part 2 with both ranks on cuda:0 over gloo (NCCL refuses two ranks on one
GPU): ioattn's kernels and autograd inside DistributedDataParallel on CUDA, where only one GPU
can be had.
"""

import argparse
import copy
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

# NVLink multicast stays off (NCCL, PyTorch symmetric memory, NVSHMEM), also in the children
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ioattn  # noqa: E402
from ioattn import interface  # noqa: E402

I32 = torch.int32


# --------------------------------------------------------------------------- 1. the device guard

def _run(device, fn, inputs, seed=0):
    """Outputs and input gradients of fn on copies of inputs on device (cuda:0 stays current)."""
    xs = [x.to(device).requires_grad_(x.is_floating_point()) for x in inputs]
    torch.manual_seed(seed)  # the dropout seed: the same on both GPUs
    outs = fn(*xs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    dout = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(1)).to(outs[0])
    grads = torch.autograd.grad(outs[0], [x for x in xs if x.requires_grad], dout)
    torch.cuda.synchronize(device)
    return [t.detach() for t in outs + list(grads)]


def _identical(xs, ys):
    """(bitwise equal, max abs difference) of two lists of tensors."""
    xs, ys = [x.cpu() for x in xs], [y.cpu() for y in ys]
    diff = max(((x.double() - y.double()).nan_to_num(0.0, 0.0, 0.0).abs().max().item() if x.numel() else 0.0)
               for x, y in zip(xs, ys))
    return all(torch.equal(x, y) for x, y in zip(xs, ys)), diff


def _compare(name, fn, inputs):
    t0 = time.perf_counter()
    on1 = _run("cuda:1", fn, inputs)
    current_after = torch.cuda.current_device()
    on0 = _run("cuda:0", fn, inputs)
    identical, diff = _identical(on1, on0)
    on_dev1 = all(a.device == torch.device("cuda:1") for a in on1)
    ok = identical and on_dev1 and current_after == 0
    return dict(name=name, ok=ok, identical=identical, max_abs_diff=diff, outputs_on_cuda1=on_dev1,
                current_device_after=current_after, seconds=round(time.perf_counter() - t0, 2))


def guard_checks():
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    results = []

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = rnd(2, 1000, 16, 128), rnd(2, 1000, 4, 128), rnd(2, 1000, 4, 128)
    results.append(_compare("guard: dense fwd+bwd (bf16, GQA, causal)",
                            lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True), [q, k, v]))
    results.append(_compare("guard: dense fwd+bwd (fp16, hdim 64, window, softcap)",
                            lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True, window_size=(200, 0),
                                                                   softcap=30.0),
                            [rnd(2, 700, 8, 64, dtype=torch.float16)] * 3))
    lens = [300, 0, 1000, 77]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=I32)
    n = int(cu[-1])
    results.append(_compare("guard: varlen fwd+bwd",
                            lambda q, k, v, cu: ioattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens),
                                                                              causal=True),
                            [rnd(n, 16, 128), rnd(n, 4, 128), rnd(n, 4, 128), cu]))
    results.append(_compare("guard: dropout fwd+bwd + mask (return_attn_probs)",
                            lambda q, k, v: ioattn.flash_attn_func(q, k, v, dropout_p=0.17, causal=True,
                                                                   return_attn_probs=True),
                            [rnd(1, 256, 4, 64), rnd(1, 256, 2, 64), rnd(1, 256, 2, 64)]))

    # paged KV cache with an append and rotary: out, lse and the caches after the in-place append
    t0 = time.perf_counter()
    b, pages, page, hk, d = 4, 64, 64, 8, 128
    base = dict(q=rnd(b, 1, 32, d), kc=rnd(pages, page, hk, d), vc=rnd(pages, page, hk, d),
                k=rnd(b, 1, hk, d), v=rnd(b, 1, hk, d), cos=torch.randn(16 * page, 64, generator=g),
                sin=torch.randn(16 * page, 64, generator=g), lens=torch.tensor([0, 17, 500, 1000], dtype=I32),
                table=torch.randperm(pages, generator=g).to(I32).view(b, 16))
    outs = {}
    for dev in ("cuda:1", "cuda:0"):
        a = {key: t.to(dev) for key, t in base.items()}
        out, lse = ioattn.flash_attn_with_kvcache(a["q"], a["kc"], a["vc"], a["k"], a["v"], a["cos"], a["sin"],
                                                  cache_seqlens=a["lens"], block_table=a["table"], causal=True,
                                                  return_softmax_lse=True)
        torch.cuda.synchronize(dev)
        outs[dev] = (out, lse, a["kc"], a["vc"], torch.cuda.current_device())
    identical, diff = _identical(outs["cuda:1"][:4], outs["cuda:0"][:4])
    cur = outs["cuda:1"][4]
    results.append(dict(name="guard: flash_attn_with_kvcache (paged, append, rotary)",
                        ok=identical and cur == 0 and outs["cuda:1"][0].device == torch.device("cuda:1"),
                        identical=identical, max_abs_diff=diff, current_device_after=cur,
                        seconds=round(time.perf_counter() - t0, 2)))

    # inputs on different devices: a ValueError naming them
    errors = {}
    q1, k0 = rnd(1, 8, 2, 64).to("cuda:1"), rnd(1, 8, 2, 64).to("cuda:0")
    cases = {
        "q cuda:1, k/v cuda:0": lambda: ioattn.flash_attn_func(q1, k0, k0),
        "q/k/v cuda:1, cu_seqlens cuda:0": lambda: ioattn.flash_attn_varlen_func(
            q1[0], q1[0], q1[0], torch.tensor([0, 8], dtype=I32, device="cuda:0"),
            torch.tensor([0, 8], dtype=I32, device="cuda:1"), 8, 8),
        "q cuda:1, k/v cpu": lambda: ioattn.flash_attn_func(q1, k0.cpu(), k0.cpu()),
        "q cuda:1, caches cuda:0": lambda: ioattn.flash_attn_with_kvcache(q1, k0, k0),
    }
    for label, call in cases.items():
        try:
            call()
            errors[label] = "no error"
        except ValueError as e:
            errors[label] = f"ValueError: {e}"
        except Exception as e:  # noqa: BLE001 -- reported as a failure
            errors[label] = f"{type(e).__name__}: {e}"
    results.append(dict(name="mixed devices raise ValueError", ok=all(m.startswith("ValueError") for m in errors.values()),
                        messages=errors))
    return results


# --------------------------------------------------------------------------- 2. data parallel

class TinyAttentionLM(torch.nn.Module):
    """Embedding, `layers` x (pre-norm GQA causal attention through ioattn + MLP), LM head."""

    def __init__(self, vocab=256, dim=256, heads=8, kv_heads=2, layers=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(torch.nn.ModuleDict(dict(
                norm1=torch.nn.LayerNorm(dim), qkv=torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd),
                proj=torch.nn.Linear(dim, dim), norm2=torch.nn.LayerNorm(dim),
                mlp=torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)))))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        b, s = tokens.shape
        x = self.embed(tokens)
        for blk in self.blocks:
            qkv = blk["qkv"](blk["norm1"](x)).view(b, s, self.heads + 2 * self.kv_heads, self.hd)
            q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
            x = x + blk["proj"](ioattn.flash_attn_func(q, k, v, causal=True).reshape(b, s, -1))
            x = x + blk["mlp"](blk["norm2"](x))
        return self.head(x)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _ddp_worker(rank, world, port, tmpdir, steps, cpu, one_gpu=False):
    result = dict(rank=rank, ok=False)
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if cpu:  # --cpu: gloo and ioattn's CPU path, to check this script without GPUs
            dev = torch.device("cpu")
            dist.init_process_group("gloo", rank=rank, world_size=world)
        elif one_gpu:  # --one-gpu: both ranks on cuda:0, gloo (its CUDA all-reduce and broadcast)
            torch.cuda.set_device(0)
            dev = torch.device("cuda", 0)
            dist.init_process_group("gloo", rank=rank, world_size=world)
        else:
            torch.cuda.set_device(rank)
            dev = torch.device("cuda", rank)
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
        torch.manual_seed(0)
        model = TinyAttentionLM().to(dev)  # fp32: ioattn's fp32 path (true fp32 products)
        reference = copy.deepcopy(model) if rank == 0 else None  # the single-GPU run of the whole batch
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if cpu else [dev.index])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1) if rank == 0 else None
        per_rank = 4
        steps_out = []
        for step in range(steps):
            data = torch.randint(0, 256, (world * per_rank, 129),
                                 generator=torch.Generator().manual_seed(100 + step)).to(dev)
            opt.zero_grad(set_to_none=True)
            loss = _loss(ddp, data[rank * per_rank:(rank + 1) * per_rank])
            loss.backward()  # DDP all-reduces (averages) the gradients
            grads = _flat_grads(model)
            wire = grads.cpu() if one_gpu else grads  # (gloo gathers CPU tensors only)
            gathered = [torch.empty_like(wire) for _ in range(world)]
            dist.all_gather(gathered, wire)
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            rec = dict(step=step, loss=mean_loss.item() / world,
                       grads_identical_across_ranks=all(torch.equal(gathered[0], g_) for g_ in gathered))
            if rank == 0:
                ref_opt.zero_grad(set_to_none=True)
                ref_loss = _loss(reference, data)  # the whole batch on one GPU
                ref_loss.backward()
                ref = _flat_grads(reference)
                err = ((grads - ref).abs().max() / ref.abs().max()).item()  # (both on dev)
                rec.update(single_gpu_loss=ref_loss.item(), rel_grad_err_vs_single_gpu=err,
                           matches_single_gpu=err < 1e-4)
                ref_opt.step()
            opt.step()
            params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            params = params.cpu() if one_gpu else params
            all_params = [torch.empty_like(params) for _ in range(world)]
            dist.all_gather(all_params, params)
            rec["params_identical_across_ranks"] = all(torch.equal(all_params[0], p) for p in all_params)
            steps_out.append(rec)
        result.update(steps=steps_out, ok=all(r["grads_identical_across_ranks"] and r["params_identical_across_ranks"]
                                              and r.get("matches_single_gpu", True) for r in steps_out))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- the parent reports it
        result["error"] = traceback.format_exc(limit=6)
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _spawn_ranks(worker, world, *args):
    """Runs worker(rank, world, port, tmpdir, *args) in `world` processes; each writes
    rank<r>.json to tmpdir. Returns (spawn error or None, the ranks' results, seconds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        try:
            mp.spawn(worker, args=(world, port, tmpdir, *args), nprocs=world, join=True)
            spawn_error = None
        except Exception as e:  # noqa: BLE001 -- a crashed worker is a FAIL, reported by the caller
            spawn_error = f"{type(e).__name__}: {e}"
        ranks = [json.load(open(p)) if os.path.exists(p := os.path.join(tmpdir, f"rank{r}.json"))
                 else dict(rank=r, ok=False, error="no result") for r in range(world)]
    return spawn_error, ranks, round(time.perf_counter() - t0, 1)


def ddp_check(steps, cpu=False, one_gpu=False):
    world = 2
    spawn_error, ranks, seconds = _spawn_ranks(_ddp_worker, world, steps, cpu, one_gpu)
    kind = "gloo (CPU)" if cpu else "gloo (both on cuda:0)" if one_gpu else "NCCL"
    return dict(name=f"DDP: {world} ranks x {kind}, {steps} steps, grads vs single GPU",
                ok=spawn_error is None and all(r["ok"] for r in ranks),
                spawn_error=spawn_error, ranks=ranks, seconds=seconds)


def _cp_worker(rank, world, port, tmpdir, cpu):
    """flash_attn_cp_func (zigzag, causal) on this rank's shard vs flash_attn_func over the whole
    sequence on this rank's device: out, dq, dk, dv of the shard."""
    from ioattn.distributed import shard_sequence
    result = dict(rank=rank, ok=False)
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if cpu:
            dev, dtype, n = torch.device("cpu"), torch.float32, 256
            dist.init_process_group("gloo", rank=rank, world_size=world)
        else:
            torch.cuda.set_device(rank)
            dev, dtype, n = torch.device("cuda", rank), torch.bfloat16, 8192
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(1, n, h, 128, generator=g).to(dev, dtype) for h in (16, 4, 4, 16))
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        out = ioattn.flash_attn_func(*full, causal=True)
        want = (out, *torch.autograd.grad(out, full, dout))
        shards = [shard_sequence(x, rank, world).requires_grad_() for x in (q, k, v)]
        out_s = ioattn.flash_attn_cp_func(*shards, causal=True)
        got = (out_s, *torch.autograd.grad(out_s, shards, shard_sequence(dout, rank, world)))
        errs = {}
        for name, x, w in zip(("out", "dq", "dk", "dv"), got, want):
            w = shard_sequence(w, rank, world).float()
            errs[name] = ((x.float() - w).norm() / w.norm()).item()
        result.update(rel_err=errs, ok=all(e < (1e-5 if cpu else 2e-2) for e in errs.values()))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- the parent reports it
        result["error"] = traceback.format_exc(limit=6)
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def cp_check(cpu=False):
    world = 2
    spawn_error, ranks, seconds = _spawn_ranks(_cp_worker, world, cpu)
    return dict(name=f"context parallel: {world} ranks x {'gloo (CPU)' if cpu else 'NCCL'}, zigzag causal, "
                     f"shard vs whole sequence", ok=spawn_error is None and all(r["ok"] for r in ranks),
                spawn_error=spawn_error, cp_ranks=ranks, seconds=seconds)


def _summary(r):
    if "cp_ranks" in r:
        return "; ".join(f"rank {x['rank']}: " + (", ".join(f"{k} {e:.1e}" for k, e in x["rel_err"].items())
                                                 if "rel_err" in x else x.get("error", "").strip()[-200:])
                         for x in r["cp_ranks"]) + f" ({r['seconds']} s)"
    if "max_abs_diff" in r:
        return f"max |cuda:1 - cuda:0| = {r['max_abs_diff']:.3g}, current device after: {r['current_device_after']}"
    if "messages" in r:
        bad = {k: m for k, m in r["messages"].items() if not m.startswith("ValueError")}
        return f"{len(r['messages'])} cases" + (f", not ValueError: {bad}" if bad else "")
    if "ranks" in r:
        r0 = r["ranks"][0]
        if "error" in r0 or r.get("spawn_error"):
            errs = [x.get("error", "").strip().splitlines()[-1:] for x in r["ranks"]]
            return f"spawn: {r.get('spawn_error')}; errors: {errs}"
        last = r0["steps"][-1]
        return (f"loss {last['loss']:.5f} (single GPU {last['single_gpu_loss']:.5f}), max rel grad err vs single "
                f"GPU {max(s['rel_grad_err_vs_single_gpu'] for s in r0['steps']):.2e}, {r['seconds']} s")
    return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="multi_gpu_check.json")
    ap.add_argument("--steps", type=int, default=3, help="DDP training steps")
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--cpu", action="store_true",
                    help="check this script without GPUs: only the DDP part, on gloo and ioattn's CPU path")
    ap.add_argument("--one-gpu", action="store_true",
                    help="the DDP part with both ranks on cuda:0 over gloo (one GPU is enough)")
    args = ap.parse_args()
    if args.cpu:
        results = [ddp_check(args.steps, cpu=True), cp_check(cpu=True)]
    elif args.one_gpu:
        if not torch.cuda.is_available():
            print("SKIP: --one-gpu needs a CUDA GPU")
            sys.exit(2)
        results = [ddp_check(args.steps, one_gpu=True)]
    elif not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print(f"SKIP: needs 2 CUDA GPUs, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        sys.exit(2)
    else:
        results = []
        try:
            results += guard_checks()
        except Exception:  # noqa: BLE001
            results.append(dict(name="guard checks", ok=False, error=traceback.format_exc(limit=6)))
        if not args.skip_ddp:
            results.append(ddp_check(args.steps))
        results.append(cp_check())
    for r in results:
        detail = _summary(r) or r.get("error", "").strip().splitlines()[-1:]
        print(f"{'PASS' if r['ok'] else 'FAIL'} {r['name']}: {detail}")
    passed = sum(r["ok"] for r in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    with open(args.out, "w") as f:
        json.dump(dict(devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                       if torch.cuda.is_available() else ["cpu"],
                       torch=torch.__version__, results=results), f, indent=1, default=str)
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
