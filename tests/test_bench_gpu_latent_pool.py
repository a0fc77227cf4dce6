"""bench/gpu_latent_pool.py in its --tiny mode on the CPU: every code path of the latent_pool GPU benchmark (the
GEMM reference rate, the agreement checks in float64 / float32 and at the benchmark size, the eager released layer,
torch.compile of it, our op, both masks, fwd and fwd+bwd, ratios, the CSVs) runs in seconds, so the script cannot
rot between GPU sessions; a provider that cannot run is recorded, not fatal."""
import csv
import importlib.util
import os
import sys

from conftest import ROOT, run_bench

sys.path.insert(0, os.path.join(ROOT, "bench"))
# the script's own CSV columns (the script itself runs in a subprocess below)
from gpu_latent_pool import COLUMNS, CHECK_COLUMNS  # noqa: E402


def _run(tmp_path, *argv):
    out = run_bench("gpu_latent_pool.py", "--tiny", "--device", "cpu", "--out", str(tmp_path), *argv)
    assert out.returncode == 0, out.stdout + out.stderr
    tables = []
    for name, columns in (("gpu_latent_pool_tiny.csv", COLUMNS), ("gpu_latent_pool_tiny_agreement.csv",
                                                                  CHECK_COLUMNS)):
        with open(tmp_path / name) as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == columns
            tables.append(list(reader))
    return out.stdout, tables[0], tables[1]


def test_gpu_latent_pool_tiny_cpu(tmp_path):
    stdout, rows, checks = _run(tmp_path)
    for r in rows + checks:
        assert r["gpu"].startswith("cpu") and r["torch"] and r["commit"] and r["date"]

    # agreement: ours against the released layer in float64, float32 and at the benchmark size (compile too)
    assert [(c["check"], c["provider"]) for c in checks] == [
        ("small-fp64", "nvembed"), ("small-fp32", "eager"), ("small-fp32", "nvembed"), ("small-fp32", "nvembed-fused"),
        ("small-fp32", "nvembed-saved"), ("bench", "eager"), ("bench", "compile"), ("bench", "nvembed"),
        ("bench", "nvembed-fused"), ("bench", "nvembed-saved")]
    for c in checks:
        assert c["status"] == ("baseline" if c["provider"] == "eager" else "ok"), c
        assert float(c["out_err"]) <= float(c["tol_out"]) and float(c["grad_err"]) <= float(c["tol_grad"])
    assert float(checks[0]["out_err"]) < 1e-12 and float(checks[0]["grad_err"]) < 1e-12  # float64: exact algebra

    # the reference GEMM row, then provider x mode x mask, every one timed
    gemm = rows[0]
    assert gemm["provider"] == "torch.matmul" and gemm["mode"] == "gemm" and float(gemm["tflops"]) > 0
    timed = rows[1:]
    assert sorted((r["mask"], r["mode"], r["provider"]) for r in timed) == sorted(
        (m, mode, p) for m in ("all", "padded") for mode in ("fwd", "fwd+bwd")
        for p in ("eager", "compile", "nvembed", "nvembed-fused", "nvembed-saved"))
    for r in timed:
        assert (r["batch"], r["seqlen"], r["d"], r["latents"], r["heads"], r["dim_head"], r["ff_hidden"], r["dtype"]) \
            == ("2", "17", "64", "16", "2", "64", "256", "float32")
        assert "unavailable" not in r["note"] and "skipped" not in r["note"], r
        assert float(r["ms"]) > 0 and float(r["ms_p20"]) <= float(r["ms"]) <= float(r["ms_p80"])
        assert float(r["tflops"]) > 0 and float(r["gemm_tflops"]) == float(gemm["tflops"])
        # the eager layer's FLOPs, the same for every provider: forward 2T(2dI + 2NI + 3dF) + 4NdI, fwd+bwd 3x
        T, d, N, inner, F = 2 * 17, 64, 16, 128, 256
        fwd = 2 * T * (2 * d * inner + 2 * N * inner + 3 * d * F) + 4 * N * d * inner
        assert abs(float(r["gflop"]) * 1e9 - fwd * (3 if r["mode"] == "fwd+bwd" else 1)) < 1e-3 * fwd
        assert r["peak_mb"] == "" and r["mem_vs_eager"] == ""  # CUDA only
    by = {(r["mask"], r["mode"], r["provider"]): r for r in timed}
    for (mask, mode, p), r in by.items():
        for anchor in ("eager", "compile"):  # speedup = anchor's median / this row's median
            want = float(by[mask, mode, anchor]["ms"]) / float(r["ms"])
            assert abs(float(r[f"speedup_vs_{anchor}"]) - want) <= 1e-3 * want + 1e-3
    assert {int(r["pooled_tokens"]) for r in timed if r["mask"] == "all"} == {34}
    padded = {int(r["pooled_tokens"]) for r in timed if r["mask"] == "padded"}
    assert len(padded) == 1 and 0 < padded.pop() < 34
    ours = [r for r in timed if r["provider"] in ("nvembed", "nvembed-fused", "nvembed-saved")]
    assert len(ours) == 12 and all("targets (issue 7)" in r["note"] and "small-fp32 ok" in r["agreement"] for r in ours)
    assert all("small-fp64 ok" in r["agreement"] for r in ours if r["provider"] == "nvembed")
    assert all("aot_eager" in r["note"] for r in timed if r["provider"] == "compile")
    assert "wrote" in stdout
    assert (tmp_path / "gpu_latent_pool_tiny.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_gpu_latent_pool_tiny_records_a_failing_compile(tmp_path):
    stdout, rows, checks = _run(tmp_path, "--compile-backend", "no_such_backend", "--masks", "padded")
    compiled = [r for r in rows if r["provider"] == "compile"]
    assert {r["mode"] for r in compiled} == {"fwd", "fwd+bwd"}
    for r in compiled:
        assert r["ms"] == "" and "unavailable: " in r["note"] and "no_such_backend" in r["note"]
    assert [c["status"].split(":")[0] for c in checks if c["provider"] == "compile"] == ["unavailable"]
    for r in rows:
        if r["provider"] in ("eager", "nvembed", "nvembed-fused", "nvembed-saved"):
            assert float(r["ms"]) > 0 and r["speedup_vs_compile"] == ""


def test_gpu_profile_latent_pool_tiny_cpu(tmp_path):
    """bench/gpu_profile_latent_pool.py (gpu_check.sh's latent_pool_profile step) in --tiny mode: both kernel
    choices, fwd and fwd+bwd, and fwd+bwd with saved activations, the CSV."""
    out = run_bench("gpu_profile_latent_pool.py", "--tiny", "--device", "cpu", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "gpu_profile_latent_pool_tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kernels"], r["mode"]) for r in rows] == [("aten", "fwd"), ("aten", "fwd+bwd"), ("fused", "fwd"),
                                                         ("fused", "fwd+bwd"), ("saved", "fwd+bwd")]
    # the saved path executes fewer FLOPs: no attention output and no ff_in GEMM in the backward's recomputation
    assert float(rows[4]["tflop"]) < float(rows[1]["tflop"])
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["tflop"]) > 0
        assert abs(float(r["kernel_ms"]) - sum(float(r[k]) for k in ("gemm_ms", "nvembed_ms", "other_ms"))) < 1e-2
