"""A language-model × ID hybrid by late fusion: the generative model's beams and an ID model's (SASRec,
GRU4Rec, or the hybrid: SASRec + item text) full ranking, combined per user by one of two rules::

    mixture  p(item) = (1 − w) · softmax(ID scores)[item] + w · softmax(beam log-probabilities)[item]
    rrf      s(item) = (1 − w) / (61 + rank by the ID model) + w / (61 + rank among the beams)

The ID model scores every item it was trained with; the generative model's ``beams`` best items lift the
items it is sure of — by their probability (renormalised over the beams) in the mixture, by their place in
the list in reciprocal-rank fusion (Cormack, Clarke & Büttcher 2009, constant 60). Outside the beams the ID
model's order stands. An item the ID model never saw gets only the beams' share: with SASRec or GRU4Rec, a
new item is reached only as far as the generative model generates its codes, which on ml-100k's cold split
it rarely did (docs/baselines.md); the hybrid scores new items by their text, so fused with it they keep the
hybrid's order among themselves, but for those the beams hold. The ID model (when several are given), the
rule and the weight are chosen together on the validation split (the weights of
:data:`lmrec.config.FUSION_WEIGHTS`, 0 and 1 included: when one model alone validates best, the fusion is
that model); the test split is read once with them. Why fuse at all: the generative model wins on
transitions the ID model never saw in training and the ID model on the others (Hou et al., arXiv
2603.19809); each model's confidence (mixture) or list position (rrf) says which case a user is.

This module sits above both families (like :mod:`lmrec.pipeline`): they never import each other. On disk
a fused model is a directory holding ``fusion.json`` (the dataset, the two models' and the semantic IDs'
directories — relative to its own, and where they were when fused —, the rule, the weight, the beams, each
rule's validation metric by weight) and the ``lmrec.json`` marker; the two models stay where they are (a run
tree moved or copied as one keeps working, and so does a fused model moved alone). It ranks the catalog of the
dataset it was fused on; the mixture scores every item in item chunks (memory O(users × chunk)), rrf ranks each user's
whole catalog by the ID model at once (O(users × items)).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmrec.config import FUSION_WEIGHTS
from lmrec.errors import LmrecError
from lmrec.eval.evaluator import RankFn
from lmrec.eval.metrics import DEFAULT_KS
from lmrec.eval.ranking import DEFAULT_CHUNK, chunk_ranks, chunk_top_k
from lmrec.io import atomic_dir
from lmrec.modelfiles import ModelFileError, check_format, write_marker

FILE = "fusion.json"
PARTS = ("data", "id_model", "generative_model", "sids")  # the directories a fused model refers to
RULES = ("mixture", "rrf")
RRF_K = 60  # reciprocal-rank fusion's constant (Cormack, Clarke & Büttcher 2009)
# log-probability of an item neither model gives any mass (an item the ID model never saw, outside the beams):
# finite, so that the evaluator does not take it for a diverged model's -inf, and below any real log-probability
LOG_ZERO = -1e30


class _Pool:
    """Candidate items (catalog indices) and each catalog item's position among them (-1: not a candidate)."""

    def __init__(self, items: np.ndarray, num_items: int):
        self.items = torch.as_tensor(np.asarray(items), dtype=torch.long)
        self._pos = torch.full((num_items,), -1, dtype=torch.long)
        self._pos[self.items] = torch.arange(len(self.items))

    def position(self, items: torch.Tensor) -> torch.Tensor:
        return self._pos[items.clamp(min=0)].masked_fill(items < 0, -1)


def is_fused_model(path: str | Path) -> bool:
    return (Path(path) / FILE).is_file()


