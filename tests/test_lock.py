"""The lock: constraints.txt pins every package .ci/setup.sh installs, and the running interpreter
holds exactly those versions, so a fresh clone runs what CI tested (drift fails here, by name)."""
import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import Specifier
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

LOCK = ROOT / "constraints.txt"


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of the lock's `name==version` lines. Any other line but a comment
    is an error, so a line the check cannot read is never silently left out of it."""
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if req.url or req.extras or req.marker or len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(f"{path}:{n}: {line!r} is not `name==version`")
        name = canonicalize_name(req.name)
        if name in pins:
            raise ValueError(f"{path}:{n}: {req.name} is pinned twice")
        pins[name] = specs[0].version
    return pins


def outside_lock_torch_requires(installed: dict, pins: dict[str, str]) -> set[str]:
    """Names the lock lacks that the installed torch requires, directly or through one another: a
    GPU build's CUDA libraries and triton (its wheel pins them itself; the CPU build has none)."""
    found, todo = set(), ["torch"]
    while todo:
        dist = installed.get(todo.pop())
        for line in (dist.requires or []) if dist else []:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if name not in pins and name not in found and (req.marker is None or req.marker.evaluate({"extra": ""})):
                found.add(name)
                todo.append(name)
    return found


def lock_drift(pins: dict[str, str], dists) -> list[str]:
    """One line per way the distributions `dists` differ from the lock `pins`: a version other than
    the pinned one, a package the lock lacks, a pinned package not installed. Not compared:
    smft_dist (this tree, installed editable), pip (the venv's installer, which `python -m venv`
    brings; .ci/lock.sh leaves it out too) and what only the torch build needs (above). A pin
    without a local label matches any (PEP 440 `==`): torch==2.13.0 holds for 2.13.0+cpu."""
    installed = {}
    for dist in dists:  # the first of two copies on the path is the one imported
        installed.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    skip = {"smft-dist", "pip"} | outside_lock_torch_requires(installed, pins)
    drift = []
    for name, dist in sorted(installed.items()):
        if name in skip:
            continue
        if name not in pins:
            drift.append(f"{name}=={dist.version} is installed but not in the lock")
        elif not Specifier(f"=={pins[name]}").contains(dist.version, prereleases=True):
            drift.append(f"{name}=={dist.version} is installed; the lock pins {pins[name]}")
    drift += [f"{name}=={v} is in the lock but not installed" for name, v in sorted(pins.items()) if name not in installed]
    return drift


def test_the_running_venv_holds_exactly_the_locked_versions():
    pins = read_lock(LOCK)
    # Not vacuous: the lock pins everything this package declares (every extra: setup.sh installs
    # them all) and mosaicml-streaming, and the drift check below finds every pin installed.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    needed = {canonicalize_name(Requirement(r).name) for r in declared + ["mosaicml-streaming"]}
    assert "torch" in needed and needed <= pins.keys(), f"{LOCK.name} lacks {sorted(needed - pins.keys())}"
    drift = lock_drift(pins, importlib.metadata.distributions())
    assert not drift, (f"this venv differs from {LOCK.name}: rebuild it (rm -r .venv && bash .ci/setup.sh), or "
                       "refresh the lock (bash .ci/lock.sh) and rerun the tests:\n" + "\n".join(drift))


def write_dist(root: Path, name: str, version: str, *requires: str) -> None:
    """An installed distribution's metadata, as pip leaves it in site-packages."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    (info / "METADATA").write_text("\n".join(lines + [f"Requires-Dist: {r}" for r in requires]) + "\n")


def test_drift_names_each_changed_extra_and_missing_package(tmp_path):
    site = tmp_path / "site-packages"
    site.mkdir()
    write_dist(site, "torch", "2.13.0+cu128", "filelock", "nvidia-cublas-cu12==12.8.4.1; platform_system == 'Linux'",
               "triton==3.5.0", "optree>=0.13; extra == 'optree'")
    write_dist(site, "nvidia-cublas-cu12", "12.8.4.1")
    write_dist(site, "triton", "3.5.0", "setuptools")
    write_dist(site, "setuptools", "84.2.1")
    write_dist(site, "filelock", "3.0.0")  # the lock pins 3.0.1
    write_dist(site, "stray", "0.1")  # in no lock and required by no torch
    write_dist(site, "smft_dist", "0.1.0", "torch")
    write_dist(site, "pip", "23.2.1")
    lock = tmp_path / "constraints.txt"
    lock.write_text("# header\ntorch==2.13.0\nsetuptools==84.2.1\nfilelock==3.0.1\nNumPy==2.4.6\n")
    pins = read_lock(lock)
    assert pins == {"torch": "2.13.0", "setuptools": "84.2.1", "filelock": "3.0.1", "numpy": "2.4.6"}
    assert lock_drift(pins, importlib.metadata.distributions(path=[str(site)])) == [
        "filelock==3.0.0 is installed; the lock pins 3.0.1",
        "stray==0.1 is installed but not in the lock",
        "numpy==2.4.6 is in the lock but not installed",
    ]
    assert lock_drift(pins, importlib.metadata.distributions(path=[str(tmp_path / "empty")])) == [
        f"{n}=={v} is in the lock but not installed" for n, v in sorted(pins.items())]
    for bad in ("torch>=2.13.0", "torch", "torch==2.13.0; python_version > '3'", "torch==2.13.0\ntorch==2.13.0"):
        lock.write_text(bad + "\n")
        with pytest.raises(ValueError, match="is not `name==version`|pinned twice"):
            read_lock(lock)
