"""The one training loop, on Accelerate (so ``torchrun`` and ``accelerate launch`` work unchanged).

Contract: every batch is a dict of tensors and ``model(**batch).loss`` is the loss. The loop does AdamW
steps with warmup + linear decay, gradient accumulation and clipping, mixed precision when a GPU is
present, a progress bar, TensorBoard logging, periodic validation, early stopping on a metric, and calls
back when a new best is reached so the caller can keep the best state. Family-specific work (re-encoding
RecFormer's item table before an epoch, for instance) comes in through ``before_epoch``.

Checkpoints (``Checkpointing``) hold everything needed to continue exactly: model, optimizer, scheduler and
RNG states (``Accelerator.save_state``), the loop's position (epoch, batches done, running loss, best
metrics, early-stopping counter) and the caller's ``extra_state``. They are written under a temporary
name and renamed, so a run killed while saving leaves the previous checkpoint intact. A run resumed from a
checkpoint on CPU with a fixed seed ends with the same weights as an uninterrupted one: batches come from
``make_loader(epoch)`` (deterministic per epoch; build it with ``data_loader``) and the consumed ones are
skipped.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_linear_schedule_with_warmup

from lmrec.errors import LmrecError
from lmrec.progress import progress, tqdm


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1, log_dir: str | None = None,
                     seed: int = 42) -> Accelerator:
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Frozen buffers (RecFormer's item table) are set identically on every rank: no broadcast needed.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # Without a GPU, accelerate only sets up multi-process (gloo) training under torchrun when told cpu=True.
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                      gradient_accumulation_steps=grad_accum,
                      log_with="tensorboard" if log_dir else None, project_dir=log_dir, kwargs_handlers=[ddp])
    set_seed(seed)
    return acc


def data_loader(data, *, seed: int, collate_fn=None, batch_size: int | None = None) -> torch.utils.data.DataLoader:
    """An unshuffled DataLoader with its own generator, so creating its iterator does not draw from the
    global RNG (which would make a resumed run diverge from an uninterrupted one). ``batch_size=None``:
    ``data`` is a list of ready-made batches (served one per step, so batches can be skipped on resume and
    sharded across processes)."""
    if batch_size is None:
        inner = collate_fn or (lambda b: b)
        batch_size, collate_fn = 1, (lambda one: inner(one[0]))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                                       generator=torch.Generator().manual_seed(seed))


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
        return found[-1] if found else None


@dataclass
class Checkpointing:
    root: Path  # <run>/checkpoints; each fit writes <root>/<tag>/step-<global step>
    save_steps: int = 0  # also save every N optimizer steps (0: only at the end of each epoch)
    keep: int = 2  # checkpoints kept per stage
    resume: Resume | None = None


def accelerator_for(run_dir: str | Path, tr) -> Accelerator:
    """The accelerator of a run from its ``train`` config (TensorBoard logs in ``run_dir/logs``)."""
    return make_accelerator(tr.mixed_precision, tr.grad_accum, str(Path(run_dir) / "logs"), tr.seed)


def fit_options(run_dir: str | Path, tr) -> dict:
    """``fit`` keyword arguments every command takes from its ``train`` config: optimizer details and the
    checkpoints under ``run_dir/checkpoints`` (``save_steps``, ``save_total_limit``, ``resume_from``)."""
    root = Path(run_dir) / "checkpoints"
    return dict(weight_decay=tr.weight_decay, warmup_ratio=tr.warmup_ratio, grad_clip=tr.grad_clip,
                checkpointing=Checkpointing(root, tr.save_steps, tr.save_total_limit, Resume(root, tr.resume_from)))


@dataclass
class FitResult:
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1
    epochs_run: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    make_loader: Callable[[int], torch.utils.data.DataLoader],
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.05,
    grad_clip: float | None = 1.0,
    steps_per_epoch: int,
    before_epoch: Callable[[int], None] | None = None,
    validate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 1,
    metric: str = "ndcg@10",
    greater_is_better: bool = True,
    patience: int | None = None,
    on_best: Callable[[dict[str, float], int], None] | None = None,
    tag: str = "train",
    global_step: int = 0,
    after_step: Callable[[], None] | None = None,
    checkpointing: Checkpointing | None = None,
    extra_state: Any = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train ``model`` for up to ``epochs`` epochs; ``steps_per_epoch`` counts optimizer steps over all
    processes (it sizes the learning-rate schedule). ``after_step`` runs after every optimizer step (stage 1
    of the generative family restores the frozen embedding rows there). ``extra_state`` (an object with
    ``state_dict``/``load_state_dict``) is saved with every checkpoint and restored on resume."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(no_decay)],
         "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(no_decay)],
         "weight_decay": 0.0},
    ]
    if not params:
        raise ValueError("no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=lr)
    total = max(1, epochs * steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total), total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    result = FitResult(global_step=global_step)
    pos = {"epoch": 0, "batches": 0, "running": 0.0, "bad_epochs": 0, "finished": False}
    ck = checkpointing
    start = ck.resume.checkpoint_for(tag) if ck is not None and ck.resume is not None else None
    if start is not None:
        pos, result = _load_checkpoint(accelerator, start, tag, extra_state)
        log(f"[{tag}] resumed from {start} (epoch {pos['epoch'] + 1}, batch {pos['batches']}, "
            f"step {result.global_step})")
        if pos["finished"]:
            return result
    elif ck is not None and accelerator.is_main_process:  # a fresh start replaces this stage's checkpoints
        shutil.rmtree(ck.root / tag, ignore_errors=True)

    def save(finished: bool = False):
        if ck is not None:
            pos["finished"] = finished
            _save_checkpoint(accelerator, ck, tag, pos, result, extra_state)

    show = accelerator.is_local_main_process
    for epoch in range(pos["epoch"], epochs):
        skip, pos["epoch"] = pos["batches"], epoch
        if before_epoch is not None and skip == 0:  # mid-epoch, the state it sets came from the checkpoint
            before_epoch(epoch)
        loader = accelerator.prepare(make_loader(epoch))
        n_batches = len(loader)
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        model.train()
        bar = progress(loader, f"{tag} epoch {epoch + 1}/{epochs}", show, initial=skip, total=n_batches)
        i = skip - 1
        for i, batch in enumerate(bar, start=skip):
            with accelerator.accumulate(model):
                out = model(**batch)
                loss = out.loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                if after_step is not None and accelerator.sync_gradients:
                    after_step()
                scheduler.step()
                optimizer.zero_grad()
            pos["running"] += loss.item()
            bar.set_postfix(loss=f"{pos['running'] / (i + 1):.4f}", refresh=False)
            if accelerator.sync_gradients:
                result.global_step += 1
                scalars = {f"{tag}/{k}": v.item() for k, v in out.items()  # mlm_loss, contrastive_accuracy ...
                           if k != "loss" and torch.is_tensor(v) and v.dim() == 0}
                accelerator.log({f"{tag}/loss": loss.item(), f"{tag}/lr": scheduler.get_last_lr()[0], **scalars},
                                step=result.global_step)
                if ck is not None and ck.save_steps and result.global_step % ck.save_steps == 0 and i + 1 < n_batches:
                    pos["batches"] = i + 1
                    save()
        result.epochs_run = epoch + 1
        record = {"epoch": epoch + 1, "loss": pos["running"] / max(1, i + 1)}
        pos.update(epoch=epoch + 1, batches=0, running=0.0)
        stop = False
        if validate is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            metrics = validate()
            record.update({f"valid_{k}": v for k, v in metrics.items()})
            accelerator.log({f"{tag}/valid_{k}": v for k, v in metrics.items() if k != "users"},
                            step=result.global_step)
            sign = 1.0 if greater_is_better else -1.0
            if metric not in result.best_metrics or sign * metrics[metric] > sign * result.best_metrics[metric]:
                result.best_metrics, result.best_epoch, pos["bad_epochs"] = metrics, epoch + 1, 0
                if on_best is not None:
                    on_best(metrics, epoch + 1)
            else:
                pos["bad_epochs"] += 1
            if show:
                tqdm.write(f"[{tag}] epoch {epoch + 1}: loss {record['loss']:.4f}  valid {metric} "
                           f"{metrics[metric]:.4f}  (best {result.best_metrics[metric]:.4f} @ {result.best_epoch})")
            stop = patience is not None and pos["bad_epochs"] >= patience
        result.history.append(record)
        save(finished=stop or epoch + 1 == epochs)
        if stop:
            break
    accelerator.wait_for_everyone()
    return result


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


def _save_checkpoint(accelerator: Accelerator, ck: Checkpointing, tag: str, pos: dict, result: FitResult,
                     extra_state: Any) -> None:
    """Every rank writes its part (RNG states) into a temporary directory; the main process adds the loop
    state and renames it into place, then drops the oldest checkpoints beyond ``ck.keep``."""
    stage_dir = ck.root / tag
    final = stage_dir / f"step-{result.global_step:08d}"
    tmp = stage_dir / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    notice = _TiedWeightsNotice(accelerator.unwrap_model(m) for m in accelerator._models)
    acc_log = logging.getLogger("accelerate.utils.other")
    acc_log.addFilter(notice)
    try:
        accelerator.save_state(str(tmp))
    finally:
        acc_log.removeFilter(notice)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra_state is not None:
            torch.save(extra_state.state_dict(), tmp / "extra_state.pt")
        state = {"tag": tag, **pos, "result": asdict(result)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        if final.exists():  # same step saved again (an epoch end right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(stage_dir)[: -ck.keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Accelerator, path: Path, tag: str, extra_state: Any) -> tuple[dict, FitResult]:
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmrecError(f"cannot resume from {path}: {STATE_FILE} unreadable ({e})") from None
    if state.get("tag") != tag:
        raise LmrecError(f"cannot resume stage {tag!r} from {path}: it is a checkpoint of {state.get('tag')!r}")
    accelerator.load_state(str(path))
    if extra_state is not None:
        extra_state.load_state_dict(torch.load(path / "extra_state.pt", weights_only=False))
    result = FitResult(**state.pop("result"))
    state.pop("tag")
    return state, result
