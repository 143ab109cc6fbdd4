"""Run the test suite as parallel pytest processes, one per CPU core by default.

    python tests/run.py                      # the whole suite
    python tests/run.py -m "not slow"        # any pytest arguments pass through
    python tests/run.py --shards 1           # one process: plain pytest
    python tests/run.py --record             # also rewrite tests/timings.json from this run

Each process runs ``pytest --shard I/N``: ``conftest.py`` splits the collected tests into N
shards of about equal time, from the seconds per test in ``tests/timings.json`` (a test not in
it counts as the median). Tests that share a module-scoped fixture stay in one shard. Output
lines carry their shard's number; the exit code is the worst of the shards'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
TIMINGS = os.path.join(HERE, "timings.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=os.cpu_count() or 1, help="processes (default: CPU cores)")
    parser.add_argument("--record", action="store_true", help="rewrite tests/timings.json from this run's durations")
    args, pytest_args = parser.parse_known_args()
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines as they come, not at exit
    # each process gets its share of the cores for torch's intra-op threads
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.shards)))
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(args.shards):
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--shard={i}/{args.shards}",
                       f"--record-durations={os.path.join(tmp, f'{i}.json')}", *pytest_args]
            procs.append(subprocess.Popen(command, cwd=os.path.dirname(HERE), env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, bufsize=1))
        print(f"{args.shards} pytest processes; lines start with their shard", flush=True)
        lock = threading.Lock()
        threads = [threading.Thread(target=_relay, args=(p, f"[{i + 1}/{args.shards}]", lock)) for i, p in enumerate(procs)]
        for t in threads:
            t.start()
        codes = [p.wait() for p in procs]
        for t in threads:
            t.join()
        durations = _durations(tmp, args.shards)
    if args.record:
        with open(TIMINGS, "w") as f:
            json.dump({k: round(v, 2) for k, v in sorted(durations.items())}, f, indent=0)
            f.write("\n")
        print(f"wrote the durations of {len(durations)} tests to {TIMINGS}")
    if not durations:
        print("no tests ran in any shard", file=sys.stderr)
        return 5
    # 5 (no tests collected) is fine for one shard when the others ran tests
    return max((c for c in codes if c != 5), default=0)


def _relay(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            print(f"{prefix} {line}", end="", flush=True)


def _durations(folder: str, shards: int) -> dict[str, float]:
    """Seconds per test (setup, call and teardown), from each shard's ``--record-durations``."""
    seconds = {}
    for i in range(shards):
        path = os.path.join(folder, f"{i}.json")
        if os.path.exists(path):
            with open(path) as f:
                seconds.update(json.load(f))
    return seconds


if __name__ == "__main__":
    sys.exit(main())
