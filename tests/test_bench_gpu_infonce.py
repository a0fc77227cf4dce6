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
    # ours against the naive anchor on the same inputs (bf16 both); the anchor's own row has no ratios
    assert float(rows[0]["loss_rel_diff_same_inputs"]) < 2e-2 and float(rows[0]["speedup_vs_naive"]) > 0
    assert float(rows[0]["grad_q_rel_diff_vs_naive"]) < 5e-2 and float(rows[0]["grad_docs_rel_diff_vs_naive"]) < 5e-2
    assert rows[1]["speedup_vs_naive"] == rows[1]["loss_rel_diff_same_inputs"] == ""


def test_gpu_infonce_variants_cpu(tmp_path):
    """--variants picks the rows (the GEMM forward's and backward's and the fused variants run on CPU tensors too);
    unknown names fail."""
    out = run_bench("gpu_infonce.py", "--smoke", "--device", "cpu", "--out", str(tmp_path), "--variants",
                    "nvembed-gemm,nvembed-gemm-fwd,nvembed-fused,nvembed-auto,naive")
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "gpu_infonce_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["nvembed-gemm", "nvembed-gemm-fwd", "nvembed-fused", "nvembed-auto",
                                            "naive"]
    assert all(r["status"] == "ok" for r in rows)
    assert all(float(r["speedup_vs_naive"]) > 0 for r in rows[:4])
    # each variant's own agreement with the naive loss (the fused one through its own path: inputs need gradients)
    assert all(float(r["grad_docs_rel_diff_vs_naive"]) < 5e-2 for r in rows[:4])
    assert rows[4]["grad_docs_rel_diff_vs_naive"] == ""
    bad = run_bench("gpu_infonce.py", "--smoke", "--device", "cpu", "--out", str(tmp_path), "--variants",
                    "nvembed-cublas")
    assert bad.returncode == 2 and "unknown --variants ['nvembed-cublas']" in bad.stderr


def test_fused_accuracy_script_cpu(tmp_path):
    """bench/infonce_fused_accuracy.py (the fused path's dD accumulators against fp64, beside PyTorch's bf16 loss)
    keeps working: tiny shapes, every plan it lists, the CSV it promises."""
    out = run_bench("infonce_fused_accuracy.py", "--B", "9", "--G", "2", "--extra", "3", "--d", "8", "--seeds", "1",
                    "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "infonce_fused_accumulation_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["accumulator"] for r in rows] == ["", "none", "fp32", "output", "output"]
    assert all(float(r["grad_docs_rel_err"]) < 2e-2 and float(r["grad_queries_rel_err"]) < 2e-2 for r in rows)
