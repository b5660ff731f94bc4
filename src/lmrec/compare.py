"""``lmrec compare``: several models × several seeds on one prepared dataset, reported as mean ± standard
deviation next to popularity and the random expectation (above both families and the ID baselines, so it
may run any of them).

Every run is an ordinary run directory (``OUT/<model>/seed-<s>``); the summary is ``OUT/compare.json``
(per model: the seeds, each seed's test metrics, their mean and sample standard deviation; under ``paired``
each model's NDCG@10 minus a reference run's over the test users, read from the ranks the runs wrote).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmrec.errors import LmrecError
from lmrec.io import atomic_file

MODELS = ("recformer", "generative", "hybrid", "sasrec", "gru4rec", "fusion")
RUN_ORDER = ("recformer", "sasrec", "gru4rec", "hybrid", "generative", "fusion")  # each after the runs it takes


def check_models(models) -> None:
    """``models`` names at least one model, each one lmrec can compare."""
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise LmrecError(f"--models: unknown {unknown or '(none given)'}; expected some of {', '.join(MODELS)}")


def schemas(models) -> dict[str, type]:
    """Each model's run-configuration type, by name (what its ``--set`` overrides are checked against)."""
    from lmrec.config import FusionRunConfig, GenRunConfig, IdRunConfig, RunConfig

    check_models(models)
    types = {"recformer": RunConfig, "generative": GenRunConfig, "fusion": FusionRunConfig}
    return {m: types.get(m, IdRunConfig) for m in models}


def _recformer(data, out: Path, seed: int, overrides: list[str], log, config=None) -> dict:
    from lmrec.api import finetune

    return finetune(data, output_dir=out, config=config, overrides=[*overrides, f"train.seed={seed}"],
                    log=log).metrics["test"]


def _generative(data, out: Path, seed: int, overrides: list[str], log, config=None) -> dict:
    """Semantic IDs from the same seed's RecFormer or SASRec — whichever validates better (each trained
    first when missing) — then stage 2 as in the quickstart, on a budget like the ID baselines' (GEN_COMPARE:
    more epochs, the best validated state kept) or a preset's (``config``, in place of GEN_COMPARE)."""
    from lmrec.pipeline import GEN_COMPARE, choose_sid_source, generative_pipeline

    trained = {name: _trained(data, out, seed, name, log) for name in ("recformer", "sasrec")}
    return generative_pipeline(data, out, sources=choose_sid_source("auto", trained, log=log), init="codebook",
                               config=config, overrides=[*([] if config else GEN_COMPARE), *overrides,
                                                         f"train.seed={seed}"], log=log)["test"]


def _id_baseline(arch: str):
    def run(data, out: Path, seed: int, overrides: list[str], log, config=None) -> dict:
        from lmrec.config import IdRunConfig, load_config
        from lmrec.idrec.train import train_baseline

        cfg = load_config(config, [f"model.arch={arch}", f"output_dir={out}", *overrides, f"train.seed={seed}"],
                          schema=IdRunConfig)
        return train_baseline(cfg, data, log=log).metrics["test"]

    return run


def _trained(data, out: Path, seed: int, name: str, log) -> tuple[Path, dict]:
    """The same seed's run of ``name`` (recformer or sasrec) next to ``out``, trained first when missing
    (and marked done, so that the comparison's own row for that model reads it back rather than training it
    again): (its model directory, its validation metrics)."""
    run = out.parent.parent / name / f"seed-{seed}"
    saved = json.loads((run / DONE).read_text()) if (run / DONE).exists() else None
    over, preset = (saved.get("overrides", []), saved.get("config")) if saved else ([], None)
    stale = saved is not None and saved.get("settings") != _settings(name, over, preset)
    if stale or not (run / "model" / "items.parquet").exists() or not (run / "metrics.json").exists():
        _run_once(name, data, run, seed, over, preset, log)  # a stale run: again, with its own overrides
    return run / "model", json.loads((run / "metrics.json").read_text())["valid"]


