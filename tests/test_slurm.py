"""A real single-node SLURM (slurmctld + slurmd + munge, configured here on localhost) runs the launcher test's
3-method x 2-seed comparison through sbatch, submitted by submitit's SlurmExecutor.

Needs Debian's ``slurm-wlm`` and ``munge`` (``apt-get install -y slurm-wlm munge``) and root (the daemons run as
root, with proctrack/linuxproc and no cgroups); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from test_launchers import METHODS, SEEDS, compare_command, job_environment, job_runs, write_config

pytestmark = pytest.mark.slow
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch")


def slurm_conf(root: Path) -> str:
    host = socket.gethostname()
    cpus = os.cpu_count() or 1
    return f"""ClusterName=robustft
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def slurm(tmp_path):
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and slurm-wlm + munge ({', '.join(missing) or 'not root'})")
    root = tmp_path / "slurm"
    for folder in ("state", "spool", "munge"):
        (root / folder).mkdir(parents=True)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root))
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = root / "munge" / "munge.socket"
    environment = {**os.environ, "SLURM_CONF": str(conf)}
    processes = [
        subprocess.Popen(
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={root / 'munge' / 'munged.pid'}",
                f"--log-file={root / 'munge' / 'munged.log'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
            ]
        )
    ]
    time.sleep(1)
    (root / "plugstack.conf").write_text("")
    conf.write_text(conf.read_text() + f"AuthInfo=socket={socket_path}\n")
    processes.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=environment))
    processes.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=environment))
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=environment, capture_output=True, text=True).stdout
        if "idle" in state:
            break
        time.sleep(1)
    else:
        logs = {
            name: (root / f"{name}.log").read_text()[-1500:]
            for name in ("slurmctld", "slurmd")
            if (root / f"{name}.log").is_file()
        }
        for process in processes:
            process.terminate()
        pytest.fail(f"the node never became idle (sinfo: {state!r}); logs: {logs}")
    yield environment
    for process in reversed(processes):
        process.terminate()
        process.wait(timeout=30)


def test_a_comparison_runs_through_sbatch(slurm, tmp_path):
    config, out = write_config(tmp_path), tmp_path / "cmp"
    command = compare_command(config, out)
    command[command.index("--cluster") + 1] = "slurm"
    started = time.monotonic()
    environment = job_environment(tmp_path / "cache") | slurm
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"comparison through sbatch: {time.monotonic() - started:.1f} s")
    leaderboard = json.loads((out / "leaderboard.json").read_text())
    assert list(leaderboard["methods"]) == METHODS and leaderboard["seeds"] == SEEDS
    runs = json.loads((out / "launcher_jobs.json").read_text())["runs"]
    assert sorted(runs) == sorted(str(out / f"seed{seed}" / method) for seed, method in job_runs())
    assert all(entry["state"] == "fitted" for entry in runs.values())
    submitted = list((out / "jobs").rglob("*_submission.sh"))
    assert submitted and "#SBATCH" in submitted[0].read_text()  # written by submitit, not robustft
