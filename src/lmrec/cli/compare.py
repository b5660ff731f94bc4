"""Commands that train several models: ``quickstart``, ``baseline`` (SASRec, GRU4Rec, the hybrid) and
``compare`` (models × seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lmrec.cli.common import (
    BACKBONE_HELP,
    OVERWRITE_HELP,
    SET_HELP,
    SET_MODELS_HELP,
    _log,
    _one_protocol_check,
    _overrides,
    _per_model,
    _print_new_items,
    _report,
    _run_flags,
    app,
)
from lmrec.cli.report import print_metrics, print_paired
from lmrec.errors import LmrecError
from lmrec.training.distributed import is_main_rank


def _refuse_an_earlier_run(output_dir: Path, overwrite: bool) -> None:
    """The quickstart's directory holds only its prepared data unless --overwrite replaces the rest."""
    earlier = sorted(p.name for p in output_dir.iterdir() if p.name != "data") if output_dir.is_dir() else []
    if earlier and not overwrite:
        raise LmrecError(f"{output_dir} holds an earlier run ({', '.join(earlier[:4])}"
                         f"{', ...' if len(earlier) > 4 else ''}): pass --overwrite to replace it (the prepared data "
                         "is kept), or another --output-dir")


def _join_metrics(result, added: dict, output_dir: Path) -> dict | None:
    """The quickstart's other models (and, with SASRec, every row's NDCG@10 minus SASRec's paired over the test
    users: :func:`lmrec.compare.paired_runs`) join RecFormer's metrics.json; returns the pairs or None.
    ``added``: :func:`lmrec.pipeline.quickstart_others`'s, its ranks files relative to ``output_dir``."""
    from lmrec.compare import paired_runs
    from lmrec.eval.evaluator import RANKS_FILE
    from lmrec.io import atomic_file

    if not added:
        return None
    more, paired = dict(added), None
    if "sasrec" in added:
        runs = {"recformer": [(result.run_dir / RANKS_FILE, result.metrics["test"])],
                **{name: [(output_dir / m["ranks"], m["test"])] for name, m in added.items()}}
        paired = more["paired"] = paired_runs("sasrec", runs, _log)
    metrics = {**json.loads((result.run_dir / "metrics.json").read_text()), **more}
    atomic_file(result.run_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    return paired


@app.command()
def quickstart(
    output_dir: Path = typer.Option(Path("runs/quickstart"), help="Run directory."),
    backbone: str = typer.Option(None, help=BACKBONE_HELP),
    split: str = typer.Option("loo", help="loo | cold"),
    override: list[str] = typer.Option(None, "--set", help=SET_MODELS_HELP + " Models: recformer, sasrec, hybrid, "
                                                                          "generative."),
    generative: bool = typer.Option(True, help="Also train the generative model (semantic IDs from a trained "
                                               "model's item vectors, embedded tiny Qwen3, stage 2)."),
    gen_override: list[str] = typer.Option(None, "--gen-set", hidden=True,
                                           help="The same as --set generative:KEY=VALUE (the older spelling)."),
    sasrec: bool = typer.Option(True, help="Also train the ID-based SASRec baseline (RecBole's defaults)."),
    hybrid: bool = typer.Option(True, help="Also train the hybrid (SASRec whose items are ID + text vectors, the "
                                           "text from the trained RecFormer's item table, started from the "
                                           "trained SASRec)."),
    sid_source: str = typer.Option("auto", help="The generative model's semantic IDs from: auto (the trained model "
                                                "with the best validation NDCG@10) | recformer | sasrec | fused."),
    overwrite: bool = typer.Option(False, help="Replace an earlier quickstart's models in OUTPUT_DIR (its prepared "
                                               "data is kept)."),
):
    """Prepare MovieLens-100k, finetune RecFormer (and SASRec, the hybrid, the generative model, and the fusion
    of the generative model with SASRec or the hybrid, whichever validates better), evaluate on test, and
    compare with popularity; with SASRec, each model's NDCG@10 minus SASRec's paired over the test users, with
    its 95 % interval."""

    from lmrec.api import finetune, prepare
    from lmrec.compare import schemas
    from lmrec.pipeline import RECFORMER_QUICKSTART, SID_SOURCES, quickstart_others

    if sid_source not in SID_SOURCES or (sid_source in ("sasrec", "fused") and not sasrec):
        raise LmrecError(f"--sid-source {sid_source}: expected one of {', '.join(SID_SOURCES)} (sasrec and fused "
                         "need the SASRec run: drop --no-sasrec)")
    models = ["recformer", *["sasrec"] * sasrec, *["hybrid"] * hybrid, *["generative"] * generative]
    per = _per_model([*(override or []), *(f"generative:{g}" for g in gen_override or [])], schemas(models))
    _one_protocol_check(per)
    data = output_dir / "data" / f"ml-100k-{split}"
    _refuse_an_earlier_run(output_dir, overwrite)
    if not (data / "manifest.json").exists():
        prepare("ml-100k", data, split=split, log=_log)
    _log(f"dataset: {data}")
    ov = [f"model.backbone={backbone}"] if backbone else []
    result = finetune(data, output_dir=output_dir, overrides=RECFORMER_QUICKSTART + ov + per.pop("recformer")
                      + _run_flags(None, overwrite), log=_log)
    extra, walls, added = quickstart_others(data, output_dir, result, sasrec=sasrec, hybrid=hybrid,
                                            generative=generative, sid_source=sid_source, overrides=per, log=_log)
    wall = ", ".join(f"{name} {s:.0f} s" for name, s in {"RecFormer": result.metrics["wall_time_s"], **walls}.items())
    paired = _join_metrics(result, added, output_dir)
    print_metrics(result.metrics, title=f"MovieLens-100k ({split}), test split", extra=extra)
    if paired:
        print_paired(paired, {"recformer": "RecFormer", **{name: m["row"] for name, m in added.items()}})
    _print_new_items(result.metrics, others={"SASRec (item IDs)": added.get("sasrec", {}),
                                             "hybrid (SASRec + text)": added.get("hybrid", {})})
    from lmrec.training.run import write_run_report

    report = write_run_report(result.run_dir, _log)  # again, with the other models' runs
    typer.echo(f"wall time {wall}; metrics in {result.run_dir / 'metrics.json'}; model in {result.model_dir}"
               + (f"; report in {report}" if report else ""))


@app.command()
def baseline(
    arch: str = typer.Argument(..., help="sasrec | gru4rec | hybrid (SASRec whose items are ID + text vectors: "
                                         "model.text_from=RECFORMER_MODEL, default the MiniLM sentence encoder)"),
    data: Path = typer.Option(None, help="Prepared dataset directory (overrides data.path)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config (model / train / eval sections)."),
    output_dir: Path = typer.Option(None, help="Run directory (default: runs/baseline-<arch>)."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    sets: list[str] = typer.Option(None, "--set", help=SET_HELP),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, the same as --set.", hidden=True),
):
    """An ID-based sequential baseline (SASRec or GRU4Rec, RecBole's defaults) trained on every position of
    every training sequence, early-stopped on validation, tested on the same split and evaluator as the
    language-model families, next to popularity."""
    from lmrec.idrec import NAMES

    if arch not in NAMES:  # before torch is imported: a typo is answered at once
        raise LmrecError(f"unknown baseline {arch!r}: expected one of {', '.join(NAMES)}")
    from lmrec.config import IdRunConfig, load_config
    from lmrec.idrec.train import train_baseline
    extra = [f"model.arch={arch}", *_run_flags(None, overwrite)]
    if output_dir is not None or config is None:  # a config file's own output_dir stands unless --output-dir
        extra.append(f"output_dir={output_dir or Path('runs') / f'baseline-{arch}'}")
    cfg = load_config(config, extra + _overrides(sets, overrides), schema=IdRunConfig)
    path = data or cfg.data.path
    if path is None:
        raise LmrecError("no dataset: give --data DIR or data.path in the config (see `lmrec data prepare`)")
    text = None
    if arch == "hybrid":
        from lmrec.data.dataset import PreparedDataset
        from lmrec.pipeline import text_vectors

        PreparedDataset(path)  # a wrong path is one message before anything is encoded
        text = text_vectors(cfg.model.text_from, path, log=_log)
    result = train_baseline(cfg, path, log=_log, text_vectors=text)
    _report(result.metrics, f"{path}: test split, full ranking", result.model_dir, result.run_dir,
            model_name=NAMES[arch])


@app.command()
def compare(
    data: Path = typer.Option(..., help="Prepared dataset directory."),
    models: str = typer.Option("sasrec,gru4rec,recformer", help="Comma-separated: recformer, generative (its "
                                                                "semantic IDs from the same seed's RecFormer or "
                                                                "SASRec, whichever validates better), hybrid "
                                                                "(SASRec + item text), sasrec, gru4rec, fusion "
                                                                "(the same seed's generative run and ID model — "
                                                                "each compared one, the best on valid — combined "
                                                                "per user, rule and weight chosen on valid)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (train.seed of every run)."),
    output_dir: Path = typer.Option(Path("runs/compare"), help="Runs go to OUT/<model>/seed-<s>; the summary "
                                                               "to OUT/compare.json."),
    override: list[str] = typer.Option(None, "--set", help=SET_MODELS_HELP),
    preset: list[str] = typer.Option(None, "--preset", help="MODEL:NAME, a preset (or YAML file) one model's runs "
                                                            "start from (repeatable), e.g. "
                                                            "generative:generative-30min."),
    reference: str = typer.Option("auto", help="The run every model's NDCG@10 is paired with over the test "
                                               "users (the difference and its 95 % interval; the user is the "
                                               "unit, the seeds averaged per user): a model name, auto (sasrec "
                                               "when it runs) or none."),
):
    """Several models × several seeds: mean ± standard deviation of the test metrics next to popularity and
    the random expectation, and each model's NDCG@10 minus SASRec's paired over the test users (95 %
    interval), as a table and OUT/compare.json."""
    from lmrec.cli.report import print_comparison
    from lmrec.compare import compare as run

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise LmrecError(f"--seeds {seeds!r}: expected integers separated by commas, e.g. 0,1,2") from None
    presets: dict[str, str] = {}
    for p in preset or []:
        name, sep, value = p.partition(":")
        if not sep or not value:
            raise LmrecError(f"--preset {p!r}: expected MODEL:NAME, e.g. recformer:recformer-30min")
        presets[name] = value
    names = [m.strip() for m in models.split(",") if m.strip()]
    from lmrec.compare import schemas

    per_model = _per_model(override, schemas(names))  # (schemas refuses an unknown model first)
    _one_protocol_check(per_model)
    result = run(data, output_dir, models=names, seeds=seed_list, overrides=per_model, presets=presets,
                 reference=None if reference == "none" else reference, log=_log)
    if is_main_rank():
        print_comparison(result)
        typer.echo(f"summary in {output_dir / 'compare.json'}")
