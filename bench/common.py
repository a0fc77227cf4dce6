"""Shared pieces of the benchmarks: environment metadata and the CSV writer (Liger-Kernel style: one row per
variant with p20/p50/p80, the anchor's time and the ratio, CPU/GPU name, versions, commit, date)."""
import csv
import datetime
import os
import platform
import subprocess

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
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "-C", here, "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def environment() -> dict:
    import nvembed_ext

    info = nvembed_ext.build_info()
    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "nvembed_cpu_isa": info["cpu_isa"],
        "nvembed_cpu_blas": info["cpu_blas"],
    }


def write_csv(path: str, rows: list) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
