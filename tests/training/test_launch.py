"""Launchers: processes started the way mpirun starts them (OpenMPI's variables only) and torchrun with two
"nodes" on one machine both form one process group."""

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lmrec.errors import LmrecError
from lmrec.training.distributed import adopt_mpi_environment

HERE = Path(__file__).parent


def test_openmpi_variables_are_mapped():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert adopt_mpi_environment(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "1")
    assert not adopt_mpi_environment({"RANK": "0", "OMPI_COMM_WORLD_RANK": "5"})  # torchrun's win
    with pytest.raises(LmrecError, match="set MASTER_ADDR"):
        adopt_mpi_environment({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(log_dir: Path, *flags: str) -> list[str]:
    """``python -m torch.distributed.run`` with its logs under ``log_dir`` (a test's own folder: without
    --log-dir every launch leaves a torchelastic_* folder in the system's temporary directory for good) and
    ``flags``, by default two processes on a free port."""
    flags = flags or ("--nproc_per_node=2", f"--master_port={_free_port()}")
    return [sys.executable, "-m", "torch.distributed.run", f"--log-dir={log_dir}", *flags]


def _wait_all(procs, timeout):
    """stderr of every process; none outlives the test (a stuck peer would hold its port for the next one)."""
    try:
        return [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()


def _spawn(env_for_rank, n, out):
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, str(HERE / "mpi_worker.py"), str(out)],
                              env={**base, "OMP_NUM_THREADS": "1", **env_for_rank(r)}, stderr=subprocess.PIPE,
                              text=True) for r in range(n)]
    errors = _wait_all(procs, 120)
    assert all(p.returncode == 0 for p in procs), errors


def test_processes_started_as_mpirun_starts_them_form_one_group(tmp_path):
    port = str(_free_port())
    _spawn(lambda r: {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2",
                      "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
           2, tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"rank0-of-2.txt": "3.0", "rank1-of-2.txt": "3.0"}


def test_torchrun_with_two_nodes_on_one_machine(tmp_path):
    """Two torchrun launches, one per "node" (--nnodes 2, --node-rank 0/1, a c10d rendezvous endpoint)."""
    endpoint, run_id = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex
    out = tmp_path / "out"
    out.mkdir()
    cmd = lambda node: [*torchrun(tmp_path / f"logs-{node}", "--nnodes=2", f"--node-rank={node}",  # noqa: E731
                                  "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                                  f"--rdzv-id={run_id}"), str(HERE / "mpi_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd(n), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    errors = _wait_all(procs, 180)
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for e in errors]
    assert {p.name: p.read_text() for p in out.iterdir()} == {"rank0-of-2.txt": "3.0", "rank1-of-2.txt": "3.0"}
