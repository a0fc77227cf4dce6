"""bench/gpu_infonce.py in its CPU smoke mode: the GPU benchmark script runs end to end (tiny sizes, both variants,
same-input loss check, CSV), so it cannot rot between the sessions that have a GPU."""
import csv

from conftest import run_bench


def test_gpu_infonce_smoke_cpu(tmp_path):
    out = run_bench("gpu_infonce.py", "--smoke", "--device", "cpu", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "gpu_infonce_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["nvembed", "naive"]
    for r in rows:
        assert r["status"] == "ok" and float(r["time_ms"]) > 0 and r["device"] and r["commit"] and r["torch"]
        assert float(r["loss_rel_diff_same_inputs"]) < 2e-2  # bf16 inputs, same loss


def test_gpu_infonce_variants_cpu(tmp_path):
    """--variants picks the rows (the GEMM forward's and backward's and the fused variants run on CPU tensors too);
    unknown names fail."""
    out = run_bench("gpu_infonce.py", "--smoke", "--device", "cpu", "--out", str(tmp_path), "--variants",
                    "nvembed-gemm,nvembed-gemm-fwd,nvembed-fused,naive")
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "gpu_infonce_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["nvembed-gemm", "nvembed-gemm-fwd", "nvembed-fused", "naive"]
    assert all(r["status"] == "ok" for r in rows)
    assert all(float(r["speedup_vs_naive"]) > 0 for r in rows[:3])
    bad = run_bench("gpu_infonce.py", "--smoke", "--device", "cpu", "--out", str(tmp_path), "--variants",
                    "nvembed-cublas")
    assert bad.returncode == 2 and "unknown --variants ['nvembed-cublas']" in bad.stderr
