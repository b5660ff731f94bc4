"""``lmrec doctor``: the validation flow of a new backbone as one command (seed 000 §6).

1. static load: config → RecFormer config, tokenizer, model; one forward on a small batch of item text;
2. the init report: every tensor copied, derived or new by design; none missing, mis-shaped or unexplained;
3. (``pretrain_steps``) a pretraining smoke run on one fixed batch: MLM + contrastive loss goes down;
4. (``finetune_epochs``) a finetuning smoke run on a prepared dataset: it keeps a model whose scores are
   finite for every test user (a diverged run stops with its message; the check fails with it).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmrec.errors import LmrecError
from lmrec.modelfiles import check_format, check_weights, read_json

# A small mixed batch: English, Chinese (full-width punctuation), mixed Chinese/Latin titles.
SAMPLE_ITEMS = [
    [("title", "Toy Story"), ("year", "1995"), ("genres", "Animation Children's Comedy")],
    [("title", "GoldenEye"), ("year", "1995"), ("genres", "Action Adventure Thriller")],
    [("标题", "小米手机 Redmi Note 12（8GB+256GB）"), ("品牌", "小米"), ("类目", "手机，数码")],
    [("标题", "北京烤鸭礼盒装：真空包装！"), ("品牌", "全聚德"), ("类目", "食品")],
    [("标题", "三体：地球往事"), ("品牌", "重庆出版社"), ("类目", "图书、科幻")],
    [("title", "Heat"), ("year", "1995"), ("genres", "Action Crime Thriller")],
]


@dataclass
class Check:
    name: str
    ok: bool | None  # None = skipped
    detail: str


def _mask(ids: torch.Tensor, attention: torch.Tensor, mask_id: int, specials: set[int], g: torch.Generator,
          p: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level masking for the smoke run (whole-word masking is in the pretraining pipeline)."""
    can = attention.bool() & ~torch.isin(ids, torch.tensor(sorted(specials)))
    chosen = (torch.rand(ids.shape, generator=g) < p) & can
    chosen[0, 1] |= bool(can[0, 1])  # at least one masked token
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return torch.where(chosen, torch.full_like(ids, mask_id), ids), labels


