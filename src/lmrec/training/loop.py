"""The one training loop, on Accelerate (so ``torchrun`` and ``accelerate launch`` work unchanged).

    fit(accelerator, model, make_loader, Stage(tag, epochs, lr, ...))                  # epochs of a map-style loader
    fit(accelerator, model, make_loader, StreamStage(tag, lr, num_training_steps=...))  # one pass over a stream

Contract: every batch is a dict of tensors and ``model(**batch).loss`` is the loss. The loop does AdamW
steps with warmup + linear decay, gradient accumulation and clipping, mixed precision when a GPU is
present, a progress bar, TensorBoard logging, periodic validation, early stopping on a metric, and calls
back when a new best is reached so the caller can keep the best state. Family-specific work (re-encoding
RecFormer's item table before an epoch, for instance) comes in through ``before_epoch``.

Checkpoints (``lmrec.training.checkpoints``) hold the model, optimizer, scheduler and RNG states, the
loop's position (``LoopState``: epoch, batches done, running loss, best metrics, early-stopping counter)
and the caller's ``extra_state``. A run resumed from a checkpoint on CPU with a fixed seed ends with the
same weights as an uninterrupted one.

``fit`` prepares (optimizer, schedule, placement), resumes (or starts afresh), then runs the loop the stage's
type names. A :class:`Stage` runs epochs: batches come from ``make_loader(epoch)`` (deterministic per epoch;
build it with ``data_loader``) and a resumed epoch skips the consumed ones. A :class:`StreamStage` runs a
stream (a ``StatefulDataLoader`` over an iterable dataset that shards itself across ranks and workers, such
as ``lmrec.data.stream.ChatStream``) as one epoch: steps stay in lockstep across ranks until the first rank's
stream ends, each step's loss is normalised by the supervised tokens of all its micro-batches on all ranks,
and the loader's own state goes into every checkpoint instead of a count of batches to skip. Both loops share
one optimizer step, logging and checkpointing (``_Steps``).
"""

from __future__ import annotations

import atexit
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from lmrec.errors import LmrecError, TrainingDiverged
from lmrec.progress import progress, step_line, tqdm
from lmrec.training.checkpoints import Checkpointing, Sharded, load_checkpoint, restore_loader, save_checkpoint
from lmrec.training.fsdp import is_sharded


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1, log_dir: str | None = None,
                     seed: int = 42, tf32: bool = True) -> Accelerator:
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

    from lmrec.training.distributed import accelerator_kind, adopt_mpi_environment, auto_mixed_precision

    adopt_mpi_environment()  # mpirun scripts keep working: OMPI_COMM_WORLD_* → RANK / WORLD_SIZE / LOCAL_RANK
    kind = accelerator_kind()
    if kind == "cuda":  # fp32 matrix products in TF32 (bf16 autocast covers most; the rest, e.g. fp32 heads)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if mixed_precision == "auto":
        mixed_precision = auto_mixed_precision(kind)
    # Frozen buffers (RecFormer's item table) are set identically on every rank: no broadcast needed.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # Without an accelerator, accelerate only sets up multi-process (gloo) training under torchrun when told cpu=True.
    # batches come from pinned memory (data_loader) and are copied without blocking the host
    loading = DataLoaderConfiguration(non_blocking=kind == "cuda")
    acc = Accelerator(cpu=kind == "cpu", mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                      log_with="tensorboard" if log_dir else None, project_dir=log_dir, kwargs_handlers=[ddp],
                      dataloader_config=loading)
    set_seed(seed)
    # A process that leaves with its gloo/NCCL group still open can abort in the C++ teardown ("terminate called
    # without an active exception") while its peer is still closing: close the group on every exit path.
    atexit.unregister(acc.state.destroy_process_group)  # once, however many accelerators a process makes
    atexit.register(acc.state.destroy_process_group)
    return acc


