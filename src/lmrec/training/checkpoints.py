"""Checkpoints of the training loop, and resume.

A checkpoint (``<run>/checkpoints/<stage>/step-N``) holds everything needed to continue exactly: model,
optimizer, scheduler and RNG states (``Accelerator.save_state``), the loop's position
(``trainer_state.json``; what differs between ranks — the running loss — in ``loop_rank<r>.json`` from every
rank), the caller's extra state (``extra_state.safetensors`` + ``extra_state.json``: no pickle; a rank-local
one, such as a stream's per-source counts, from every rank: ``extra_state_rank<r>.*``) and, for a stream,
every rank's loader state. It is written under a temporary name and renamed, so a run killed while saving
leaves the previous checkpoint intact.

A sharded (FSDP) run writes model and optimizer with torch distributed checkpointing instead
(``sharded/``: each process writes its shards, any number of processes reads them back — a run saved on
2 processes resumes on 1 or on 8), the scheduler as JSON and each rank's RNG states as safetensors.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from lmrec.errors import LmrecError
from lmrec.io import share_like_user_files
from lmrec.modelfiles import check_checkpoint, loading, write_marker

STATE_FILE = "trainer_state.json"


def checkpoint_dirs(d: Path) -> list[Path]:
    """The complete checkpoints (``step-N`` with a loop state) of one stage directory, oldest first."""
    return sorted(p for p in d.glob("step-*") if (p / STATE_FILE).exists()) if d.is_dir() else []


class Resume:
    """Which checkpoint each ``fit`` of a command resumes from. ``spec``: None (start afresh), "auto" (the
    latest checkpoint of each stage under ``root``, if any), a run directory, or one checkpoint directory
    (``.../checkpoints/<tag>/step-N``: earlier stages use their latest checkpoint, that stage resumes from
    exactly this one, later stages start afresh)."""

    def __init__(self, root: str | Path, spec: str | Path | None):
        self.root, self.exact, self.passed = Path(root), None, False
        self.enabled = spec is not None
        if spec is None or str(spec) == "auto":
            return
        p = Path(spec)
        if (p / STATE_FILE).exists():
            check_checkpoint(p)  # before the run directory is made: a broken checkpoint is one message
            self.exact, self.root = p, p.parent.parent
        elif (p / "checkpoints").is_dir():
            self.root = p / "checkpoints"
        else:
            raise LmrecError(f"--resume-from {spec}: neither a checkpoint (no {STATE_FILE}) nor a run directory "
                             "with checkpoints/; use 'auto' to resume the latest checkpoint of the output directory")

    def checkpoint_for(self, tag: str) -> Path | None:
        if not self.enabled or self.passed:
            return None
        if self.exact is not None and self.exact.parent.name == tag:
            self.passed = True
            return self.exact
        found = checkpoint_dirs(self.root / tag)
        return check_checkpoint(found[-1]) if found else None


@dataclass
class Checkpointing:
    root: Path  # <run>/checkpoints; each fit writes <root>/<tag>/step-<global step>
    save_steps: int = 0  # also save every N optimizer steps (0: only at the end of each epoch)
    keep: int = 2  # checkpoints kept per stage
    resume: Resume | None = None


class _TiedWeightsNotice(logging.Filter):
    """Accelerate drops tensors that share storage with another before writing safetensors and warns about
    it. For weights the model declares tied (``all_tied_weights_keys``, re-tied when loading) that is the
    expected behaviour, so that notice is dropped; any other shared tensor still warns."""

    def __init__(self, models):
        super().__init__()
        self.tied = {k for m in models for k in (getattr(m, "all_tied_weights_keys", None) or {})}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Removed shared tensor" not in msg:
            return True
        names = re.findall(r"'([^']+)'", msg.split(" while saving")[0])
        return not names or not all(any(n == t or n.endswith("." + t) for t in self.tied) for n in names)


LOADER_STATE = "loader_state_rank{}.json"
LOOP_RANK = "loop_rank{}.json"


def loader_state(path: Path, rank: int) -> dict:
    f = path / LOADER_STATE.format(rank)
    if not f.exists():
        raise LmrecError(f"cannot resume the data stream from {path}: no {f.name} (was it saved by another number "
                         "of processes? a stream resumes exactly only on as many ranks as wrote it)")
    return json.loads(f.read_text())


def restore_loader(loader, path: Path, rank: int) -> None:
    """Give a stream's loader this rank's saved state. Its workers' states are per worker: a different
    ``num_workers`` cannot continue them (torchdata would stop on a bare assertion)."""
    state = loader_state(path, rank)
    snapshot = state.get("_snapshot")
    saved = snapshot["_main_snapshot"]["_num_workers"] if snapshot else 0
    if saved != loader.num_workers:
        raise LmrecError(f"cannot resume the data stream from {path}: it was saved with num_workers {saved} and this "
                         f"run has num_workers {loader.num_workers} (each worker's position is its own); resume with "
                         f"num_workers: {saved} in the data config")
    loader.load_state_dict(state)


@dataclass
class Sharded:
    """What a sharded run checkpoints itself (Accelerate's ``save_state`` pickles whole tensors)."""

    model: torch.nn.Module
    optimizer: Any  # Accelerate's wrapper or a torch optimizer
    scheduler: Any

    def _optim(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def save(self, directory: Path, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self._optim())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / SHARDED))
        save_file(_rng_states(), str(directory / RNG_FILE.format(rank)))
        if rank == 0:
            (directory / SCHED_FILE).write_text(json.dumps(self.scheduler.state_dict()) + "\n")

    def load(self, directory: Path, rank: int, log=print) -> None:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (directory / SHARDED).is_dir():
            raise LmrecError(f"cannot resume a sharded (train.fsdp) run from {directory}: no {SHARDED}/ (it was "
                             "saved without train.fsdp)")
        model_sd, optim_sd = get_state_dict(self.model, self._optim())
        state = {"model": model_sd, "optim": optim_sd}
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            with loading(directory / SHARDED):
                dcp.load(state, checkpoint_id=str(directory / SHARDED))  # reshards to this run's processes
        except CheckpointException as e:  # what a rank met reading its files, gathered on every rank
            inner = next(iter(getattr(e, "failures", {}).values()), e)  # rank → what it raised
            first = (str(inner).strip().splitlines() or [type(inner).__name__])[0][:300]
            raise LmrecError(f"{directory / SHARDED}: a sharded checkpoint that cannot be read ({first}); resume "
                             "from an earlier checkpoint (--resume-from .../step-N)") from None
        set_state_dict(self.model, self._optim(), model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(json.loads((directory / SCHED_FILE).read_text()))
        rng = directory / RNG_FILE.format(rank)
        if rng.exists():
            _set_rng_states(load_file(str(rng)))
        else:
            log(f"{directory} was saved by fewer processes: rank {rank} keeps its seeded random state")


SHARDED, SCHED_FILE, RNG_FILE = "sharded", "scheduler.json", "rng_rank{}.safetensors"


def _rng_states() -> dict[str, torch.Tensor]:
    import random

    import numpy as np

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "python": torch.tensor(random.getstate()[1], dtype=torch.int64),  # 624 words + position
              "numpy": torch.tensor([*keys.tolist(), pos], dtype=torch.int64),
              "numpy_gauss": torch.tensor([has_gauss, gauss], dtype=torch.float64)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, torch.Tensor]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(int(x) for x in states["python"]), None))
    words, (has_gauss, gauss) = states["numpy"].tolist(), states["numpy_gauss"].tolist()
    np.random.set_state(("MT19937", np.array(words[:-1], dtype=np.uint32), words[-1], int(has_gauss), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(accelerator: Accelerator, ck: Checkpointing, tag: str, state: dict, extra_state: Any = None,
                    loader=None, sharded: Sharded | None = None) -> None:
    """Every rank writes its part (RNG states) into a temporary directory; the main process adds the loop
    state and renames it into place, then drops the oldest checkpoints beyond ``ck.keep``."""
    stage_dir = ck.root / tag
    final = stage_dir / f"step-{state['result']['global_step']:08d}"
    tmp = stage_dir / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded is not None:
        sharded.save(tmp, accelerator.process_index)
    else:
        _save_state(accelerator, tmp)
    rank, local = accelerator.process_index, getattr(extra_state, "rank_local", False)
    if loader is not None:  # every rank: where its stream is (its readers' positions and buffers)
        (tmp / LOADER_STATE.format(rank)).write_text(json.dumps(loader.state_dict()))
    # every rank: what is its own (its running loss sum; a rank-local extra state)
    (tmp / LOOP_RANK.format(rank)).write_text(json.dumps({k: state[k] for k in ("running", "batches")}) + "\n")
    if extra_state is not None and local:
        save_extra_state(extra_state.state_dict(), tmp, rank)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra_state is not None and not local:
            save_extra_state(extra_state.state_dict(), tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"tag": tag, **state}, indent=1) + "\n")
        write_marker(tmp, "checkpoint")
        share_like_user_files(tmp)
        if final.exists():  # same step saved again (an epoch end right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(stage_dir)[: -ck.keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_state(accelerator: Accelerator, directory: Path) -> None:
    notice = _TiedWeightsNotice(accelerator.unwrap_model(m) for m in accelerator._models)
    acc_log = logging.getLogger("accelerate.utils.other")
    acc_log.addFilter(notice)
    try:
        accelerator.save_state(str(directory))
    finally:
        acc_log.removeFilter(notice)


