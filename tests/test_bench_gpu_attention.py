"""bench/gpu_attention.py in its --tiny mode on the CPU: every code path of the GPU attention benchmark (the FA3
sweep, the GQA, padded-batch and training-step rows, the agreement check against SDPA math, providers that cannot
run recorded instead of crashing, the CSV) runs in seconds, so the script cannot rot between GPU sessions."""
import csv
import os
import sys

from conftest import ROOT, run_bench

sys.path.insert(0, os.path.join(ROOT, "bench"))
# the script's own CSV columns (the script itself runs in a subprocess below)
from gpu_attention import COLUMNS  # noqa: E402


def _fa4_importable() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        return False
    return True


def test_gpu_attention_tiny_cpu(tmp_path):
    out = run_bench("gpu_attention.py", "--tiny", "--device", "cpu", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "gpu_attention_tiny.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    for r in rows:
        assert r["gpu"].startswith("cpu") and r["torch"] and r["commit"] and r["date"]
        timed = r["ms"] != ""
        assert timed == (r["tflops"] != "")
        if timed:
            assert float(r["ms"]) > 0 and float(r["tflops"]) > 0
            assert "unavailable" not in r["note"] and "skipped" not in r["note"]
        else:
            assert "unavailable: " in r["note"] or "skipped: " in r["note"], r

    def pick(**kw):
        return [r for r in rows if all(r[k] == str(v) for k, v in kw.items())]

    # the FA3 sweep (tiny: head dims 32 / 64, two lengths): our CPU op and SDPA's flash backend agree and are timed
    for provider in ("nvembed", "sdpa-flash"):
        sweep = [r for r in pick(provider=provider) if r["heads_q"] == r["heads_kv"] and r["note"] == ""]
        assert {(r["head_dim"], r["seqlen"], r["mode"]) for r in sweep} == {
            (D, S, m) for D in ("32", "64") for S in ("32", "64") for m in ("fwd", "bwd", "fwd+bwd")}
    # cuDNN SDPA has no CPU kernel: recorded, not fatal
    assert all(r["ms"] == "" and "unavailable" in r["note"] for r in pick(provider="sdpa-cudnn"))
    if not _fa4_importable():
        assert all("unavailable" in r["note"] for r in pick(provider="fa4") + pick(provider="fa4-varlen"))
    # GQA row: our op and SDPA (enable_gqa or repeated k / v, named in the note)
    gqa = pick(heads_q=4, heads_kv=2, seqlen=48)
    assert {r["mode"] for r in gqa if r["provider"] == "nvembed" and r["ms"]} == {"fwd", "bwd", "fwd+bwd"}
    assert all("GQA via" in r["note"] for r in gqa if r["provider"] == "sdpa-flash")
    # padded batch: varlen and masked dense, both against SDPA with a mask
    for provider in ("nvembed-varlen", "nvembed", "sdpa"):
        padded = [r for r in pick(provider=provider) if r["note"].startswith("padded")]
        assert {r["mode"] for r in padded if r["ms"]} == {"fwd", "bwd", "fwd+bwd"}, provider
    # training step: fwd+bwd only
    step = [r for r in rows if r["note"].startswith("train-step")]
    assert {r["mode"] for r in step} == {"fwd+bwd"}
    assert {r["provider"] for r in step if r["ms"]} >= {"nvembed", "sdpa-flash"}
    assert not any("skipped" in r["note"] for r in rows if r["provider"].startswith("nvembed"))
