"""What every benchmark script shares: the machine it ran on, GPU peaks, reusable work directories,
the time spent inside model forwards.

The scripts import it as a sibling module (`python benchmarks/bench_x.py` puts this folder first on
sys.path), so they keep running from anywhere without installing `benchmarks` as a package.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


class ForwardTimer:
    """Wall seconds spent inside models' forward, and the positions they computed, while active.

    Global module hooks (the same for every side of a benchmark) time each outermost module call:
    whatever code calls the model, `model(**batch)` in a user's loop or the library's own. On CUDA
    the device is synchronised at both ends, so queued kernels count where they run. Positions are
    the rows of the output (b x n for a padded batch, T for packed windows).
    """

    def __init__(self, sync_cuda: bool = False):
        self.sync_cuda = sync_cuda
        self.seconds = 0.0
        self.calls = 0
        self.positions = 0
        self._depth = 0
        self._started = 0.0
        self._handles: list = []

    def __enter__(self) -> "ForwardTimer":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        # always_call: a forward that raises (a probe of a model loaded without weights, caught by its
        # caller) still closes its call, or every later call would count as nested inside it.
        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._depth = [], 0

    def _pre(self, module, args) -> None:
        if self._depth == 0:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self._started = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self.sync_cuda:
                torch.cuda.synchronize()
            if output is None:  # the forward raised (always_call): no call to count
                return
            self.seconds += time.perf_counter() - self._started
            self.calls += 1
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None:
                hidden = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(hidden, torch.Tensor):
                self.positions += hidden[..., 0].numel()


@contextmanager
def work_directory(workdir: Path | None, prefix: str) -> Iterator[Path]:
    """`workdir` (made if missing, and kept: its data can be reused), or a temporary one removed afterwards."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
