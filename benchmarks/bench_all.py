"""Run every benchmark of this folder (``bench_*.py``), each in its own process, and report.

    python benchmarks/bench_all.py --quick [--timeout 600] [NAME ...]

Each benchmark runs as ``python benchmarks/bench_NAME.py [--quick]`` with its output shown as it
comes; then one line per benchmark (name, exit code, wall-clock seconds, and the CPU seconds of
it and its worker processes: a figure that other load on the machine inflates less). Exits 1 when any failed or
ran past ``--timeout`` (its whole process group is killed: Dask workers included). CI runs
``--quick``, so that none of them rots. The runs are offline: the Hugging Face libraries are
told so (``HF_HUB_OFFLINE``), and the benchmarks use random-weight architectures, the
shipped small-vae and patch-pca.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ME = Path(__file__).resolve().name


def benchmarks() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py")) if p.name != ME}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant
    return usage.ru_utime + usage.ru_stime


def run_one(path: Path, quick: bool, timeout: float | None) -> tuple[int | str, float, float]:
    cmd = [sys.executable, str(path)] + (["--quick"] if quick else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # own group: a timeout kills its workers too
    try:
        rc: int | str = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "timeout"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return rc, time.perf_counter() - start, _children_cpu() - cpu


def main() -> int:
    found = benchmarks()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all: {', '.join(found)})")
    ap.add_argument("--quick", action="store_true", help="each benchmark's --quick mode (seconds each; CI)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per benchmark (default: 600 with --quick, none otherwise)")
    args = ap.parse_args()
    unknown = [n for n in args.names if n not in found]
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; valid: {', '.join(found)}")
    timeout = args.timeout if args.timeout is not None else (600.0 if args.quick else None)
    results = {}
    for name in args.names or list(found):
        print(f"=== {found[name].name}{' --quick' if args.quick else ''}", flush=True)
        results[name] = run_one(found[name], args.quick, timeout)
    print(f"=== summary{' (--quick)' if args.quick else ''}")
    for name, (rc, seconds, cpu) in results.items():
        print(f"{name:10s} exit {rc!s:7s} {seconds:7.1f} s  (cpu {cpu:6.1f} s)")
    failed = [n for n, (rc, _, _) in results.items() if rc != 0]
    total, total_cpu = (sum(r[i] for r in results.values()) for i in (1, 2))
    print(f"{'total':10s} {'ok' if not failed else 'FAILED: ' + ', '.join(failed):12s} {total:7.1f} s  "
          f"(cpu {total_cpu:6.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
