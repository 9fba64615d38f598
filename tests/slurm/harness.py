"""A throw-away one-node SLURM cluster for tests/test_slurm.py (and for trying the profile by hand).

It installs Debian's slurmctld, slurmd, slurm-client and munge if they are missing (root + apt only),
writes a private slurm.conf/gres.conf and munge key under STATE (never /etc/slurm or /etc/munge),
starts its own munged, slurmctld and slurmd on non-default ports and stops them again. Clients find
the cluster through SLURM_CONF (and, inside jobs, through the client wrappers in STATE/bin), so a
system SLURM on the same host is neither used nor disturbed.

By hand (as root):
    python tests/slurm/harness.py start     # prints the `export SLURM_CONF=... PATH=...` to use
    python tests/slurm/harness.py status
    python tests/slurm/harness.py stop      # cancels jobs, stops the daemons, removes STATE

The node is described as the profile expects a real cluster to look: partitions `test_cpu` and
`test_gpu` on one node with one GPU (a fake device node, see GRES_CONF), at least 8 CPUs and
64 GB declared (`SlurmdParameters=config_overrides`: a 2-core CI box can then run a job that asks
for `--cpus-per-gpu=4 --mem 32000` and, beside it, the light CPU jobs; memory is not a consumable
resource here, CR_Core). The one GPU serializes the GPU jobs, as on a one-GPU node.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # also run by hand
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from debian_packages import DebianPackagesUnavailableError, apt_install

from eagleflow.h5io import pid_alive

STATE = Path(os.environ.get("EAGLE_SLURM_STATE", "/tmp/eagleflow-slurm-harness"))
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
CLIENTS = ("srun", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "munged")
SBIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
CPU_PARTITION = "test_cpu"
GPU_PARTITION = "test_gpu"
CTLD_PORT = 16817
SLURMD_PORT = 16818
MIN_JOB_AGE = 1800  # completed jobs stay visible to squeue/scontrol for the whole test

SLURM_CONF = """\
# Written by tests/slurm/harness.py: a one-node test cluster, no accounting (no slurmdbd).
ClusterName=eagletest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state}/munge/munge.socket
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/slurmd
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge={min_job_age}
MaxArraySize=1001
SlurmdParameters=config_overrides
NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} Gres=gpu:1 State=UNKNOWN
PartitionName={cpu_partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName={gpu_partition} Nodes={node} MaxTime=INFINITE State=UP
"""

# slurmd 22.05 drops a GPU without File= ("Removing file-less GPU gpu:(null) from final GRES list")
# and then drains the node ("gres/gpu count reported lower than configured (0 < 1)"); a regular file
# is rejected as "not a valid character or block device". So the GPU is a character device node in
# STATE (a copy of /dev/null, major 1 minor 3): SLURM counts and allocates it, nothing can use it.
GRES_CONF = """\
AutoDetect=off
NodeName={node} Name=gpu File={device} Count=1
"""


class SlurmUnavailableError(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (used as a skip reason)."""


@dataclass(frozen=True)
class Cluster:
    state: Path
    conf: Path
    node: str

    @property
    def bin(self) -> Path:
        """Client wrappers (srun, sbatch, ...) that pin SLURM_CONF; put first on PATH."""
        return self.state / "bin"

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, squeue, scontrol and Snakemake's SLURM executor)."""
        path = f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        result = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def log(self, name: str) -> str:
        path = self.state / "log" / name
        return path.read_text(errors="replace") if path.exists() else ""


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    return None


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if which(name) is None]


def check_possible() -> None:
    """Raise SlurmUnavailableError at once where start() could not work (before any slow work)."""
    if os.geteuid() != 0:
        raise SlurmUnavailableError("the test cluster's slurmd and munged must run as root")
    if missing_binaries() and shutil.which("apt-get") is None:
        raise SlurmUnavailableError(
            f"SLURM is not installed ({', '.join(missing_binaries())}) and no apt-get"
        )
    if not hasattr(os, "mknod"):
        raise SlurmUnavailableError("no os.mknod on this platform")


def ensure_installed(log=print) -> None:
    """apt-get install the Debian SLURM and munge packages if any binary is missing."""
    missing = missing_binaries()
    if not missing:
        return
    try:
        apt_install(PACKAGES, f"SLURM is not installed ({', '.join(missing)})", log=log)
    except DebianPackagesUnavailableError as err:
        raise SlurmUnavailableError(str(err)) from err
    still = missing_binaries()
    if still:
        raise SlurmUnavailableError(f"apt-get install did not provide {', '.join(still)}")


def _pid_alive(pid: int) -> bool:
    """Like eagleflow's pid_alive, but a zombie (our own exited child) is reaped, not alive."""
    if not pid_alive(pid):
        return False
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if status == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def _owned_pid(pidfile: Path, marker: str) -> int | None:
    """The pid in `pidfile` if that process is alive and its command line mentions `marker`."""
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError):
        return None
    return pid if marker in cmdline and _pid_alive(pid) else None


