"""Run reports: one self-contained HTML file (plots embedded as PNG) per run or for several runs.

A run directory is what :class:`~lmrec.training.run.Run` leaves: ``metrics.json`` (test metrics, baselines,
the per-epoch ``history``), ``logs/<command>/`` (TensorBoard scalars: loss, learning rate, validation
metrics per step), ``run_config.yaml``. Runs nested in a directory (the quickstart's ``sasrec/`` and
``generative/stage2/``) are found and reported with it. Plots are matplotlib (Agg, no display); the
TensorBoard files are read with TensorBoard's own event reader.

    lmrec report runs/quickstart --out report.html
    lmrec report runs/compare/sasrec/seed-0 runs/compare/recformer/seed-0 --out compare.html
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from lmrec.errors import LmrecError
from lmrec.io import atomic_file

METRICS = ("recall@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50")
NAMES = {"finetune": "RecFormer", "pretrain": "RecFormer pretraining", "pretrain_mlm": "MLM pretraining",
         "baseline_sasrec": "SASRec", "baseline_gru4rec": "GRU4Rec"}


@dataclass
class RunData:
    path: Path
    command: str  # the tracker name: finetune, gen_stage2, baseline_sasrec ...
    metrics: dict
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag → (step, value)
    config: str = ""

    @property
    def name(self) -> str:
        if self.command.startswith("gen_stage"):
            return f"generative (stage {self.command[len('gen_stage'):]})"
        return NAMES.get(self.command, self.command or self.path.name)

    def epochs(self) -> dict[str, list[dict]]:
        """Per-epoch records by stage (``metrics.json``'s history: a list, or a dict of stage → list)."""
        h = self.metrics.get("history")
        if isinstance(h, list):
            return {self.name: h} if h else {}
        return {k: v for k, v in (h or {}).items() if isinstance(v, list) and v}


def _scalars(log_dir: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command, out = "", {}
    for sub in sorted(p for p in log_dir.iterdir() if p.is_dir()) if log_dir.is_dir() else []:
        command = command or sub.name
        acc = EventAccumulator(str(sub), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return command, out


RESULT_FILES = ("metrics.json", "mlm_report.json")  # what a run writes at its end (`backbone pretrain-mlm`: the latter)


def _result_file(path: Path) -> Path | None:
    return next((path / n for n in RESULT_FILES if (path / n).exists()), None)


def read_run(path: str | Path) -> RunData:
    path = Path(path)
    f = _result_file(path)
    if f is None:
        raise LmrecError(f"{path} is not a run directory (no metrics.json): give the directory a training "
                         "command wrote (its --output-dir)")
    from lmrec.modelfiles import check_format, read_json

    check_format(path)
    metrics = read_json(f)  # not JSON, or not an object: one message naming the file
    command, scalars = _scalars(path / "logs")
    config = (path / "run_config.yaml").read_text() if (path / "run_config.yaml").exists() else ""
    return RunData(path, command, metrics, scalars, config)


def find_runs(path: str | Path, depth: int = 2) -> list[RunData]:
    """The run at ``path`` and the runs nested under it (at most ``depth`` levels down)."""
    path = Path(path)
    if not path.is_dir():
        raise LmrecError(f"{path}: no such run directory")
    runs = [read_run(path)] if _result_file(path) is not None else []
    if depth > 0:
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and p.name not in ("logs", "checkpoints", "model")):
            runs += find_runs(sub, depth - 1)
    if not runs and depth == 2:
        raise LmrecError(f"{path} holds no run (no metrics.json in it or below it)")
    return runs


# ---------------------------------------------------------------------------------------------------- plots
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


NO_PLOTS = ("<p class='meta'>No figures: they need matplotlib, an optional dependency "
            "(<code>pip install 'lmrec[report]'</code>).</p>")


def _plt():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed (the report keeps
    its tables and says why it has no figures: a finished training run is never failed by its report)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(run: RunData) -> list[str]:
    """Per stage: training loss and learning rate against the step, validation metrics against the step
    (TensorBoard) or the epoch (history)."""
    plt = _plt()
    if plt is None:
        return []
    stages = sorted({t.split("/")[0] for t in run.scalars if "/" in t})
    images = []
    for st in stages:
        s = {t.split("/", 1)[1]: v for t, v in run.scalars.items() if t.startswith(st + "/")}
        valid = [k for k in s if k.startswith("valid_") and k.split("valid_")[1] in ("ndcg@10", "recall@10", "accuracy",
                                                                                   "loss", "mlm_accuracy", "bpc")]
        panels = [p for p in (("loss", ["loss"]), ("learning rate", ["lr"]), ("validation", valid)) if
                  any(k in s for k in p[1])]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
        for ax, (title, keys) in zip(axes[0], panels):
            for k in keys:
                if k in s:
                    steps, values = zip(*s[k])
                    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=k)
            ax.set_title(f"{st}: {title}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if title == "validation":
                ax.legend(fontsize=8)
        images.append(_png(fig))
    if not images:  # no TensorBoard logs: the per-epoch history
        for st, records in run.epochs().items():
            keys = [k for k in ("loss", "valid_ndcg@10", "valid_recall@10") if any(k in r for r in records)]
            if not keys:
                continue
            fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.0), squeeze=False)
            for ax, k in zip(axes[0], keys):
                pts = [(r["epoch"], r[k]) for r in records if k in r]
                ax.plot(*zip(*pts), marker="o", ms=3)
                ax.set_title(f"{st}: {k}", fontsize=10)
                ax.set_xlabel("epoch")
                ax.grid(alpha=0.3)
            images.append(_png(fig))
    return images


