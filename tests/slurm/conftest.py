"""The `slurm_cluster` fixture: a real single-node Slurm cluster for the session.

Reuses the cluster that SLURM_CONF names when it answers, else starts one in a temp folder and
stops it at the end. Without the Slurm binaries (or without root, which slurmd needs) the tests
skip on a developer machine and FAIL on CI (CI=true), where .ci/run installs slurm-wlm.
"""
import os

import pytest

from tests.slurm import cluster as slurm


def _unavailable() -> str | None:
    missing = slurm.missing_binaries()
    if missing:
        return (f"Slurm binaries not found: {', '.join(missing)} "
                "(apt-get install slurm-wlm munge, as .ci/run does)")
    if os.geteuid() != 0 and not os.environ.get("SLURM_CONF"):
        return "starting slurmd needs root; or point SLURM_CONF at a running cluster"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = _unavailable()
    if reason:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        pytest.skip(reason)
    cluster = slurm.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    slurm.stop(cluster)
