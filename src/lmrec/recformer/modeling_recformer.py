"""RecFormer: a Longformer over the flattened key/value text of a user's items.

Embeddings = token + token position (continuous over the whole flattened history) + token type
(start/key/value/pad) + item position (0 = start token, 1 = most recent item, ...) → LayerNorm → dropout.
The encoder is HF's ``LongformerEncoder`` (sliding-window local attention + global attention on the first
token); the sequence is represented by the first token's hidden state and scored against item vectors by
cosine similarity / temperature. Parameter names follow HF's Longformer (``longformer.embeddings.*``,
``longformer.encoder.layer.{i}.attention.self.{query,key,value}[_global]``) so backbone weights load as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from lmrec.recformer.attention import LongformerLayers
from lmrec.recformer.configuration_recformer import RecformerConfig


class RecformerEmbeddings(nn.Module):
    def __init__(self, config: RecformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.token_type_size, config.hidden_size)
        self.item_position_embeddings = nn.Embedding(config.max_item_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_offset = config.position_offset

    def forward(self, input_ids, position_ids, token_type_ids, item_position_ids) -> torch.Tensor:
        emb = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids + self.position_offset)
            + self.token_type_embeddings(token_type_ids)
            + self.item_position_embeddings(item_position_ids)
        )  # (B, L, H)
        return self.dropout(self.LayerNorm(emb))


class RecformerPreTrainedModel(PreTrainedModel):
    config_class = RecformerConfig
    config: RecformerConfig
    base_model_prefix = "longformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LongformerLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class RecformerModel(RecformerPreTrainedModel):
    def __init__(self, config: RecformerConfig):
        super().__init__(config)
        self.embeddings = RecformerEmbeddings(config)
        self.encoder = LongformerLayers(config)  # the attention seam: lmrec.recformer.attention
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor,  # (B, L) 1 = token, 0 = padding
        global_attention_mask: torch.Tensor | None = None,  # (B, L) 1 = global attention
        token_type_ids: torch.Tensor | None = None,
        item_position_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,  # 0-based; the config's offset is added
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        B, L = input_ids.shape
        zeros = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        token_type_ids = zeros if token_type_ids is None else token_type_ids
        item_position_ids = zeros if item_position_ids is None else item_position_ids
        if global_attention_mask is None:
            global_attention_mask = zeros.clone()
            global_attention_mask[:, 0] = 1
        # Pad to a multiple of every layer's window (HF's band kernels need it; HF's own LongformerModel
        # pads to the largest window only, which breaks on mixed windows such as [4, 6]).
        w = math.lcm(*self.config.attention_window)
        pad = (w - L % w) % w if self.config.attention_impl == "longformer" else 0
        if pad:
            def p(x, v):
                return F.pad(x, (0, pad), value=v)

            input_ids, position_ids = p(input_ids, self.config.pad_token_id), p(position_ids, 0)
            token_type_ids, item_position_ids = p(token_type_ids, 0), p(item_position_ids, 0)
            attention_mask, global_attention_mask = p(attention_mask, 0), p(global_attention_mask, 0)
        hidden = self.embeddings(input_ids, position_ids, token_type_ids, item_position_ids)
        mask = torch.where(attention_mask.bool(), global_attention_mask.to(hidden.dtype),
                           torch.full_like(hidden[..., 0], -1.0))  # -1 pad, 0 local, +1 global
        hidden = self.encoder(hidden, mask)[:, :L]  # (B, L, H)
        if self.config.pooler_type == "cls":
            pooled = hidden[:, 0]
        else:
            m = attention_mask[:, :L, None].to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


@dataclass
class SeqRecOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, N) cosine / temperature against the item table
    user_embeddings: torch.Tensor | None = None  # (B, H)


class RecformerForSeqRec(RecformerPreTrainedModel):
    """Sequential recommendation head: a frozen item table (one vector per item, made by encoding each
    item's text alone) and a full softmax over all items."""

    def __init__(self, config: RecformerConfig):
        super().__init__(config)
        self.longformer = RecformerModel(config)
        # Not a parameter and not saved with the weights: it is derived from the encoder and the catalog,
        # and lives beside the weights as item_table.safetensors.
        self.register_buffer("item_embeddings", torch.zeros(0, config.hidden_size), persistent=False)
        self.user_projection = nn.Linear(config.hidden_size, config.hidden_size) if config.user_projection else None
        self.post_init()
        if self.user_projection is not None:
            with torch.no_grad():
                self.user_projection.weight.copy_(torch.eye(config.hidden_size))
                self.user_projection.bias.zero_()

    def set_item_embeddings(self, table: torch.Tensor) -> None:
        self.item_embeddings = table.detach().to(self.device)  # (N, H)

    def encode(self, **inputs) -> torch.Tensor:
        """Item (or any sequence) → its vector: the pooled hidden state. (B, H)"""
        return self.longformer(**inputs).pooler_output

    def encode_user(self, **inputs) -> torch.Tensor:
        """History → user vector (the pooled state, through the user projection if configured). (B, H)"""
        pooled = self.encode(**inputs)
        return self.user_projection(pooled) if self.user_projection is not None else pooled

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        item_position_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B,) item indices (into ``candidates`` when given)
        candidates: torch.Tensor | None = None,  # (C,) table rows the softmax runs over; default: all
        target_inputs: dict[str, torch.Tensor] | None = None,
        item_inputs: list[dict[str, torch.Tensor]] | None = None,
        item_order: torch.Tensor | None = None,
        **kwargs,
    ) -> SeqRecOutput:
        """``target_inputs`` (optional): the labels' items tokenized alone. They are then encoded with gradient
        and a second, in-batch contrastive term (user vs. the batch's fresh item vectors, as in RecFormer's
        pretraining) is added, so that the item side learns too. Stale table rows and fresh vectors are never
        mixed in one softmax: a model could tell them apart and collapse. Without it, the loss is RecFormer's
        finetuning loss against the frozen table only.

        ``item_inputs`` (optional): every catalog item tokenized alone, as chunks of similar length (less
        padding); ``item_order[j]`` is the table row of the j-th item over the concatenated chunks. The whole
        catalog is then encoded with gradient and used instead of the frozen table: end-to-end full softmax,
        affordable for small catalogs only (its cost grows with the catalog, not with the batch).

        ``candidates`` (optional) restricts the softmax to some items — in training, the items that occur in
        the training data: items first seen later (cold-start items) are unknown at training time and must
        not be pushed down as never-positive negatives. With ``item_inputs`` the chunks hold exactly the
        candidates and ``item_order`` indexes positions among them."""
        user = self.encode_user(input_ids=input_ids, attention_mask=attention_mask,
                           global_attention_mask=global_attention_mask, token_type_ids=token_type_ids,
                           item_position_ids=item_position_ids, position_ids=position_ids)
        if item_inputs is not None:
            flat = torch.cat([self.encode(**chunk) for chunk in item_inputs])  # (N, H), with gradient
            items = torch.empty_like(flat).index_copy(0, item_order, flat)
        elif self.item_embeddings.shape[0] == 0:
            raise RuntimeError("the item table is empty: call set_item_embeddings() (see recformer.encode_items)")
        else:
            items = self.item_embeddings.to(user.dtype)
            if candidates is not None:
                items = items[candidates]
        user_n = F.normalize(user, dim=-1)
        logits = user_n @ F.normalize(items, dim=-1).T / self.config.temperature  # (B, N)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        if target_inputs is not None and labels is not None:
            fresh = F.normalize(self.encode(**target_inputs), dim=-1)  # (B, H), with gradient
            in_batch = (user_n @ fresh.T / self.config.temperature).float()  # (B, B)
            # a repeated item is not a negative for the users whose target it also is
            same = labels[:, None] == labels[None, :]
            in_batch = in_batch.masked_fill(same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device),
                                            float("-inf"))
            loss = loss + F.cross_entropy(in_batch, torch.arange(len(labels), device=labels.device))
        return SeqRecOutput(loss=loss, logits=logits, user_embeddings=user)


