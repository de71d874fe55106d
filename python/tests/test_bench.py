"""``python -m epcomm.bench`` at a tiny size on the CPU backend: the table, the Config line to paste,
the baseline in the same run, the BENCHMARKS.md rows and the plot."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from epcomm import bench

ROW_FIELDS = {"date", "machine", "commit", "impl", "workload", "op", "dtype", "ranks", "num_sms", "tokens", "hidden",
              "topk", "experts", "time_us_median", "time_us_min", "time_us_max", "gbps_median", "timing"}
TINY = ["--backend", "cpu", "-n", "2", "--tokens", "24", "--ll-tokens", "8", "--hidden", "256", "--topk", "3",
        "--experts", "6", "--num-sms", "8,16", "--chunks", "6", "--token-sweep", "1,8", "--iters", "2",
        "--warmup", "1"]


def test_bench_runs_tiny_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows_path, png = tmp_path / "rows.jsonl", tmp_path / "sweep.png"
    plot = ["--plot", str(png)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot = []
    assert bench.main(TINY + ["--json", str(rows_path), "--quiet"] + plot) == 0
    out = capsys.readouterr().out
    assert "[tuning] SMs   8" in out and "[tuning] SMs  16" in out
    assert re.search(r"paste: epcomm\.Config\((8|16), 6, 256, 6, 128\)", out), out
    assert "baseline (all_to_all_single + index_select/index_add_)" in out
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert all(set(r) == ROW_FIELDS for r in rows)
    assert all(r["timing"] == "event" and r["ranks"] == 2 and r["hidden"] == 256 for r in rows)
    ops = {(r["impl"], r["op"], r["workload"]) for r in rows}
    for want in [("epcomm", "dispatch_cached", "python-normal"), ("epcomm", "combine", "python-normal"),
                 ("torch_all_to_all", "dispatch", "python-normal"), ("torch_all_to_all", "combine", "python-normal"),
                 ("epcomm", "ll_dispatch", "python-ll"), ("epcomm", "ll_combine", "python-ll"),
                 ("torch_all_to_all", "dispatch", "python-ll")]:
        assert want in ops, want
    assert {r["num_sms"] for r in rows if r["op"] == "dispatch_cached" and r["impl"] == "epcomm"} == {8, 16}
    assert {r["tokens"] for r in rows if r["op"] == "ll_combine"} == {1, 8}
    for r in rows:
        assert 0 < r["time_us_min"] <= r["time_us_median"] <= r["time_us_max"]
        if r["op"] in ("dispatch_cached", "combine", "ll_dispatch", "ll_combine"):
            assert r["gbps_median"] is not None and r["gbps_median"] > 0
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_arguments() -> None:
    for bad in (["--modes", "fast"], ["--backend", "cpu", "--experts", "5", "-n", "2"],
                ["--backend", "cpu", "--hidden", "100"], ["--num-sms", "8,x"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_python_m_epcomm_bench_help() -> None:
    done = subprocess.run([sys.executable, "-m", "epcomm.bench", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--num-sms" in done.stdout and "--plot" in done.stdout