class FusedRecommender:
    """``id_rec``: an :class:`~lmrec.idrec.recommender.IdRecommender` on its own catalog; ``gen``: a
    :class:`~lmrec.generative.recommender.GenerativeRecommender`, whose dataset's catalog is the one ranked
    (item indices, as the evaluator's)."""

    added = 0  # its catalog never grows: the ID model has no vector for a new item

    def __init__(self, id_rec, gen, *, weight: float, beams: int, rule: str = "mixture",
                 chunk_size: int = DEFAULT_CHUNK):
        if not 0.0 <= weight <= 1.0:
            raise LmrecError(f"the fusion weight must be within [0, 1], got {weight}")
        if beams < 1:
            raise LmrecError(f"the fusion needs at least 1 beam, got {beams}")
        if rule not in RULES:
            raise LmrecError(f"the fusion rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.id_rec, self.gen, self.weight, self.beams, self.chunk_size = id_rec, gen, weight, beams, chunk_size
        self.rule = rule
        self.item_ids, self.item_text = gen.ds.item_ids, gen.ds.item_text
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        # each catalog item's row in the ID model (-1: it never saw the item)
        self.id_rows = torch.as_tensor([id_rec.item_index.get(it, -1) for it in self.item_ids], dtype=torch.long)
        # the fusion's own arithmetic runs on the CPU (each model's forward pass on its own device): small
        # next to the beam search, and one device for every tensor it combines
        self._id_vectors = id_rec.item_vectors().cpu()

    # ------------------------------------------------------------------------------------------ the two parts
    def parts(self, histories: Sequence[Sequence[int]], rules: Sequence[str] | None = None,
              beams: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What fusion needs of one batch of histories (catalog indices), whatever the weight: the ID model's
        user vectors and the log-sum-exp of their scores over the catalog items it knows, the beams' items
        (-1: no item) and their log-probabilities renormalised over the beams (-inf: no item); for ``rrf``
        among ``rules`` (default: this model's rule) also each item's 0-based rank by the ID model (the whole
        (users × items) score matrix at once) and which users' scores of either model were not finite.
        ``beams``: the generative model's (items, log-probabilities) of these histories when already searched
        (one search shared by several ID models)."""
        rows = self.id_rows.numpy()
        known = [rows[np.asarray(h, dtype=np.int64)] for h in histories]
        user = self.id_rec.encode_histories([h[h >= 0] for h in known]).float().cpu()
        rrf = "rrf" in (rules or [self.rule])
        logits = self._id_logits(user, torch.arange(len(self.item_ids))) if rrf else None  # rrf needs them all
        if logits is not None:
            lse = torch.logsumexp(logits, -1)
        else:  # the mixture alone: one item chunk at a time
            lse = torch.full((len(histories),), float("-inf"))
            for start in range(0, len(self.item_ids), self.chunk_size):
                cols = torch.arange(start, min(start + self.chunk_size, len(self.item_ids)))
                lse = torch.logaddexp(lse, torch.logsumexp(self._id_logits(user, cols), -1))
        items, scores = beams if beams is not None else self.gen.beam_search(histories, self.beams)
        items = items.cpu()
        scores = scores.float().cpu().masked_fill(items < 0, float("-inf"))
        norm = torch.logsumexp(scores, -1, keepdim=True)
        out = {"user": user, "lse": lse, "beam_items": items, "beam_logq": scores - norm}
        if logits is not None:
            order = torch.argsort(logits, dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(len(self.item_ids)).expand_as(order).contiguous())
            out["id_rank"] = rank
            out["bad"] = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isnan(scores).any(-1)
        return out

    def _id_logits(self, user: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        rows = self.id_rows[cols]
        logits = user @ self._id_vectors[rows.clamp(min=0)].T
        return logits.masked_fill(rows < 0, float("-inf"))

    @staticmethod
    def _mix(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
        log_w = math.log(weight) if weight > 0 else float("-inf")
        log_1w = math.log1p(-weight) if weight < 1 else float("-inf")
        fused = torch.logaddexp(log_p + log_1w, log_q + log_w)
        # -inf here means "no mass", a tie among such items; NaN (a diverged model's) stays NaN
        return fused.masked_fill(fused == float("-inf"), LOG_ZERO)

    def _scores(self, parts: dict, weight: float, start: int, stop: int, pool: _Pool | None = None,
                rule: str | None = None) -> torch.Tensor:
        """(B, stop − start) fused scores of the items start..stop of the catalog, or of ``pool``: log-probabilities
        (``mixture``) or the log of the reciprocal-rank sum (``rrf``)."""
        cols = torch.arange(start, stop) if pool is None else pool.items[start:stop]
        items = parts["beam_items"]
        pos = items if pool is None else pool.position(items)  # each beam's column in the ranking (-1: none)
        r, c = ((pos >= start) & (pos < stop)).nonzero(as_tuple=True)
        if (rule or self.rule) == "rrf":
            beam = torch.full((len(items), len(cols)), -1, dtype=torch.long)  # each item's place in the beams
            beam[r, pos[r, c] - start] = c
            return self._rrf(parts["id_rank"][:, cols], self.id_rows[cols] >= 0, beam, parts["bad"], weight)
        log_p = self._id_logits(parts["user"], cols) - parts["lse"][:, None]
        log_q = torch.full_like(log_p, float("-inf"))
        log_q[r, pos[r, c] - start] = parts["beam_logq"][r, c]
        return self._mix(log_p, log_q, weight)

    @staticmethod
    def _rrf(id_rank: torch.Tensor, known: torch.Tensor, beam: torch.Tensor, bad: torch.Tensor,
             weight: float) -> torch.Tensor:
        """log((1 − w) / (k + 1 + ID rank) + w / (k + 1 + beam position)), each term 0 where that model does not
        rank the item; NaN for a user with a non-finite score (the evaluator counts them)."""
        ids = torch.where(known, 1.0 / (RRF_K + 1.0 + id_rank.double()), 0.0)
        gen = torch.where(beam >= 0, 1.0 / (RRF_K + 1.0 + beam.double()), 0.0)
        fused = torch.log((1 - weight) * ids + weight * gen).masked_fill(bad.reshape(-1, *[1] * (ids.dim() - 1)),
                                                                         float("nan"))
        return fused.masked_fill(fused == float("-inf"), LOG_ZERO)

    def _target_scores(self, parts: dict, targets: torch.Tensor, weight: float, rule: str | None = None
                       ) -> torch.Tensor:
        """(B,) each row's target's fused score (as :meth:`_scores` gives it, in another kernel)."""
        rows = self.id_rows[targets]
        hit = parts["beam_items"] == targets[:, None]  # an item is in a user's beams once at most
        if (rule or self.rule) == "rrf":
            beam = torch.where(hit.any(-1), hit.int().argmax(-1), -1)
            return self._rrf(parts["id_rank"].gather(1, targets[:, None])[:, 0], rows >= 0, beam, parts["bad"],
                             weight)
        logit = (parts["user"] * self._id_vectors[rows.clamp(min=0)]).sum(-1).masked_fill(rows < 0, float("-inf"))
        log_q = torch.where(hit, parts["beam_logq"], float("-inf")).max(-1).values
        return self._mix(logit - parts["lse"], log_q, weight)

    def ranks(self, parts: dict, histories, targets: np.ndarray, weight: float, exclude_history: bool = False,
              candidates: np.ndarray | None = None, rule: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each target's rank among the catalog's items (or among ``candidates``, item indices: every target
        must be one of them) under ``weight`` — the evaluator's ranks: ties count half — and which users had a
        non-finite score. The probabilities are over the whole catalog either way."""
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        target_scores = self._target_scores(parts, t, weight, rule)
        exclude = [np.asarray(h, dtype=np.int64) for h in histories] if exclude_history else None
        pool = None
        if candidates is not None:
            pool = _Pool(candidates, len(self.item_ids))
            t = pool.position(t)
            if (t < 0).any():
                raise LmrecError(f"{int((t < 0).sum())} target(s) of this batch are not among the "
                                 f"{len(candidates)} candidate items")
            exclude = None if exclude is None else [x[x >= 0] for x in (pool.position(torch.as_tensor(h)).numpy()
                                                                         for h in exclude)]
        n = len(self.item_ids) if pool is None else len(pool.items)
        r, bad = chunk_ranks(lambda start, stop: self._scores(parts, weight, start, stop, pool, rule), n,
                             target_scores, t, exclude=exclude, chunk_size=self.chunk_size, return_nonfinite=True)
        return r.numpy(), bad.numpy()

    # ------------------------------------------------------------------------------------------ the usual calls
    def ready_for(self, item_ids: list[str], item_text=None) -> FusedRecommender:
        """The catalog to rank must be the one the fusion was made on (the generative model's dataset)."""
        if list(item_ids) != list(self.item_ids):
            raise LmrecError(f"a fused model ranks the catalog of the dataset it was fused on ({len(self.item_ids)} "
                             f"items); this dataset's catalog ({len(item_ids)} items) is another one")
        return self

    def rank_fn(self, *, exclude_history: bool = False, candidates: np.ndarray | None = None) -> RankFn:
        return lambda histories, targets: self.ranks(self.parts(histories), histories, targets, self.weight,
                                                     exclude_history, candidates)

    def top_k(self, histories: Sequence[Sequence[int]], k: int, *, exclude_history: bool = True,
              exclude: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused log-probabilities, item indices) of the k best items per history, (B, k) each; ``exclude``
        (items per row) overrides ``exclude_history``."""
        if k < 1:
            raise LmrecError(f"k must be at least 1, got {k}")
        parts = self.parts(histories)
        skip = exclude if exclude is not None else histories if exclude_history else None  # as every recommender's
        return chunk_top_k(lambda start, stop: self._scores(parts, self.weight, start, stop), len(self.item_ids),
                           len(histories), k, exclude=skip, chunk_size=self.chunk_size)

    def recommend(self, history: Sequence[str], k: int = 10, *, exclude_history: bool = True):
        """Item ids (oldest → newest) → [(item_id, text, fused log-probability)] of the k best items."""
        from lmrec.data.dataset import recommendations

        return recommendations(self, history, k, exclude_history)

    # ------------------------------------------------------------------------------------------ on disk
    @classmethod
    def load(cls, path: str | Path, data=None, *, device: str | torch.device = "cpu",
             command: str = "lmrec evaluate") -> FusedRecommender:
        """A fused model directory (``fusion.json``) on the catalog of ``data`` (default: the dataset it was
        fused on), every file of both models checked before any is loaded."""
        spec = read_spec(path)
        return _build(spec["data"] if data is None else data, spec["id_model"], spec["generative_model"],
                      spec["sids"], weight=spec["weight"], beams=spec["beams"], rule=spec["rule"], device=device,
                      command=command, source=Path(path) / FILE)


def _check_id_model(id_model, command: str, where: str) -> None:
    """Every file of the ID model checked; it must be one (SASRec, GRU4Rec, the hybrid), not another
    recommender."""
    from lmrec.modelfiles import check_recommender

    if check_recommender(id_model, command, option=where) != "idrec":
        raise ModelFileError(f"{where} {id_model} is not an ID model (SASRec, GRU4Rec, the hybrid: `lmrec baseline`'s "
                             "…/model)")


def check_fused(path: str | Path, command: str = "lmrec evaluate") -> dict:
    """A fused model directory and every file of the two models and the semantic IDs it names, checked
    without loading any; returns its ``fusion.json``."""
    from lmrec.modelfiles import check_generative, check_sids

    spec = read_spec(path)
    _check_id_model(spec["id_model"], command, f"{Path(path) / FILE}: id_model")
    check_generative(spec["generative_model"], command)
    check_sids(spec["sids"])
    return spec


def _build(data, id_model, generative_model, sids, *, weight: float, beams: int, rule: str = "mixture",
           device="cpu", command: str = "lmrec evaluate", source=None) -> FusedRecommender:
    """The two models loaded (every file of both checked before any is loaded) and fused."""
    from lmrec.generative.recommender import GenerativeRecommender

    _check_id_model(id_model, command, f"{source}: id_model" if source else "the ID model")
    gen = GenerativeRecommender.load(generative_model, data, sids, device=device, command=command)
    return FusedRecommender(_load_id(id_model, device), gen, weight=weight, beams=beams, rule=rule)


def _load_id(id_model, device="cpu"):
    from lmrec.idrec.recommender import IdRecommender
    from lmrec.modelfiles import loading

    with loading(id_model):
        return IdRecommender.from_pretrained(id_model, device=device)


def read_spec(path: str | Path) -> dict:
    """``fusion.json``, checked: every field there, the two models' directories present; the directories it
    names (``PARTS``) are returned resolved: relative to ``path``, else where they were when fused."""

    f = Path(path) / FILE
    if not f.is_file():
        raise ModelFileError(f"{path} is not a fused model: no {FILE} (`lmrec compare` with the fusion row "
                             "writes one, or lmrec.fusion.fuse)")
    check_format(path)
    try:
        spec = json.loads(f.read_text())
    except ValueError as e:
        raise ModelFileError(f"{f}: not JSON ({e})") from None
    need = {"data": str, "id_model": str, "generative_model": str, "sids": str, "rule": str, "weight": (int, float),
            "beams": int, "exclude_history": bool}
    for key, kind in need.items():
        if not isinstance(spec.get(key), kind):
            raise ModelFileError(f"{f}: field {key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    if spec["rule"] not in RULES:
        raise ModelFileError(f"{f}: rule {spec['rule']!r} is not one of {', '.join(RULES)}")
    made_at, prints = spec.get("made_at", {}), spec.get("fingerprints")
    for field, value in (("made_at", made_at), ("fingerprints", prints or {})):
        if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
            raise ModelFileError(f"{f}: field {field!r} is not a mapping of non-empty strings")
    for key in PARTS:
        spec[key] = str(_part(f, key, [Path(path) / spec[key], *([made_at[key]] if key in made_at else [])],
                              (prints or {}).get(key)))
    return spec


def _part(f: Path, key: str, candidates: list[Path | str], fingerprint: str | None) -> Path:
    """The first of ``candidates`` (relative to the fused model's directory, then where it was when fused) that
    is a directory holding what was fused (its ``fingerprint``, when recorded)."""
    dirs = list(dict.fromkeys(Path(d).resolve() for d in candidates if Path(d).is_dir()))  # each read once
    found = next((d for d in dirs if fingerprint is None or _fingerprint(d) == fingerprint), None)
    if found is not None:
        return found
    tried = " or ".join(dict.fromkeys(str(Path(d).resolve()) for d in candidates))
    if dirs:
        raise ModelFileError(f"{f}: {key}: {' and '.join(map(str, dirs))} is not what was fused (its files differ: "
                             "trained again or another run's); fuse again (`lmrec compare` with the fusion row)")
    raise ModelFileError(f"{f}: {key}: {tried} is not a directory (a fused model refers to its two models, their "
                         "semantic IDs and dataset by paths relative to its own directory, else where they were "
                         "when fused; it does not copy them)")


def _fingerprint(d: Path, edge: int = 1 << 16) -> str:
    """What identifies a directory's content, cheaply: each file's name, size and first and last 64 KiB (the
    same for a copy; not for weights trained again, whatever their size)."""
    h = hashlib.sha256()
    for file in sorted(x for x in d.rglob("*") if x.is_file()):
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(edge)
            fh.seek(max(size - edge, len(head)))
            h.update(f"{file.relative_to(d)}:{size}:".encode() + head + fh.read(edge))
    return h.hexdigest()[:16]


def _relative(target: str | Path, start: Path) -> str:
    """``target`` relative to the directory ``start`` will be (``start`` itself may be a link that the atomic
    write replaces); absolute where no relative path exists."""
    try:
        return os.path.relpath(Path(target).resolve(), start.parent.resolve() / start.name)
    except ValueError:  # another drive
        return str(Path(target).resolve())


def _validation_ranks(recs: dict[str, FusedRecommender], valid, rules, weights, exclude_history: bool,
                      batch_size: int) -> dict[tuple[str, str, float], np.ndarray]:
    """Each validation target's rank under every (ID model, rule, weight); the generative model's beams are
    searched once per batch, every ID model ranked from them (``recs`` share one generative model)."""
    first = next(iter(recs.values()))
    ranks = {(n, rule, w): np.empty(len(valid)) for n in recs for rule in rules for w in weights}
    for start in range(0, len(valid), batch_size):
        hist, targets = valid.histories[start:start + batch_size], valid.targets[start:start + batch_size]
        searched = first.gen.beam_search(hist, first.beams)
        for n, rec in recs.items():
            parts = rec.parts(hist, rules, searched)
            for rule, w in ((r, w) for r in rules for w in weights):
                ranks[n, rule, w][start:start + len(hist)] = rec.ranks(parts, hist, targets, w, exclude_history,
                                                                       rule=rule)[0]
    return ranks


def _checked_inputs(id_model, weights: Sequence[float], rules: Sequence[str]) -> dict:
    """``fuse``'s ID models by name (a single unnamed one: None), after its weights, rules and ID models are
    checked."""
    bad = [w for w in weights if not 0.0 <= w <= 1.0]
    if bad or not weights:
        raise LmrecError(f"fusion weights must be within [0, 1], got {list(weights) or '(none)'}")
    if not rules or set(rules) - set(RULES):
        raise LmrecError(f"fusion rules must be some of {', '.join(RULES)}, got {list(rules) or '(none)'}")
    paths = dict(id_model) if isinstance(id_model, dict) else {None: id_model}
    if not paths:
        raise LmrecError("the fusion needs at least one ID model")
    for name, path in paths.items():
        _check_id_model(path, "lmrec compare", f"the ID model {name}" if name else "the ID model")
    return paths


def fuse(data, id_model: str | Path | dict[str, str | Path], generative_model: str | Path, sids: str | Path,
         out: str | Path, *, beams: int = 50, exclude_history: bool = False,
         weights: Sequence[float] = FUSION_WEIGHTS, rules: Sequence[str] = RULES, metric: str = "ndcg@10",
         ks: Sequence[int] = DEFAULT_KS, batch_size: int = 64, ranks_to: str | Path | None = None,
         log=print) -> dict:
    """Choose the ID model (``id_model``: one model directory, or several by name — e.g. SASRec and the
    hybrid), the rule and the weight together on the validation split (``metric``; on a tie the earlier ID
    model, then the earlier rule, then the smaller weight), read the test split once with them, write the
    fused model to ``out`` (``fusion.json``) and return its metrics: ``valid``, ``test``, ``id_model`` (the
    chosen one's name), ``rule``, ``weight``, ``tried`` (by ID model, each rule's validation metric by weight).
    The generative model's beams are searched once per validation user, whatever the number of ID models.
    ``ranks_to``: where to write the test users' ranks (:func:`~lmrec.eval.evaluator.save_ranks`)."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.eval.evaluator import evaluate, save_ranks
    from lmrec.eval.metrics import compute_metrics
    from lmrec.generative.recommender import GenerativeRecommender

    paths = _checked_inputs(id_model, weights, rules)
    ds = PreparedDataset(data)
    gen = GenerativeRecommender.load(generative_model, data, sids, command="lmrec compare")
    recs, dirs = {}, {}  # by name (a single unnamed model: its arch)
    for name, path in paths.items():
        rec = FusedRecommender(_load_id(path), gen, weight=0.0, beams=beams)
        name = name or rec.id_rec.model.config.arch
        recs[name], dirs[name] = rec, path
    ranks = _validation_ranks(recs, ds.examples("valid"), rules, weights, exclude_history, batch_size)
    tried = {key: compute_metrics(r, ks) for key, r in ranks.items()}
    names = list(recs)
    chosen, rule, best = max(tried, key=lambda k: (tried[k][metric], -names.index(k[0]), -list(rules).index(k[1]),
                                                   -k[2]))
    for n in names:
        for r in rules:
            log(f"fusion ({n} × generative, {r}), validation {metric} by the generative model's weight: "
                + ", ".join(f"{w:g} {tried[n, r, w][metric]:.4f}" for w in weights))
    log(f"fusion: {chosen} × generative, {rule} with weight {best:g}")
    rec = recs[chosen]
    rec.rule, rec.weight = rule, best
    examples = ds.examples("test")
    test, ranks = evaluate(rec.rank_fn(exclude_history=exclude_history), examples, ks=ks, batch_size=batch_size,
                           desc="fusion test", return_ranks=True)
    if ranks_to is not None:
        save_ranks(ranks_to, examples, ranks)
    where = dict(zip(PARTS, (data, dirs[chosen], generative_model, sids), strict=True))
    spec = {**{k: _relative(d, Path(out)) for k, d in where.items()}, "id_model_name": chosen,
            "made_at": {k: str(Path(d).resolve()) for k, d in where.items()},
            "fingerprints": {k: _fingerprint(Path(d)) for k, d in where.items()}, "rule": rule, "weight": best,
            "beams": beams, "exclude_history": exclude_history, "metric": metric,
            "tried": {n: {r: {f"{w:g}": tried[n, r, w][metric] for w in weights} for r in rules} for n in names}}

    def write(tmp: Path) -> None:
        (tmp / FILE).write_text(json.dumps(spec, indent=2) + "\n")
        write_marker(tmp, "fusion")

    atomic_dir(out, write)
    return {"valid": tried[chosen, rule, best], "test": test, "id_model": chosen, "rule": rule, "weight": best,
            "tried": spec["tried"]}
