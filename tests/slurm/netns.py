"""Network namespaces that stand in for a cluster's hosts: one per Slurm node, on a private bridge.

Slot k (0-7, one flock each, so that concurrent test sessions get separate clusters) owns:

    bridge smftbr<k>, address 10.213.<k>.1/24     in the root namespace (slurmctld, the test)
    namespace smft<k>node<i>, veth smft<k>v<i>     eth0 = 10.213.<k>.<10+i>/24, hostname node<i>
    /etc/netns/smft<k>node<i>/hosts                node<i> -> its address, for every node

Like `ip netns exec`, `Network.exec_prefix` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts for
what it starts (in a private mount namespace), so inside a node (slurmd, the job's batch shell, srun, torchrun, gloo) `node2` resolves to node 2's address
and the node's own hostname (set in a UTS namespace) to its own: the launch scripts see a normal
cluster. The real /etc/hosts is never touched. Only these addresses and loopback are used.

`Network.down()` kills every process left in the namespaces, deletes namespaces, links, bridge and
hosts files; it is idempotent. Bring-up first tears down whatever a killed earlier holder of the
same slot left behind (the slot's lock is free, so nothing of it is in use).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

LOCK_DIR = Path("/run/lock")
SLOTS = 8


class NetnsUnavailable(RuntimeError):
    """This machine or user cannot make network namespaces (no root, no iproute2, a sandbox)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")
    return out


def _kill_and_wait(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM `pids`, SIGKILL what is left after `timeout` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
            time.sleep(0.1)
        if not pids:
            return


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@dataclass
class Network:
    slot: int
    nodes: int
    lock_fd: int = -1
    extra_pids: list[int] = field(default_factory=list)  # root-namespace daemons (slurmctld) to stop

    @property
    def bridge(self) -> str:
        return f"smftbr{self.slot}"

    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace, where slurmctld listens."""
        return f"10.213.{self.slot}.1"

    def names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def netns(self, node: str) -> str:
        return f"smft{self.slot}{node}"

    def addr(self, node: str) -> str:
        return f"10.213.{self.slot}.{10 + int(node[4:])}"

    def exec_prefix(self, node: str, local_tmp: Path) -> list[str]:
        """Run a command as if on `node`: its network namespace, its /etc/hosts, its hostname, and
        its own /dev/shm and `local_tmp` (an empty folder: jobs' TMPDIR), since streaming and the
        launch scripts keep per-node locks and files there, as on separate machines. The rest of
        the file system is shared, as a cluster's shared file system is. What `ip netns exec`
        does, without its remount of /sys, which hides /sys/fs/cgroup from slurmd. The mounts
        live in a private mount namespace: never seen outside."""
        ns = self.netns(node)
        setup = (f"mount --bind /etc/netns/{ns}/hosts /etc/hosts && mount -t tmpfs -o size=2g tmpfs /dev/shm"
                 f" && mount -t tmpfs -o size=1g tmpfs {local_tmp} && hostname {node}")
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts", "sh", "-c",
                f'{setup} && exec "$@"', "sh"]

    @property
    def _state_file(self) -> Path:
        return LOCK_DIR / f"smft-netns-{self.slot}.json"

    def up(self) -> None:
        """Create bridge, namespaces, veths and hosts files (after clearing stale leftovers)."""
        self.down(release=False)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.addr(n)} {n}\n" for n in self.names())
        # Keep the nodes' traffic out of iptables: with br_netfilter loaded (e.g. on a Docker host,
        # whose FORWARD policy is DROP) bridged frames would otherwise be filtered.
        if _ip("link", "add", self.bridge, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables", "0",
               "nf_call_arptables", "0", check=False).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")  # an iproute2 without these options
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, node in enumerate(self.names(), 1):
            ns, veth = self.netns(node), f"smft{self.slot}v{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            (Path("/etc/netns") / ns).mkdir(parents=True, exist_ok=True)
            (Path("/etc/netns") / ns / "hosts").write_text(hosts)

    def record_daemons(self, pids: list[int]) -> None:
        """Remember root-namespace daemons so that a later bring-up can stop them if we are killed."""
        self.extra_pids = pids
        self._state_file.write_text(json.dumps({"pids": pids, "owner": os.getpid()}))

    def down(self, release: bool = True) -> None:
        """Tear down everything of this slot; safe to call twice, or on a half-made network. Acts
        only while this process holds the slot's lock: once released, the slot may be another's."""
        if self.lock_fd < 0:
            return
        stale = []
        if self._state_file.exists():
            try:
                stale = json.loads(self._state_file.read_text())["pids"]
            except (ValueError, KeyError):
                pass
        # Only daemons that are still Slurm's (a pid may have been reused since a killed run).
        pids = [p for p in set(self.extra_pids) | set(stale) if _is_slurm_daemon(p)]
        for i in range(1, SLOTS * 4):  # every namespace of the slot, whatever node count made it
            ns = f"smft{self.slot}node{i}"
            if ns in _ip("netns", "list", check=False).stdout.split():
                pids += [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        _kill_and_wait(pids)
        listed = _ip("netns", "list", check=False).stdout
        for i in range(1, SLOTS * 4):
            ns = f"smft{self.slot}node{i}"
            if ns in listed.split():
                _ip("netns", "del", ns, check=False)
            _ip("link", "del", f"smft{self.slot}v{i}", check=False)
            hosts_dir = Path("/etc/netns") / ns
            if hosts_dir.exists():
                for f in hosts_dir.iterdir():
                    f.unlink()
                hosts_dir.rmdir()
        _ip("link", "del", self.bridge, check=False)
        if Path("/etc/netns").exists() and not any(Path("/etc/netns").iterdir()):
            Path("/etc/netns").rmdir()
        self._state_file.unlink(missing_ok=True)
        self.extra_pids = []
        if release and self.lock_fd >= 0:
            (LOCK_DIR / f"smft-netns-{self.slot}.lock").unlink(missing_ok=True)
            os.close(self.lock_fd)
            self.lock_fd = -1


def _is_slurm_daemon(pid: int) -> bool:
    try:
        return b"slurm" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _check_rights() -> None:
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (ip netns add)")
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    except FileNotFoundError:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed") from None
    if out.returncode != 0:
        raise NetnsUnavailable(f"ip netns does not work here: {out.stderr.strip()}")
    missing = [tool for tool in ("nsenter", "unshare", "mount") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"{', '.join(missing)} not found (util-linux, mount)")
    if subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True).returncode != 0:
        raise NetnsUnavailable("unshare --uts --mount fails: cannot give each node its own hostname and hosts file")


def _lock(slot: int, block: bool) -> int:
    """-> a file descriptor holding the slot's lock, or -1 when another process holds it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / f"smft-netns-{slot}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return -1
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # its last holder unlinked the file after we opened it: lock the new one


def claim(slot: int) -> Network:
    """The network of `slot`, locked (waiting for its holder), for `down()` by hand."""
    return Network(slot, 0, lock_fd=_lock(slot, block=True))


def acquire(nodes: int) -> Network:
    """Lock a free slot and build its network; NetnsUnavailable when this machine cannot."""
    _check_rights()
    for slot in range(SLOTS):
        fd = _lock(slot, block=False)
        if fd < 0:
            continue
        net = Network(slot, nodes, lock_fd=fd)
        try:
            net.up()
        except Exception as e:
            net.down()
            raise NetnsUnavailable(f"could not build the namespace network: {e}") from e
        return net
    raise RuntimeError(f"all {SLOTS} namespace-cluster slots are in use ({LOCK_DIR}/smft-netns-*.lock)")
