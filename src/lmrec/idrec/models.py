"""ID-based sequential recommenders, the baselines a recommendation table is read against: SASRec (Kang &
McAuley 2018) and GRU4Rec (Hidasi et al. 2016), in RecBole 1.2.1's configuration.

An item is a learned vector (row ``i + 1`` of ``item_embeddings``; row 0 is padding). A history, oldest
first and left-aligned (padding after it), goes through causal self-attention blocks with learned positions
(SASRec) or a GRU (GRU4Rec); the hidden state at every position scores all items by a dot product with
their vectors, and the loss is the cross-entropy of the next item at every position (``labels``, -100
where there is no target). A user is the hidden state at the last item of the history.

The transformer blocks are torch's ``TransformerEncoderLayer`` (post-norm, GELU, as RecBole's SASRec
blocks, without the dropout between the two feed-forward layers that RecBole does not have), the
recurrence torch's ``GRU``; what is written here is only the wiring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class IdRecConfig(PretrainedConfig):
    model_type = "lmrec-idrec"

    def __init__(self, arch: str = "sasrec", num_items: int = 1, hidden_size: int = 64, layers: int = 2,
                 heads: int = 2, inner_size: int = 256, gru_hidden_size: int = 128, dropout: float = 0.5,
                 max_len: int = 50, initializer_range: float = 0.02, layer_norm_eps: float = 1e-12,
                 text_dim: int = 0, id_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.text_dim, self.id_dropout = text_dim, id_dropout  # the hybrid: text vectors of that width
        self.arch, self.num_items, self.hidden_size, self.layers = arch, num_items, hidden_size, layers
        self.heads, self.inner_size, self.gru_hidden_size, self.dropout = heads, inner_size, gru_hidden_size, dropout
        self.max_len, self.initializer_range, self.layer_norm_eps = max_len, initializer_range, layer_norm_eps


@dataclass
class IdRecOutput:
    loss: torch.Tensor | None
    hidden: torch.Tensor  # (B, L, hidden) states at every position

    def items(self):
        return [("loss", self.loss)] if self.loss is not None else []


class IdSeqRec(PreTrainedModel):
    config_class = IdRecConfig
    base_model_prefix = "idrec"

    def __init__(self, config: IdRecConfig):
        super().__init__(config)
        h = config.hidden_size
        self.item_embeddings = nn.Embedding(config.num_items + 1, h, padding_idx=0)
        self.dropout = nn.Dropout(config.dropout)
        if config.arch == "hybrid":
            # an item = its learned ID vector (items of the training sequences only) + a projection of its
            # text vector (every item: new ones too); both saved with the weights
            self.text_proj = nn.Linear(config.text_dim, h)
            self.register_buffer("text_vectors", torch.zeros(config.num_items, config.text_dim))
            self.register_buffer("known", torch.zeros(config.num_items, dtype=torch.bool))
        if config.arch in ("sasrec", "hybrid"):
            self.positions = nn.Embedding(config.max_len, h)
            self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
            block = nn.TransformerEncoderLayer(h, config.heads, config.inner_size, config.dropout, activation="gelu",
                                               layer_norm_eps=config.layer_norm_eps, batch_first=True)
            block.dropout = nn.Identity()  # RecBole's feed-forward has no dropout between its two layers
            self.blocks = nn.TransformerEncoder(block, config.layers, enable_nested_tensor=False)
        elif config.arch == "gru4rec":
            self.gru = nn.GRU(h, config.gru_hidden_size, config.layers, bias=False, batch_first=True)
            self.dense = nn.Linear(config.gru_hidden_size, h)
        else:
            raise ValueError(f"unknown arch {config.arch!r} (sasrec, gru4rec or hybrid)")
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # RecBole's initialisation: SASRec normal(0, 0.02); GRU4Rec Xavier for the embeddings and the GRU,
        # torch's default for its output layer
        std = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            if self.config.arch != "gru4rec":
                nn.init.normal_(module.weight, 0.0, std)
            else:
                nn.init.xavier_normal_(module.weight)
        elif isinstance(module, nn.Linear) and self.config.arch != "gru4rec":
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):  # RecBole's Q, K, V are Linear layers: normal(0, std)
            nn.init.normal_(module.in_proj_weight, 0.0, std)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GRU):
            for p in module.parameters():
                nn.init.xavier_uniform_(p)

    def set_text(self, text_vectors: torch.Tensor, known: torch.Tensor) -> None:
        """The hybrid's text vectors (num_items, text_dim) and which items have a learned ID vector."""
        self.text_vectors.copy_(text_vectors)
        self.known.copy_(known)

    def _table(self) -> torch.Tensor:
        """(num_items + 1, hidden): row 0 padding, row ``i + 1`` item ``i``'s vector."""
        if self.config.arch != "hybrid":
            return self.item_embeddings.weight
        keep = self.known
        if self.training and self.config.id_dropout > 0:  # some items by their text alone: it must carry signal
            keep = keep & (torch.rand(keep.shape, device=keep.device) >= self.config.id_dropout)
        items = self.item_embeddings.weight[1:] * keep[:, None] + self.text_proj(self.text_vectors)
        return torch.cat([self.item_embeddings.weight[:1], items])

    def item_vectors(self) -> torch.Tensor:
        """(num_items, hidden): the vector of item ``i`` (index ``i`` of the prepared dataset)."""
        return self._table()[1:]

    def encode(self, input_ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) item ids + 1, left-aligned, 0 = padding → (B, L, hidden) causal states."""
        x = F.embedding(input_ids, self._table() if table is None else table, padding_idx=0)
        if self.config.arch != "gru4rec":
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.dropout(self.norm(x + self.positions(pos)[None]))
            causal = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1], device=x.device, dtype=x.dtype)
            return self.blocks(x, mask=causal, is_causal=True)
        out, _ = self.gru(self.dropout(x))
        return self.dense(out)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> IdRecOutput:
        table = self._table()  # one draw of the ID dropout for the inputs and the softmax
        hidden = self.encode(input_ids, table)
        loss = None
        if labels is not None:
            seen = labels != -100
            logits = hidden[seen] @ table[1:].T
            loss = F.cross_entropy(logits, labels[seen])
        return IdRecOutput(loss, hidden)

    def user_vectors(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, hidden): the state at each history's last item."""
        hidden = self.encode(input_ids)
        return hidden[torch.arange(len(lengths), device=hidden.device), lengths - 1]
