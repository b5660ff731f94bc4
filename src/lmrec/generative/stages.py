"""The generative family's training stages, one named function each (OpenOneRec's recipe).

Every stage trains with the same objective: ``model(**batch).loss``, the language model's next-token
cross-entropy averaged over the supervised tokens, where only the assistant's answer is supervised (the
labels are built by :func:`lmrec.generative.prompts.encode_training`; -100 everywhere else). What differs
between the stages is what may change, and that is all a stage function sets up: it freezes or wraps the
model and returns a :class:`StageSetup` with the model to train and the hook the loop calls after every
optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmrec.errors import LmrecError


@dataclass
class StageSetup:
    model: torch.nn.Module  # the model to train (a peft model for LoRA)
    keep_rows: torch.Tensor | None = None  # stage 1: embedding rows (bool, all rows) that must not change

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def after_step(self) -> Callable[[], None] | None:
        """The hook the loop calls after every optimizer step, bound to the parameters as they are now: call
        it once the model is where it trains (on its device, sharded). Stage 1: restore the kept rows."""
        if self.keep_rows is None:
            return None
        saved = []
        for w in _embedding_matrices(self.model):
            local, rows = _local_rows(w)
            keep = self.keep_rows[rows].to(local.device)
            saved.append((local, keep, local.detach()[keep].clone()))

        @torch.no_grad()
        def restore_kept_rows():
            for local, keep, rows in saved:
                local[keep] = rows

        return restore_kept_rows


def _embedding_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    return [emb] if out is None or out.weight is emb else [emb, out.weight]


def _local_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's rows of a (possibly FSDP-sharded) matrix, writable in place, and their global indices."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(w, DTensor):
        return w.data, torch.arange(w.shape[0])
    index = torch.arange(w.shape[0], device=w.device_mesh.device_type)
    rows = distribute_tensor(index, w.device_mesh, w.placements, src_data_rank=None).to_local()
    return w.to_local(), rows.cpu()


def new_token_ids(meta: dict) -> list[int]:
    """The rows added by vocabulary expansion: every itemic token and ``<|sid_begin|>``/``<|sid_end|>``."""
    return sum(meta["level_token_ids"], []) + [meta["sid_begin"], meta["sid_end"]]


def stage1_new_embeddings(model: torch.nn.Module, meta: dict, lora=None) -> StageSetup:
    """Stage 1: align the new itemic tokens with the frozen language model.

    Trains only the embedding rows of the new tokens (input embeddings, and the LM head's rows when it is
    not tied to them); every other parameter is frozen. The optimizer still holds the whole embedding
    matrix, and a gradient mask alone would let decoupled weight decay shrink the old rows, so the old rows
    are restored after every step (``StageSetup.after_step``): they stay bit-for-bit unchanged, on one
    process or sharded over many."""
    if lora is not None:
        raise LmrecError("train.lora applies to stage 2 / sft (stage 1 trains only the new token rows)")
    for p in model.parameters():
        p.requires_grad_(False)
    for w in _embedding_matrices(model):
        w.requires_grad_(True)
    keep = torch.ones(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    keep[torch.as_tensor(new_token_ids(meta))] = False
    return StageSetup(model, keep)


def stage2_full(model: torch.nn.Module, meta: dict, lora=None) -> StageSetup:
    """Stage 2: every parameter trains (the seed's co-pretraining; with ``lora``, LoRA adapters + the new
    token rows instead)."""
    return _all_or_lora(model, meta, lora)


def sft(model: torch.nn.Module, meta: dict, lora=None) -> StageSetup:
    """Supervised finetuning on the recommendation conversations: every parameter, or (``lora``: a
    ``GenTrainConfig`` with ``lora: true``) peft LoRA adapters with the new token rows trainable
    (``trainable_token_indices``)."""
    return _all_or_lora(model, meta, lora)


def _all_or_lora(model: torch.nn.Module, meta: dict, lora) -> StageSetup:
    for p in model.parameters():
        p.requires_grad_(True)
    if lora is None:
        return StageSetup(model)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                     target_modules=lora.lora_target_modules, trainable_token_indices=new_token_ids(meta),
                     task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM")
    from lmrec.generative.vocab import quiet_peft

    with quiet_peft():
        return StageSetup(get_peft_model(model, cfg))


STAGES: dict[str, Callable[..., StageSetup]] = {"1": stage1_new_embeddings, "2": stage2_full, "sft": sft}


class ChunkedOutput:
    """``loss``, and every position's loss (``token_nll``, ``(B, L - 1)``, detached; for the logged metrics):
    given, or computed when first read (Liger returns only the sum)."""

    def __init__(self, loss: torch.Tensor, token_nll: torch.Tensor | None = None, lazy=None):
        self.loss, self._nll, self._lazy = loss, token_nll, lazy

    @property
    def token_nll(self) -> torch.Tensor:
        if self._nll is None:
            self._nll = self._lazy()
        return self._nll

    def items(self):
        return [("loss", self.loss)]


LOSS_IMPLS = ("auto", "chunked", "liger")


def loss_impl(choice: str, device: torch.device) -> str:
    """``train.loss_impl``: Liger's fused linear cross-entropy (Triton, CUDA) where asked for or, with
    ``auto``, where installed on a GPU; our chunked loss elsewhere (CPU, any accelerator)."""
    import importlib.util

    has_liger = importlib.util.find_spec("liger_kernel") is not None
    if choice == "auto":
        return "liger" if has_liger and device.type == "cuda" else "chunked"
    if choice == "liger" and not (has_liger and device.type == "cuda"):
        raise LmrecError("train.loss_impl=liger needs the liger-kernel package and a CUDA device "
                         f"({'installed' if has_liger else 'not installed'}, device {device.type})")
    return choice


class ChunkedLossLM(torch.nn.Module):
    """A causal LM whose ``forward(**batch).loss`` is the LM-head cross-entropy computed without the whole
    pack's logits, equal to the model's own loss: ``impl`` "chunked" (``lmrec.training.losses.chunked_lm_loss``,
    in chunks of ``chunk_tokens`` positions) or "liger" (Liger's fused linear cross-entropy). Wraps any
    decoder-only HF model (the stage's freezing and LoRA are applied to ``lm`` before). An untied ``nn.Linear``
    head computes the loss in its own forward (``LossLinear``: FSDP can then shard it as its own group); a head
    tied to the embeddings is used through its weight."""

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int, impl: str = "chunked"):
        from lmrec.training.losses import LossLinear

        super().__init__()
        if getattr(lm.config, "is_encoder_decoder", False):
            raise LmrecError("train.loss_chunk_tokens applies to decoder-only models")
        self.lm, self.chunk_tokens, self.impl = lm, chunk_tokens, impl
        self.config = lm.config
        head = lm.get_output_embeddings()
        if type(head) is torch.nn.Linear and head.weight is not lm.get_input_embeddings().weight:
            head.__class__ = LossLinear  # same parameters and names; logits as before when called without labels

    @property
    def all_tied_weights_keys(self) -> dict[str, str]:
        """The wrapped model's ties under this module's names (a checkpoint then drops the tied head quietly)."""
        return {f"lm.{k}": f"lm.{v}" for k, v in (getattr(self.lm, "all_tied_weights_keys", None) or {}).items()}

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, num_items_in_batch=None,
                use_cache=False, **kwargs):
        from lmrec.training.losses import LossLinear, chunked_lm_loss, liger_lm_loss, token_losses

        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False, **kwargs).last_hidden_state
        head = self.lm.get_output_embeddings()
        if isinstance(head, LossLinear):
            loss, nll = head(hidden, labels=labels, chunk_tokens=self.chunk_tokens, num_items=num_items_in_batch,
                             impl=self.impl)
        elif self.impl == "liger":
            loss, nll = liger_lm_loss(hidden, head.weight, labels, num_items=num_items_in_batch), None
        else:
            loss, nll = chunked_lm_loss(hidden, head.weight, labels, chunk_tokens=self.chunk_tokens,
                                        num_items=num_items_in_batch)
        if nll is not None:
            return ChunkedOutput(loss, nll)
        return ChunkedOutput(loss, lazy=lambda: token_losses(hidden.detach(), head.weight.detach(), labels,
                                                             self.chunk_tokens))
