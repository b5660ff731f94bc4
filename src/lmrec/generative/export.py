"""``lmrec gen export`` and ``lmrec gen check-model``: a training checkpoint (or a trained model directory)
→ a Hugging Face directory every engine reads, and a check of it that can fail.

The export is ``save_pretrained`` of the model in bf16 or fp32 (safetensors shards + index), its config,
the tokenizer with the chat template, ``sid_vocab.json`` and ``prompt_config.json``, written atomically.
A checkpoint (``.../checkpoints/<stage>/step-N``, of a DDP run or a sharded ``train.fsdp`` one, read here
in one process whatever the number that wrote it) holds only weights: the architecture, tokenizer and token
layout come from the model the run started from (recorded in the run directory, or ``--base``).

``check-model`` is what a conversion test should be: it loads the export with ``AutoModelForCausalLM``,
compares its logits on a fixed batch with the source's (fp32: ≤ 1e-4 absolute; bf16: the source cast to
bf16, ≤ 5 % of the logits' scale), checks that constrained beam search returns only real items (with
``--sids``), and with ``--data`` prints the metrics. Any failed check is a non-zero exit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmrec.errors import LmrecError
from lmrec.generative.prompts import PROMPT_CONFIG
from lmrec.generative.vocab import META, load_lm, read_meta
from lmrec.io import atomic_dir
from lmrec.training.checkpoints import SHARDED
from lmrec.training.fsdp import load_sharded_weights

SOURCE = "source_model.json"  # written by gen train into its run directory: where the run started from
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _source_of(ckpt: Path, base: Path | None) -> Path:
    """The model a checkpoint's run started from: ``--base``, else the run's ``source_model.json``."""
    if base is not None:
        return base
    for d in (ckpt, *ckpt.parents):
        if (d / SOURCE).exists():
            return Path(json.loads((d / SOURCE).read_text())["model"])
    raise LmrecError(f"{ckpt}: cannot tell which model this checkpoint's run started from; give --base DIR "
                     "(the expanded model or the previous stage's model)")


def load_source(ckpt: str | Path, base: str | Path | None = None):
    """(model, tokenizer, directory with sid_vocab.json) of a trained model directory or a checkpoint."""
    ckpt = Path(ckpt)
    if (ckpt / "config.json").exists():
        if (ckpt / "adapter_config.json").exists():
            from lmrec.generative.recommender import load_generative

            model, tok = load_generative(ckpt)
            return model.merge_and_unload(), tok, ckpt
        model, tok = load_lm(ckpt)
        return model, tok, ckpt
    weights = ckpt / "model.safetensors"
    if (ckpt / SHARDED).is_dir():  # a train.fsdp checkpoint: read its shards in this one process
        src = _source_of(ckpt, Path(base) if base else None)
        model, tok = load_lm(src)
        load_sharded_weights(ckpt / SHARDED, model)
        return model, tok, src
    if not weights.exists():
        raise LmrecError(f"{ckpt}: neither a model directory (config.json) nor a checkpoint (model.safetensors, "
                         f"or {SHARDED}/ of a sharded run)")
    src = _source_of(ckpt, Path(base) if base else None)
    model, tok = load_lm(src)
    state = {k.removeprefix("lm."): v for k, v in load_file(str(weights)).items()}  # ChunkedLossLM wraps as lm.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "all_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise LmrecError(f"{weights} does not fit {src}: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         "(a LoRA run: export its model/ directory instead)")
    model.tie_weights()
    return model, tok, src


def export_model(ckpt: str | Path, out: str | Path, *, base: str | Path | None = None, dtype: str = "bf16",
                 max_shard_size: str = "2GB") -> Path:
    if dtype not in DTYPES:
        raise LmrecError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, tok, meta_dir = load_source(ckpt, base)
    read_meta(meta_dir)  # an export without its token layout could not decode items

    def write(tmp: Path) -> None:
        model.to(DTYPES[dtype]).save_pretrained(str(tmp), max_shard_size=max_shard_size)
        tok.save_pretrained(str(tmp))
        (tmp / META).write_text((Path(meta_dir) / META).read_text())
        prompt = Path(meta_dir) / PROMPT_CONFIG
        if prompt.exists():
            (tmp / PROMPT_CONFIG).write_text(prompt.read_text())
        (tmp / "export_info.json").write_text(json.dumps({"source": str(ckpt), "dtype": dtype}) + "\n")

    return atomic_dir(out, write)


def _fixed_batch(tok, meta: dict, n: int = 4) -> dict[str, torch.Tensor]:
    """A few prompts in the model's chat format with itemic tokens in the history."""
    level0 = meta["level_token_ids"][0]
    texts = []
    for i in range(n):
        sid = tok.decode([meta["sid_begin"], level0[i % len(level0)], meta["sid_end"]])
        texts.append(tok.apply_chat_template([{"role": "user", "content": f"Recent items, oldest first: {sid}. "
                                               "Next item?"}], tokenize=False, add_generation_prompt=True))
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def check_model(export_dir: str | Path, *, source: str | Path | None = None, base: str | Path | None = None,
                data: str | Path | None = None, sids: str | Path | None = None, beams: int = 10) -> list[Check]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file():  # never read as a hub id: nothing is downloaded
        raise LmrecError(f"{export_dir}: " + ("no such directory" if not export_dir.exists() else
                                              "not a model directory (no config.json)"))
    checks: list[Check] = []
    try:
        model = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
        tok = AutoTokenizer.from_pretrained(str(export_dir))
        meta = read_meta(export_dir)
    except (OSError, ValueError, LmrecError) as e:
        return [Check("load with AutoModelForCausalLM", False, f"{type(e).__name__}: {str(e)[:300]}")]
    checks.append(Check("load with AutoModelForCausalLM", True, f"{type(model).__name__}, {model.dtype}, "
                        f"vocabulary {model.get_input_embeddings().weight.shape[0]:,}"))
    batch = _fixed_batch(tok, meta)
    if source is not None:
        checks.append(_logits_check(model, load_source(source, base)[0], batch))
    if sids is not None:
        checks.append(_beam_check(export_dir, data, sids, beams))
    return checks


@torch.no_grad()
def _logits_check(model, reference, batch) -> Check:
    reference = reference.to(model.dtype).eval()
    a, b = model(**batch).logits.float(), reference(**batch).logits.float()
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    tol = 1e-4 if model.dtype == torch.float32 else 0.05 * scale
    return Check("logits equal the source's", diff <= tol, f"max |Δ| {diff:.2e} (tolerance {tol:.2e}, "
                 f"{model.dtype}) on {tuple(a.shape)}")


def _beam_check(export_dir: Path, data, sids, beams: int) -> Check:
    if data is None:
        return Check("constrained beam search", False, "--sids needs --data (the items' ids)")
    from lmrec.generative.recommender import GenerativeRecommender

    rec = GenerativeRecommender.load(export_dir, data, sids)
    ex = rec.ds.examples("test").head(16)
    items, _ = rec.beam_search(ex.histories, beams)
    real = items[items >= 0]
    ok = bool(len(real)) and int(real.max()) < len(rec.ds.item_ids)
    return Check("constrained beam search returns real items", ok,
                 f"{len(real)} of {items.numel()} beams decoded to items of the catalog ({len(ex)} users)")