# ---------------------------------------------------------------------------------------------------------
# Pretraining (RecFormer §3.3): masked language modelling on the history and on the target item, plus an
# item-item contrastive loss between a history and its next item.
# ---------------------------------------------------------------------------------------------------------


class RecformerLMHead(nn.Module):
    """dense → gelu → LayerNorm → decoder tied to the word embeddings, + bias. Parameter names follow HF's
    ``LongformerLMHead`` (``lm_head.dense``, ``lm_head.layer_norm``, ``lm_head.decoder``, ``lm_head.bias``),
    so RoBERTa/Longformer heads load as they are and BERT's ``cls.predictions.*`` map onto it."""

    def __init__(self, config: RecformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden)))) + self.bias


@dataclass
class PretrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    contrastive_accuracy: torch.Tensor | None = None
    user_embeddings: torch.Tensor | None = None
    item_embeddings: torch.Tensor | None = None


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows concatenated. Backward: the gradient of every copy of a rank's rows (the loss of
    every rank uses them as negatives) is summed back onto that rank (an all-reduce, so gloo works), which
    makes the data-parallel gradient equal to the single-process one on the global batch."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated; the local block keeps its gradient and the other ranks' losses send
    theirs back (see ``_GatherWithGrad``). Identity in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def contrastive_loss(users: torch.Tensor, items: torch.Tensor, temperature: float, gather: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each user against every item of the (global) batch, cosine / temperature; user i's
    positive is item i. Returns (loss, accuracy). Under DDP the mean of the ranks' losses equals the
    single-process loss on the concatenated batch (equal local batch sizes)."""
    import torch.distributed as dist

    u = F.normalize(users, dim=-1)
    v = F.normalize(_gather_with_grad(items) if gather else items, dim=-1)
    distributed = gather and dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    target = torch.arange(len(u), device=u.device) + rank * len(u)
    logits = (u @ v.T / temperature).float()
    return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()


class RecformerForPretraining(RecformerPreTrainedModel):
    """History (flattened item text) and its next item, both encoded by the same Longformer:

    loss = InfoNCE(history, item; in-batch negatives gathered across ranks, cosine / temperature)
           + ``mlm_weight`` × (MLM loss on the history + MLM loss on the item)."""

    _tied_weights_keys = {"lm_head.decoder.weight": "longformer.embeddings.word_embeddings.weight"}

    def __init__(self, config: RecformerConfig):
        super().__init__(config)
        self.longformer = RecformerModel(config)
        self.lm_head = RecformerLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head.decoder = value

    def _mlm(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None:
            return None
        sel = labels >= 0  # -100 = not masked
        if not bool(sel.any()):
            return hidden.sum() * 0.0
        logits = self.lm_head(hidden[sel])  # only masked positions go through the vocabulary projection
        return F.cross_entropy(logits.float(), labels[sel])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        item_position_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,  # (B, L) original token ids at masked positions, else -100
        item_inputs: dict[str, torch.Tensor] | None = None,  # the next items, tokenized alone (+ mlm_labels)
        gather: bool = True,
        **kwargs,
    ) -> PretrainingOutput:
        h = self.longformer(input_ids=input_ids, attention_mask=attention_mask,
                            global_attention_mask=global_attention_mask, token_type_ids=token_type_ids,
                            item_position_ids=item_position_ids, position_ids=position_ids)
        losses = [self._mlm(h.last_hidden_state, mlm_labels)]
        user = h.pooler_output
        out = PretrainingOutput(user_embeddings=user)
        if item_inputs is not None:
            item_inputs = dict(item_inputs)
            item_labels = item_inputs.pop("mlm_labels", None)
            hi = self.longformer(**item_inputs)
            losses.append(self._mlm(hi.last_hidden_state, item_labels))
            items = hi.pooler_output
            out.item_embeddings = items
            out.contrastive_loss, out.contrastive_accuracy = contrastive_loss(user, items, self.config.temperature,
                                                                              gather)
        mlm = [x for x in losses if x is not None]
        out.mlm_loss = sum(mlm) if mlm else None
        parts = [x for x in (out.contrastive_loss,
                             self.config.mlm_weight * out.mlm_loss if out.mlm_loss is not None else None)
                 if x is not None]
        out.loss = sum(parts) if parts else None
        return out