def data_loader(data, *, seed: int, collate_fn=None, batch_size: int | None = None, workers: int = 0
                ) -> torch.utils.data.DataLoader:
    """An unshuffled DataLoader with its own generator, so creating its iterator does not draw from the
    global RNG (which would make a resumed run diverge from an uninterrupted one). ``batch_size=None``:
    ``data`` is a list of ready-made batches (served one per step, so batches can be skipped on resume and
    sharded across processes). ``workers``: processes that run ``collate_fn`` (the tokenizing collators) while
    the model trains; the batches are the same (every collator seeds its randomness per batch)."""
    if batch_size is None:
        inner = collate_fn or (lambda b: b)
        batch_size, collate_fn = 1, (lambda one: inner(one[0]))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                                       generator=torch.Generator().manual_seed(seed), num_workers=workers,
                                       pin_memory=torch.cuda.is_available())


def loader_workers(setting: int | None, device: torch.device) -> int:
    """``train.dataloader_workers``: as set, or (None) 2 beside an accelerator and 0 on the CPU, where workers
    would take the cores the model trains on."""
    return setting if setting is not None else (0 if device.type == "cpu" else 2)


@dataclass
class FitResult:
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1
    epochs_run: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class LoopState:
    """Where the loop is: saved with every checkpoint (``trainer_state.json``) and restored on resume."""

    epoch: int = 0  # epochs completed
    batches: int = 0  # batches of the current epoch already consumed
    running: float = 0.0  # sum of the losses of those batches
    bad_epochs: int = 0  # validations since the last new best (early stopping)
    finished: bool = False  # the stage ran to its end (a resumed run skips it)
    result: FitResult = field(default_factory=FitResult)
    processes: int = 1  # how many processes ran it (a sharded checkpoint resumes on another number)


@dataclass
class Optim:
    """AdamW + warmup then linear decay to 0, cosine decay to ``min_lr`` or a constant lr + clipping, from a ``train``
    config. No weight decay on biases and normalisation weights (chosen by module type, whatever the
    architecture names them), nor on embeddings when ``no_decay_embeddings``."""

    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float | None = 1.0
    schedule: str = "linear"
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay_embeddings: bool = False

    @classmethod
    def from_train(cls, tr) -> Optim:
        return cls(tr.weight_decay, tr.warmup_ratio, tr.grad_clip, tr.lr_schedule, tr.min_lr, tuple(tr.adam_betas),
                   tr.no_decay_embeddings)

    def build(self, model: torch.nn.Module, lr: float, total_steps: int, device: torch.device | None = None):
        """(optimizer, scheduler) for ``total_steps`` optimizer steps. On CUDA, AdamW's fused kernel (one launch
        for all parameters instead of several per tensor)."""
        fused = device is not None and device.type == "cuda"
        opt = torch.optim.AdamW(optimizer_groups(model, self.weight_decay, self.no_decay_embeddings), lr=lr,
                                betas=self.betas, fused=fused or None)
        warmup = math.ceil(self.warmup_ratio * total_steps)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(self.schedule, warmup, total_steps,
                                                                      self.min_lr / lr))


@dataclass
class Stage:
    """One call of :func:`fit` over a map-style loader: ``epochs`` passes over ``make_loader(epoch)``, resumed
    mid-epoch by skipping the batches the checkpoint had consumed. The fields after ``epochs`` are shared with
    :class:`StreamStage` (a stream runs as one epoch)."""

    tag: str  # names the stage in logs and trackers, and its checkpoints' directory
    epochs: int
    lr: float  # the peak learning rate
    validate: Callable[[], dict[str, float]] | None = None  # metrics on the validation data, at an epoch's end
    metric: str = "ndcg@10"  # the one of them that picks the best epoch
    greater_is_better: bool = True
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    patience: int | None = None  # validations without a new best that end the stage early (None: never)
    # (metrics, epoch) when validation reaches a new best: the caller keeps that model
    on_best: Callable[[dict[str, float], int], None] | None = None
    # (epoch) before a fresh epoch, not one resumed mid-way: RecFormer re-encodes its item table there
    before_epoch: Callable[[int], None] | None = None
    # after every optimizer step: generative stage 1 restores its frozen embedding rows there
    after_step: Callable[[], None] | None = None
    # ``state_dict()`` (tensors and JSON values) / ``load_state_dict``: in every checkpoint, restored on resume;
    # rank 0's, or each rank's own when it has ``rank_local = True`` (counts of what this rank trained on)
    extra_state: Any = None
    step_metrics: Callable[[dict, Any], dict[str, float]] | None = None  # (batch, output) → logged scalars
    log_every: int = 10  # optimizer steps between read-backs of the loss (and step_metrics)
    on_batch: Callable[[dict], None] | None = None  # every micro-batch trained on (a stream's with its side keys)


