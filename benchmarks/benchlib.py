"""What every benchmark script shares: the machine it ran on, GPU peaks, reusable work directories.

The scripts import it as a sibling module (`python benchmarks/bench_x.py` puts this folder first on
sys.path), so they keep running from anywhere without installing `benchmarks` as a package.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

# Dense (no sparsity: half the data sheets' headline) bf16 tensor-core peaks in TFLOP/s from NVIDIA's
# data sheets, matched in order against the CUDA device name (the more specific names first).
GPU_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM: "NVIDIA H200"; also matches "NVIDIA GH200 ..." (same peak)
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def gpu_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its device name, or None when it is not in the table."""
    return next((peak for pattern, peak in GPU_BF16_PEAK_TFLOPS if pattern in name), None)


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info(**extra: Any) -> dict[str, Any]:
    """Platform, CPU, RAM, library versions, load average and GPU (if any), plus `extra` entries."""
    import transformers

    from embedcache import __version__

    mem = _proc_field("/proc/meminfo", "MemTotal")
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "embedcache": __version__,
        "load_average_at_start": load_average(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "bf16_dense_peak_tflops": gpu_peak_tflops(props.name),
            "cuda": torch.version.cuda,
        }
    return {**info, **extra}


def write_json(path: str | Path | None, figures: dict[str, Any]) -> None:
    """Write a benchmark's figures to `path` (its --json), if one was given; say where."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # numpy scalars as numbers, anything else unusual (paths, dtypes) as its text
    path.write_text(json.dumps(figures, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
    print(f"== wrote {path}")


def reuse_or_clear(work: Path, stamp_name: str, stamp_value: dict, made: tuple[str, ...]) -> bool:
    """True when `work` holds a data set made from `stamp_value` (its stamp file matches); otherwise
    remove the entries `made` (and the stamp) so the caller can make it afresh, and return False.

    Callers write the stamp last, so its presence marks a whole data set.
    """
    stamp = work / stamp_name
    if stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(stamp_value)):
        return True
    for name in (*made, stamp_name):
        target = work / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return False