def _hybrid(data, out: Path, seed: int, overrides: list[str], log, config=None) -> dict:
    """SASRec with text, the text from the same seed's RecFormer item table (trained first when missing; it
    validated better than MiniLM's vectors), or from ``model.text_from`` when given."""
    from lmrec.config import IdRunConfig, load_config
    from lmrec.idrec.train import train_baseline
    from lmrec.pipeline import text_vectors

    cfg = load_config(config, ["model.arch=hybrid", f"output_dir={out}", *overrides, f"train.seed={seed}"],
                      schema=IdRunConfig)
    if cfg.model.text_from is None:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"text_from": str(_trained(data, out, seed, "recformer", log)[0])})})
    text = text_vectors(cfg.model.text_from, data, log=log)
    return train_baseline(cfg, data, log=log, text_vectors=text).metrics["test"]


ID_MODELS = ("sasrec", "gru4rec", "hybrid")  # the models the fusion can take as its ID model


def fused_parts(models: list[str], overrides: dict[str, list[str]] | None = None,
                presets: dict[str, str] | None = None) -> dict[str, tuple[list[str], str | None]]:
    """The runs a comparison's fusion takes, name → (overrides, preset) as given for their rows: the
    generative model and the ID model ``fusion:id_model`` names — with ``auto``, every ID model among
    ``models`` (SASRec when there is none)."""
    from lmrec.config import FusionRunConfig, load_config

    overrides, presets = overrides or {}, presets or {}
    cfg = load_config(presets.get("fusion"), list(overrides.get("fusion", [])), schema=FusionRunConfig)
    ids = [cfg.id_model] if cfg.id_model != "auto" else [n for n in ID_MODELS if n in models] or ["sasrec"]
    return {n: (list(overrides.get(n, [])), presets.get(n)) for n in [*ids, "generative"]}


