"""A real single-node Slurm cluster for the tests: config in a temp folder, daemons, job helpers.

The cluster is one node named `localhost` with `cpus` CPUs, one `debug` partition, no accounting,
and `auth/none` (no munge key or daemon to manage on a throwaway single-host cluster). Every
daemon and client finds it through the `SLURM_CONF` environment variable, so the machine's own
/etc/slurm is never touched. Usable by hand as well:

    python tests/slurm/cluster.py up /tmp/slurm     # prints `export SLURM_CONF=...`
    python tests/slurm/cluster.py down /tmp/slurm
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo", "srun")

SLURM_CONF = """\
ClusterName=smftci
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
# A requeued job may start again cred_expire + 1 s later (Slurm's default: 120 s).
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Look for startable jobs every second (a requeued job would otherwise wait up to a minute).
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=30
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def missing_binaries() -> list[str]:
    """Names of the Slurm programs that are not installed (empty when the cluster can run)."""
    found = lambda name: shutil.which(name) or os.path.exists(f"/usr/sbin/{name}")  # noqa: E731
    return [name for name in DAEMONS + CLIENTS if not found(name)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A running cluster: `env` is os.environ plus SLURM_CONF, for every Slurm command."""

    root: Path
    env: dict[str, str]
    started: bool  # False when an already running cluster was reused: then never stop it

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def ping(self) -> bool:
        out = subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and "UP" in out.stdout

    def node_ready(self) -> bool:
        state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip()
        return state.startswith(("idle", "mixed", "allocated"))

    def sbatch(self, script: str, env: dict[str, str], *args: str, cwd=None) -> int:
        """Submit `script` from `cwd` with `env` (merged over the cluster env); -> the job id."""
        out = subprocess.run(["sbatch", "--parsable", *args, script], env={**self.env, **env},
                             cwd=cwd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                         "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"),
             timeout: float = 300.0, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job reaches one of `states`; returns its final `job()` record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout}s")
            time.sleep(poll)


def _existing(root: Path) -> Cluster | None:
    """The cluster named by SLURM_CONF in the environment, if it answers."""
    conf = os.environ.get("SLURM_CONF")
    if not conf or not os.path.exists(conf):
        return None
    cluster = Cluster(root=Path(conf).parent, env=dict(os.environ), started=False)
    return cluster if cluster.ping() else None


def start(root: Path, cpus: int = 2, timeout: float = 30.0) -> Cluster:
    """Reuse the cluster that SLURM_CONF names if it is up; otherwise start one under `root`."""
    existing = _existing(root)
    if existing is not None:
        return existing
    root = Path(root).resolve()
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, cpus=cpus, ctld_port=_free_port(),
                                      slurmd_port=_free_port()))
    cluster = Cluster(root=root, env={**os.environ, "SLURM_CONF": str(conf)}, started=True)
    # -i: ignore state left by an earlier run; slurmd -N: this host is node `localhost`.
    for cmd in (["/usr/sbin/slurmctld", "-i"], ["/usr/sbin/slurmd", "-N", "localhost"]):
        subprocess.run(cmd, env=cluster.env, check=True)
    deadline = time.monotonic() + timeout
    while not (cluster.ping() and cluster.node_ready()):
        if time.monotonic() > deadline:
            logs = "\n".join((root / f"{d}.log").read_text()[-2000:] for d in DAEMONS
                             if (root / f"{d}.log").exists())
            stop(cluster)
            raise RuntimeError(f"Slurm did not come up within {timeout}s; daemon logs:\n{logs}")
        time.sleep(0.3)
    return cluster


def stop(cluster: Cluster, timeout: float = 15.0) -> None:
    """Stop the daemons this process started, by the pids in their pid files."""
    if not cluster.started:
        return
    for daemon in DAEMONS:
        pid_file = cluster.root / f"{daemon}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text().split()[0])
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    if action == "up":
        c = start(where)
        print(f"export SLURM_CONF={c.env['SLURM_CONF']}")
    else:
        stop(Cluster(root=where.resolve(), env=dict(os.environ), started=True))
