"""Plots and README tables from a bench_attention.py JSON; needs matplotlib, not a GPU or torch.

    python benchmarks/plot.py benchmarks/results/nvidia-h100-80gb-hbm3.json
        -> <stem>-speed-<dtype>-<mode>.png   TFLOP/s vs seqlen, one panel per (hdim, causal)
           <stem>-memory.png                 peak memory vs seqlen, log scale
           <stem>.md                         the markdown tables below
    python benchmarks/plot.py results.json --markdown          # print the tables, no PNG
    python benchmarks/plot.py results.json --md-modes fwd,bwd,fwd_bwd
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = ("fwd", "bwd", "fwd_bwd")
MODE_TITLE = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}
# One color and marker per provider, the same in every figure; ioattn drawn on top.
STYLE = {
    "ioattn": ("#d62728", "o"),
    "sdpa_cudnn": ("#1f77b4", "s"),
    "sdpa_flash": ("#2ca02c", "^"),
    "flash_attn": ("#17becf", "^"),
    "fa3": ("#9467bd", "D"),
    "fa4": ("#8c564b", "D"),
    "flex": ("#ff7f0e", "v"),
    "sdpa_efficient": ("#7f7f7f", "P"),
    "sdpa_math": ("#bcbd22", "x"),
    "standard": ("#000000", "x"),
}


def fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def load(path) -> dict:
    return json.loads(Path(path).read_text())


def _providers(rows) -> list[str]:
    seen = list(dict.fromkeys(r["provider"] for r in rows))
    return sorted(seen, key=lambda p: list(STYLE).index(p) if p in STYLE else len(STYLE))


def _subtitle(result) -> str:
    fake = "FAKE DATA - " if result.get("fake") else ""
    return (f"{fake}{result.get('device')} | torch {result.get('torch')} | "
            f"triton {result.get('triton')} | {str(result.get('date', ''))[:10]}")


# --------------------------------------------------------------------------- PNG

def plot_speed(result, dtype, mode, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["mode"] == mode and r["dtype"] == dtype]
    hdims = sorted({r["headdim"] for r in rows})
    causals = sorted({r["causal"] for r in rows})
    providers = _providers(rows)
    fig, axes = plt.subplots(len(causals), len(hdims), squeeze=False, sharex=True,
                             figsize=(4.2 * len(hdims) + 0.5, 3.4 * len(causals) + 1.2))
    seqlens = sorted({r["seqlen"] for r in rows})
    failed_any = False
    for i, causal in enumerate(causals):
        for j, hdim in enumerate(hdims):
            ax = axes[i][j]
            panel = [r for r in rows if r["causal"] == causal and r["headdim"] == hdim]
            for prov in providers:
                pts = sorted((r["seqlen"], r["tflops"], r["status"]) for r in panel
                             if r["provider"] == prov and r["tflops"] is not None)
                if not pts:
                    continue
                color, marker = STYLE.get(prov, (None, "o"))
                x = [p[0] for p in pts]
                y = [p[1] for p in pts]
                ax.plot(x, y, marker=marker, color=color, label=prov, markersize=5,
                        linewidth=2.6 if prov == "ioattn" else 1.4,
                        zorder=3 if prov == "ioattn" else 2)
                bad = [(p[0], p[1]) for p in pts if p[2] == "FAIL"]
                if bad:  # a wrong result: a big black cross over the point
                    failed_any = True
                    ax.scatter(*zip(*bad), s=120, marker="X", color="black",
                               edgecolors="white", linewidths=0.8, zorder=4)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens)
            ax.set_xticklabels([fmt_len(n) for n in seqlens])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"head dim {hdim}, {'causal' if causal else 'not causal'}", fontsize=10)
            if j == 0:
                ax.set_ylabel("TFLOP/s")
            if i == len(causals) - 1:
                ax.set_xlabel("sequence length (batch = tokens / seqlen)")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if failed_any:
        from matplotlib.lines import Line2D
        handles["FAIL (wrong result)"] = Line2D([], [], marker="X", linestyle="none",
                                                color="black", markersize=10)
    ncol = len(handles) if len(handles) <= 8 else (len(handles) + 1) // 2
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=ncol, frameon=False)
    fig.suptitle(f"Attention {MODE_TITLE.get(mode, mode)}, {dtype}\n{_subtitle(result)}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.07 if len(handles) <= 8 else 0.11, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in result["rows"] if r["mode"] == "memory"]
    seqlens = sorted({r["seqlen"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for prov in _providers(rows):
        mine = sorted((r for r in rows if r["provider"] == prov), key=lambda r: r["seqlen"])
        pts = [(r["seqlen"], r["peak_mib"]) for r in mine if r["peak_mib"] is not None]
        missing = [r for r in mine if r["peak_mib"] is None]
        label = prov
        if missing:
            oom = all((r.get("reason") or "").startswith("OOM") for r in missing)
            label += f" ({'OOM' if oom else 'n/a'} at {', '.join(fmt_len(r['seqlen']) for r in missing)})"
        if not pts:
            continue
        color, marker = STYLE.get(prov, (None, "o"))
        ax.plot(*zip(*pts), marker=marker, color=color, label=label,
                linewidth=2.6 if prov == "ioattn" else 1.4)
    if rows:
        r0 = rows[0]
        # The floor: the outputs themselves (o, dq, dk, dv), 4 x B*N*H*D elements of 2 bytes.
        floor = [(n, 4 * r0["batch"] * n * r0["nheads"] * r0["headdim"] * 2 / 2**20) for n in seqlens]
        ax.plot(*zip(*floor), linestyle="--", color="#999999", label="floor: o, dq, dk, dv")
        ax.set_title(f"Peak memory of one forward + backward beyond q, k, v, dO "
                     f"(B={r0['batch']}, H={r0['nheads']}, D={r0['headdim']}, {r0['dtype']})\n"
                     f"{_subtitle(result)}", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(seqlens)
    ax.set_xticklabels([fmt_len(n) for n in seqlens])
    ax.minorticks_off()
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak extra memory (log scale)")
    # Ticks at powers of 4 MiB (..., 256 MiB, 1 GiB, 4 GiB, ...): round numbers in both units.
    lo, hi = ax.get_ylim()
    ticks = [4.0**k for k in range(-2, 12) if lo <= 4.0**k <= hi]
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v / 1024:g} GiB" if v >= 1024 else f"{v:g} MiB"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown

def _md_cell(r) -> str:
    if r is None:
        return ""
    if r.get("tflops") is None:
        return "OOM" if (r.get("reason") or "").startswith("OOM") else "–"
    return f"{r['tflops']:.0f}" + (" ✗" if r["status"] == "FAIL" else "")


def markdown(result, modes=("fwd", "bwd")) -> str:
    rows = [r for r in result["rows"] if r["mode"] in modes]
    out = []
    if result.get("fake"):
        out.append("> **FAKE DATA** for testing the plotting code; not a measurement.\n")
    out.append(f"Measured on {result.get('device')}, torch {result.get('torch')}, triton "
               f"{result.get('triton')}, CUDA {result.get('cuda')}, {str(result.get('date', ''))[:10]}.")
    for dtype in sorted({r["dtype"] for r in rows}):
        drows = [r for r in rows if r["dtype"] == dtype]
        present = [m for m in modes if any(r["mode"] == m for r in drows)]
        providers = _providers(drows)
        table = {}
        for r in drows:
            table[(r["seqlen"], r["headdim"], r["causal"], r["provider"], r["mode"])] = r
        shapes = sorted({(r["headdim"], r["causal"], r["seqlen"]) for r in drows})
        out.append(f"\n**TFLOP/s, {' / '.join(present)}, {dtype}** (batch × seqlen = "
                   f"{result.get('config', {}).get('tokens', '?')} tokens, heads × hdim = "
                   f"{result.get('config', {}).get('hidden', '?')}; ✗ = wrong result, – = not run)\n")
        out.append("| seqlen, hdim, causal | " + " | ".join(providers) + " |")
        out.append("|---|" + "---|" * len(providers))
        for hdim, causal, seqlen in shapes:
            cells = []
            for p in providers:
                rs = [table.get((seqlen, hdim, causal, p, m)) for m in present]
                cells.append("" if all(r is None for r in rs) else
                             " / ".join(_md_cell(r) or "–" for r in rs))
            out.append(f"| {fmt_len(seqlen)}, {hdim}, {'yes' if causal else 'no'} | "
                       + " | ".join(cells) + " |")
    graphed = [r for r in rows if r.get("graph_tflops") is not None]
    if graphed:
        providers = _providers(graphed)
        table = {(r["dtype"], r["seqlen"], r["headdim"], r["causal"], r["provider"]): r for r in graphed}
        out.append("\n**Forward TFLOP/s, eager / CUDA-graph replay** (no host in the loop: the kernels "
                   "alone; a large gap means the eager call was host-bound)\n")
        out.append("| dtype, seqlen, hdim, causal | " + " | ".join(providers) + " |")
        out.append("|---|" + "---|" * len(providers))
        for key in sorted({k[:4] for k in table}):
            cells = [f"{table[key + (p,)]['tflops']:.0f} / {table[key + (p,)]['graph_tflops']:.0f}"
                     if key + (p,) in table else "–" for p in providers]
            out.append(f"| {key[0]}, {fmt_len(key[1])}, {key[2]}, {'yes' if key[3] else 'no'} | "
                       + " | ".join(cells) + " |")
    mem = [r for r in result["rows"] if r["mode"] == "memory"]
    if mem:
        r0 = mem[0]
        providers = _providers(mem)
        table = {(r["seqlen"], r["provider"]): r for r in mem}
        out.append(f"\n**Peak memory of one forward + backward beyond q, k, v, dO, MiB** "
                   f"(B={r0['batch']}, H={r0['nheads']}, D={r0['headdim']}, {r0['dtype']})\n")
        out.append("| seqlen | " + " | ".join(providers) + " |")
        out.append("|---|" + "---|" * len(providers))
        for n in sorted({r["seqlen"] for r in mem}):
            cells = []
            for p in providers:
                r = table.get((n, p))
                cells.append("" if r is None else f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None
                             else "OOM" if (r.get("reason") or "").startswith("OOM") else "–")
            out.append(f"| {fmt_len(n)} | " + " | ".join(cells) + " |")
    summary = first_call_summary(result.get("first_call", []), "ioattn")
    if summary:
        out.append("\n**ioattn: first call of a new shape, ms, fwd / bwd (steady state of the same "
                   "shapes)**: the first shape of each group includes Triton compilation; the "
                   "other shapes are medians\n")
        out.append("| dtype, hdim, causal | first shape | other new shapes |")
        out.append("|---|---|---|")
        for (dtype, hdim, causal), cols in summary.items():
            out.append(f"| {dtype}, {hdim}, {'yes' if causal else 'no'} | " + " | ".join(
                f"{_md_ms(c[0])} / {_md_ms(c[1])} ({_md_ms(c[2])} / {_md_ms(c[3])})" for c in cols)
                + " |")
    return "\n".join(out) + "\n"


def first_call_summary(firsts, provider):
    """(dtype, hdim, causal) -> [first shape, other shapes (medians)], each as
    (first fwd, first bwd, steady fwd, steady bwd) in ms."""
    import statistics

    def med(fs, key):
        values = [f[key] for f in fs if f[key] is not None]
        return statistics.median(values) if values else None

    keys = ("first_fwd_ms", "first_bwd_ms", "steady_fwd_ms", "steady_bwd_ms")
    groups = {}
    for f in firsts:  # in run order: the first of a group is where compilation happened
        if f["provider"] == provider:
            groups.setdefault((f["dtype"], f["headdim"], f["causal"]), []).append(f)
    return {group: [tuple(fs[0][k] for k in keys), tuple(med(fs[1:], k) for k in keys)]
            for group, fs in groups.items()}


def _md_ms(x) -> str:
    return "–" if x is None else f"{x:.3g}" if x < 100 else f"{x:.0f}"


# --------------------------------------------------------------------------- entry points

def write_all(result: dict, json_path, outdir=None, modes=("fwd", "bwd")) -> list[Path]:
    """PNG plots and the markdown file next to the JSON (or in outdir). Returns the paths."""
    json_path = Path(json_path)
    outdir = Path(outdir) if outdir else json_path.parent
    outdir.mkdir(parents=True, exist_ok=True)
    stem = json_path.stem
    written = []
    speed = [r for r in result["rows"] if r["mode"] in MODES]
    for dtype in sorted({r["dtype"] for r in speed}):
        for mode in [m for m in MODES if any(r["mode"] == m and r["dtype"] == dtype for r in speed)]:
            path = outdir / f"{stem}-speed-{dtype}-{mode}.png"
            plot_speed(result, dtype, mode, path)
            written.append(path)
    if any(r["mode"] == "memory" for r in result["rows"]):
        path = outdir / f"{stem}-memory.png"
        plot_memory(result, path)
        written.append(path)
    path = outdir / f"{stem}.md"
    path.write_text(markdown(result, modes))
    written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="a bench_attention.py result")
    ap.add_argument("--outdir", type=Path, help="default: next to the JSON")
    ap.add_argument("--markdown", action="store_true", help="print the markdown tables only")
    ap.add_argument("--md-modes", default="fwd,bwd", help="modes in each markdown cell (default fwd,bwd)")
    args = ap.parse_args(argv)
    result = load(args.json)
    modes = tuple(m for m in args.md_modes.split(",") if m)
    if args.markdown:
        print(markdown(result, modes), end="")
        return 0
    for path in write_all(result, args.json, args.outdir, modes):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
