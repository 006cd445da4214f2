"""Real Slurm clusters for the tests: config in a temp folder, daemons, job helpers.

`start`: one node named `localhost` with `cpus` CPUs. `start_multinode`: nodes `node1..N`, each
slurmd in its own network namespace with its own address and hostname (tests/slurm/netns.py),
slurmctld beside them on the namespaces' bridge. Both have one `debug` partition, no accounting,
and `auth/none` (no munge key or daemon to manage on a throwaway single-host cluster). Every
daemon and client finds it through the `SLURM_CONF` environment variable, so the machine's own
/etc/slurm is never touched. Usable by hand as well:

    python tests/slurm/cluster.py up /tmp/slurm      # prints `export SLURM_CONF=...`
    python tests/slurm/cluster.py up2 /tmp/slurm     # 2 nodes in namespaces; stays up until `down`
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

try:  # imported as tests.slurm.cluster (pytest) or run as a script
    from tests.slurm import netns
except ImportError:
    import netns

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo", "srun")

SLURM_CONF = """\
ClusterName=smftci
SlurmctldHost={ctld_host}
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
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
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
    network: Optional[netns.Network] = None  # the nodes' namespaces (start_multinode)
    job_env: dict[str, str] = field(default_factory=dict)  # set for every job submitted
    stopped: bool = False

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def ping(self) -> bool:
        out = subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and "UP" in out.stdout

    def node_ready(self) -> bool:
        """Every node is up (a node that is still `unknown` or `down` cannot take jobs)."""
        states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).split()
        return bool(states) and all(s.startswith(("idle", "mixed", "allocated")) for s in states)

    def sbatch(self, script: str, env: dict[str, str], *args: str, cwd=None) -> int:
        """Submit `script` from `cwd` with `env` (merged over the cluster env); -> the job id."""
        out = subprocess.run(["sbatch", "--parsable", *args, script], env={**self.env, **self.job_env, **env},
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
    node = f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN"
    cluster = _configure(root, "localhost", node, "localhost")
    return _boot(cluster, {"localhost": []}, timeout)


def start_multinode(root: Path, nodes: int = 2, cpus: int = 2, timeout: float = 60.0) -> Cluster:
    """A cluster of `nodes` nodes, each slurmd in its own network namespace (netns.acquire: raises
    netns.NetnsUnavailable where namespaces cannot be made). Always a fresh cluster."""
    net = netns.acquire(nodes)
    try:
        lines = "\n".join(f"NodeName={n} NodeAddr={net.addr(n)} CPUs={cpus} RealMemory=4000 State=UNKNOWN"
                          for n in net.names())
        # "localhost(addr)": slurmctld accepts the name `localhost` as its own on any machine;
        # clients and the nodes reach it at the bridge address.
        cluster = _configure(root, f"localhost({net.gateway})", lines, ",".join(net.names()), network=net)
        local_tmp = cluster.root / "node-tmp"  # each node mounts its own tmpfs here: the jobs' TMPDIR
        local_tmp.mkdir()
        cluster.job_env["TMPDIR"] = str(local_tmp)
        return _boot(cluster, {n: net.exec_prefix(n, local_tmp) for n in net.names()}, timeout)
    except BaseException:
        net.down()
        raise


def _configure(root: Path, ctld_host: str, node_lines: str, node_names: str, network=None) -> Cluster:
    root = Path(root).resolve()
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if network is not None:
        (root / "netns_slot").write_text(str(network.slot))
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_host=ctld_host, ctld_port=_free_port(),
                                      slurmd_port=_free_port(), node_lines=node_lines, node_names=node_names))
    return Cluster(root=root, env={**os.environ, "SLURM_CONF": str(conf)}, started=True, network=network)


def _boot(cluster: Cluster, node_prefixes: dict[str, list[str]], timeout: float) -> Cluster:
    """Start slurmctld, then one slurmd per node (each behind its command prefix); wait until up."""
    try:
        # -i: ignore state left by an earlier run; slurmd -N: which node this slurmd is.
        subprocess.run(["/usr/sbin/slurmctld", "-i"], env=cluster.env, check=True)
        if cluster.network is not None:  # for a later bring-up to stop, should this process be killed
            deadline = time.monotonic() + timeout
            while not _pids(cluster, "slurmctld.pid") and time.monotonic() < deadline:
                time.sleep(0.1)  # the daemon writes its pid file after it has forked
            cluster.network.record_daemons(_pids(cluster, "slurmctld.pid"))
        for node, prefix in node_prefixes.items():
            (cluster.root / "spool" / node).mkdir(exist_ok=True)
            subprocess.run([*prefix, "/usr/sbin/slurmd", "-N", node], env=cluster.env, check=True)
        deadline = time.monotonic() + timeout
        while not (cluster.ping() and cluster.node_ready()):
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(cluster.root.glob("*.log")))
                raise RuntimeError(f"Slurm did not come up within {timeout}s; daemon logs:\n{logs}")
            time.sleep(0.3)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _pids(cluster: Cluster, pattern: str) -> list[int]:
    pids = []
    for pid_file in cluster.root.glob(pattern):
        try:
            pids.append(int(pid_file.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    return pids


def stop(cluster: Cluster, timeout: float = 15.0) -> None:
    """Stop the daemons this process started, by the pids in their pid files, and tear down the
    nodes' namespaces (with whatever still runs in them). Idempotent."""
    if not cluster.started or cluster.stopped:
        return
    cluster.stopped = True  # a second call must not signal pids that may since have been reused
    for pid in _pids(cluster, "slurm*.pid"):
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
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if cluster.network is not None:
        cluster.network.down()


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    if action == "up":
        c = start(where)
        print(f"export SLURM_CONF={c.env['SLURM_CONF']}")
    elif action == "up2":  # by hand the slot is unlocked once this exits: `down` before the next test run
        c = start_multinode(where)
        print(f"export SLURM_CONF={c.env['SLURM_CONF']}")
    else:
        slot_file = where.resolve() / "netns_slot"
        network = netns.claim(int(slot_file.read_text())) if slot_file.exists() else None
        stop(Cluster(root=where.resolve(), env=dict(os.environ), started=True, network=network))
