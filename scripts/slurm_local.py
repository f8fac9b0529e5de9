"""A one-node SLURM cluster on this machine, for tests and local tries of the SLURM scripts (docs/DESIGN.md §6).

`with local_slurm() as env:` writes a minimal slurm.conf under a temp dir (this host as controller and node,
munge auth, linuxproc tracking, cons_tres), starts munged, slurmctld and slurmd, waits until the node is idle, and
yields the environment (SLURM_CONF) that sbatch/squeue need; on exit it stops the daemons by pid.
Needs root and Debian's slurm-wlm + munge (`apt-get install -y slurm-wlm munge`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from kvfuse.net import free_port


def missing_tools() -> list[str]:
    return [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "sinfo") if shutil.which(tool) is None]


@contextlib.contextmanager
def local_slurm(cpus: int | None = None):
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"SLURM tools not found: {missing}; install with `apt-get install -y slurm-wlm munge`")
    root = Path(tempfile.mkdtemp(prefix="kvfuse-slurm-"))
    host = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 1
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=kvfuse-local
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    pids: list[int] = []
    try:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run(["munged", "--force"], check=True, env=env)
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
        for name in ("slurmctld", "slurmd"):
            pid_file = root / f"{name}.pid"
            deadline = time.time() + 30
            while not pid_file.exists():
                if time.time() > deadline:
                    raise RuntimeError(f"{name} did not start; log: {(root / 'log' / (name + '.log')).read_text()}")
                time.sleep(0.2)
            pids.append(int(pid_file.read_text().strip()))
        deadline = time.time() + 60
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
            if state.strip() in ("idle", "mix", "alloc"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"SLURM node never became idle (state {state.strip()!r}); see {root}/log")
            time.sleep(0.5)
        yield env
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
