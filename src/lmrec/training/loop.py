"""The one training loop, on Accelerate (so ``torchrun`` and ``accelerate launch`` work unchanged).

Contract: every batch is a dict of tensors and ``model(**batch).loss`` is the loss. The loop does AdamW
steps with warmup + linear decay, gradient accumulation and clipping, mixed precision when a GPU is
present, a progress bar, TensorBoard logging, periodic validation, early stopping on a metric, and calls
back when a new best is reached so the caller can keep the best state. Family-specific work (re-encoding
RecFormer's item table before an epoch, for instance) comes in through ``before_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup


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
    patience: int | None = None,
    on_best: Callable[[dict[str, float], int], None] | None = None,
    tag: str = "train",
    global_step: int = 0,
    after_step: Callable[[], None] | None = None,
) -> FitResult:
    """Train ``model`` for up to ``epochs`` epochs; ``steps_per_epoch`` counts optimizer steps over all
    processes (it sizes the learning-rate schedule). ``after_step`` runs after every optimizer step (stage 1
    of the generative family restores the frozen embedding rows there)."""
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
    bad_epochs = 0
    show = accelerator.is_local_main_process
    for epoch in range(epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        loader = accelerator.prepare(make_loader(epoch))
        model.train()
        bar = tqdm(loader, desc=f"{tag} epoch {epoch + 1}/{epochs}", disable=not show, leave=False)
        running = 0.0
        for i, batch in enumerate(bar):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                if after_step is not None and accelerator.sync_gradients:
                    after_step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                result.global_step += 1
            running += loss.item()
            bar.set_postfix(loss=f"{running / (i + 1):.4f}")
            if accelerator.sync_gradients:
                accelerator.log({f"{tag}/loss": loss.item(), f"{tag}/lr": scheduler.get_last_lr()[0]},
                                step=result.global_step)
        result.epochs_run = epoch + 1
        record = {"epoch": epoch + 1, "loss": running / max(1, i + 1)}
        if validate is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            metrics = validate()
            record.update({f"valid_{k}": v for k, v in metrics.items()})
            accelerator.log({f"{tag}/valid_{k}": v for k, v in metrics.items() if k != "users"},
                            step=result.global_step)
            if metrics[metric] > result.best_metrics.get(metric, -1.0):
                result.best_metrics, result.best_epoch, bad_epochs = metrics, epoch + 1, 0
                if on_best is not None:
                    on_best(metrics, epoch + 1)
            else:
                bad_epochs += 1
            if show:
                tqdm.write(f"[{tag}] epoch {epoch + 1}: loss {record['loss']:.4f}  valid {metric} "
                           f"{metrics[metric]:.4f}  (best {result.best_metrics[metric]:.4f} @ {result.best_epoch})")
            if patience is not None and bad_epochs >= patience:
                result.history.append(record)
                break
        result.history.append(record)
    accelerator.wait_for_everyone()
    return result
