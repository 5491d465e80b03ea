"""A real single-node SLURM cluster on localhost in a temporary folder: munged, slurmctld and slurmd from Debian's
``slurm-wlm`` and ``munge`` packages, each with its own key, socket, ports, state and logs under the folder, so it
touches no system configuration and several can run side by side. Started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")
INSTALL = "apt-get install -y --no-install-recommends slurm-wlm munge"


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalSlurm:
    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log(self, daemon: str) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, cpus: int = 2, timeout: float = 60.0) -> LocalSlurm:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        os.chmod(munge, 0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        socket_path = munge / "munge.socket"
        # --force: munged refuses to run as root or with a key in a folder it does not own otherwise
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={munge / 'munged.pid'}",
                        f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
                       check=True, capture_output=True, text=True)
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        self.conf.write_text("\n".join([
            "ClusterName=layerfold-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",  # no cgroups needed
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            # no oversubscription: a job waits for a free CPU, so with cpus=1 the jobs run one after the other
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]) + "\n")
        env = {**os.environ, **self.env}
        subprocess.run(["slurmctld", "-i"], env=env, check=True, capture_output=True, text=True)
        subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True, capture_output=True, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the local SLURM node did not become idle in {timeout:.0f} s:\n{self.log('slurmctld')[-3000:]}\n"
                           f"{self.log('slurmd')[-3000:]}")

    def stop(self) -> None:
        """Stop the three daemons this cluster started (by their pid files), slurmd first."""
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
        time.sleep(0.5)
