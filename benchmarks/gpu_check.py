"""The GPU check: every figure this project needs from a CUDA machine, in one call of under 8 minutes.

    python3 benchmarks/gpu_check.py [--out DIR]      # DIR default: $OUT if set, else runs/gpu_check-<time>

Steps, each a child process under its own time limit (a failing step is recorded and the next runs):

    wheels        pip install --no-index --no-deps --target <tmp> .whl/*.whl, when .whl/ exists: the
                  packages the GPU machine lacks (benchmarks/gpu_wheels.sh downloads them here)
    pytest-gpu    pytest -m gpu: the tests that need CUDA (unpadded ESM vs padded, varlen and nested)
    bench-build   bench_build.py at the ESM2-650M shape: extract.py-style loop vs embedcache (fp32),
                  embedcache bf16 (residues/s, MFU, padding efficiency, bf16 vs fp32 parity), and the
                  unpadded vs padded forward on the same batches
    build-busy    bench_build_host.py --forms model: real builds (per-token and pooled-only) of random ESM2s at
                  the 150M and 650M shapes in bf16, the share of each build's wall the GPU spends in forwards
                  (CUDA events), beside tokens/s and MFU
    bench-fusion  bench_fusion.py --size isoformer: cached vs frozen vs full finetune s/epoch, and the share
                  of each training step spent waiting for its batch (the data-wait share)

Without CUDA it says so and runs what a CPU can at toy size (bench_build on a tiny ESM2, bench_fusion
--size tiny cut short; the gpu tests are collected and skipped), so the script itself is tried here.

It writes DIR/gpu_check.log (everything the steps print) and DIR/gpu_check.json (machine, each step's
exit status, seconds, what it skipped, and the figures of each benchmark's own JSON).

Only the standard library is imported here, so nothing fails before the wheels are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
BUDGET_SECONDS = 470  # the whole check, under the 8 minutes it is sized for (setup included)

# (name, time limit in seconds, arguments on CUDA, arguments without CUDA or None = skipped there)
STEPS = [
    ("pytest-gpu", 70,
     [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
     [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]),
    ("bench-build", 170,
     [sys.executable, str(BENCH / "bench_build.py"), "--shape", "650M", "--n-sequences", "700", "--repeats", "1",
      "--max-tokens", "16384", "--warmup-sequences", "16", "--unpadded-ab", "on"],
     [sys.executable, str(BENCH / "bench_build.py"), "--hidden", "64", "--layers", "2", "--heads", "4",
      "--n-sequences", "40", "--max-length", "300", "--repeats", "1", "--warmup-sequences", "2", "--unpadded-ab", "on"]),
    ("build-busy", 100,
     [sys.executable, str(BENCH / "bench_build_host.py"), "--forms", "model", "--device", "cuda", "--n-sequences", "1500",
      "--repeats", "1", "--warmup-sequences", "16"],
     [sys.executable, str(BENCH / "bench_build_host.py"), "--forms", "model", "--quick"]),
    ("bench-fusion", 120,
     [sys.executable, str(BENCH / "bench_fusion.py"), "--size", "isoformer", "--n-genes", "12", "--steps", "3",
      "--warmup-steps", "1", "--cached-epochs", "2"],
     [sys.executable, str(BENCH / "bench_fusion.py"), "--size", "tiny", "--n-genes", "10", "--batch-size", "4",
      "--steps", "1", "--warmup-steps", "1", "--cached-epochs", "2", "--threads", "1"]),
]  # fmt: skip
WITHOUT_CUDA = {
    "pytest-gpu": "every gpu-marked test skips without CUDA (collected, so imports and markers are checked)",
    "bench-build": "toy ESM2 (hidden 64, 2 layers) instead of ESM2-650M; no bf16, no MFU (CPU)",
    "build-busy": "--quick: tiny ESM2s timed by wall clock on the CPU; no MFU",
    "bench-fusion": "--size tiny instead of isoformer (the Enformer window alone takes ~30 s per step on a CPU)",
}


class Log:
    """Prints and appends to the log file (the device tool returns only the end of stdout)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")


def install_wheels(log: Log) -> tuple[dict, str | None]:
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not wheels:
        return {"status": "skipped", "reason": "no .whl/ (run benchmarks/gpu_wheels.sh, carry .whl)"}, None
    target = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]  # fmt: skip
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log(proc.stdout + proc.stderr)
    status = {"status": "ok" if proc.returncode == 0 else "failed", "rc": proc.returncode,
              "seconds": round(time.time() - started, 1), "wheels": [w.name for w in wheels]}  # fmt: skip
    return status, str(target) if proc.returncode == 0 else None


