"""Run each gpu_check case in its own process (CUDA_LAUNCH_BLOCKING=1) and report which ones crash.

    python benchmarks/find_crash.py [--workers 8]
"""

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))


def run(i):
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    code = ("import sys; sys.argv=['x']; import gpu_check as g; cases=g.build_cases(False); "
            f"c=cases[{i}]; g._warm(c); print('ok', c)")
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                       capture_output=True, text=True, timeout=300)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return i, r.returncode, tail[0][:300]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    import gpu_check
    n = len(gpu_check.build_cases(False))
    with ThreadPoolExecutor(args.workers) as ex:
        for i, rc, tail in ex.map(run, range(n)):
            if rc != 0:
                print(f"CRASH case {i}: {gpu_check.build_cases(False)[i]} -> {tail}", flush=True)
    print(f"checked {n} cases")


if __name__ == "__main__":
    main()