@dataclass(kw_only=True)
class StreamStage(Stage):
    """One call of :func:`fit` over a stream: a ``StatefulDataLoader`` (``make_loader(0)``) over an iterable
    dataset that shards itself across ranks and workers, such as ``lmrec.data.stream.ChatStream``. It has no
    length and is read once: one epoch, validated at its end, of as many optimizer steps as the shortest rank's
    share lasts (or ``max_steps``); resumed from the loader's own state."""

    epochs: int = field(default=1, init=False)  # a stream is read once
    num_training_steps: int  # the learning-rate schedule's length in optimizer steps (the stream may run longer)
    max_steps: int | None = None  # stop after this many optimizer steps, wherever the stream is
    side_keys: tuple[str, ...] = ("sources", "skipped")  # batch keys that are not model inputs (for on_batch)

    def __post_init__(self) -> None:
        if not self.num_training_steps or self.num_training_steps < 1:
            raise ValueError(f"[{self.tag}] a stream has no length: its schedule needs num_training_steps >= 1, "
                             f"not {self.num_training_steps}")


def _lr_factor(schedule: str, warmup: int, total: int, floor: float):
    """The learning rate of optimizer step ``step`` (from 0) as a share of the peak: a linear warmup that
    reaches the peak at step ``warmup``, then linear decay to 0 at ``total`` steps, cosine decay to ``floor``
    (held for as long as the data lasts: transformers' cosine-with-min-lr schedule rises again past its end,
    and a stream may run longer than ``num_training_steps``) or the peak.

    The warmup is transformers' shifted by one step, (step + 1) / (warmup + 1) instead of step / warmup:
    theirs gives the first step lr 0, so a run of one optimizer step trained nothing. After the warmup the
    schedules are transformers' (linear, constant) and the cosine to the floor as before."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def optimizer_groups(model: torch.nn.Module, weight_decay: float, no_decay_embeddings: bool = False
                     ) -> list[dict]:
    """Two AdamW groups: with weight decay, and without it for biases, the weights of normalisation modules
    (LayerNorm, RMSNorm, …: any module class named *Norm*) and, optionally, embeddings."""
    exempt: set[int] = set()
    for module in model.modules():
        norm = "norm" in type(module).__name__.lower()
        emb = no_decay_embeddings and isinstance(module, torch.nn.Embedding)
        for name, p in module.named_parameters(recurse=False):
            if norm or emb or name == "bias" or name.endswith("_bias"):
                exempt.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]  # each shared (tied) tensor once
    if not params:
        raise ValueError("no trainable parameters")
    return [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]


def fit(accelerator: Accelerator, model: torch.nn.Module, make_loader: Callable[[int], torch.utils.data.DataLoader],
        stage: Stage, *, optim: Optim | None = None, checkpointing: Checkpointing | None = None,
        global_step: int = 0, log: Callable[[str], None] = print) -> FitResult:
    """Train ``model`` as ``stage`` says: prepare (optimizer, schedule, placement), resume (or start afresh),
    then the epoch loop over ``make_loader(epoch)`` — or, for a :class:`StreamStage`, the stream loop over
    ``make_loader(0)``."""
    first = make_loader(0)
    _check_loader(stage, first)
    optim = optim or Optim()
    model, optimizer, scheduler, sharded = _prepare(accelerator, model, stage, first, optim)
    _warn_few_steps(accelerator, stage, first, log)
    state = _resume(accelerator, stage, checkpointing, first, sharded, global_step, log)
    if state.finished:
        return state.result
    parts = (accelerator, model, optimizer, scheduler, stage, optim.grad_clip, checkpointing, state, sharded)
    if isinstance(stage, StreamStage):
        _StreamLoop(*parts).run(first)
    else:
        _EpochLoop(*parts).run(first, make_loader)
    accelerator.wait_for_everyone()
    return state.result


def _check_loader(stage: Stage, loader) -> None:
    """The stage's type says how the loop reads and resumes its loader; refuse a loader of the other kind."""
    stateful = hasattr(loader, "load_state_dict")  # a stream resumes from its own state, not by skipping batches
    kind = type(loader).__name__
    if isinstance(stage, StreamStage) and not stateful:
        raise ValueError(f"[{stage.tag}] a StreamStage reads a stream that keeps its own position (a torchdata "
                         f"StatefulDataLoader over an iterable dataset), and this {kind} has no load_state_dict: "
                         "train a map-style loader epoch by epoch with Stage")
    if not isinstance(stage, StreamStage) and stateful:
        raise ValueError(f"[{stage.tag}] a Stage trains epoch by epoch on a map-style loader, resumed by skipping "
                         f"batches, and this {kind} keeps its own position (load_state_dict), as a stream does: "
                         "train a stream with StreamStage(tag, lr, num_training_steps=...)")


