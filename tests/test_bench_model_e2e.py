"""bench/gpu_model_e2e.py in its tiny mode, so that the GPU benchmark cannot rot between GPU runs: both paths run,
agree, are timed and land in the CSV; a path whose ops cannot run (float16 has no CPU kernel) is reported, not
fatal; the full 7B-shaped run is refused on the CPU. On a CUDA machine the same tiny run goes on the GPU."""
import csv
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import gpu_model_e2e  # noqa: E402


def _run(tmp_path, *argv):
    rc = gpu_model_e2e.main(["--tiny", "--out", str(tmp_path), *argv])
    with open(tmp_path / "gpu_model_e2e_tiny.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    return rc, rows


def _check_env(row, device_type):
    assert row["device_type"] == device_type and row["device"] and row["torch"] == torch.__version__
    assert row["commit"] and row["mode"] == "tiny" and row["layers"] == "2" and row["hidden"] == "256"


def test_tiny_cpu_both_paths_agree_and_are_timed(tmp_path, capsys):
    rc, rows = _run(tmp_path, "--device", "cpu")
    assert rc == 0 and set(rows) == {"released-sdpa", "nvembed"}
    ref, ours = rows["released-sdpa"], rows["nvembed"]
    _check_env(ours, "cpu")
    assert ref["status"] == ours["status"] == "ok" and ours["dtype"] == "bfloat16"
    assert ours["cuda_kernels"] == "flash_attn=ok;latent_pool=ok"
    assert float(ours["min_cosine_vs_released"]) > 0.99
    for r in (ref, ours):
        assert 0 < float(r["min_ms"]) <= float(r["median_ms"]) and float(r["texts_per_s"]) > 0
    assert float(ours["speedup_vs_released_sdpa"]) == pytest.approx(
        float(ref["median_ms"]) / float(ours["median_ms"]), rel=1e-2)
    assert "agreement: per-row cosine min" in capsys.readouterr().out


def test_tiny_cpu_reports_ops_that_cannot_run(tmp_path, capsys):
    rc, rows = _run(tmp_path, "--device", "cpu", "--dtype", "float16", "--warmup", "0", "--iters", "1")
    assert rc == 0
    assert rows["released-sdpa"]["status"] == "ok" and float(rows["released-sdpa"]["median_ms"]) > 0
    ours = rows["nvembed"]
    assert ours["status"].startswith("not run: flash_attn: TypeError: nvembed::flash_attn: q has dtype Half")
    assert ours["median_ms"] == "" and ours["cuda_kernels"] == "flash_attn=missing;latent_pool=missing"
    assert "nvembed        not run: flash_attn: TypeError" in capsys.readouterr().out


def test_full_run_refused_on_cpu(tmp_path):
    with pytest.raises(SystemExit, match="use --tiny on the CPU"):
        gpu_model_e2e.main(["--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        gpu_model_e2e.main(["--tiny", "--device", "cpu", "--iters", "0", "--out", str(tmp_path)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_cuda_runs_reference_and_reports_kernels(tmp_path):
    rc, rows = _run(tmp_path, "--device", "cuda")
    ref, ours = rows["released-sdpa"], rows["nvembed"]
    _check_env(ref, "cuda")
    assert ref["status"] == "ok" and float(ref["median_ms"]) > 0 and float(ref["peak_mem_mb"]) > 0
    if ours["cuda_kernels"] == "flash_attn=ok;latent_pool=ok":
        assert rc == 0 and ours["status"] == "ok" and float(ours["min_cosine_vs_released"]) > 0.99
    else:
        assert rc == 0 and ours["status"].startswith("not run: ")
