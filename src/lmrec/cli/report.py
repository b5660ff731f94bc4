"""Terminal reports (rich tables) for metrics and recommendations."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

COLUMNS = ("recall@10", "ndcg@10", "mrr@10", "mrr")


def print_metrics(metrics: dict, title: str = "metrics", console: Console | None = None,
                  model_name: str = "RecFormer", extra: dict[str, dict] | None = None) -> None:
    """One row per model: the recommender (``metrics["test"]``) and each baseline."""
    console = console or Console()
    table = Table(title=title)
    table.add_column("model")
    for c in COLUMNS:
        table.add_column(c, justify="right")
    table.add_column("users", justify="right")
    rows = [(model_name, metrics["test"])] + list((extra or {}).items())
    rows += [("random (expected)" if k == "random" else k, v) for k, v in metrics.get("baselines", {}).items()]
    for name, m in rows:
        table.add_row(name, *[f"{m.get(c, float('nan')):.4f}" for c in COLUMNS], str(m.get("users", "")))
    console.print(table)
    for name, m in rows:
        if m.get("nonfinite"):
            console.print(f"[red]warning: {name}: {m['nonfinite']} of {m['users']} users had non-finite scores "
                          "(NaN or infinite: the model diverged or its weights are broken); they rank last[/]")


def print_paired(paired: dict, labels: dict[str, str], console: Console | None = None) -> None:
    """Each model's metric minus the reference's, paired over the test users (:func:`lmrec.compare.paired_runs`),
    one row per model under its table label (``labels``: model → label), the reference's own row first."""
    console = console or Console()
    ref = paired["reference"]
    users = next((d["users"] for d in paired["models"].values() if "users" in d), None)
    table = Table(title=f"{paired['metric']} minus {labels.get(ref, ref)}'s, paired over "
                        f"{f'the {users} ' if users else 'the '}test users")
    for c in ("model", f"{paired['metric']} difference", "95 % interval"):
        table.add_column(c, justify="left" if c == "model" else "right")
    table.add_row(labels.get(ref, ref), "reference", "")
    for name, d in paired["models"].items():
        cells = [f"{d['diff']:+.4f}", f"[{d['low']:+.4f}, {d['high']:+.4f}]"] if "diff" in d else ["—", ""]
        table.add_row(labels.get(name, name), *cells)
    console.print(table)
    for name, d in paired["models"].items():
        if "missing" in d:
            console.print(f"{labels.get(name, name)}: no paired figure ({d['missing']})")


def print_recommendations(recs, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="recommendations")
    for c in ("#", "item", "text", "score"):
        table.add_column(c, justify="right" if c in ("#", "score") else "left")
    for r, (item, text, score) in enumerate(recs, start=1):
        table.add_row(str(r), item, " | ".join(f"{k}: {v}" for k, v in text), f"{score:.3f}")
    console.print(table)


def print_init_report(report, console: Console | None = None, verbose: bool = False) -> None:
    """Counts per status, then every tensor that is not a plain copy (all of them with ``verbose``)."""
    console = console or Console()
    table = Table(title="initialisation report")
    table.add_column("status", no_wrap=True)
    table.add_column("tensor", overflow="fold")
    table.add_column("note", overflow="fold")
    style = {"missing": "red", "wrong_size": "red", "derived": "cyan", "new": "yellow", "unused": "dim"}
    for status, name, note in report.rows():
        if status == "copied" and not verbose:
            continue
        if note.startswith("UNEXPECTED"):
            status = "unexpected"
        table.add_row(f"[{style.get(status, '')}]{status}[/]" if status in style else status, name, note)
    console.print(table)
    console.print("  ".join(f"{k}: {v}" for k, v in report.counts().items()))


def print_checks(checks, console: Console | None = None, title: str = "lmrec doctor") -> None:
    console = console or Console()
    table = Table(title=title)
    table.add_column("check")
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for c in checks:
        result = "[green]PASS[/]" if c.ok else ("[dim]skip[/]" if c.ok is None else "[red]FAIL[/]")
        table.add_row(c.name, result, c.detail)
    console.print(table)


def print_comparison(result: dict, console: Console | None = None, metrics=("ndcg@10", "recall@10", "mrr")) -> None:
    """``lmrec compare``: mean ± standard deviation over the seeds per model — and, with a reference run, each
    model's NDCG@10 minus the reference's paired over the test users with its 95 % interval —, then the
    non-learned baselines."""
    from lmrec.compare import paired_cell

    console = console or Console()
    n = len(result["seeds"])
    paired = result.get("paired")
    table = Table(title=f"{result['data']}: test split, mean ± std over {n} seed{'s' if n > 1 else ''}")
    table.add_column("model")
    for c in metrics:
        table.add_column(c, justify="right")
    if paired:
        table.add_column(f"{paired['metric']} − {paired['reference']} [95 % over users]", justify="right")
    for name, r in result["models"].items():
        diff = [paired_cell(paired, name)] if paired else []
        table.add_row(name, *[f"{r['mean'][c]:.4f} ± {r['std'][c]:.4f}" for c in metrics], *diff)
    for name, m in result["baselines"].items():
        table.add_row("random (expected)" if name == "random" else name, *[f"{m[c]:.4f}" for c in metrics],
                      *([""] if paired else []))
    console.print(table)
