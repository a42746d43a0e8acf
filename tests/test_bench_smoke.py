"""Every benchmark script still runs: each one's --smoke mode (a tiny model, a few steps, results in
a temp dir) ends with status 0 and prints its results. Figures are not checked here (bench/ only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


def test_every_bench_script_is_covered():
    assert set(SCRIPTS) >= {
        "bench_failover.py",
        "bench_gateway.py",
        "bench_hop.py",
        "bench_int8.py",
        "bench_load.py",
        "bench_mesh.py",
        "bench_prefix.py",
    }
    for name in SCRIPTS:
        assert "--smoke" in (BENCH / name).read_text(), f"{name} has no --smoke mode"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_mode_runs(script, tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, f"{script} --smoke: rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert out.stdout.strip(), f"{script} --smoke printed no results"
    assert "Traceback" not in out.stderr, out.stderr[-5000:]