def _terminate(pid: int, timeout: float = 20) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.2)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _spawn(name: str, args: list[str], state: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a daemon in the foreground of a new session; its pid goes to STATE/<name>.harness.pid."""
    with open(state / "log" / f"{name}.out", "ab") as out:
        process = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # survives the CLI; stopped by pid file, not by process group
        )
    (state / f"{name}.harness.pid").write_text(f"{process.pid}\n")
    return process


def _wait_for(check, what: str, timeout: float, cluster: Cluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as error:  # the daemon may not answer yet
            last = error
        time.sleep(0.5)
    logs = ""
    if cluster is not None:
        logs = (
            f"\n--- slurmctld.log ---\n{cluster.log('slurmctld.log')[-4000:]}"
            f"\n--- slurmd.log ---\n{cluster.log('slurmd.log')[-4000:]}"
        )
    raise RuntimeError(f"timed out waiting for {what} ({last}){logs}")


def stop(state: Path = STATE, remove: bool = True, log=print) -> None:
    """Cancel the test cluster's jobs, stop the daemons this harness started, remove `state`."""
    conf = state / "slurm.conf"
    marker = str(state)
    ctld = _owned_pid(state / "slurmctld.harness.pid", marker)
    if ctld is not None and conf.exists() and which("scancel"):
        env = {**os.environ, "SLURM_CONF": str(conf)}
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(
                [which("scancel"), "--quiet", "--user=root"],
                env=env,
                capture_output=True,
                timeout=30,
            )
            time.sleep(2)
    for name in ("slurmd", "slurmctld", "munged"):
        pid = _owned_pid(state / f"{name}.harness.pid", marker)
        if pid is not None:
            log(f"stopping {name} (pid {pid})")
            _terminate(pid)
    if remove and state.exists():
        shutil.rmtree(state, ignore_errors=True)


def start(state: Path = STATE, log=print) -> Cluster:
    """Install if needed, (re)write the configuration and start munged, slurmctld and slurmd."""
    ensure_installed(log)
    if os.geteuid() != 0:
        raise SlurmUnavailableError("starting slurmd and munged needs root")
    stop(state, remove=True, log=log)  # a previous attempt's daemons and state
    for sub in ("munge", "ctld", "slurmd", "log"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)
    (state / "munge").chmod(0o700)

    host = socket.gethostname().split(".")[0]
    node = host
    cpus = max(os.cpu_count() or 1, 8)
    conf = state / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host,
            node=node,
            state=state,
            cpus=cpus,
            mem_mb=64000,
            ctld_port=CTLD_PORT,
            slurmd_port=SLURMD_PORT,
            min_job_age=MIN_JOB_AGE,
            cpu_partition=CPU_PARTITION,
            gpu_partition=GPU_PARTITION,
        )
    )
    device = state / "dev" / "nvidia0"
    device.parent.mkdir(exist_ok=True)
    try:
        os.mknod(device, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError as error:
        raise SlurmUnavailableError(
            f"cannot create the fake GPU device node {device}: {error}"
        ) from error
    (state / "gres.conf").write_text(GRES_CONF.format(node=node, device=device))
    cluster = Cluster(state=state, conf=conf, node=node)
    # Inside a job, the jobstep executor removes every SLURM_* variable (SLURM_CONF too) before it
    # calls `srun`, and SLURM_CONF is how clients find this private cluster (a real cluster has
    # /etc/slurm/slurm.conf or configless DNS records). PATH survives (--export=ALL), so the
    # client commands are wrappers, first on PATH, that set SLURM_CONF and exec the real binary.
    cluster.bin.mkdir()
    for name in CLIENTS:
        real = which(name)
        if real is None:
            continue
        wrapper = cluster.bin / name
        wrapper.write_text(
            f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(conf))} exec {shlex.quote(real)} "$@"\n'
        )
        wrapper.chmod(0o755)
    try:
        _start_daemons(cluster)
    except BaseException:
        stop(state, remove=False, log=log)  # keep the logs for the error message's reader
        raise
    log(f"SLURM test cluster up: export SLURM_CONF={conf} PATH={cluster.bin}:$PATH")
    return cluster


def _start_daemons(cluster: Cluster) -> None:
    state, conf, node, env = cluster.state, cluster.conf, cluster.node, cluster.env
    key = state / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge = state / "munge"
    _spawn(
        "munged",
        [
            which("munged"),
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={munge / 'munge.socket'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={state / 'log' / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
        ],
        state,
        env,
    )
    _wait_for(lambda: (munge / "munge.socket").exists(), "munged's socket", 20, cluster)
    _spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(conf)], state, env)
    _wait_for(
        lambda: cluster.run("scontrol", "ping", timeout=10).count("UP") > 0,
        "slurmctld",
        60,
        cluster,
    )
    _spawn("slurmd", [which("slurmd"), "-D", "-N", node, "-f", str(conf)], state, env)
    _wait_for(
        lambda: (
            cluster.run("sinfo", "-h", "-N", "-o", "%t", timeout=10).split()
            and all(s == "idle" for s in cluster.run("sinfo", "-h", "-N", "-o", "%t").split())
        ),
        "the node to be idle in sinfo",
        90,
        cluster,
    )


def status(state: Path = STATE) -> str:
    conf = state / "slurm.conf"
    if not conf.exists():
        return "not running"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    return subprocess.run(
        ["sinfo", "-N", "-O", "NodeList,Partition,StateLong,CPUs,Memory,Gres"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "status"
    if command == "start":
        start()
    elif command == "stop":
        stop()
    elif command == "status":
        print(status())
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
