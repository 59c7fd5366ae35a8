"""Time per pick of every balancing algorithm, and Maglev table build time.

Run from the repository root:  python3 bench/balance_bench.py
Plain timeit, single process; numbers are for comparing algorithms and pool sizes on one machine.
"""

from __future__ import annotations

import random
import sys
import time
import timeit
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pointsman.balance import ALGORITHMS, Candidate, build_picker, build_table

SIZES = (10, 100, 1000)
TABLE_SIZE = 65537
PICK_SECONDS = 0.1
"""Rough time budget per repeat; the best of REPEATS is reported (robust to a busy machine)."""
REPEATS = 7


@dataclass
class Load:
    active: int


def pool(size: int, weighted: bool) -> list[Candidate]:
    rng = random.Random(size)
    return [
        Candidate(f"10.0.{i // 256}.{i % 256}:80", float(rng.randint(1, 5)) if weighted else 1.0)
        for i in range(size)
    ]


def ns_per_pick(algorithm: str, size: int) -> float:
    cands = pool(size, weighted=True)
    rng = random.Random(1)
    load = [Load(rng.randint(0, 50)) for _ in cands]
    picker = build_picker(algorithm, cands, load=load, table_size=TABLE_SIZE, rng=rng)
    keys = [rng.randbytes(4) for _ in range(1024)]
    pick = picker.pick

    def run() -> None:
        for key in keys:
            pick(key)

    timer = timeit.Timer(run)
    loops, _ = timer.autorange()
    loops = max(1, int(loops * PICK_SECONDS / 0.2))
    best = min(timer.repeat(repeat=REPEATS, number=loops))
    return best / (loops * len(keys)) * 1e9


def build_seconds(size: int, weighted: bool) -> float:
    cands = pool(size, weighted)
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        build_table(cands, TABLE_SIZE)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    print(f"Python {sys.version.split()[0]}, weights random 1-5, keys 4 bytes")
    print()
    print("ns per pick".ljust(24) + "".join(f"{n:>10} backends" for n in SIZES))
    for algorithm in ALGORITHMS:
        row = "".join(f"{ns_per_pick(algorithm, n):>19,.0f}" for n in SIZES)
        print(algorithm.ljust(24) + row)
    print()
    header = "".join(f"{n:>10} backends" for n in SIZES)
    print(f"Maglev build, M={TABLE_SIZE}, ms".ljust(24) + header)
    for weighted in (False, True):
        label = "weighted 1-5" if weighted else "equal weights"
        row = "".join(f"{build_seconds(n, weighted) * 1e3:>19,.1f}" for n in SIZES)
        print(label.ljust(24) + row)


if __name__ == "__main__":
    main()
