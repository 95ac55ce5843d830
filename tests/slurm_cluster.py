"""A throwaway one-node Slurm cluster for tests.

:func:`slurm_unavailable` installs Debian's ``slurmctld slurmd slurm-client munge`` when the commands are missing
(root and apt-get only). :class:`SlurmCluster` writes its own ``slurm.conf`` and munge key into a directory,
starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as children of this process (so their pids are
known), submits and waits for jobs, and stops exactly those daemons. It uses free ports and its own munge socket,
so it leaves any Slurm or munge already on the machine alone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import apt_install

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c, path=SBIN_PATH) is None]


def slurm_unavailable(install_timeout: float = 300.0) -> str | None:
    """None when a private Slurm cluster can run here (installing the Debian packages first if a command is
    missing), otherwise the reason it cannot (to skip with)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "Slurm tests need Linux"
    if os.geteuid() != 0:
        return "Slurm tests need root (they start munged, slurmctld and slurmd as root)"
    if not _missing_commands():
        return None
    return apt_install(PACKAGES, _missing_commands, install_timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_job_line(line: str) -> dict[str, str]:
    """The ``Key=Value`` fields of one ``scontrol show job -o`` line. The first occurrence wins: the job's
    ``Command=`` field, which may hold ``key=value`` arguments of the script, comes after Slurm's own fields."""
    fields: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][\w/:]*)=(\S*)", line):
        fields.setdefault(m.group(1), m.group(2))
    return fields


class SlurmCluster:
    """One node (``CPUs=2``) and one partition, all state under ``root``. Use :meth:`start` / :meth:`stop`."""

    def __init__(self, root: Path, cpus: int = 2, cred_expire: int = 5):
        self.root = Path(root)
        self.cpus = cpus
        self.cred_expire = cred_expire  # seconds a requeued job waits before it may start again (default 120)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.log_dir = self.root / "log"
        self.daemons: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env.update(SLURM_CONF=str(self.conf), PATH=SBIN_PATH)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def write_config(self) -> None:
        """The munge key and a minimal ``slurm.conf``: root everywhere, no accounting, no cgroups."""
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(f"""\
ClusterName=fedlit-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "slurmctld.pid"}
SlurmdPidFile={self.root / "slurmd.pid"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            self.daemons[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                  start_new_session=True)

    def start(self, timeout: float = 60.0) -> None:
        """Start munged, slurmctld and slurmd, and wait until the node is idle (or raise with the daemon logs)."""
        self.write_config()
        munge = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                               f"--seed-file={munge / 'munged.seed'}", f"--log-file={munge / 'munged.log'}"])
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged to create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait_for(lambda: self.command("sinfo", "-h", "-o", "%T", check=False).strip() == "idle", timeout,
                       "the node to become idle")

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel every job of this cluster, then stop the daemons this object started (SIGTERM, then SIGKILL)."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            jobs = self.command("squeue", "-h", "-o", "%A", check=False).split()
            if jobs:
                self.command("scancel", "--full", *sorted(set(jobs)), check=False)
                deadline = time.monotonic() + timeout
                while self.command("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def _wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [n for n, p in self.daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                reason = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f} s"
                raise RuntimeError(f"waiting for {what}: {reason}\n{self.daemon_logs()}")
            time.sleep(0.2)

    # -- commands and jobs ------------------------------------------------------------------------------------------
    def command(self, *argv: str, check: bool = True, timeout: float = 30.0, cwd: Path | None = None) -> str:
        """Run a Slurm client command against this cluster; returns stdout."""
        result = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit ``sbatch --parsable ARGS`` from ``cwd`` with extra environment ``env``; returns the job id."""
        result = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` records of ``job_id`` (one per array task), as ``{key: value}``."""
        out = self.command("scontrol", "show", "job", "-o", job_id, check=False)
        return [_parse_job_line(line) for line in out.splitlines() if line.startswith("JobId=")]

    def wait_job(self, job_id: str, timeout: float, until=None) -> list[dict[str, str]]:
        """Poll until every record of ``job_id`` is finished (or ``until(records)`` holds); raise on timeout."""
        until = until or (lambda recs: bool(recs) and all(r.get("JobState") in FINISHED for r in recs))
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if until(records):
                return records
            if time.monotonic() > deadline:
                states = [(r.get("JobId"), r.get("JobState"), r.get("Reason")) for r in records]
                raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s: {states}")
            time.sleep(0.5)

    def daemon_logs(self, lines: int = 40) -> str:
        """The last ``lines`` lines of each daemon's log, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==== {path.name} ====\n" + "\n".join(text))
        return "\n".join(parts)
