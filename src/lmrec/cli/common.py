"""What every command module shares: the ``lmrec`` app and its command groups, option help texts, and the
small helpers that parse counts and print a run's report."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lmrec.cli.report import print_metrics
from lmrec.errors import LmrecError

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
OVERWRITE_HELP = ("Replace what a non-empty output directory holds (refused otherwise). Same as "
                  "train.overwrite=true.")
BACKBONE_HELP = ("Local backbone directory (default: $LMREC_BACKBONE, else $MODEL_NAME_OR_PATH, else the embedded "
                 "default).")


DEVICE_HELP = "Where the model runs: auto (the accelerator when one is present, else the CPU) | cpu | cuda | cuda:N."


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _is_main_rank() -> bool:
    """Under torchrun every process runs the command; only global rank 0 prints the final report."""
    return int(os.environ.get("RANK", "0")) == 0


def _report(metrics: dict, title: str, model_dir: Path, run_dir: Path, model_name: str = "RecFormer") -> None:
    if _is_main_rank():
        print_metrics(metrics, title=title, model_name=model_name)
        _print_new_items(metrics, model_name)
        typer.echo(f"model in {model_dir}; metrics in {run_dir / 'metrics.json'}")


def _run_flags(resume_from: str | None, overwrite: bool) -> list[str]:
    """The overrides of the training commands' --resume-from and --overwrite."""
    return [f"train.resume_from={resume_from}"] * bool(resume_from) + ["train.overwrite=true"] * overwrite


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
