"""nvembed_ext.cutlass_gemm (csrc/cuda/gemm_sm90.cu, the CUTLASS Hopper GEMM that bench/gpu_gemm_compare.py measures
against cuBLAS): on a compute capability 9.0 device against torch.matmul on shapes with tails in every dimension;
everywhere, its refusals (no sm_90a build / device, bad tensors) name the function and the reason; and the
benchmark script's --tiny mode on the CPU."""
import csv

import pytest
import torch

import nvembed_ext  # noqa: F401
from conftest import run_bench
from nvembed_ext.cutlass_gemm import _tma_operand, available, cutlass_gemm

WHY = available() if torch.cuda.is_available() else "no CUDA device"


@pytest.mark.cuda
@pytest.mark.skipif(WHY is not None, reason=f"cutlass_gemm cannot run here: {WHY}")
@pytest.mark.parametrize("M,N,K", [(1, 8, 8), (129, 264, 72), (300, 520, 4096), (4096, 4096, 4096)])
def test_matches_torch_matmul(M, N, K):
    a = torch.randn(M, K, device="cuda").bfloat16()
    b = (torch.randn(N, K, device="cuda") / K ** 0.5).bfloat16()
    got = cutlass_gemm(a, b)
    ref = (a.double() @ b.double().T)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 8e-3  # one bf16 rounding of an fp32 sum
    torch.testing.assert_close(cutlass_gemm(a, b), got, rtol=0, atol=0)  # deterministic


@pytest.mark.cuda
@pytest.mark.skipif(WHY is not None, reason=f"cutlass_gemm cannot run here: {WHY}")
def test_bad_tensors_cuda():
    a = torch.randn(16, 64, device="cuda").bfloat16()
    with pytest.raises(ValueError, match=r"nvembed.cutlass_gemm: b must be a 2-d bfloat16 CUDA tensor"):
        cutlass_gemm(a, torch.randn(16, 64, device="cuda"))
    with pytest.raises(ValueError, match=r"nvembed.cutlass_gemm: needs a \[M, K\], b \[N, K\]"):
        cutlass_gemm(a, torch.randn(16, 60, device="cuda").bfloat16())


@pytest.mark.cuda
@pytest.mark.skipif(WHY is not None, reason=f"cutlass_gemm cannot run here: {WHY}")
def test_misaligned_views_cuda():
    """Operands at storage offsets that are not 16-byte aligned (TMA's requirement) are copied, not passed on."""
    M, N, K = 24, 16, 64
    buf = torch.randn(M * K + 1, device="cuda").bfloat16()
    a = buf[1:].view(M, K)
    b = (torch.randn(N * K + 3, device="cuda") / K ** 0.5).bfloat16()[3:].view(N, K)
    ref = a.double() @ b.double().T
    got = cutlass_gemm(a, b)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 8e-3


def test_tma_operand_alignment():
    """The operand preparation itself (device-independent): aligned contiguous tensors pass through untouched,
    views at odd offsets and transposes come back contiguous at a 16-byte aligned address with the same values."""
    base = torch.randn(8 * 16 + 1).bfloat16()
    aligned = base[:128].view(8, 16)
    assert aligned.data_ptr() % 16 == 0 and _tma_operand(aligned).data_ptr() == aligned.data_ptr()
    odd = base[1:].view(8, 16)
    assert odd.data_ptr() % 16 != 0
    fixed = _tma_operand(odd)
    assert fixed.data_ptr() % 16 == 0 and fixed.is_contiguous() and torch.equal(fixed, odd)
    t = _tma_operand(aligned.t())
    assert t.is_contiguous() and t.data_ptr() % 16 == 0 and torch.equal(t, aligned.t())


def test_refuses_where_it_cannot_run():
    if WHY is None:
        pytest.skip("cutlass_gemm runs here")
    with pytest.raises(RuntimeError, match=r"nvembed.cutlass_gemm: "):
        cutlass_gemm(torch.randn(8, 8).bfloat16(), torch.randn(8, 8).bfloat16())


def test_gpu_gemm_compare_tiny_cpu(tmp_path):
    out = run_bench("gpu_gemm_compare.py", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--iters", "2",
                    "--warmup", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "gpu_gemm_compare_tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["shape"], r["provider"]) for r in rows] == [("tiny a", "cublas"), ("tiny a", "cutlass"),
                                                           ("tiny b", "cublas"), ("tiny b", "cutlass")]
    for r in rows:
        if r["provider"] == "cublas":
            assert r["status"] == "ok" and float(r["ms"]) > 0 and float(r["rel_err"]) == 0
        else:
            assert r["status"].startswith("unavailable: ")