def _prepare(accelerator: Accelerator, model, stage: Stage, loader, optim: Optim):
    """(model, optimizer, scheduler, Sharded or None): the model placed (DDP) or left sharded (FSDP: already
    distributed, checkpointed shard by shard), with a schedule of :func:`_schedule_steps`."""
    sharded = is_sharded(model)
    optimizer, scheduler = optim.build(model, stage.lr, max(1, _schedule_steps(accelerator, stage, loader, sharded)),
                                       accelerator.device)
    if sharded:
        optimizer = accelerator.prepare(optimizer)
        return model, optimizer, scheduler, Sharded(model, optimizer, scheduler)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler, None


def _schedule_steps(accelerator: Accelerator, stage: Stage, loader, sharded: bool) -> int:
    """The schedule's length in scheduler steps. The loop steps a sharded run's scheduler once per optimizer
    step, the same on any process count. Accelerate steps a prepared scheduler once per process at every
    optimizer step: it assumes steps counted on the global data, as a map-style loader's length is, while a
    stream's steps are each process's own."""
    if isinstance(stage, StreamStage):
        return stage.num_training_steps * (1 if sharded else accelerator.num_processes)
    per_epoch = (_epoch_steps(accelerator, loader) if sharded else  # the loader's length: batches of all processes
                 math.ceil(len(loader) / accelerator.gradient_accumulation_steps))
    return stage.epochs * per_epoch


def _epoch_steps(accelerator: Accelerator, loader) -> int:
    """Optimizer steps of an epoch on each process: its 1/N of the loader's batches, ``ga`` to a step."""
    return math.ceil(math.ceil(len(loader) / accelerator.num_processes) / accelerator.gradient_accumulation_steps)


# A stage of fewer optimizer steps than this is warned about: the model barely moves from where it starts.
FEW_STEPS = 10


def _warn_few_steps(accelerator: Accelerator, stage: Stage, loader, log: Callable[[str], None]) -> None:
    """Warn about a stage of fewer than ``FEW_STEPS`` optimizer steps (on each process)."""
    if isinstance(stage, StreamStage):
        per_epoch = stage.num_training_steps
        steps = min(per_epoch, stage.max_steps) if stage.max_steps else per_epoch
    else:
        per_epoch = _epoch_steps(accelerator, loader)
        steps = stage.epochs * per_epoch
    if 0 < steps < FEW_STEPS:
        log(f"warning: [{stage.tag}] only {steps} optimizer step(s) ({stage.epochs} epoch(s) of {per_epoch}): "
            "the model will barely move from where it starts; train more epochs or use a smaller train.batch_size")


