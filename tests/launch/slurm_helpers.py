"""A real Slurm cluster for the launch tests: munged, slurmctld and two slurmd (nodes n1, n2) on this machine.

Everything lives in a temp folder (config, state, spool, logs, the MUNGE key and socket) and runs in the
foreground under this process, so stopping it stops exactly what was started. Clients find the cluster through
``SLURM_CONF`` (``cluster.env``); ``AuthInfo=socket=...`` points them at the private munged (a Unix socket, so
it serves every network namespace).

Two nodes, two networks: each slurmd runs in a network namespace of its own (``ip netns``), joined to the
controller by veth pairs on a bridge: controller 10.77.X.1, n1 .11, n2 .12. A two-node job is then two hosts
as far as TCP is concerned: the c10d rendezvous and gloo cross a real (virtual) link, and 127.0.0.1 on one
node is not the other. The machine's DNS server cannot be reached from the namespaces, so every address lookup
there would fail with EAI_AGAIN, and c10d logs a warning for each socket it cannot name; each slurmd therefore
runs in a mount namespace of its own whose /etc/hosts names the controller and the nodes and whose
/etc/nsswitch.conf resolves from that file alone, as a cluster's resolver would answer. Where namespaces cannot be made (no root, no ``ip``), both slurmd run on 127.0.0.1
with a port each (``network == "loopback"``); Debian's slurmd runs several instances per host (``-N NAME``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tunesmith.runenv import free_port

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun")
NODES = ("n1", "n2")


def ensure_slurm() -> None:
    """Install Slurm + MUNGE with scripts/install-slurm.sh when missing; skip (saying why) if that fails."""
    missing = [name for name in DAEMONS if not shutil.which(name)]
    if missing:
        subprocess.run(["bash", str(REPO / "scripts" / "install-slurm.sh")], check=False, timeout=900)
        missing = [name for name in DAEMONS if not shutil.which(name)]
    if missing:
        pytest.skip(
            f"Slurm is not installed and scripts/install-slurm.sh could not install it (missing: {missing})"
        )


class SlurmCluster:
    def __init__(self, root: Path, nodes: tuple[str, ...] = NODES, cpus: int = 2, netns: bool = True) -> None:
        self.root = root
        self.nodes = nodes
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.want_netns = netns
        self.network = "loopback"
        tag = os.getpid() % 10000  # interface names are limited to 15 characters
        self.bridge = f"tsbr{tag}"
        self.namespaces = {node: f"tsn{tag}-{i}" for i, node in enumerate(nodes, 1)}
        self.subnet = f"10.77.{tag % 250}"
        self.ctld_addr = "127.0.0.1"
        self.node_addrs = {node: "127.0.0.1" for node in nodes}

    # -- network ---------------------------------------------------------------------------------------------
    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def make_network(self) -> bool:
        """A bridge with the controller's address and a namespace per node behind a veth pair (True: made)."""
        tools = ("ip", "nsenter", "unshare", "mount")
        if not Path("/etc/nsswitch.conf").is_file():
            return False
        if not self.want_netns or os.getuid() != 0 or not all(shutil.which(tool) for tool in tools):
            return False
        if not self._private_hosts_work():
            return False
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self._ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            for i, node in enumerate(self.nodes, 1):
                ns, host_end = self.namespaces[node], f"{self.bridge}h{i}"
                self._ip("netns", "add", ns)
                self._ip("link", "add", host_end, "type", "veth", "peer", "name", "ts0", "netns", ns)
                self._ip("link", "set", host_end, "master", self.bridge)
                self._ip("link", "set", host_end, "up")
                self._ip("-n", ns, "addr", "add", f"{self.subnet}.{10 + i}/24", "dev", "ts0")
                self._ip("-n", ns, "link", "set", "ts0", "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
                self.node_addrs[node] = f"{self.subnet}.{10 + i}"
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            self.remove_network()
            self.node_addrs = {node: "127.0.0.1" for node in self.nodes}
            return False
        self.ctld_addr = f"{self.subnet}.1"
        self.network = "netns"
        # gloo advertises the address the hostname resolves to (127.0.0.1 here); inside a node's namespace the
        # link to the other node is ts0. sbatch passes the submitter's environment on to the job.
        self.env["GLOO_SOCKET_IFNAME"] = "ts0"
        return True

    def _private_hosts_work(self) -> bool:
        """Whether a mount namespace with its own /etc/hosts can be made here (see write_resolver)."""
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "mount", "--bind", "/etc/hosts", "/etc/hosts"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return probe.returncode == 0

    def write_resolver(self) -> tuple[Path, Path]:
        """For the nodes' namespaces: this machine's /etc/hosts plus the controller's and the nodes' addresses,
        and an /etc/nsswitch.conf that looks host names up in that file only (no DNS server is reachable)."""
        hosts, nsswitch = self.root / "hosts", self.root / "nsswitch.conf"
        names = [f"{self.ctld_addr} tunesmith-slurmctld", *(f"{a} {n}" for n, a in self.node_addrs.items())]
        original = Path("/etc/hosts").read_text(encoding="utf-8") if Path("/etc/hosts").is_file() else ""
        hosts.write_text(original.rstrip("\n") + "\n" + "\n".join(names) + "\n", encoding="utf-8")
        lines = Path("/etc/nsswitch.conf").read_text(encoding="utf-8").splitlines()
        lines = [line for line in lines if not line.startswith("hosts:")] + ["hosts: files"]
        nsswitch.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return hosts, nsswitch

    def remove_network(self) -> None:
        for ns in self.namespaces.values():  # deleting a namespace deletes its veth end, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30, check=False)

    # -- setup -----------------------------------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("munge", "run", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged wants every folder above its socket traversable by all
        os.chmod(self.root / "run", 0o755)
        os.chmod(self.root / "munge", 0o700)  # ...and its key readable by its user only
        host = socket.gethostname()
        ctld_port = free_port()
        # one port per slurmd: they share 127.0.0.1 in loopback mode (in namespaces they could share one)
        node_ports = [free_port() for _ in self.nodes]
        d = self.root
        lines = [
            "ClusterName=tunesmith-test",
            f"SlurmctldHost={host}({self.ctld_addr})",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={d}/run/munge.sock",
            f"SlurmUser={_user()}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",  # no cgroups needed (containers rarely delegate them)
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",  # no slurmdbd: sacct is unavailable here
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` for the whole session
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
        ]
        for name, port in zip(self.nodes, node_ports, strict=True):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr={self.node_addrs[name]} Port={port} "
                f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
            )
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        out.close()
        self.procs.append((name, proc))

    def start(self, timeout: float = 60) -> SlurmCluster:
        self.make_network()
        self.write_config()
        d = self.root
        key = d / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, timeout=30)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={d}/run/munge.sock",
                f"--key-file={key}",
                f"--pid-file={d}/run/munged.pid",
                f"--log-file={d}/log/munged.log",
                f"--seed-file={d}/munge/seed",
            ],
        )
        self._wait(lambda: (d / "run" / "munge.sock").exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in self.nodes:
            slurmd = ["slurmd", "-D", "-N", node, "-f", str(self.conf)]
            # nsenter --net only: `ip netns exec` would also remount /sys, and slurmd finds no cgroup fs there.
            # unshare --mount: the node's own name resolution, for slurmd and every job step it starts.
            if self.network == "netns":
                bind = 'mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/nsswitch.conf && shift && exec "$@"'
                slurmd = [
                    "unshare", "--mount", "--propagation", "private",
                    "sh", "-c", bind, *(str(path) for path in self.write_resolver()),
                    "nsenter", f"--net=/run/netns/{self.namespaces[node]}", *slurmd,
                ]  # fmt: skip
            self._spawn(f"slurmd-{node}", slurmd)
        self._wait(self.all_idle, timeout, "the nodes did not become idle")
        return self

    def all_idle(self) -> bool:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
        return all(states.get(node) == "idle" for node in self.nodes)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")

    # -- use -------------------------------------------------------------------------------------------------
    def run(
        self, cmd: list[str], check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job_state(self, job_id: str) -> str:
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "UNKNOWN"

    def wait_job(self, job_id: str, timeout: float) -> str:
        """The job's final state (bounded wait); cancels it when it runs out of time."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
                return state
            time.sleep(1)
        self.run(["scancel", job_id], check=False)
        raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s:\n{self.logs()}")

    def logs(self, tail: int = 20) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-tail:]
            parts.append(f"== {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- teardown --------------------------------------------------------------------------------------------
    def stop(self, timeout: float = 20) -> None:
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self.procs):
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
        for _name, proc in reversed(self.procs):  # nodes first, then the controller, then munged
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self.procs.clear()
        if self.network == "netns":
            self.remove_network()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running two-node cluster (n1, n2 on 127.0.0.1); stopped, and its folder removed, after the module."""
    ensure_slurm()
    if os.getuid() != 0:
        pytest.skip("the Slurm test cluster runs slurmd, which needs root (it launches jobs as their user)")
    root = Path(tempfile.mkdtemp(prefix="tunesmith-slurm-"))
    # TUNESMITH_SLURM_NETNS=0: both slurmd on 127.0.0.1 (what machines without network namespaces get)
    cluster = SlurmCluster(root, netns=os.environ.get("TUNESMITH_SLURM_NETNS", "1") != "0")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
