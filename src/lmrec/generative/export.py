"""``lmrec gen export`` and ``lmrec gen check-model``: a training checkpoint (or a trained model directory)
→ a Hugging Face directory every engine reads, and a check of it that can fail.

The export is ``save_pretrained`` of the model in fp32 (the default: the training's master weights, so an
export ranks exactly as the model it came from) or bf16 on request (half the size; ranks may change, and
``check-model`` says by how much), as safetensors shards + index, its config, the tokenizer with the chat
template, ``sid_vocab.json`` and ``prompt_config.json``, written atomically. A checkpoint
(``.../checkpoints/<stage>/step-N``, of a DDP run or a sharded ``train.fsdp`` one, read here in one process
whatever the number that wrote it) holds only weights: the architecture, tokenizer and token layout come from
the model the run started from (recorded in the run directory, or ``--base``); every weight the model has
must be in it, except a head tied to the embeddings.

``check-model`` is what a conversion test should be: it loads the export with ``AutoModelForCausalLM``,
compares its logits on a fixed batch with the source's (fp32: ≤ 1e-4 absolute; bf16: the source cast to
bf16, ≤ 5 % of the logits' scale), checks that constrained beam search returns only real items (with
``--sids``), and with ``--data`` ranks the test users with the export and with the source (fp32, same
prompts): a metric that moves by more than ``--metric-tolerance`` (default 2 %) of the source's value fails.
Logits within tolerance do not imply equal rankings — beam search turns small differences into different
beams — so the metrics are compared themselves; the tolerance is relative because what matters is the
share of the model's quality an export loses, and 2 % is below the change a user would act on yet far above
an fp32 export's (none: the same ranks). Any failed check is a non-zero exit.
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
from lmrec.modelfiles import check_checkpoint, check_generative, loading, read_json, write_marker
from lmrec.training.checkpoints import SHARDED
from lmrec.training.fsdp import load_sharded_weights

SOURCE = "source_model.json"  # written by gen train into its run directory: where the run started from
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# check-model's ranking check: the largest change of a metric, relative to the source's value, that passes
METRIC_TOLERANCE = 0.02


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped
    detail: str
    metrics: dict | None = None  # the ranking check's {"test", "source", "baselines"} metrics


def _source_of(ckpt: Path, base: Path | None) -> Path:
    """The model a checkpoint's run started from: ``--base``, else the run's ``source_model.json``."""
    if base is not None:
        return base
    for d in (ckpt, *ckpt.parents):
        if (d / SOURCE).exists():
            model = read_json(d / SOURCE).get("model")
            if not isinstance(model, str):
                raise LmrecError(f"{d / SOURCE}: no 'model' (the directory the run started from); give --base DIR")
            return Path(model)
    raise LmrecError(f"{ckpt}: cannot tell which model this checkpoint's run started from; give --base DIR "
                     "(the expanded model or the previous stage's model)")


def load_source(ckpt: str | Path, base: str | Path | None = None, command: str = "lmrec gen export",
                option: str = "CHECKPOINT"):
    """(model, tokenizer, directory with sid_vocab.json) of a trained model directory or a checkpoint."""
    ckpt = Path(ckpt)
    if (ckpt / "config.json").exists() or (ckpt / "adapter_config.json").exists():
        check_generative(ckpt, command, option=option)  # every file checked before any is loaded
        with loading(ckpt):
            if (ckpt / "adapter_config.json").exists():
                from lmrec.generative.recommender import load_generative

                model, tok = load_generative(ckpt, dtype=torch.float32)
                return model.merge_and_unload(), tok, ckpt
            model, tok = load_lm(ckpt, dtype=torch.float32)
        return model, tok, ckpt
    weights = ckpt / "model.safetensors"
    if not weights.exists() and not (ckpt / SHARDED).is_dir():
        raise LmrecError(f"{ckpt}: neither a model directory (config.json) nor a checkpoint (model.safetensors, "
                         f"or {SHARDED}/ of a sharded run)")
    check_checkpoint(ckpt, resume=False)
    src = check_generative(_source_of(ckpt, Path(base) if base else None), command, option="--base")
    with loading(src):
        model, tok = load_lm(src, dtype=torch.float32)  # the checkpoint's fp32 master weights are loaded into it
    if (ckpt / SHARDED).is_dir():  # a train.fsdp checkpoint: read its shards in this one process
        with loading(ckpt / SHARDED):
            load_sharded_weights(ckpt / SHARDED, model)
        return model, tok, src
    with loading(weights):
        state = {k.removeprefix("lm."): v for k, v in load_file(str(weights)).items()}  # ChunkedLossLM: lm.*
    missing, unexpected = model.load_state_dict(state, strict=False)
    # only a tied head may be absent (it is the embedding matrix); an untied one would silently stay the base's
    missing = [k for k in missing if k not in (getattr(model, "all_tied_weights_keys", None) or {})]
    if missing or unexpected:
        raise LmrecError(f"{weights} does not fit {src}: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         "(a LoRA run: export its model/ directory instead)")
    model.tie_weights()
    return model, tok, src


def export_model(ckpt: str | Path, out: str | Path, *, base: str | Path | None = None, dtype: str = "fp32",
                 max_shard_size: str = "2GB") -> Path:
    if dtype not in DTYPES:
        raise LmrecError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, tok, meta_dir = load_source(ckpt, base)  # checked file by file before anything is written
    read_meta(meta_dir)  # an export without its token layout could not decode items

    def write(tmp: Path) -> None:
        model.to(DTYPES[dtype]).save_pretrained(str(tmp), max_shard_size=max_shard_size)
        tok.save_pretrained(str(tmp))
        (tmp / META).write_text((Path(meta_dir) / META).read_text())
        prompt = Path(meta_dir) / PROMPT_CONFIG
        if prompt.exists():
            (tmp / PROMPT_CONFIG).write_text(prompt.read_text())
        (tmp / "export_info.json").write_text(json.dumps({"source": str(ckpt), "dtype": dtype}) + "\n")
        write_marker(tmp, "generative")

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
                data: str | Path | None = None, sids: str | Path | None = None, beams: int = 10,
                metric_tolerance: float = METRIC_TOLERANCE) -> list[Check]:
    """The checks of an export (see the module's doc). With ``data`` and ``sids``, the last one ranks the
    test users with the export and, given ``source``, with the source in fp32 (the same prompts and
    users): it fails when a metric moves by more than ``metric_tolerance`` of the source's value, and
    carries both metrics (``Check.metrics``) for the caller to print."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file():  # never read as a hub id: nothing is downloaded
        raise LmrecError(f"{export_dir}: " + ("no such directory" if not export_dir.exists() else
                                              "not a model directory (no config.json)"))
    if metric_tolerance < 0:
        raise LmrecError(f"--metric-tolerance must be at least 0, got {metric_tolerance}")
    check_generative(export_dir, "lmrec gen check-model", option="EXPORT")  # a broken export: one message, exit 2
    try:  # in the export's own dtype ("auto"): what an engine reading it computes
        model = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
        tok = AutoTokenizer.from_pretrained(str(export_dir))
        meta = read_meta(export_dir)
    except (OSError, ValueError, LmrecError) as e:
        return [Check("load with AutoModelForCausalLM", False, f"{type(e).__name__}: {str(e)[:300]}")]
    checks = [Check("load with AutoModelForCausalLM", True, f"{type(model).__name__}, {model.dtype}, "
                    f"vocabulary {model.get_input_embeddings().weight.shape[0]:,}")]
    reference = (load_source(source, base, "lmrec gen check-model", "--source")[0].eval() if source is not None
                 else None)
    ranking: list[Check] = []
    if sids is not None and data is None:
        ranking.append(Check("constrained beam search", False, "--sids needs --data (the items' ids)"))
    elif sids is not None:  # before the logits check, which casts the reference to the export's dtype
        rec = _recommender(model, tok, meta, export_dir, data, sids)
        ranking += [_beam_check(rec, beams), _metrics_check(rec, reference, beams, metric_tolerance)]
    if reference is not None:
        checks.append(_logits_check(model, reference, _fixed_batch(tok, meta)))
    return checks + ranking


@torch.no_grad()
def _logits_check(model, reference, batch) -> Check:
    reference = reference.to(model.dtype).eval()
    a, b = model(**batch).logits.float(), reference(**batch).logits.float()
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    tol = 1e-4 if model.dtype == torch.float32 else 0.05 * scale
    return Check("logits equal the source's", diff <= tol, f"max |Δ| {diff:.2e} (tolerance {tol:.2e}, "
                 f"{model.dtype}) on {tuple(a.shape)}")


def _recommender(model, tok, meta: dict, export_dir: Path, data, sids):
    """The export as a recommender (the model already loaded), with the prompt format it carries."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.generative.prompts import PromptFormat
    from lmrec.generative.recommender import GenerativeRecommender
    from lmrec.generative.samples import align_sids
    from lmrec.generative.sid import SemanticIds

    ds = PreparedDataset(data)
    return GenerativeRecommender(model, tok, meta, align_sids(ds, SemanticIds.load(sids)), ds,
                                 PromptFormat.load(export_dir))


def _beam_check(rec, beams: int) -> Check:
    ex = rec.ds.examples("test").head(16)
    items, _ = rec.beam_search(ex.histories, beams)
    real = items[items >= 0]
    ok = bool(len(real)) and int(real.max()) < len(rec.ds.item_ids)
    return Check("constrained beam search returns real items", ok,
                 f"{len(real)} of {items.numel()} beams decoded to items of the catalog ({len(ex)} users)")


def _metrics_check(rec, reference, beams: int, tolerance: float) -> Check:
    """The export's test metrics; with the source (fp32) ranked on the same users and prompts, the change."""
    from lmrec.eval.baselines import baselines
    from lmrec.eval.evaluator import evaluate
    from lmrec.generative.recommender import GenerativeRecommender

    ex, name = rec.ds.examples("test"), "ranking metrics equal the source's"
    got, ranks = evaluate(rec.rank_fn(beams), ex, desc="export", return_ranks=True)
    metrics = {"test": got, "baselines": baselines(rec.ds, "test")}
    if reference is None:
        return Check(name, None, "not compared: give --source (the checkpoint or model exported)", metrics)
    src = GenerativeRecommender(reference.float(), rec.tokenizer, rec.meta, rec.sids, rec.ds, rec.fmt)
    want, src_ranks = evaluate(src.rank_fn(beams), ex, desc="source", return_ranks=True)
    metrics["source"] = want
    keys = [k for k in want if k != "users"]
    change = {k: got[k] - want[k] for k in keys}
    bad = sorted((k for k in keys if abs(change[k]) > tolerance * abs(want[k])),
                 key=lambda k: -abs(change[k]) / max(abs(want[k]), 1e-12))
    moved = int((ranks != src_ranks).sum())
    shown = bad[:3] or [k for k in keys if k.startswith("ndcg@")][:1] + ["mrr"]
    detail = ", ".join(f"{k} {want[k]:.4f} → {got[k]:.4f} ({_relative(change[k], want[k])})" for k in shown)
    detail += f" and {len(bad) - 3} more beyond the tolerance" if len(bad) > 3 else ""
    return Check(name, not bad, f"{detail}; {moved} of {len(ex)} test users' target rank changed ({rec.model.dtype} "
                 f"export vs the fp32 source, {beams} beams; tolerance {tolerance:.0%} of each metric)", metrics)


def _relative(change: float, ref: float) -> str:
    if change == 0:
        return "unchanged"
    return f"{change:+.4f}" if ref == 0 else f"{change / ref:+.1%}"