def probe(env: dict) -> dict:
    """Versions and the GPU as the children will see them (imports run in a child, after the wheels)."""
    code = (
        "import json, importlib, torch\n"
        "v = {}\n"
        "for m in ('torch', 'transformers', 'numpy', 'zarr', 'numcodecs', 'peft', 'xarray', 'enformer_pytorch'):\n"
        "    try: v[m] = getattr(importlib.import_module(m), '__version__', 'present')\n"
        "    except Exception as e: v[m] = f'missing ({type(e).__name__})'\n"
        "gpu = None\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    gpu = {'name': p.name, 'memory_gib': round(p.total_memory / 2**30, 1), 'cuda': torch.version.cuda}\n"
        "try:\n"
        "    from torch.nn.attention.varlen import varlen_attn; varlen = True\n"
        "except ImportError: varlen = False\n"
        "print(json.dumps({'versions': v, 'gpu': gpu, 'varlen_attn': varlen}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_step(name: str, cmd: list[str], limit: float, env: dict, out: Path, log: Log) -> dict:
    json_path = out / f"{name}.json"
    if name.startswith("bench"):
        cmd = [*cmd, "--json", str(json_path)]
    log(f"\n== {name} (limit {limit:.0f} s): {' '.join(cmd[1:])}")
    started = time.time()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                              timeout=limit)  # fmt: skip
        output, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""), "timeout"
    log(output.rstrip())
    result = {"rc": rc, "seconds": round(time.time() - started, 1), "output_tail": output[-1500:]}
    if json_path.exists():
        result["figures"] = json.loads(json_path.read_text())
    if name == "pytest-gpu":
        result["summary"] = next((l for l in reversed(output.splitlines()) if " in " in l and "=" not in l[:1]), "")
    log(f"== {name}: exit {rc} after {result['seconds']} s")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.environ.get("OUT") or str(REPO / "runs" / time.strftime("gpu_check-%Y%m%d-%H%M%S"))
    p.add_argument("--out", type=Path, default=Path(default_out), help="where the log and JSON go (default: $OUT)")
    p.add_argument("--steps", default=",".join(s[0] for s in STEPS), help="comma-separated subset of the steps")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_check.log")
    started = time.time()
    log(f"== gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()} ({platform.platform()}), "
        f"python {platform.python_version()}")  # fmt: skip

    wheels, site = install_wheels(log)
    log(f"== wheels: {wheels['status']}" + (f" ({len(wheels.get('wheels', []))} into {site})" if site else
                                              f": {wheels.get('reason', '')}"))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), site, os.environ.get("PYTHONPATH")) if p)
    machine = probe(env)
    log(f"== environment: {json.dumps(machine)}")
    cuda = bool(machine.get("gpu"))
    if not cuda:
        log("== NO CUDA: running the CPU-possible parts at toy size. Skipped or reduced:")
        for step, what in WITHOUT_CUDA.items():
            log(f"   {step}: {what}")

    wanted = set(args.steps.split(","))
    steps = {}
    for name, limit, gpu_cmd, cpu_cmd in STEPS:
        if name not in wanted:
            steps[name] = {"skipped": "not in --steps"}
            continue
        left = BUDGET_SECONDS - (time.time() - started)
        if left < 30:
            steps[name] = {"skipped": f"only {left:.0f} s of the {BUDGET_SECONDS} s budget left"}
            log(f"== {name}: SKIPPED, {steps[name]['skipped']}")
            continue
        steps[name] = run_step(name, gpu_cmd if cuda else cpu_cmd, min(limit, left), env, args.out, log)
        if not cuda:
            steps[name]["reduced_without_cuda"] = WITHOUT_CUDA[name]

    report = {
        "check": "gpu_check",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cuda": cuda,
        "machine": machine,
        "wheels": wheels,
        "seconds": round(time.time() - started, 1),
        "steps": steps,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    log("\n== summary")
    for name, s in steps.items():
        status = s.get("skipped") or f"exit {s['rc']} in {s['seconds']} s"
        log(f"  {name:<13} {status}{'  (' + s['summary'] + ')' if s.get('summary') else ''}")
    log(f"  total {report['seconds']} s; wrote {args.out / 'gpu_check.json'} and gpu_check.log")
    return 0 if all(s.get("rc", 0) == 0 for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
