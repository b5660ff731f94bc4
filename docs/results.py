"""The results page, generated from run outputs: each figure with its date, commit, hardware and command.

    python docs/results.py add RUN/compare.json --name compare-ml100k --title "..."   # or a run's metrics.json
    python bench/bench_beam.py --record beam.json && python docs/results.py add beam.json --name beam-cpu
    python docs/results.py render                                                      # the page's markdown

``add`` keeps a record in ``docs/results/NAME.json``: the figures read from the output and its provenance
(written by lmrec into every ``metrics.json`` and ``compare.json``, and by every benchmark's ``--record``;
for an output written before lmrec recorded it, ``--date --commit --hardware --command`` give it, and the
record says so). The site's build hook renders ``<!-- lmrec:results -->`` from the records, so the page
never holds a hand-copied number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECORDS = Path(__file__).parent / "results"
METRICS = ("ndcg@10", "recall@10", "mrr")
PROVENANCE = ("date", "commit", "hardware", "command")


def record_from(output: Path, name: str, title: str | None, given: dict, label: str | None = None) -> dict:
    """A record of a ``compare.json`` (mean ± std per model over seeds), a run's ``metrics.json``, or a
    benchmark's ``--record`` output (its tables as it printed them)."""
    try:
        data = json.loads(output.read_text())
    except OSError as e:
        raise SystemExit(f"{output}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{output}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict) or not ({"tables", "models", "test"} & data.keys()):
        raise SystemExit(f"{output}: not a run's metrics.json, a compare.json or a benchmark's --record file "
                         "(expected a 'test', 'models' or 'tables' entry)")
    prov = {**{k: v for k, v in given.items() if v}, **data.get("provenance", {})}
    missing = [k for k in PROVENANCE if not prov.get(k)]
    if missing:
        raise SystemExit(f"{output}: no {', '.join(missing)} recorded; give --{' --'.join(missing)}")
    kept = {"source": output.name, "provenance": {k: prov[k] for k in PROVENANCE},
            "provenance_recorded_by": "lmrec" if "provenance" in data else "given when the record was added"}
    if "tables" in data:  # a benchmark's --record: its tables as it printed them
        return {"title": title or data["tables"][0]["title"], "tables": data["tables"], **kept}
    if not title:
        raise SystemExit(f"{output}: give --title")
    columns, paired = ["model", *METRICS], data.get("paired")
    if "models" in data:  # lmrec compare (and each model paired with its reference run, when it was)
        rows = [[model, *(f"{m['mean'][k]:.4f} ± {m['std'][k]:.4f}" for k in METRICS)]
                for model, m in data["models"].items()]
        if paired:
            columns.append(f"{paired['metric']} − {paired['reference']} [95 % over users]")
            from lmrec.compare import paired_cell

            for row in rows:
                row.append(paired_cell(paired, row[0]))
        seeds = data.get("seeds")
        note = f"mean ± std over seeds {seeds}" if seeds else ""
    else:  # one run
        rows, note = [[label or name, *(f"{data['test'][k]:.4f}" for k in METRICS)]], "one run, test split"
    rows += [[base, *(f"{m[k]:.4f}" for k in METRICS), *([""] if paired else [])]
             for base, m in data.get("baselines", {}).items()]
    return {"title": title, "columns": columns, "rows": rows, "note": note, **kept}


def _table(t: dict) -> list[str]:
    return ["| " + " | ".join(t["columns"]) + " |", "|" + " --- |" * len(t["columns"]),
            *("| " + " | ".join(map(str, row)) + " |" for row in t["rows"])]


def render(benchmarks: bool = False) -> str:
    """The records of runs (``benchmarks=False``: ``metrics.json``, ``compare.json``) or of benchmarks (their
    ``--record`` files), as markdown sections; a benchmark's sit one level lower, under the page's own heading."""
    out = []
    h = "###" if benchmarks else "##"
    for path in sorted(RECORDS.glob("*.json")):
        r = json.loads(path.read_text())
        if ("tables" in r) != benchmarks:
            continue
        p = r["provenance"]
        tables = r.get("tables") or [r]  # a benchmark's tables, or a run's one
        one = len(tables) == 1
        out += [f"{h} {r['title']}", "", f"{p['date']}, commit `{p['commit']}`, {p['hardware']}"
                + (f"; {tables[0]['note']}" if one and tables[0]["note"] else ""),
                "", "```bash", p["command"], "```", ""]
        for t in tables:
            if not one:
                out += [f"{h}# {t['title']}", ""] + ([t["note"], ""] if t["note"] else [])
            out += [*_table(t), ""]
        out += [f"<small>Record `docs/results/{path.name}`, from `{r['source']}`; provenance "
                f"{r['provenance_recorded_by']}.</small>", ""]
    return "\n".join(out) if out else ("No benchmark recorded yet." if benchmarks else "No results recorded yet.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="record the figures of a compare.json, a run's metrics.json or a "
                                     "benchmark's --record output")
    add.add_argument("output", type=Path)
    add.add_argument("--name", required=True)
    add.add_argument("--title", help="the section's title (default: a benchmark record's own)")
    add.add_argument("--label", help="the table row of a single run (default: --name)")
    for k in PROVENANCE:
        add.add_argument(f"--{k}")
    ren = sub.add_parser("render", help="print the results page's markdown")
    ren.add_argument("--benchmarks", action="store_true", help="the benchmarks' records instead of the runs'")
    a = ap.parse_args(argv)
    if a.cmd == "add":
        rec = record_from(a.output, a.name, a.title, {k: getattr(a, k) for k in PROVENANCE}, a.label)
        RECORDS.mkdir(exist_ok=True)
        (RECORDS / f"{a.name}.json").write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
        print(f"recorded {RECORDS / (a.name + '.json')}")
    else:
        sys.stdout.write(render(a.benchmarks) + "\n")


if __name__ == "__main__":
    main()