def pretrain_smoke(model, tokenizer, steps: int, lr: float = 1e-4, seed: int = 0) -> tuple[float, float]:
    """Train ``steps`` steps on one fixed batch (history → next item pairs of SAMPLE_ITEMS, 15% masked);
    returns (loss before, loss after) on that batch. Dropout is off so that the losses are comparable."""
    tok = tokenizer.tokenizer
    mask_id = tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id
    specials = {i for i in (tok.pad_token_id, tokenizer.start_token_id, tok.sep_token_id, tok.cls_token_id,
                            tok.bos_token_id, tok.eos_token_id) if i is not None}
    items = tokenizer.encode_items(SAMPLE_ITEMS)
    g = torch.Generator().manual_seed(seed)
    hist = tokenizer.pad([tokenizer.build_sequence(items[max(0, i - 2):i]) for i in range(1, len(items))])
    tgt = tokenizer.pad([tokenizer.build_sequence([items[i]]) for i in range(1, len(items))])
    hist["input_ids"], hist["mlm_labels"] = _mask(hist["input_ids"], hist["attention_mask"], mask_id, specials, g)
    tgt["input_ids"], tgt["mlm_labels"] = _mask(tgt["input_ids"], tgt["attention_mask"], mask_id, specials, g)
    model.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(**hist, item_inputs=tgt, gather=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    with torch.no_grad():
        losses.append(model(**hist, item_inputs=tgt, gather=False).loss.item())
    return losses[0], losses[-1]


def _check_inputs(backbone: Path, data) -> None:
    """A wrong path or a damaged file is bad input (exit 2, one message naming it), not a failed check."""
    if not (backbone / "config.json").is_file():
        raise LmrecError(f"--backbone {backbone}: " + ("no such directory" if not backbone.exists() else
                                                       "not a model directory (no config.json)"))
    if data is not None and not (Path(data) / "manifest.json").is_file():
        raise LmrecError(f"--data {data}: not a prepared dataset (no manifest.json; see `lmrec data prepare`)")
    check_format(backbone)
    check_weights(backbone, read_json(backbone / "config.json"))


def run_doctor(backbone: str | Path, *, pretrain_steps: int = 0, finetune_epochs: int = 0,
               data: str | Path | None = None, max_token_num: int | None = None, log=print) -> list[Check]:
    from lmrec.recformer.backbones import build_recformer, detect_layout, read_backbone
    from lmrec.recformer.modeling_recformer import RecformerForPretraining

    checks: list[Check] = []
    backbone = Path(backbone)
    _check_inputs(backbone, data)
    overrides = {"max_token_num": max_token_num or 256, "max_item_embeddings": 51}
    # 1. static load + one forward
    try:
        cfg, state = read_backbone(backbone)
        layout = detect_layout(cfg, state)
        overrides["max_token_num"] = min(overrides["max_token_num"],
                                         int(cfg.get("max_position_embeddings", 512)) - layout.position_offset)
        if layout.name == "recformer":  # an lmrec checkpoint keeps its own sizes
            overrides = {"max_token_num": max_token_num} if max_token_num else {}
        t = time.time()
        model, tokenizer, report = build_recformer(backbone, model_cls=RecformerForPretraining, **overrides)
        batch = tokenizer([[it] for it in SAMPLE_ITEMS] + [SAMPLE_ITEMS[:3], SAMPLE_ITEMS[2:]])
        model.eval()
        with torch.no_grad():
            out = model.longformer(**batch)
        h = out.last_hidden_state
        finite = bool(torch.isfinite(h).all())
        unk = tokenizer.tokenizer.unk_token_id
        unk_share = float((batch["input_ids"] == unk).sum() / batch["attention_mask"].sum()) if unk is not None else 0
        start = tokenizer.tokenizer.convert_ids_to_tokens(tokenizer.start_token_id)
        checks.append(Check("static load + forward", finite,
                            f"layout {layout.name} (positions from {layout.position_offset}), "
                            f"{type(tokenizer.tokenizer).__name__} start {start!r}, "
                            f"{cfg.get('num_hidden_layers')} layers × {cfg.get('hidden_size')}, attention_window "
                            f"{model.config.attention_window}; hidden states {tuple(h.shape)}"
                            f"{' finite' if finite else ' NOT FINITE'}; {unk_share:.0%} unknown tokens in the sample "
                            f"text; {time.time() - t:.1f} s"))
    except LmrecError as e:
        checks.append(Check("static load + forward", False, str(e)))
        return checks
    # 2. init report
    problems = report.problems()
    counts = ", ".join(f"{v} {k}" for k, v in report.counts().items())
    checks.append(Check("init report", not problems, counts + ("; " + "; ".join(problems[:6]) if problems else "")))
    # 3. pretraining smoke run
    if pretrain_steps > 0:
        torch.manual_seed(0)
        first, last = pretrain_smoke(model, tokenizer, pretrain_steps)
        ok = math.isfinite(last) and last < first
        checks.append(Check(f"pretrain {pretrain_steps} steps", ok, f"loss {first:.4f} → {last:.4f}"))
    else:
        checks.append(Check("pretrain smoke run", None, "skipped (--pretrain-steps N)"))
    # 4. finetuning smoke run
    if finetune_epochs > 0:
        checks.append(_finetune_smoke(backbone, finetune_epochs, data, model.config.max_token_num, log))
    else:
        checks.append(Check("finetune smoke run", None, "skipped (--finetune-epochs N)"))
    return checks


def _finetune_smoke(backbone: Path, epochs: int, data, max_token_num: int, log) -> Check:
    from lmrec.config import load_config
    from lmrec.recformer.finetune import finetune

    name = f"finetune {epochs} epoch(s)"
    with tempfile.TemporaryDirectory(prefix="lmrec-doctor-") as tmp:
        if data is None:
            from lmrec.data.prepare import PrepareOptions, prepare
            from lmrec.data.sources import load_ml100k

            data = prepare(load_ml100k(log), Path(tmp) / "ml-100k", PrepareOptions())
        cfg = load_config("recformer", [f"output_dir={tmp}/run", f"model.backbone={backbone}",
                                        f"model.max_token_num={min(max_token_num, 128)}",
                                        f"train.stage1_epochs={epochs}", "train.stage2_epochs=0",
                                        "train.item_grad=batch", "train.batch_size=32", "train.lr=1e-4"])
        try:
            metrics = finetune(cfg, data, log=log).metrics
        except LmrecError as e:
            return Check(name, False, str(e))
    test = metrics["test"]
    # non-finite scores rank last, so the metrics themselves stay finite: the evaluator's count says it
    bad = test.get("nonfinite", 0)
    finite = not bad and all(math.isfinite(v) for k, v in test.items() if k != "users")
    return Check(name, finite, ", ".join(f"{k} {test[k]:.4f}" for k in ("recall@10", "ndcg@10", "mrr"))
                 + f" on {test['users']} users" + ("" if finite else f" — NOT FINITE ({bad} users with non-finite "
                                                                     "scores)"))
