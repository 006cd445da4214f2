"""Real Slurm clusters for the session: `slurm_cluster` (one node) and `slurm_2node` (two nodes,
each slurmd in its own network namespace: tests/slurm/netns.py).

`slurm_cluster` reuses the cluster that SLURM_CONF names when it answers, else starts one in a
temp folder and stops it at the end. Without the Slurm binaries (or without root, which slurmd
needs) the tests skip on a developer machine and FAIL on CI (CI=true), where .ci/run installs
slurm-wlm. `slurm_2node` also skips (on CI too) where network namespaces cannot be made; it is
torn down by its finalizer, and by atexit should the session end without one.
"""
import atexit
import os

import pytest

from tests.conftest import skip_unless_ci
from tests.slurm import cluster as slurm
from tests.slurm import netns


def _unavailable() -> str | None:
    missing = slurm.missing_binaries()
    if missing:
        return (f"Slurm binaries not found: {', '.join(missing)} "
                "(apt-get install slurm-wlm munge, as .ci/run does)")
    if os.geteuid() != 0 and not os.environ.get("SLURM_CONF"):
        return "starting slurmd needs root; or point SLURM_CONF at a running cluster"
    return None


def _require_slurm() -> None:
    reason = _unavailable()
    if reason:
        skip_unless_ci(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    _require_slurm()
    cluster = slurm.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    slurm.stop(cluster)


@pytest.fixture(scope="session")
def slurm_2node(tmp_path_factory):
    _require_slurm()
    try:
        cluster = slurm.start_multinode(tmp_path_factory.mktemp("slurm2"), nodes=2)
    except netns.NetnsUnavailable as e:
        skip_unless_ci(f"no 2-node cluster: {e}")
    atexit.register(slurm.stop, cluster)  # idempotent: a no-op after the finalizer below
    yield cluster
    slurm.stop(cluster)