EXTRA_TENSORS, EXTRA_VALUES = "extra_state{}.safetensors", "extra_state{}.json"


def save_extra_state(state: dict[str, Any], directory: Path, rank: int | None = None) -> None:
    """A caller's extra state without pickle: tensors to safetensors, everything else to JSON (one rank's
    own when ``rank`` is given)."""
    from safetensors.torch import save_file

    suffix = "" if rank is None else f"_rank{rank}"
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    values = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    save_file(tensors, str(directory / EXTRA_TENSORS.format(suffix)))
    (directory / EXTRA_VALUES.format(suffix)).write_text(json.dumps(values) + "\n")


def load_extra_state(directory: Path, rank: int | None = None) -> dict[str, Any]:
    from safetensors.torch import load_file

    suffix = "" if rank is None else f"_rank{rank}"
    return {**json.loads((directory / EXTRA_VALUES.format(suffix)).read_text()),
            **load_file(str(directory / EXTRA_TENSORS.format(suffix)))}


def _load_rank_local(extra_state: Any, path: Path, rank: int, processes: int, saved_by: int) -> None:
    """This rank's own saved part of a rank-local extra state (a single process's older checkpoint kept it
    in the shared file)."""
    if (path / EXTRA_VALUES.format(f"_rank{rank}")).exists():
        extra_state.load_state_dict(load_extra_state(path, rank))
    elif saved_by == processes == 1 and (path / EXTRA_VALUES.format("")).exists():
        extra_state.load_state_dict(load_extra_state(path))
    else:
        raise LmrecError(f"cannot resume from {path} on {processes} processes: it was saved by {saved_by}, and "
                         f"rank {rank}'s own state ({EXTRA_VALUES.format(f'_rank{rank}')}) is not in it")


