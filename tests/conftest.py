"""Shared test helpers: fresh random inputs each run (the seed is printed on failure), errors judged against the
fp64 reference with per-dtype tolerances."""
import os
import random
import subprocess
import sys

import pytest
import torch

# ‖out − ref‖ / ‖ref‖ bounds from the foundation issue.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-10}

ERR_TYPES = (RuntimeError, ValueError, TypeError, IndexError)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """bench/<script> with `args` in a subprocess (the repository and python/ on PYTHONPATH, as the GPU machine runs
    it from a checkout), stdout / stderr captured as text."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in the Frobenius norm. Where the reference is (near) zero, e.g. the gradient of a row with a
    single key, the denominator is floored so that rounding noise of size ~1e-6 per element does not count as
    error."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    floor = 1e-3 * max(ref.numel(), 1) ** 0.5
    return ((out - ref).norm() / max(ref.norm().item(), floor)).item()


def assert_close(out, ref, dtype, what="output", factor=1.0, baseline=None):
    """err(out) <= TOL[dtype]; where `baseline` (PyTorch's own result in the same low dtype) is given, also accept
    up to 2x PyTorch's error (FlashAttention's rule), which matters where the exact result is ~0."""
    err = rel_err(out, ref)
    bound = TOL[dtype] * factor
    if baseline is not None:
        bound = max(bound, 2.0 * rel_err(baseline, ref))
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.1e} ({dtype})"
    assert torch.isfinite(out.detach().float()).all(), f"{what}: non-finite values"


@pytest.fixture(autouse=True)
def fresh_seed(request):
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    random.seed(seed)
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(f"\n[seed] {request.node.nodeid} ran with torch.manual_seed({seed})", file=sys.stderr)


@pytest.fixture(autouse=True)
def cuda_context_check(request):
    """After a test marked cuda: a sticky CUDA error (an illegal memory access leaves the context unusable, and every
    later test in this process would fail with it) is charged to this test. Under pytest-xdist (bench/gpu_check.sh)
    the worker process ends, so xdist reports this test as crashed and starts a fresh worker for the rest; without
    xdist the test errors in its teardown."""
    yield
    if request.node.get_closest_marker("cuda") is None or not torch.cuda.is_available() \
            or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 -- torch raises RuntimeError / AcceleratorError by version
        if os.environ.get("PYTEST_XDIST_WORKER"):
            print(f"\n[cuda] {request.node.nodeid} left a CUDA error ({e}); ending this worker", file=sys.stderr,
                  flush=True)
            os._exit(3)
        raise


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
