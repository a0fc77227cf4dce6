"""Shared pieces of the benchmarks: environment metadata and the CSV writer (Liger-Kernel style: one row per
variant with p20/p50/p80, the anchor's time and the ratio, CPU/GPU name, versions, commit, date), and for the GPU
scripts (bench/gpu_*.py, run as `python3 bench/gpu_X.py`, which puts this folder on sys.path) their device choice,
CUDA-event timing, quantiles and matplotlib figures."""
import contextlib
import csv
import datetime
import os
import platform
import subprocess
import time
from typing import Callable, Optional

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """$NVEMBED_COMMIT where set (a device run's copied tree may carry stale git metadata: bench/gpu_check.sh's caller
    passes the commit), else HEAD's short hash, with "-dirty" where tracked files differ from it."""
    if os.environ.get("NVEMBED_COMMIT"):
        return os.environ["NVEMBED_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.check_output(["git", "-C", here, "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"
    dirty = subprocess.run(["git", "-C", here, "diff", "--quiet", "HEAD", "--"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL).returncode == 1
    return head + ("-dirty" if dirty else "")


def device_name(device) -> str:
    """The GPU's name for a CUDA device (the current one for a bare "cuda"), else the CPU's."""
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else cpu_name()


@contextlib.contextmanager
def env_vars(values: dict):
    """The environment variables `values` set inside the block (the ops read theirs on every call), the previous
    values restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def gpu_environment(device) -> dict:
    """The leading CSV columns of bench/gpu_attention.py and bench/gpu_latent_pool.py: gpu (a CPU run says
    "cpu: <model>"), torch, cuda, commit ($NVEMBED_COMMIT first: a copied tree may have no .git), date."""
    name = device_name(device)
    return {"gpu": name if device.type == "cuda" else f"cpu: {name}",
            "torch": torch.__version__, "cuda": torch.version.cuda or "",
            "commit": git_commit(), "date": datetime.date.today().isoformat()}


def describe(env: dict) -> str:
    """gpu_environment() in one line, for the log's first line and the figures' titles."""
    return f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda'] or '-'}, commit {env['commit']}"


def environment() -> dict:
    import nvembed_ext

    info = nvembed_ext.build_info()
    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "device": cpu_name(),  # the CPU benchmarks run on CPU tensors, whatever GPU the machine has
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "nvembed_cpu_isa": info["cpu_isa"],
        "nvembed_cpu_blas": info["cpu_blas"],
    }


def write_csv(path: str, rows: list, columns: Optional[list] = None) -> None:
    """`columns` given: exactly those, in that order ("" where a row lacks one, keys not named dropped), the header
    even when there are no rows. None: the union of the rows' keys in first-seen order, and no file for no rows."""
    if columns is None:
        if not rows:
            return
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})


def first_line(e: BaseException, limit: Optional[int] = None) -> str:
    """"Type: first line of the message" (that line cut to `limit` characters): what a benchmark row records of an
    error, the full traceback going to the log."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:limit] if limit else first}"


def quantile(times: list, p: float) -> float:
    """The p-quantile of `times` as the benchmarks report it: sorted(times)[min(n - 1, int(p * n))]."""
    s = sorted(times)
    return s[min(len(s) - 1, int(p * len(s)))]


# ---- the GPU scripts ---------------------------------------------------------------------------------------------

def select_device(prog: str, spec: str, tiny: bool, full_run: str) -> Optional[torch.device]:
    """--device of a GPU script with a --tiny mode: "auto" = cuda when available, else cpu. None, having said why,
    where CUDA is asked for and absent or where `full_run` (the non-tiny run) is asked for on a CPU; a CUDA device is
    made the current one."""
    device = torch.device(spec if spec != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: no CUDA device here; use --tiny (it runs on the CPU)")
        return None
    if device.type == "cpu" and not tiny:
        print(f"{prog}: {full_run} is for a GPU; use --tiny on the CPU")
        return None
    if device.type == "cuda":
        if device.index is None:  # torch 2.11's set_device refuses an index-less "cuda"
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def time_calls(call: Callable, warmup: int, iters: int, on_cuda: bool) -> list:
    """Milliseconds of each of `iters` calls after `warmup` untimed ones: on CUDA each between two CUDA events, all
    recorded back to back and read after one synchronize; on a CPU a perf_counter pair."""
    for _ in range(warmup):
        call()
    if on_cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (and a line saying so) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (the CSV has every number)")
        return None
    return plt


def save_figure(fig, path: str, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
