#!/usr/bin/env bash
# Download, here (with PyPI), the wheels the GPU check needs on a GPU machine without network that
# has Python 3.12, torch, transformers 5.x, peft, xarray, scikit-learn, pandas, pyarrow, scipy,
# einops, tqdm, pyyaml and pytest, but none of this project's other dependencies.
#
#     benchmarks/gpu_wheels.sh            # -> .whl/ (git-ignored; about 48 MB)
#
# Copy .whl/ to that machine with the repository; benchmarks/gpu_check.py installs them
# with `pip install --no-index --no-deps --target` before anything imports embedcache.
# Versions: the ones this project's .venv resolved (pyproject.toml), for cp312 manylinux x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
py=${PYTHON:-python3}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
wheels=(
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0  # the store
  pyfaidx==0.9.2.2                                                         # fusion.prepare.isoformer
  enformer-pytorch==0.8.11 polars==1.33.1  # bench_fusion --size isoformer (enformer_pytorch imports polars;
                                          # 1.33 is one 40 MB wheel, 2.x adds a 54 MB runtime: too big to carry)
)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}"
ls -la "$dest"
du -sh "$dest"