def _resume(accelerator: Accelerator, stage: Stage, ck: Checkpointing | None, loader, sharded,
            global_step: int, log) -> LoopState:
    """The loop's state: from this stage's checkpoint when resuming (model, optimizer, RNG and the position in
    the data restored), else a fresh one (and this stage's old checkpoints removed)."""
    state = LoopState(result=FitResult(global_step=global_step))
    start = ck.resume.checkpoint_for(stage.tag) if ck is not None and ck.resume is not None else None
    if start is None:
        if ck is not None and accelerator.is_main_process:  # a fresh start replaces this stage's checkpoints
            shutil.rmtree(ck.root / stage.tag, ignore_errors=True)
        state.processes = accelerator.num_processes
        return state
    saved = load_checkpoint(accelerator, start, stage.tag, stage.extra_state, sharded, log)
    state = LoopState(**{**saved, "result": FitResult(**saved["result"])})
    if isinstance(stage, StreamStage):  # where the stream is: its loader's own state, one per rank
        if saved["processes"] != accelerator.num_processes:  # fewer ranks would drop the others' positions
            raise LmrecError(f"cannot resume the data stream from {start}: {saved['processes']} process(es) wrote it "
                             f"and this run has {accelerator.num_processes}; each rank's place in the stream (its "
                             f"files, its buffers) is its own: resume on {saved['processes']} process(es)")
        restore_loader(loader, start, accelerator.process_index)
    elif saved["processes"] != accelerator.num_processes and state.batches:
        state.batches, state.running = _rescaled(state, saved["processes"], accelerator.num_processes)
        log(f"[{stage.tag}] saved by {saved['processes']} processes, resumed on {accelerator.num_processes}: "
            f"continuing at batch {state.batches} of each process's part of the epoch")
    log(f"[{stage.tag}] resumed from {start} (epoch {state.epoch + 1}, batch {state.batches}, "
        f"step {state.result.global_step})")
    state.processes = accelerator.num_processes
    return state


def _rescaled(state: LoopState, saved_by: int, processes: int) -> tuple[int, float]:
    """Batches done and running loss sum of a process resumed on another number of processes: each had
    consumed ``batches`` of its 1/N of the epoch — the same share of the data now, at the same mean loss."""
    batches = math.ceil(state.batches * saved_by / processes)
    return batches, state.running * batches / state.batches


