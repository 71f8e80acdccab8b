"""benchmarks/bench_gpu.py runs on the CPU at the tiny preset, so it cannot rot between GPU
leases: every part finishes, ours agrees with diffusers, and the numbers are sane."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402


def test_bench_gpu_runs_on_the_cpu_at_the_tiny_preset(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--repeats", "1",
                           "--no-compile", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    forward = results["forward"]
    assert {r["case"] for r in forward} == set(bench_gpu.CASES)
    assert {r["model"] for r in forward} == {"zimagekit eager", "diffusers eager"}
    assert all(r["max_rel_diff_vs_diffusers"] < 1e-5 and r["ms"] > 0 and 0 < r["of_peak"] for r in forward)
    assert [r["stage"] for r in results["generate"]][1].startswith("whole generation, 8 steps")
    assert all(r["samples_per_s"] > 0 and 0 < r["mfu"] < 1.5 for r in results["train"])
    assert "| case | model | ms |" in capsys.readouterr().out
