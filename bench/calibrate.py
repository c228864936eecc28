"""How fast this machine runs Python and C today, printed with every benchmark's results.

This project's VM changes speed from one session to the next, and not evenly: on
2026-12-01 the same build of dicomd needed 40-47 µs of CPU per association in process
(``profile_echo.py --cycle``) at 02:00-05:00 UTC and 96-134 µs at 10:30 UTC, while DCMTK's
storescp (C, mostly kernel time) cost about the same per association both times; within
one hour the loop below read anything from 50 to 103 µs. So a ratio to a C peer measured
at one time cannot be held against one measured at another unless the speed is known.
Two short probes, taken before the servers start (bench_store.py repeats the first at
every round):

* ``python_loop_us``: a fixed dict/str loop in the interpreter running the benchmark (best
  of 5, µs per loop): what dicomd's own code pays;
* ``sha256_mb_s``: SHA-256 of 1 MiB through hashlib (OpenSSL, C; SHA-NI where the CPU has
  it), MB/s: what compiled code gets, and what dicomd's per-instance digest costs.
"""

from __future__ import annotations

import hashlib
import timeit

_LOOP_SETUP = "d = {str(i): i for i in range(1000)}"
_LOOP_STMT = "for k in d: d[k] += 1"


def python_loop_us(repeat: int = 5, number: int = 2000) -> float:
    """Best-of-``repeat`` time of the fixed dict/str loop, µs per loop."""
    times = timeit.repeat(_LOOP_STMT, _LOOP_SETUP, repeat=repeat, number=number)
    return min(times) / number * 1e6


def sha256_mb_s(size: int = 1 << 20, rounds: int = 40) -> float:
    data = bytes(range(256)) * (size // 256)
    best = float("inf")
    for _ in range(3):
        t = timeit.default_timer()
        for _ in range(rounds):
            hashlib.sha256(data).digest()
        best = min(best, timeit.default_timer() - t)
    return size * rounds / best / 1e6


def machine_speed() -> dict[str, float]:
    return {"python_loop_us": python_loop_us(), "sha256_mb_s": sha256_mb_s()}


def describe(speed: dict[str, float]) -> str:
    return (
        f"Python dict loop {speed['python_loop_us']:.1f} µs, "
        f"SHA-256 {speed['sha256_mb_s']:.0f} MB/s (bench/calibrate.py)"
    )


if __name__ == "__main__":
    print(describe(machine_speed()))
