"""What every command module shares: the ``lmrec`` app and its command groups, option help texts, and the
small helpers that parse counts and print a run's report."""

from __future__ import annotations

from pathlib import Path

import typer

from lmrec.cli.report import print_metrics
from lmrec.errors import LmrecError
from lmrec.training.distributed import is_main_rank

app = typer.Typer(help="lmrec: sequential recommendation with pretrained language models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
backbone_app = typer.Typer(help="Backbones: initialise RecFormer from one, convert BERT/RoBERTa to long.",
                           no_args_is_help=True)
app.add_typer(backbone_app, name="backbone")
ckpt_app = typer.Typer(help="Checkpoints: convert pretraining checkpoints, reuse one with another tokenizer.",
                       no_args_is_help=True)
app.add_typer(ckpt_app, name="checkpoint")
sid_app = typer.Typer(help="Semantic IDs (itemic tokens) for the generative family.", no_args_is_help=True)
app.add_typer(sid_app, name="sid")
gen_app = typer.Typer(help="Generative recommendation: vocabulary expansion, training stages, beam search.",
                      no_args_is_help=True)
app.add_typer(gen_app, name="gen")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"lmrec {version('lmrec')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print lmrec's version and exit.")) -> None:
    """lmrec: sequential recommendation with pretrained language models."""


RESUME_HELP = ("Continue a killed run exactly: 'auto' (latest checkpoint in the output directory), a run "
               "directory, or one checkpoint directory (.../checkpoints/<stage>/step-N).")
OVERWRITE_HELP = ("Replace what a non-empty output directory holds (refused otherwise). Same as --set "
                  "train.overwrite=true.")
BACKBONE_HELP = ("Local backbone directory (default: $LMREC_BACKBONE, else $MODEL_NAME_OR_PATH, else the embedded "
                 "default).")


DEVICE_HELP = "Where the model runs: auto (the accelerator when one is present, else the CPU) | cpu | cuda | cuda:N."


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _report(metrics: dict, title: str, model_dir: Path, run_dir: Path, model_name: str = "RecFormer") -> None:
    if is_main_rank():  # under torchrun every process runs the command; rank 0 reports
        print_metrics(metrics, title=title, model_name=model_name)
        _print_new_items(metrics, model_name)
        typer.echo(f"model in {model_dir}; metrics in {run_dir / 'metrics.json'}")


def _run_flags(resume_from: str | None, overwrite: bool) -> list[str]:
    """The overrides of the training commands' --resume-from and --overwrite."""
    return [f"train.resume_from={resume_from}"] * bool(resume_from) + ["train.overwrite=true"] * overwrite


SET_HELP = ("KEY=VALUE: a configuration override (repeatable), e.g. --set train.lr=1e-4 (every key: the "
            "documentation's run-configuration reference). Plain KEY=VALUE arguments do the same.")
SET_MODELS_HELP = ("[MODEL:]KEY=VALUE: a configuration override (repeatable). MODEL:KEY=VALUE for one model's "
                   "runs (e.g. sasrec:train.patience=5); KEY=VALUE for every model of the run whose configuration "
                   "has KEY (e.g. eval.exclude_history=true).")


def _split_override(ov: str) -> tuple[str, str, str]:
    """``[MODEL:]KEY=VALUE`` → (model or "", key, value); the model prefix is read before the ``=`` only, so a
    value may hold colons (``model.backbone=C:/models/x``)."""
    head, sep, value = ov.partition("=")
    model, _, key = head.strip().rpartition(":")
    if not sep or not key:
        raise LmrecError(f"--set {ov!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    return model, key, value


def _overrides(sets: list[str] | None, args: list[str] | None = None) -> list[str]:
    """The overrides of a command that trains one model: ``--set KEY=VALUE`` options, then plain KEY=VALUE
    arguments (the older spelling, the same meaning)."""
    out = []
    for ov in [*(sets or []), *(args or [])]:
        model, key, value = _split_override(ov)
        if model:
            raise LmrecError(f"--set {ov!r}: MODEL:KEY=VALUE is for the commands that train several models "
                             f"(quickstart, compare); this one trains one: --set {key}={value}")
        out.append(f"{key}={value}")
    return out


def _per_model(sets: list[str] | None, schemas: dict[str, type]) -> dict[str, list[str]]:
    """``--set [MODEL:]KEY=VALUE`` of a command that trains several models (``schemas``: each model's run
    configuration type, by name) → each model's overrides, in the order given (the last of a key wins)."""
    from lmrec.config import has_key

    per: dict[str, list[str]] = {name: [] for name in schemas}
    for ov in sets or []:
        model, key, value = _split_override(ov)
        if model and model not in schemas:
            raise LmrecError(f"--set {ov!r}: {model!r} is not a model of this run ({', '.join(schemas)})")
        takers = [model] if model else [name for name, schema in schemas.items() if has_key(schema, key)]
        if not takers:
            raise LmrecError(f"--set {ov!r}: no model of this run ({', '.join(schemas)}) has the key {key!r}; "
                             "see the configuration reference")
        for name in takers:
            per[name].append(f"{key}={value}")
    return per


def _one_protocol_check(per_model: dict[str, list[str]]) -> None:
    """One table, one protocol: ``eval.exclude_history`` holds for every model of a table or for none."""
    import yaml

    given = {m: yaml.safe_load(v) for m, ovs in per_model.items() for k, _, v in (o.partition("=") for o in ovs)
             if k == "eval.exclude_history"}
    if given and (set(given) != set(per_model) or len(set(given.values())) > 1):
        raise LmrecError(f"eval.exclude_history must be the same for every model of one table (got {given}): "
                         "give it once, without a model prefix (--set eval.exclude_history=true)")


def _k(value: int, name: str = "-k") -> int:
    """A count the user gave: at least 1."""
    if value < 1:
        raise LmrecError(f"{name} must be at least 1, got {value}")
    return value


def _ks(text: str) -> list[int]:
    """``--ks 10,20,50``: positive integers."""
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise LmrecError(f"--ks {text!r}: expected positive integers separated by commas, e.g. 10,20,50") from None
    if not ks or min(ks) < 1:
        raise LmrecError(f"--ks {text!r}: every cut-off must be at least 1")
    return ks


def _print_new_items(metrics: dict, model_name: str = "RecFormer", others: dict[str, dict] | None = None) -> None:
    """Cold-start splits: the same test users, each target ranked among the items never seen before test time
    (``others``: more models' metrics, by table row, that hold the same protocol)."""
    new = metrics.get("test_new_items")
    if new:
        extra = {name: m["test_new_items"]["test"] for name, m in (others or {}).items() if "test_new_items" in m}
        print_metrics(new, title=f"test targets among the {new['candidates']} new items only", model_name=model_name,
                      extra=extra)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