class _Steps:
    """What both loops share: the optimizer step (forward, backward, clipping), the read-backs and logging at
    the log interval, periodic checkpoints, and an epoch's start and end. :class:`_EpochLoop` and
    :class:`_StreamLoop` feed it batches.

    The host never waits for the device inside a step: the running loss is a device tensor, read (with the
    gradient norm and the health check) every ``log_every`` optimizer steps, before a checkpoint and at the end
    of an epoch — as torchtitan and nanoGPT read their values at the log interval only."""

    unit: str  # what the progress bar counts

    def __init__(self, accelerator, model, optimizer, scheduler, stage: Stage, grad_clip, ck, state: LoopState,
                 sharded: Sharded | None = None):
        self.acc, self.model, self.opt, self.sched, self.sharded = accelerator, model, optimizer, scheduler, sharded
        self.stage, self.grad_clip, self.ck, self.state = stage, grad_clip, ck, state
        self.loader = None  # a stream's loader, whose state goes into every checkpoint
        self.grad_norm = None  # of the last optimizer step, before clipping (a device tensor)
        self.pending = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # losses not yet in state
        self.health = Health(accelerator)

    def mean_loss(self) -> float:
        """The mean loss of what this epoch trained on so far: the running sum over the batches done."""
        return self.state.running / max(1, self.state.batches)

    def position(self) -> int:
        """Where the progress bar is, in its ``unit``."""
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> None:
        # mid-epoch (resumed), what before_epoch would have made came from the checkpoint
        if self.stage.before_epoch is not None and self.state.batches == 0:
            self.stage.before_epoch(epoch)

    def end_epoch(self, loss: float) -> bool:
        """Record the epoch (validating when due) and checkpoint it; whether early stopping ends the stage."""
        loss = _mean_over_ranks(self.acc, loss)  # the epoch's loss on all the data, not rank 0's share
        stop = _end_epoch(self.acc, self.stage, self.state, loss)
        self.save(finished=stop or self.state.epoch == self.stage.epochs)
        return stop

    def _bar(self, iterable, desc: str, total: int | None, initial: int):
        """A progress bar on a terminal (else a disabled one: :meth:`after_step` prints a line instead), and
        the clock the printed rate and ETA are measured from."""
        self._clock = (time.perf_counter(), initial, total, desc)
        return progress(iterable, desc, self.acc.is_local_main_process, total=total, initial=initial)

    def step(self, batch) -> tuple[Any, torch.Tensor]:
        acc = self.acc
        with acc.accumulate(self.model):
            if self.sharded is not None:  # FSDP reduce-scatters only on the step's last micro-batch
                self.model.set_requires_gradient_sync(acc.sync_gradients)
            out = self.model(**batch)
            acc.backward(out.loss)
            if acc.sync_gradients:  # the norm is logged before clipping (inf: measured, not clipped)
                self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.grad_clip or float("inf"))
            self.opt.step()
            if self.stage.after_step is not None and acc.sync_gradients:
                self.stage.after_step()
            if self.sharded is None or acc.sync_gradients:  # a prepared scheduler skips accumulation steps itself
                self.sched.step()
            self.opt.zero_grad()
        loss = out.loss.detach()
        self.health.observe(loss, self.state.result.global_step + 1)
        return out, loss

    def after_step(self, out, batch, bar, last: bool = False) -> None:
        """After an optimizer step: every ``log_every`` steps read the values back (loss, health, metrics);
        checkpoint every ``save_steps``."""
        step = self.state.result.global_step
        if step % self.stage.log_every == 0 or last:
            self.settle()
            loss = self.mean_loss()
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if bar.disable and self.acc.is_local_main_process:  # a log file: one line, the bar's figures
                t0, pos0, total, desc = self._clock
                pos = self.position()
                tqdm.write(step_line(desc, self.unit, pos, total, time.perf_counter() - t0, pos - pos0, loss=loss,
                                     lr=self.sched.get_last_lr()[0]))
            self.log(out)
            self.metrics(batch, out)
        if self.ck is not None and self.ck.save_steps and step % self.ck.save_steps == 0 and not last:
            self.save()

    def settle(self) -> None:
        """Fold the device-side loss sum into the loop's state, and stop on a non-finite loss (on any rank)."""
        self.health.check(self.state.result.global_step)
        self.state.running += float(self.pending)
        self.pending.zero_()

    def metrics(self, batch: dict, out) -> None:
        """The stage's ``step_metrics`` every ``log_every`` optimizer steps: to the trackers and the console."""
        step = self.state.result.global_step
        if self.stage.step_metrics is None or step % self.stage.log_every:
            return
        scalars = self.stage.step_metrics(batch, out)
        self.acc.log({f"{self.stage.tag}/{k}": v for k, v in scalars.items()}, step=step)
        if self.acc.is_local_main_process:
            tqdm.write(f"[{self.stage.tag}] step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in scalars.items()))

    def log(self, out) -> None:
        tag = self.stage.tag
        scalars = {f"{tag}/{k}": v.item() for k, v in out.items()  # mlm_loss, contrastive_accuracy ...
                   if torch.is_tensor(v) and v.dim() == 0}
        scalars[f"{tag}/loss"] = scalars.pop(f"{tag}/loss", float("nan"))
        if self.grad_norm is not None:
            scalars[f"{tag}/grad_norm"] = float(self.grad_norm)
        self.acc.log({f"{tag}/lr": self.sched.get_last_lr()[0], **scalars}, step=self.state.result.global_step)

    def save(self, finished: bool = False) -> None:
        if self.ck is not None:
            self.settle()  # never a checkpoint of a diverged model
            self.state.finished = finished
            save_checkpoint(self.acc, self.ck, self.stage.tag, asdict(self.state), self.stage.extra_state,
                            self.loader, self.sharded)


class _EpochLoop(_Steps):
    """Epoch after epoch over ``make_loader(epoch)``; a resumed epoch skips the batches its checkpoint had
    consumed. ``state.batches`` counts this epoch's batches, ``state.running`` sums their losses."""

    unit = "batch"

    def run(self, first, make_loader: Callable[[int], torch.utils.data.DataLoader]) -> None:
        for epoch in range(self.state.epoch, self.stage.epochs):
            self.begin_epoch(epoch)
            loader = first if epoch == 0 else make_loader(epoch)
            if self.end_epoch(self.epoch(epoch, self.acc.prepare(loader))):
                break

    def position(self) -> int:
        return self.state.batches

    def epoch(self, epoch: int, loader) -> float:
        """Run the rest of epoch ``epoch`` (skipping the batches a resumed state consumed); mean loss."""
        st, acc, tag = self.state, self.acc, self.stage.tag
        skip, n_batches = st.batches, len(loader)
        if skip:
            loader = acc.skip_first_batches(loader, skip)
        self.model.train()
        bar = self._bar(loader, f"{tag} epoch {epoch + 1}/{self.stage.epochs}", n_batches, skip)
        for i, batch in enumerate(bar, start=skip):
            out, loss = self.step(batch)
            if self.stage.on_batch is not None:
                self.stage.on_batch(batch)
            self.pending += loss
            st.batches = i + 1
            if acc.sync_gradients:
                st.result.global_step += 1
                self.after_step(out, batch, bar, last=i + 1 == n_batches)
        self.settle()
        return self.mean_loss()


class _StreamLoop(_Steps):
    """Optimizer steps over a stream until it ends on any rank (or ``max_steps``): one epoch. The loss of a step
    is normalised by the supervised tokens of all its micro-batches on all ranks, so every token weighs the
    same however the tokens fall into packs, micro-batches and ranks. ``state.batches`` counts micro-batches and
    ``state.running`` sums step losses (each micro-batch adds its 1/ga share); the stream's own position is in
    the loader's state, saved with every checkpoint."""

    unit = "step"
    stage: StreamStage

    def run(self, loader) -> None:
        self.host = HostReduce(self.acc)  # every rank builds it at the same point (a collective call)
        self.begin_epoch(0)
        self.end_epoch(self.stream(loader))

    def position(self) -> int:
        return self.state.result.global_step

    def mean_loss(self) -> float:  # running sums step losses, batches counts micro-batches
        return self.state.running * self.acc.gradient_accumulation_steps / max(1, self.state.batches)

    def stream(self, loader) -> float:
        """Run the stream to its end (on any rank) or ``max_steps``; mean loss of its steps."""
        st, acc, ga, stage = self.state, self.acc, self.acc.gradient_accumulation_steps, self.stage
        self.loader, it, out = loader, iter(loader), None
        self.model.train()
        # a stream stopped early ends there, whatever the schedule's length
        total = stage.num_training_steps if stage.max_steps is None else min(stage.num_training_steps, stage.max_steps)
        bar = self._bar(None, stage.tag, total, st.result.global_step)
        while stage.max_steps is None or st.result.global_step < stage.max_steps:
            group = [b for _, b in zip(range(ga), it)]
            # the token count is read on the host (the labels are still there); one reduction for both numbers
            tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
            short, tokens = self.host.sum([int(len(group) != ga), tokens])
            if short:  # a partial last step (on any rank) is dropped
                break
            share = tokens / (ga * acc.num_processes)  # accelerate divides by ga, DDP by world
            for b in group:
                b = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
                aux = {k: b.pop(k) for k in stage.side_keys if k in b}
                out, loss = self.step({**b, "num_items_in_batch": max(share, 1e-8)})
                if stage.on_batch is not None:
                    stage.on_batch({**b, **aux})
                self.pending += loss / ga
            st.batches += ga
            st.result.global_step += 1
            bar.update(1)
            self.after_step(out, {**b, **aux}, bar)
        bar.close()
        if out is not None and st.result.global_step % stage.log_every:  # the last steps' values, logged too
            self.after_step(out, {**b, **aux}, bar, last=True)
        self.settle()
        return self.mean_loss()


class Health:
    """The first optimizer step whose loss was not finite, kept on the device (no read-back per step) and
    checked at the log interval, before every checkpoint and every validation. A non-finite loss stops the
    run — rather than skipping the step — because with fp32 master weights and bf16 compute it means the
    model has diverged or a batch is broken, and every later step would train on NaN weights; stopping before
    any checkpoint or validation of them keeps the last good checkpoint and the best model intact."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self, step: int) -> None:
        first = torch.where(self.first_bad < 0, torch.iinfo(torch.long).max, self.first_bad)
        if self.acc.num_processes > 1:  # every rank stops together, naming the earliest bad step of any rank
            import torch.distributed as dist

            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first)
        if first != torch.iinfo(torch.long).max:
            raise TrainingDiverged(f"the training loss is not finite (NaN or inf) from optimizer step {first} "
                                   f"(checked at step {step}): the run stops before saving or validating that model; "
                                   "the last checkpoint before it is intact (a resume from it keeps its learning-rate "
                                   "schedule). Check the data and train.grad_clip, or start again with a lower "
                                   "train.lr (--overwrite)")


class HostReduce:
    """Sums of host-side counts over the ranks without touching the accelerator: on a CPU (gloo) group next to
    NCCL, so reading the result never waits for the device's queued work. One process: no communication."""

    def __init__(self, accelerator):
        import torch.distributed as dist

        self.group = None
        if accelerator.num_processes > 1:
            # every rank builds the group at the same point of fit (a collective call)
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def sum(self, values: list[int]) -> list[int]:
        if self.group is None:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(t, group=self.group)
        return t.tolist()


def _end_epoch(accelerator: Accelerator, stage: Stage, state: LoopState, loss: float) -> bool:
    """Record the epoch, validate when due, keep the best, and say whether early stopping ends the stage."""
    result, epoch = state.result, state.epoch + 1
    result.epochs_run = epoch
    record = {"epoch": epoch, "loss": loss}
    state.epoch, state.batches, state.running = epoch, 0, 0.0
    stop = False
    if stage.validate is not None and (epoch % stage.eval_every == 0 or epoch == stage.epochs):
        metrics = stage.validate()
        record.update({f"valid_{k}": v for k, v in metrics.items()})
        accelerator.log({f"{stage.tag}/valid_{k}": v for k, v in metrics.items() if k != "users"},
                        step=result.global_step)
        sign, m = (1.0 if stage.greater_is_better else -1.0), stage.metric
        # a model that scored some users NaN (ranked last, so its metric may even look fine) is never kept
        finite = math.isfinite(metrics[m]) and not metrics.get("nonfinite")
        if finite and (m not in result.best_metrics or sign * metrics[m] > sign * result.best_metrics[m]):
            result.best_metrics, result.best_epoch, state.bad_epochs = metrics, epoch, 0
            if stage.on_best is not None:
                stage.on_best(metrics, epoch)
        else:
            state.bad_epochs += 1
        if accelerator.is_local_main_process:
            best = f"{result.best_metrics[m]:.4f} @ {result.best_epoch}" if m in result.best_metrics else "none yet"
            why = (f"{metrics['nonfinite']} users had non-finite scores" if metrics.get("nonfinite") else
                   f"{m} is not finite")
            tqdm.write(f"[{stage.tag}] epoch {epoch}: loss {loss:.4f}  valid {m} {metrics[m]:.4f}  (best {best})"
                       + ("" if finite else f"  NOT KEPT: {why}"))
        stop = stage.patience is not None and state.bad_epochs >= stage.patience
    result.history.append(record)
    return stop


def _mean_over_ranks(accelerator: Accelerator, value: float) -> float:
    return _over_ranks(accelerator, value, "mean")


def _over_ranks(accelerator: Accelerator, value: float, reduction: str) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], device=accelerator.device)  # int64 for counts, float32 for losses
    return accelerator.reduce(t, reduction=reduction).item()


def peak_memory_mib(device: torch.device) -> float:
    """The accelerator's peak allocated memory (CUDA), else this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
