"""The run skeleton every training command opens (``finetune``, ``pretrain``, ``backbone pretrain-mlm``,
``gen train``): one place for what they all do around the loop.

    with Run(cfg, "finetune") as run:              # accelerator, run directory, resolved config, barrier,
        ...                                        # TensorBoard trackers
        r = run.fit(model, make_loader, Stage(...)) # the one loop (StreamStage(...) for a stream), with this
                                                    # run's optimizer options and checkpoints (one resume plan
                                                    # for every stage)
        run.finish(metrics)                        # metrics.json written atomically by rank 0

Inputs are validated before a ``Run`` is opened; if a user error (:class:`~lmrec.errors.LmrecError`) still
ends a run that created its directory, the directory is removed: a failed command leaves nothing behind.

A run never writes into a directory that holds something else (an earlier run, another dataset's models):
that is refused unless the run resumes (``train.resume_from``) or replaces it (``train.overwrite``, the
commands' ``--overwrite``), which first empties the directory — all but the run's own inputs (a dataset or
a model the run reads that lies inside it, as the quickstart's ``data/``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from lmrec.config import save_config
from lmrec.errors import LmrecError, TrainingDiverged
from lmrec.io import atomic_file
from lmrec.modelfiles import write_marker
from lmrec.provenance import provenance
from lmrec.training.checkpoints import Checkpointing, Resume
from lmrec.training.loop import FitResult, Optim, Stage, fit, make_accelerator


def _config_paths(cfg) -> list[str]:
    """Every string value of a run config (some are the paths it reads)."""
    out, todo = [], [cfg.model_dump()]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, list | tuple):
            todo.extend(x)
        elif isinstance(x, str):
            out.append(x)
    return out


def check_output_dir(cfg, inputs: tuple = ()) -> list[Path]:
    """What an ``output_dir`` holds that a new run there would replace: [] when it is missing or empty, when
    the run resumes, or when it holds only the run's own inputs (``inputs`` and any path the config names).
    Otherwise, without ``train.overwrite``, a :class:`LmrecError` saying what is there and what to pass."""
    out = Path(cfg.output_dir)
    if not out.is_dir() or cfg.train.resume_from:
        return []
    keep = set()
    for p in [*(str(x) for x in inputs if x is not None), *_config_paths(cfg)]:
        try:
            rel = Path(p).resolve().relative_to(out.resolve())
        except (ValueError, OSError):
            continue
        if rel.parts:
            keep.add(rel.parts[0])
    held = sorted(p for p in out.iterdir() if p.name not in keep)
    if held and not getattr(cfg.train, "overwrite", False):
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in held[:4]) + (", ..." if len(held) > 4 else "")
        raise LmrecError(f"{out} is not empty (it holds {names}): pass --overwrite (train.overwrite=true) to replace "
                         "what it holds, --resume-from auto to continue the run saved there, or another output "
                         "directory")
    return held


class Run:
    def __init__(self, cfg, tracker: str, log: Callable[[str], None] = print, inputs: tuple = ()):
        self.cfg, self.log, self.t0 = cfg, log, time.time()
        self.dir = Path(cfg.output_dir)
        tr = cfg.train
        replaced = check_output_dir(cfg, inputs)  # on every rank, before any rank writes
        self.acc = make_accelerator(tr.mixed_precision, tr.grad_accum, str(self.dir / "logs"), tr.seed, tr.tf32)
        root = self.dir / "checkpoints"
        resume = Resume(root, tr.resume_from)  # a bad --resume-from is refused before the directory is made
        self.acc.wait_for_everyone()
        self._created = not self.dir.exists()
        self._console = None
        if self.is_main:
            for p in replaced:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            if replaced:
                log(f"--overwrite: replaced what {self.dir} held ({len(replaced)} entries)")
            self.dir.mkdir(parents=True, exist_ok=True)
            write_marker(self.dir, "run")
            # a re-run of run_config.yaml asks again before replacing anything
            save_config(cfg.model_copy(update={"train": tr.model_copy(update={"overwrite": False})}),
                        self.dir / "run_config.yaml")
            self._console = _ConsoleLog(self.dir / "train.log")
        self.acc.wait_for_everyone()
        self.acc.init_trackers(tracker)
        self.checkpointing = Checkpointing(root, tr.save_steps, tr.save_total_limit, resume)
        self.optim = Optim.from_train(tr)

    @property
    def loader_workers(self) -> int:
        """DataLoader worker processes for this run (``train.dataloader_workers``)."""
        from lmrec.training.loop import loader_workers

        return loader_workers(self.cfg.train.dataloader_workers, self.acc.device)

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self._console is not None:
            self._console.close()
        if exc is None:
            return
        self.acc.end_training()
        if isinstance(exc, LmrecError) and not isinstance(exc, TrainingDiverged) and self._created and self.is_main:
            shutil.rmtree(self.dir, ignore_errors=True)

    def fit(self, model, make_loader, stage: Stage, global_step: int = 0, fallback: str | None = None) -> FitResult:
        """The loop (epochs for a :class:`Stage`, one pass for a :class:`StreamStage`) with this run's optimizer
        options and checkpoints. A stage that validated and kept no epoch (every validation non-finite: the model
        diverged) stops the run, there being no model to save, unless the caller has a ``fallback`` (what it
        keeps instead, said in the log)."""
        r = fit(self.acc, model, make_loader, stage, optim=self.optim, checkpointing=self.checkpointing,
                global_step=global_step, log=self.log)
        if stage.validate is not None and r.epochs_run > 0 and r.best_epoch < 0:
            n = sum(any(k.startswith("valid_") for k in h) for h in r.history)
            what = (f"{stage.tag}: none of its {n} validation(s) was finite ({stage.metric} NaN or users with "
                    "non-finite scores): the model diverged and no epoch was kept")
            if fallback is None:
                raise LmrecError(f"{what}; lower train.lr or check the data and the backbone")
            self.log(f"warning: {what}; keeping {fallback}")
        return r

    def on_main(self, write: Callable[[], object]) -> None:
        """``write()`` on rank 0, then every rank waits for it (saving a model all ranks read next)."""
        if self.is_main:
            write()
        self.acc.wait_for_everyone()

    def keep_best(self, save: Callable[[Path], object], name: str = "model") -> Callable[[dict, int], None]:
        """An ``on_best`` hook: ``save(run_dir / name)`` on rank 0 (an atomic directory write), then a barrier."""
        return lambda metrics, epoch: self.on_main(lambda: save(self.dir / name))

    def finish(self, metrics: dict, name: str = "metrics.json", test_ranks: tuple | None = None) -> dict:
        """Add the wall time, write ``name`` atomically on rank 0 — after ``test_ranks`` ((test examples, their
        ranks): ``RANKS_FILE``, read by paired comparisons), when given —, close the trackers."""
        metrics["wall_time_s"] = round(time.time() - self.t0, 1)
        metrics["provenance"] = provenance()
        if self.is_main:
            if test_ranks is not None:
                from lmrec.eval.evaluator import RANKS_FILE, save_ranks

                save_ranks(self.dir / RANKS_FILE, *test_ranks)
            text = json.dumps(metrics, indent=2) + "\n"
            atomic_file(self.dir / name, lambda tmp: tmp.write_text(text))
        # every rank leaves together: a rank that closed the process group while a peer was still in a
        # collective (or about to close its own) has aborted in gloo's teardown
        self.acc.wait_for_everyone()
        self.acc.end_training()
        if self.is_main:
            write_run_report(self.dir, self.log)
        return metrics


def write_run_report(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """``run_dir/report.html`` (curves, test metrics; :mod:`lmrec.training.report`), unless ``$LMREC_REPORT``
    is 0. A report that cannot be drawn is a warning: the trained model and its metrics are already saved."""
    import os

    if os.environ.get("LMREC_REPORT", "1") == "0":
        return None
    from lmrec.training.report import write_report

    try:
        out = write_report([run_dir], run_dir / "report.html", title=f"lmrec run report: {run_dir}")
    except Exception as e:  # noqa: BLE001
        log(f"warning: no report.html ({type(e).__name__}: {e})")
        return None
    log(f"report: {out}")
    return out


class _ConsoleLog:
    """The run's console output (stdout and stderr, as printed) also goes to ``train.log`` in the run
    directory while the run is open — what users of ``stdout.log`` / ``stderr.log`` expect. Progress-bar
    redraws (carriage returns) stay on the console only."""

    def __init__(self, path: Path):
        import sys

        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed by close())
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)

    def close(self) -> None:
        import sys

        sys.stdout, sys.stderr = self.saved
        self.file.close()


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        if "\r" not in text and not self.file.closed:
            self.file.write(text)
            self.file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... of the real stream
        return getattr(self.stream, name)
