"""Process-group set-up from the launcher's environment.

``torchrun`` (one node or many: ``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``) sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``, which Accelerate reads. Under ``mpirun``
(OpenMPI) a user's existing scripts only have ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK``:
they are mapped to the torchrun names here, so the same command trains under either launcher — without
an MPI dependency (the process group is still gloo / NCCL, rendezvous through ``MASTER_ADDR``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from typing import TypeVar

from lmrec.errors import LmrecError

OMPI = {"RANK": "OMPI_COMM_WORLD_RANK", "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
        "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_WORLD_SIZE": "OMPI_COMM_WORLD_LOCAL_SIZE"}
T = TypeVar("T")


def adopt_mpi_environment(env: MutableMapping[str, str] | None = None) -> bool:
    """Under mpirun without torchrun's variables, set them from OpenMPI's; True when it did."""
    env = os.environ if env is None else env
    if "RANK" in env or "OMPI_COMM_WORLD_RANK" not in env:
        return False
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        raise LmrecError("launched by mpirun on several processes: set MASTER_ADDR (the first node's address) and "
                         "MASTER_PORT (a free port), e.g. mpirun -x MASTER_ADDR=node0 -x MASTER_PORT=29500 ...")
    for ours, theirs in OMPI.items():
        if theirs in env:
            env[ours] = env[theirs]
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return True


def accelerator_kind() -> str:
    """The accelerator this process trains on, as Accelerate sees it: "cuda", "npu" (Ascend, torch_npu),
    "xpu", "mlu", "musa", "hpu", "mps" or "cpu". The one place that asks — the rest of lmrec follows the
    accelerator's ``device``, so the same command runs on any of them."""
    from accelerate import utils

    for kind in ("cuda", "npu", "xpu", "mlu", "musa", "hpu", "mps"):
        check = getattr(utils, f"is_{kind}_available", None)
        if check is not None and check():
            return kind
    return "cpu"


def auto_mixed_precision(kind: str) -> str:
    """bf16 where the device supports it (CUDA: Ampere and newer; Ascend NPUs), else full precision."""
    import torch

    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if kind in ("npu", "xpu", "hpu") else "no"


def from_main_process(accelerator, compute: Callable[[], T]) -> T:
    """``compute()`` on the main process, its result sent to every other one (pickled: plain values). An
    error on the main process reaches every process, so none waits for ever for a result that never comes:
    a user error is raised everywhere with its message, anything else as a RuntimeError naming it."""
    if accelerator.num_processes == 1:
        return compute()
    import torch.distributed as dist

    box: list = [None]
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            box = [("ok", compute())]
        except Exception as e:  # every process must reach the broadcast below
            user = isinstance(e, LmrecError)
            failure, box = e, [("user", str(e)) if user else ("bug", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(box, src=0)  # NCCL: through this process's current device, set by Accelerate
    kind, value = box[0]
    if failure is not None:
        raise failure
    if kind == "user":
        raise LmrecError(value)
    if kind == "bug":
        raise RuntimeError(f"the main process failed ({value})")
    return value


def inference_device(spec: str = "auto"):
    """``--device``: ``auto`` (the accelerator when one is present, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N`` (any torch device string). A device that is not there is a clear error, not a fallback."""
    import torch

    if spec == "auto":
        kind = accelerator_kind()
        return torch.device("cpu" if kind in ("cpu", "mps") else kind)  # MPS: not tested here; asked for by name
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LmrecError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise LmrecError(f"--device {spec}: no CUDA device is visible (torch {torch.__version__}, {build})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LmrecError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def is_main_rank() -> bool:
    """Global rank 0, or no launcher at all (under torchrun every process runs the command)."""
    return int(os.environ.get("RANK", "0")) == 0
