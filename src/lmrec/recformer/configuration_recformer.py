"""RecFormer configuration (Li et al., "Text Is All You Need: Learning Language Representations for
Sequential Recommendation", KDD 2023) on top of HF's ``LongformerConfig``."""

from __future__ import annotations

from transformers import LongformerConfig

from lmrec.errors import ConfigError


class RecformerConfig(LongformerConfig):
    r"""
    Args (beyond ``LongformerConfig``'s):
        token_type_size: rows of the token-type table: 0 start token, 1 attribute key, 2 attribute value, 3 pad.
        max_token_num: longest flattened history (tokens), start token included.
        max_item_embeddings: rows of the item-position table (0 = start token, 1 = most recent item, ...).
        max_attr_num: attributes kept per item, in their configured order.
        max_attr_length: tokens kept per attribute (key and value together).
        pooler_type: ``"cls"`` (first token's hidden state, RecFormer's choice) or ``"mean"``.
        temperature: cosine similarities are divided by it to give logits.
        mlm_weight: weight of the MLM loss next to the contrastive one during pretraining.
        position_offset: added to token positions before the lookup: 2 (= pad_token_id + 1) for RoBERTa /
            English Longformer checkpoints, 0 for BERT-style ones (Longformer_ZH, MiniLM).
        attention_impl: which implementation computes the Longformer attention (``lmrec.recformer.attention``):
            ``"auto"`` (dense SDPA on short inputs, the blocked kernel on long ones, chosen per call),
            ``"sdpa"`` (dense, memory L²), ``"blocked"`` (linear memory) or ``"longformer"`` (HF's band kernels).
            All compute the same function; it is a run-time choice, not part of the weights.
        user_projection: a linear map (initialised to the identity) applied to user vectors only, so that the
            user side can move away from the items it already contains; off in RecFormer.
    """

    model_type = "recformer"
    max_position_embeddings: int = 4098  # as allenai/longformer-base-4096 (4096 + pad offset 2)
    token_type_size: int = 4
    max_token_num: int = 1024
    max_item_embeddings: int = 51
    max_attr_num: int = 3
    max_attr_length: int = 32
    pooler_type: str = "cls"
    temperature: float = 0.05
    mlm_weight: float = 0.1
    position_offset: int = 2
    attention_impl: str = "auto"
    user_projection: bool = False
    attention_window: list[int] | int = 64

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.attention_window = normalize_attention_window(self.attention_window, self.num_hidden_layers)
        self.validate()

    def validate(self) -> None:
        if self.pooler_type not in ("cls", "mean"):
            raise ConfigError(f"pooler_type must be 'cls' or 'mean', got {self.pooler_type!r}")
        if self.max_token_num + self.position_offset > self.max_position_embeddings:
            raise ConfigError(
                f"max_token_num={self.max_token_num} (+ position offset {self.position_offset}) exceeds the "
                f"backbone's max_position_embeddings={self.max_position_embeddings}; lower max_token_num or "
                "convert the backbone to longer positions (`lmrec backbone convert-to-long`)"
            )
        if self.max_item_embeddings < 2:
            raise ConfigError(f"max_item_embeddings must be >= 2 (start token + one item), got "
                              f"{self.max_item_embeddings}")
        from lmrec.recformer.attention import ATTENTION_IMPLS

        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got "
                              f"{self.attention_impl!r}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


def normalize_attention_window(window: int | list[int], num_layers: int) -> list[int]:
    """One value → one per layer; a list must have one even, positive value per layer."""
    windows = [int(window)] * num_layers if isinstance(window, int) else [int(w) for w in window]
    if len(windows) != num_layers:
        raise ConfigError(f"attention_window has {len(windows)} values but the model has {num_layers} layers "
                          "(give one value, or one per layer)")
    for i, w in enumerate(windows):
        if w <= 0 or w % 2:
            raise ConfigError(f"attention_window must be a positive even number, got {w} for layer {i} "
                              "(the window spans w/2 tokens on each side)")
    return windows