def _fusion(data, out: Path, seed: int, overrides: list[str], log, config=None, parts=None) -> dict:
    """The same seed's ID model(s) and generative model — the comparison's own runs of them, with their
    overrides and presets (``parts``: name → (overrides, preset), :func:`fused_parts`), trained first when
    missing — fused per user with the ID model, rule and weight that validate best (:mod:`lmrec.fusion`)."""
    from lmrec.config import FusionRunConfig, GenRunConfig, IdRunConfig, load_config
    from lmrec.eval.evaluator import RANKS_FILE
    from lmrec.fusion import fuse
    from lmrec.training.distributed import is_main_rank

    cfg = load_config(config, [f"output_dir={out}", *overrides], schema=FusionRunConfig)
    if parts is None:  # called outside a comparison: the ID model the fusion's own settings name (auto: SASRec)
        parts = fused_parts([], {"fusion": list(overrides)}, {"fusion": config} if config else None)
    runs, protocol = {}, {}
    for name, (part_overrides, preset) in parts.items():
        run = out.parent.parent / name / f"seed-{seed}"
        _run_once(name, data, run, seed, part_overrides, preset, log)
        runs[name] = run
        stage = _final_run(name, run)
        protocol[name] = load_config(stage / "run_config.yaml",
                                     schema=GenRunConfig if name == "generative" else IdRunConfig).eval
    gen_eval = protocol["generative"]
    if {e.exclude_history for e in protocol.values()} != {cfg.eval.exclude_history}:
        raise LmrecError(f"fusion: eval.exclude_history is {cfg.eval.exclude_history} here but "
                         + ", ".join(f"{n} {e.exclude_history}" for n, e in protocol.items())
                         + " in the runs it fuses: one protocol for every row (--set eval.exclude_history=... once)")
    result = fuse(data, {n: runs[n] / "model" for n in runs if n != "generative"},
                  runs["generative"] / "stage2" / "model", runs["generative"] / "sids", out / "model",
                  beams=cfg.eval.beams or gen_eval.beams, exclude_history=cfg.eval.exclude_history,
                  weights=cfg.weights, rules=cfg.rules, metric=cfg.eval.metric, ks=cfg.eval.ks,
                  batch_size=cfg.eval.batch_size, log=log,
                  ranks_to=out / RANKS_FILE if is_main_rank() else None)
    metrics = {"model": f"fusion ({result['id_model']} × generative)", **result,
               "parts": {n: str(r) for n, r in runs.items()}}
    atomic_file(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    return result["test"]


# the models that train; the fusion (no training of its own, it takes the runs it fuses) is run by _run_once
RUNNERS: dict[str, Callable] = {"recformer": _recformer, "generative": _generative, "hybrid": _hybrid,
                                "sasrec": _id_baseline("sasrec"), "gru4rec": _id_baseline("gru4rec")}


def summarize(per_seed: list[dict]) -> dict:
    """Mean and sample standard deviation (n − 1; 0 for one seed) of every metric over the seeds."""
    keys = [k for k in per_seed[0] if k not in ("users", "nonfinite")]
    values = {k: np.array([m[k] for m in per_seed], dtype=np.float64) for k in keys}
    out = {"mean": {k: float(v.mean()) for k, v in values.items()},
           "std": {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
           "users": per_seed[0].get("users")}
    nonfinite = sum(m.get("nonfinite", 0) for m in per_seed)  # users with non-finite scores, all seeds together
    return {**out, "nonfinite": nonfinite} if nonfinite else out


DONE = "compare_run.json"
# the same seed's runs a row's run takes (the generative model's semantic IDs from RecFormer or SASRec, the
# hybrid's text from RecFormer; the fusion: the runs it fuses): one of them trained again makes the row stale
INPUTS = {"generative": ("recformer", "sasrec"), "hybrid": ("recformer",)}


def _inputs(name: str, run_dir: Path, overrides: list[str], config, parts: dict | None) -> dict[str, str | None]:
    """A digest of each input run's ``compare_run.json`` (None: no finished run there) as it is now."""
    from lmrec.config import IdRunConfig, load_config

    if name == "fusion":
        deps = list(parts or {})
    elif name == "hybrid" and load_config(config, list(overrides), schema=IdRunConfig).model.text_from is not None:
        deps = []  # its text comes from a model the user named, not from the comparison's RecFormer
    else:
        deps = INPUTS.get(name, ())
    done = {d: run_dir.parent.parent / d / run_dir.name / DONE for d in deps}
    return {d: hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.exists() else None for d, f in done.items()}


def _settings(name: str, overrides: list[str], config) -> str:
    """A digest of the configuration a row's run resolves to — lmrec's defaults, the preset's contents and the
    overrides —, so that a row finished under other defaults (another lmrec) or before its preset file was
    edited is trained again, not read back. Not covered: what is decided outside the run configuration (a
    backbone named by $LMREC_BACKBONE, the embedded default models' shapes, how semantic IDs are built)."""
    from lmrec.config import load_config
    from lmrec.pipeline import GEN_COMPARE

    fixed = {"generative": [] if config else GEN_COMPARE, "sasrec": ["model.arch=sasrec"],
             "gru4rec": ["model.arch=gru4rec"], "hybrid": ["model.arch=hybrid"]}.get(name, [])
    cfg = load_config(config, [*fixed, *overrides], schema=schemas([name])[name])
    if hasattr(getattr(cfg, "model", None), "resolved"):  # the ID models' layers and dropout: by architecture
        cfg = cfg.model_copy(update={"model": cfg.model.resolved()})
    resolved = json.dumps(cfg.model_dump(mode="json", exclude={"output_dir"}), sort_keys=True)
    return hashlib.sha256(resolved.encode()).hexdigest()[:16]


def _run_once(name: str, data, run_dir: Path, seed: int, overrides: list[str], config, log,
              parts: dict | None = None) -> dict:
    """One model × seed; a run that finished before with the same data, seed, preset and overrides (and, for
    the fusion, the same settings of the runs it fuses: ``parts``) is read back instead of trained again (a
    killed comparison goes on where it stopped)."""
    key = {"model": name, "data": str(Path(data).resolve()), "seed": seed, "overrides": list(overrides),
           "config": None if config is None else str(config), "settings": _settings(name, overrides, config)}
    if name == "fusion":
        key["parts"] = {n: [list(o), p] for n, (o, p) in sorted((parts or {}).items())}
    done = run_dir / DONE
    if done.exists():
        saved = json.loads(done.read_text())
        if {k: saved.get(k) for k in key} == key:
            took = saved.get("inputs")  # None: marked done before lmrec recorded what a run took
            changed = [d for d, h in _inputs(name, run_dir, overrides, config, parts).items()
                       if took is not None and h != took.get(d)]
            if not changed:
                log(f"{name} seed {seed}: finished before, read from {done}"
                    + ("" if took is not None or not INPUTS.get(name) else " (the runs it took were not recorded)"))
                return saved["test"]
            log(f"{name} seed {seed}: {', '.join(changed)} trained again since this run took it: training again")
        else:
            other = [k for k in key if saved.get(k) != key[k]]
            log(f"{name} seed {seed}: the run there had other {', '.join(other)}"
                + (" (not recorded by the lmrec that ran it)" if "settings" not in saved else "") + ": training again")
    # the comparison owns its run directories: a run killed before it was marked done is trained again (the
    # mark goes first: a stage of it killed midway, e.g. the generative model's semantic IDs, is never read back)
    done.unlink(missing_ok=True)
    if name == "fusion":  # no training of its own: it writes only its fusion.json and metrics.json
        test = _fusion(data, run_dir, seed, list(overrides), log, config, parts)
    else:
        test = RUNNERS[name](data, run_dir, seed, [*overrides, "train.overwrite=true"], log, config)
    inputs = _inputs(name, run_dir, overrides, config, parts)  # as this run found (or trained) them
    atomic_file(done, lambda tmp: tmp.write_text(json.dumps({**key, "inputs": inputs, "test": test}, indent=2) + "\n"))
    return test


def _final_run(name: str, run_dir: Path) -> Path:
    """The run directory of a row's final model (the generative model: its stage-2 run)."""
    return run_dir / "stage2" if name == "generative" else run_dir


def ranks_gains(path: Path, test: dict, metric: str) -> tuple[tuple | None, str]:
    """((the test users, their targets, each user's ``metric``), "") from a run's ranks file ``path``, or
    (None, why not). The ranks must give every figure the run recorded (``test``): a file left by another run
    is never paired."""
    from lmrec.eval.evaluator import read_ranks
    from lmrec.eval.metrics import compute_metrics, ndcg_per_user

    if metric not in test:
        return None, f"its test metrics have no {metric} (eval.ks)"
    if not path.exists():
        return None, f"no {path.name} in {path.parent} (a run by an lmrec that did not write one)"
    try:
        r = read_ranks(path)
    except LmrecError as e:
        return None, str(e)
    ks = sorted({int(k.split("@")[1]) for k in test if "@" in k})
    again = compute_metrics(r["ranks"], ks)
    differ = [k for k in test if k in again and not np.isclose(again[k], test[k], rtol=0, atol=1e-9)]
    if differ:
        return None, f"{path} gives {differ[0]} {again[differ[0]]:.6f}, not the run's {test[differ[0]]:.6f}"
    return (r["users"], r["targets"], ndcg_per_user(r["ranks"], int(metric.split("@")[1]))), ""


def paired_runs(reference: str, runs: dict[str, list[tuple[Path, dict]]], log, metric: str = "ndcg@10") -> dict:
    """Each row's ``metric`` minus the ``reference`` row's, paired over the test users
    (:func:`~lmrec.eval.metrics.paired_difference`: the user is the unit, each user's difference averaged over
    the seeds). ``runs``: per row, per seed, (its ranks file, its recorded test metrics); a row whose runs left
    no usable ranks gets ``{"missing": why}``."""
    from lmrec.eval.metrics import paired_difference

    def gains(name: str) -> tuple[tuple | None, np.ndarray | None, str]:
        per_seed = [ranks_gains(path, test, metric) for path, test in runs[name]]
        bad = next((why for g, why in per_seed if g is None), "")
        if bad:
            return None, None, bad
        pairs = per_seed[0][0][:2]  # (users, targets)
        if any(not (np.array_equal(u, pairs[0]) and np.array_equal(t, pairs[1])) for (u, t, _), _ in per_seed):
            return None, None, "its seeds' test users or targets differ"
        return pairs, np.stack([g for (_, _, g), _ in per_seed]), ""

    ref_pairs, ref, ref_why = gains(reference)
    models: dict = {}
    for name in (r for r in runs if r != reference):
        pairs, g, why = gains(name) if ref is not None else (None, None, f"the reference {reference}: {ref_why}")
        if g is not None and len(g) != len(ref):
            g, why = None, f"{len(g)} seeds against the reference {reference}'s {len(ref)}"
        if g is not None and not all(np.array_equal(a, b) for a, b in zip(pairs, ref_pairs, strict=True)):
            g, why = None, f"its test users or targets are not {reference}'s"
        models[name] = paired_difference(g, ref) if g is not None else {"missing": why}
        if g is None:
            log(f"{name} − {reference}: no paired interval ({why})")
    return {"reference": reference, "metric": metric, "models": models}


def paired_with(reference: str, done: dict[str, list[dict]], rows: list[str], out: Path, seeds: list[int], log,
                metric: str = "ndcg@10") -> dict:
    """:func:`paired_runs` over the comparison's runs (``OUT/<row>/seed-<s>``; ``done``: each row's test
    metrics per seed; the reference's runs need not be a row of the table)."""
    from lmrec.eval.evaluator import RANKS_FILE

    runs = {name: [(_final_run(name, out / name / f"seed-{s}") / RANKS_FILE, t)
                   for s, t in zip(seeds, done[name], strict=True)] for name in dict.fromkeys([*rows, reference])}
    return paired_runs(reference, runs, log, metric)


def paired_cell(paired: dict, name: str) -> str:
    """A model's cell of the paired column (tables of ``lmrec compare`` and of the results page)."""
    d = paired["models"].get(name, {})
    if "diff" in d:
        return f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
    return "reference" if name == paired["reference"] else "—"


def _check_presets(presets: dict[str, str], models: list[str]) -> None:
    """Every preset names a model the comparison runs and loads as that model's config: before any run
    starts."""
    from lmrec.config import FusionRunConfig, GenRunConfig, IdRunConfig, RunConfig, load_config

    schemas = {"recformer": RunConfig, "generative": GenRunConfig, "fusion": FusionRunConfig}
    for name, config in presets.items():
        if name not in models:
            raise LmrecError(f"--preset {name}:{config}: {name} is not among the compared models")
        load_config(config, schema=schemas.get(name, IdRunConfig))


def compare(data: str | Path, out: str | Path, *, models: list[str], seeds: list[int],
            overrides: dict[str, list[str]] | None = None, presets: dict[str, str] | None = None,
            reference: str | None = "auto", log=print) -> dict:
    """``overrides`` / ``presets``: per model, ``key=value`` overrides and a config (YAML file or preset name,
    e.g. ``recformer-30min``) its runs start from. ``reference``: the run every row's NDCG@10 is paired with
    over the test users (:func:`paired_with`; ``auto``: SASRec when the comparison runs it; None: none)."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.eval.baselines import baselines

    check_models(models)
    if not seeds:
        raise LmrecError("--seeds: give at least one seed")
    ds = PreparedDataset(data)  # bad input fails before any run starts
    # the fusion fuses the comparison's own runs of its models: their settings as given for their rows
    parts = fused_parts(models, overrides, presets) if "fusion" in models else {}
    runs = [*models, *(n for n in parts if n not in models)]  # and the runs it fuses that are no row
    _check_presets(presets or {}, runs)
    stray = sorted(n for n, o in (overrides or {}).items() if o and n not in runs)
    if stray:  # a run others take (e.g. SASRec for the generative model) is a row, a fused run, or untouched
        raise LmrecError(f"overrides for {', '.join(stray)}, which {'is' if len(stray) == 1 else 'are'} not "
                         "among the compared models")
    if reference not in (None, "auto", *runs):
        raise LmrecError(f"--reference {reference}: not among the comparison's runs ({', '.join(runs)}); "
                         "auto (SASRec when it runs) or none")
    if reference == "auto":
        reference = "sasrec" if "sasrec" in runs else None
    out = Path(out)
    result: dict = {"data": str(data), "seeds": seeds, "models": {}}
    # the runs others take first, whatever the order given (the table keeps it)
    done = {name: [_run_once(name, data, out / name / f"seed-{s}", s, (overrides or {}).get(name, []),
                             (presets or {}).get(name), log, parts or None) for s in seeds]
            for name in sorted(runs, key=RUN_ORDER.index)}
    result["models"] = {name: {"per_seed": done[name], **summarize(done[name])} for name in models}
    if reference is not None:
        result["paired"] = paired_with(reference, done, models, out, seeds, log)
    result["baselines"] = baselines(ds, "test")
    out.mkdir(parents=True, exist_ok=True)
    from lmrec.provenance import provenance

    result["provenance"] = provenance()
    atomic_file(out / "compare.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    return result