def _own_running(saved: dict, path: Path, rank: int, processes: int) -> None:
    """This rank's running loss sum (``trainer_state.json`` holds rank 0's). Resumed on another number of
    processes: the mean loss per batch of all the saved ranks, over this rank's batches."""
    parts = sorted(path.glob(LOOP_RANK.format("*")))
    own = path / LOOP_RANK.format(rank)
    if saved["processes"] == processes and own.exists():
        saved["running"] = json.loads(own.read_text())["running"]
    elif parts:
        loaded = [json.loads(f.read_text()) for f in parts]
        saved["running"] = (sum(x["running"] for x in loaded) / max(1, sum(x["batches"] for x in loaded))
                            * saved["batches"])


def load_checkpoint(accelerator: Accelerator, path: Path, tag: str, extra_state: Any = None,
                    sharded: Sharded | None = None, log=print) -> dict:
    """Restore the accelerator's states (or a sharded run's) and ``extra_state`` from a checkpoint; returns
    the loop's state (with ``processes``, the number of processes that saved it)."""
    try:
        saved = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmrecError(f"cannot resume from {path}: {STATE_FILE} unreadable ({e})") from None
    if saved.get("tag") != tag:
        raise LmrecError(f"cannot resume stage {tag!r} from {path}: it is a checkpoint of {saved.get('tag')!r}")
    if sharded is not None:
        sharded.load(path, accelerator.process_index, log)
    elif (path / SHARDED).is_dir():
        raise LmrecError(f"{path} is a sharded (train.fsdp) checkpoint: resume it with train.fsdp: true")
    else:
        with loading(path):  # a damaged optimizer / RNG file: one message naming the checkpoint
            accelerator.load_state(str(path))
    saved.pop("tag")
    saved.setdefault("processes", accelerator.num_processes)
    rank, processes = accelerator.process_index, accelerator.num_processes
    if getattr(extra_state, "rank_local", False):
        _load_rank_local(extra_state, path, rank, processes, saved["processes"])
    elif extra_state is not None:
        extra_state.load_state_dict(load_extra_state(path))
    _own_running(saved, path, rank, processes)
    return saved
