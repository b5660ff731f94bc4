"""Vocabulary expansion: one ordinary added token per (level, code) plus ``<|sid_begin|>``/``<|sid_end|>``,
embeddings padded to a multiple of 256, new rows initialised, tied weights kept tied.

Works for decoder-only models (``Qwen3ForCausalLM``, tied embeddings) and encoder-decoders (T5)."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from lmrec.errors import LmrecError
from lmrec.generative.sid import SemanticIds
from lmrec.io import atomic_dir
from lmrec.modelfiles import write_marker

SID_BEGIN, SID_END = "<|sid_begin|>", "<|sid_end|>"
META = "sid_vocab.json"


@contextlib.contextmanager
def quiet_peft():
    """peft (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model: a
    FutureWarning on every LoRA load that is neither the user's to act on nor ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_lm(path: str | Path, dtype: torch.dtype | str = "auto"):
    """A local causal LM or encoder-decoder and its tokenizer. ``dtype`` "auto" keeps the checkpoint's
    (inference: a bf16 export runs in bf16); training passes ``torch.float32``, the master weights the
    optimizer updates (an AdamW step below bf16's resolution would otherwise be rounded away)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise LmrecError(f"{path} is not a model directory (no config.json); nothing is downloaded")
    cfg = AutoConfig.from_pretrained(str(path))
    cls = AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else AutoModelForCausalLM
    return cls.from_pretrained(str(path), dtype=dtype), AutoTokenizer.from_pretrained(str(path))


def stored_dtype(path: str | Path) -> torch.dtype:
    """The floating dtype a model directory's weights are stored in (its safetensors headers; else the
    config's ``dtype``; else float32)."""
    from safetensors import safe_open

    path = Path(path)
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                dtype = _SAFETENSORS_DTYPES.get(st.get_slice(k).get_dtype())
                if dtype is not None:
                    return dtype
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def expand_vocab(model_path: str | Path, sids: SemanticIds, out: str | Path, *, init: str = "codebook",
                 pad_multiple: int = 256, books: list[np.ndarray] | None = None, seed: int = 0, log=print) -> dict:
    """Add the itemic tokens to a model; returns (and saves as ``sid_vocab.json``) the id layout.

    The expanded model is saved in the dtype the source is stored in (recorded as ``dtype`` in
    ``sid_vocab.json`` and logged): a bf16 checkpoint stays half the size of fp32 on disk, and nothing is
    lost — training loads it in fp32 (bf16 → fp32 is exact), and the only values computed here, the new
    rows' initialisation, are computed in fp32 and rounded once."""
    from lmrec.modelfiles import loading

    with loading(model_path):
        dtype = stored_dtype(model_path)
        model, tok = load_lm(model_path, dtype=dtype)
    old_rows = model.get_input_embeddings().weight.shape[0]
    new_tokens = [SID_BEGIN, SID_END] + sids.all_tokens()
    present = [t for t in new_tokens if t in tok.get_vocab()]
    if present:
        raise LmrecError(f"{model_path}: the tokenizer already has itemic tokens ({present[:3]} ...); "
                         "expand the original model")
    n_before = len(tok)  # rows of real tokens (a checkpoint may have more rows, e.g. Qwen's padding)
    added = tok.add_tokens(new_tokens)  # ordinary added tokens: never split, decoded as text
    ids = tok.convert_tokens_to_ids(new_tokens)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad_multiple, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == emb.data_ptr()
    with torch.no_grad():
        new_rows = torch.as_tensor(ids)
        padding = torch.arange(max(old_rows, max(ids) + 1), emb.shape[0])
        old = emb[:n_before].float()
        emb[new_rows] = _init_rows(old, init, sids, books, seed).to(emb.dtype)
        emb[padding] = old.mean(0).to(emb.dtype)
        if out_emb is not None and not tied:
            w = out_emb.weight
            w[torch.cat([new_rows, padding])] = w[:n_before].float().mean(0).to(w.dtype)
    meta = {"sid_begin": ids[0], "sid_end": ids[1], "first_new_id": min(ids), "last_new_id": max(ids),
            "old_vocab_rows": old_rows, "old_tokenizer_size": n_before, "embedding_rows": int(emb.shape[0]),
            "tokenizer_size": len(tok), "dtype": str(dtype).removeprefix("torch."),
            "added": added, "tied": tied, "init": init, "level_sizes": sids.config.level_sizes,
            "level_token_ids": [[tok.convert_tokens_to_ids(sids.token(lv, c)) for c in range(size)]
                                for lv, size in enumerate(sids.config.level_sizes)]}

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / META).write_text(json.dumps(meta) + "\n")
        write_marker(tmp, "generative")

    atomic_dir(out, write)
    log(f"added {added} tokens: ids {meta['first_new_id']}..{meta['last_new_id']} "
        f"(embedding rows {old_rows} → {meta['embedding_rows']}, padded to a multiple of {pad_multiple}; "
        f"{'tied' if tied else 'untied'} output embeddings; init {init}); saved in {meta['dtype']}, as the source "
        "model is stored (training loads it in float32)")
    return meta


def _init_rows(old: torch.Tensor, init: str, sids: SemanticIds, books, seed: int) -> torch.Tensor:
    """Rows for [begin, end, every (level, code) token] in that order."""
    mean = old.mean(0, keepdim=True)
    rows = mean.expand(2 + sum(sids.config.level_sizes), -1).clone()
    if init == "mean":
        return rows
    if init != "codebook":
        raise LmrecError(f"init must be 'mean' or 'codebook', got {init!r}")
    if books is None:
        raise LmrecError("init 'codebook' needs the codebooks (codebooks.safetensors of the semantic IDs)")
    # mean + a fixed random projection of the level's centroid, scaled to the spread of the old rows
    g = torch.Generator().manual_seed(seed)
    std = old.std(0).mean()
    for lv, book in enumerate(books):
        c = torch.as_tensor(book, dtype=old.dtype)
        proj = torch.randn(c.shape[1], old.shape[1], generator=g, dtype=old.dtype) / c.shape[1] ** 0.5
        v = c @ proj
        v = v / v.std().clamp(min=1e-8) * std
        start = 2 + sum(sids.config.level_sizes[:lv])
        rows[start : start + len(c)] = mean[0] + v
    return rows


def read_meta(path: str | Path) -> dict:
    p = Path(path) / META
    if not p.exists():
        raise LmrecError(f"{path} has no {META}: expand its vocabulary first (`lmrec gen expand-vocab`)")
    return json.loads(p.read_text())