def comparison_plot(rows: list[tuple[str, dict]]) -> str:
    plt = _plt()
    if plt is None:
        return ""
    names = [n for n, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    fig.subplots_adjust(wspace=0.25)
    for ax, m in zip(axes, ("ndcg@10", "recall@10")):
        vals = [r.get(m, 0.0) for _, r in rows]
        bars = ax.barh(names, vals, color=["#4c72b0" if "popularity" not in n and "random" not in n else "#bbbbbb"
                                           for n in names])
        ax.bar_label(bars, fmt="%.4f", fontsize=8, padding=2)
        ax.set_xlim(0, max(vals + [1e-9]) * 1.25)
        ax.set_title(f"test {m}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # shared: the first row on top
    return _png(fig)


def validation_overlay(runs: list[RunData]) -> str | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    drawn = 0
    for run in runs:
        for st, records in run.epochs().items():
            pts = [(r["epoch"], r["valid_ndcg@10"]) for r in records if "valid_ndcg@10" in r]
            if pts:
                label = f"{run.name} · {run.path.name}" + (f" · {st}" if st != run.name else "")
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_title("validation NDCG@10 per epoch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------------------------------------------- tables
def metric_rows(run: RunData) -> list[tuple[str, dict]]:
    """The run's model on test, the models a quickstart adds beside it, then the baselines."""
    m = run.metrics
    rows = [(run.name, m["test"])] if isinstance(m.get("test"), dict) and "ndcg@10" in m["test"] else []
    for key, label in (("sasrec", "SASRec (item IDs)"), ("generative", "generative (semantic IDs)")):
        if isinstance(m.get(key), dict) and isinstance(m[key].get("test"), dict):
            rows.append((label, m[key]["test"]))
    for name, b in (m.get("baselines") or {}).items():
        rows.append(("random (expected)" if name == "random" else name, b))
    return rows


def _table(rows: list[tuple[str, dict]], first: str = "model") -> str:
    cols = [c for c in METRICS if any(c in r for _, r in rows)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [first, *cols, "users"])
    body = "".join("<tr><td>" + html.escape(n) + "</td>" + "".join(
        f"<td>{r[c]:.4f}</td>" if isinstance(r.get(c), int | float) else "<td></td>" for c in cols)
        + f"<td>{r.get('users', '')}</td></tr>" for n, r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:.3em 0}
.meta{color:#666;font-size:.9em}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}"""


def _section(run: RunData) -> str:
    m = run.metrics
    parts = [f"<h2>{html.escape(run.name)} — <code>{html.escape(str(run.path))}</code></h2>"]
    facts = []
    if "wall_time_s" in m:
        facts.append(f"wall time {m['wall_time_s']:.0f} s")
    if "best_epoch" in m:
        facts.append(f"best epoch {m['best_epoch']}")
    if "steps" in m:
        facts.append(f"{m['steps']} steps")
    if facts:
        parts.append(f"<p class='meta'>{' · '.join(facts)}</p>")
    rows = metric_rows(run)
    if rows:
        parts.append("<h3>Test metrics</h3>" + _table(rows))
    images = curves(run)
    if images:
        parts.append("<h3>Training curves</h3>" + "".join(images))
    if run.config:
        parts.append(f"<details><summary>run configuration</summary><pre>{html.escape(run.config)}</pre></details>")
    return "\n".join(parts)


def render(runs: list[RunData], title: str = "lmrec run report") -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p class='meta'>" + ", ".join(html.escape(str(r.path)) for r in runs) + "</p>"]
    if _plt() is None:
        parts.append(NO_PLOTS)
    compared = [(f"{n} · {r.path.name}" if len(runs) > 1 and n == r.name else n, row)
                for r in runs for n, row in metric_rows(r)]
    baseline = ("popularity", "random (expected)")
    seen, unique = set(), []
    for n, row in sorted(compared, key=lambda x: x[0] in baseline):  # the models, then the baselines
        # one row per distinct result: runs on one dataset repeat the baselines, and the quickstart's
        # metrics.json repeats the SASRec and generative results its nested runs report themselves
        key = tuple(round(row[m], 6) if isinstance(row.get(m), int | float) else None for m in METRICS)
        key += (n if n in baseline else "model", row.get("users"))
        if key not in seen:
            seen.add(key)
            unique.append((n, row))
    if len(runs) > 1 and unique:
        parts.append("<h2>Comparison (test)</h2>" + _table(unique) + comparison_plot(unique))
        overlay = validation_overlay(runs)
        if overlay:
            parts.append(overlay)
    parts += [_section(r) for r in runs]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Read the runs (and the runs nested in them), write one HTML file atomically."""
    runs = [r for d in run_dirs for r in find_runs(d)]
    text = render(runs, title or "lmrec run report")
    return atomic_file(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
