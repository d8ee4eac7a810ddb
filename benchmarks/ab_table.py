"""One table from several fwd_tiles_ab.py runs, each under another compile-time setting (one JSON
per setting and round, e.g. gpu_suite s14e / s14g's pp_<setting>_<mode>.json): per row (hdim,
seqlen, causal) the median TFLOP/s of each setting's per-tile and persistent kernels, their ratio
to the first setting's, the other kernels' (cuDNN, Triton) median over all files, and whether every setting wrote the same
output bits (out_sha). Runs anywhere (no GPU needed).

    python benchmarks/ab_table.py pp_0_s14e.json pp_2_s14e.json pp_0_s14g.json pp_2_s14g.json [--md]

Files whose names differ only in the part after the last "_" count as rounds of one setting
(pp_2_s14e.json and pp_2_s14g.json are setting "pp_2").
"""

import argparse
import json
import os
import statistics
from collections import defaultdict


def setting_of(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--md", action="store_true", help="a markdown table")
    args = ap.parse_args(argv)
    tf = defaultdict(lambda: defaultdict(list))  # row -> (setting, kernel) -> TFLOP/s of each round
    sha = defaultdict(set)
    order = []
    extra = []
    for path in args.files:
        s = setting_of(path)
        if s not in order:
            order.append(s)
        for row in json.load(open(path))["rows"]:
            key = (row["hdim"], row["seqlen"], row["causal"])
            for kernel, value in row["tflops"].items():
                own = kernel in ("per_tile", "persistent")  # (the peers' and Triton's: one column over all files)
                tf[key][(s if own else "", kernel)].append(value)
                if not own and kernel not in extra:
                    extra.append(kernel)
            if row.get("out_sha"):
                sha[key].add(row["out_sha"])
    base = order[0]
    head = ["hdim", "seqlen", "causal"] + [f"{s} {k}" for s in order for k in ("per_tile", "persistent")] + [
        k.replace("sdpa_", "") for k in extra] + ["same bits"]
    lines = []
    for key in sorted(tf):
        cells = [str(key[0]), str(key[1]), "yes" if key[2] else "no"]
        for s in order:
            for k in ("per_tile", "persistent"):
                vals = tf[key].get((s, k))
                ref = tf[key].get((base, k))
                if not vals:
                    cells.append("-")
                    continue
                med = statistics.median(vals)
                rel = f" ({med / statistics.median(ref):.3f})" if ref and s != base else ""
                cells.append(f"{med:.0f}{rel}")
        for k in extra:
            vals = tf[key].get(("", k))
            cells.append(f"{statistics.median(vals):.0f}" if vals else "-")
        cells.append("yes" if len(sha[key]) == 1 else ("-" if not sha[key] else f"NO ({len(sha[key])})"))
        lines.append(cells)
    if args.md:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for cells in lines:
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))


if __name__ == "__main__":
    main()
