"""The benchmarks' A/B switches run what they name (bench/bench_store.py, bench/bench_echo.py).

Until c9011e3, ``bench_store.py --src LABEL=PATH`` started dicomd in the caller's working
directory; ``python -m dicomd`` puts that directory first on ``sys.path``, ahead of
``PYTHONPATH``, so every label ran the current checkout and an A/B compared a build with
itself. These tests start the server command the way the benchmark does and ask the child
which dicomd it imported and on which interpreter it runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench_store(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_store

    monkeypatch.setattr(bench_store, "SOURCES", {})
    monkeypatch.setattr(bench_store, "PYTHONS", {})
    return bench_store


def _imported_by(server, probe: str) -> str:  # type: ignore[no-untyped-def]
    """Run ``probe`` with the server's interpreter, environment and working directory."""
    env = {**os.environ, **server.env}
    return subprocess.run(
        [server.cmd[0], "-c", probe],
        cwd=server.cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_src_label_runs_that_checkout(bench_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "other"
    (other / "dicomd").mkdir(parents=True)
    (other / "dicomd" / "__init__.py").write_text("MARK = 'other checkout'\n")
    bench_store.SOURCES["old"] = other
    server = bench_store.build_server("dicomd-none@old", tmp_path / "run-old", 1)
    # What `python -m dicomd` would import, started the way Server.start() starts it.
    probe = "import sys; sys.path.insert(0, ''); import dicomd; print(dicomd.__file__)"
    assert _imported_by(server, probe) == str(other / "dicomd" / "__init__.py")
    plain = bench_store.build_server("dicomd-none", tmp_path / "run-plain", 1)
    assert _imported_by(plain, probe) == str(ROOT / "dicomd" / "__init__.py")


def test_python_label_runs_that_interpreter(bench_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bench_store.PYTHONS["alt"] = sys.executable
    server = bench_store.build_server("dicomd-full@alt", tmp_path / "run-alt", 1)
    assert server.cmd[0] == sys.executable
    probe = "import sys; sys.path.insert(0, ''); import dicomd; print(dicomd.__file__)"
    assert _imported_by(server, probe) == str(ROOT / "dicomd" / "__init__.py")


def test_paired_compares_within_each_round(bench_store) -> None:  # type: ignore[no-untyped-def]
    """``--versus``: the ratio is taken round by round, not between the medians (which,
    with one slow round each at different places, would call these two builds level)."""
    R = bench_store.Result
    rates = {"a": [1000, 400, 1000, 1000], "b": [1100, 440, 500, 1100]}
    results = [
        R(server, "small", 4, ips, 0.0, 0.0, 0.0, 0, round=k + 1)
        for server, series in rates.items()
        for k, ips in enumerate(series)
    ]
    results.append(R("b", "small", 4, 9999, 0.0, 0.0, 0.0, 0))  # pre-filled run: no round
    text = bench_store.paired(results, "a")
    row = [line for line in text.splitlines() if line.startswith("| small | 4 | b |")]
    assert row == ["| small | 4 | b | 1.10 | 3 of 4 | 1.10 1.10 0.50 1.10 |"]
    assert "| a |" not in text  # the reference is not compared with itself


def test_echo_rounds_compared_within_each_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_echo

    k1, k4 = bench_echo.rate_keys("")
    runs = {
        "storescp": ([1000, 500, 1000], [900, 900, 900]),
        "dicomd": ([1100, 450, 900], [2000] * 3),
    }
    results = {
        key: {k1: [{"rate": x} for x in one], k4: [{"rate": x} for x in four]}
        for key, (one, four) in runs.items()
    }
    servers = [bench_echo.Server(key, key, "AE", Path("/nonexistent")) for key in runs]
    lines = bench_echo.paired_lines(results, servers, "storescp", k1, k4)
    assert (
        "- dicomd: 1 client: 1.10 0.90 0.90 (1 of 3); 4 clients: 2.22 2.22 2.22 (3 of 3)" in lines
    )
    assert not any(line.startswith("- storescp") for line in lines)


def test_machine_speed_probe_measures_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every benchmark prints the day's Python and C speed (bench/calibrate.py): the loop
    time grows with the work asked of it and the digest rate is a plausible figure."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import calibrate

    short = calibrate.python_loop_us(repeat=3, number=200)
    assert 0 < short < 100_000
    speed = calibrate.machine_speed()
    assert 1 < speed["sha256_mb_s"] < 100_000
    text = calibrate.describe(speed)
    assert "µs" in text and "MB/s" in text
    # A loop over twice the entries takes measurably longer: the probe times real work.
    monkeypatch.setattr(calibrate, "_LOOP_SETUP", "d = {str(i): i for i in range(20000)}")
    assert calibrate.python_loop_us(repeat=3, number=50) > short * 2


def test_store_table_without_storescp_says_so(bench_store) -> None:  # type: ignore[no-untyped-def]
    """An A/B of two dicomd builds has no storescp to divide by: the column says "—"."""
    R = bench_store.Result
    rows = [R("dicomd-none", "ct", 1, 100.0, 1.0, 1.0, 90.0, 0, "")]
    assert "| — |" in bench_store.table(rows) and "nan" not in bench_store.table(rows)
    rows.append(R("storescp", "ct", 1, 200.0, 1.0, 1.0, 16.0, 0, ""))
    assert "| 0.50 |" in bench_store.table(rows)
