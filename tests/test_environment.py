"""The installed packages are a set the project supports: pyproject's ranges, extras included.

A resolver left to itself once paired enformer-pytorch 0.8.12 (which pins transformers 4.56.2)
or 0.8.11 with versions the project never ran; this names the offending package in one line
instead of letting the suite fail somewhere deep in a model's save or load.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRAS_TESTED = ("test", "enformer")  # what `make install` installs


def requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    listed = project["dependencies"] + [r for extra in EXTRAS_TESTED for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in listed]


@pytest.mark.parametrize("requirement", requirements(), ids=str)
def test_installed_version_is_supported(requirement: Requirement):
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        pytest.fail(f"{requirement.name} is not installed; `make install` installs every package pyproject.toml lists")
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{requirement.name} {installed} is installed, but pyproject.toml supports {requirement}: reinstall with "
        f"`make install` (pip install -c constraints.txt -e '.[{','.join(EXTRAS_TESTED)}]')"
    )


def test_constraints_satisfy_pyproject():
    """constraints.txt, what `make install` pins, lies inside pyproject's ranges."""
    pinned = {}
    for line in (PYPROJECT.parent / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            r = Requirement(line)
            pinned[canonicalize_name(r.name)] = next(iter(r.specifier)).version
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"constraints.txt pins no version of {requirement.name}; run `make constraints`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pinned[name]}, outside pyproject.toml's {requirement}; run `make constraints`"
        )
