"""Benchmark records: a script's ``--record`` writes its tables with their provenance, ``docs/results.py add``
keeps them and the results page renders them — the page holds no hand-copied benchmark figure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmrec.provenance import Table, write_record

ROOT = Path(__file__).resolve().parents[1]


def _results(monkeypatch, records):
    spec = importlib.util.spec_from_file_location("results", ROOT / "docs" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    monkeypatch.setattr(results, "RECORDS", records)
    return results


def test_the_gpu_table_is_recorded_and_rendered_with_its_provenance(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "env.txt").write_text("2026-12-06 10:00 UTC\ncommit abc1234\nNVIDIA H200, 143771 MiB, 570.1\n"
                                 "torch 2.13.0 | transformers 5.25.0 | accelerate 1.12.0\n")
    (out / "gen.json").write_text(json.dumps([{"shape": "0.6B", "impl": "varlen", "tokens_per_s": 123456.7,
                                               "mfu": 0.412, "peak_gib": 31.04, "vs_sdpa": 1.37}]))
    (out / "infer.json").write_text(json.dumps([{"part": "rank", "chunk": 8192, "ms_per_query": 0.0123,
                                                 "ref_ms_per_query": 0.0150, "ratio": 1.22}]))
    (out / "gpu_tests.log").write_text("....\n17 passed in 80.1s\n")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "table.py"), str(out), "--record",
                          str(out / "gpu.json")], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "| Qwen3-0.6B shape, 32k packs, varlen | 123,457 tokens/s, MFU 41.2 %, peak 31.0 GiB |" in res.stdout
    rec = json.loads((out / "gpu.json").read_text())
    (table,) = rec["tables"]
    assert table["rows"] == [
        ["Qwen3-0.6B shape, 32k packs, varlen", "123,457 tokens/s, MFU 41.2 %, peak 31.0 GiB",
         "transformers' sdpa on the same packs", "1.37×"],
        ["full ranking 10M × 128, chunks of 8,192", "0.012 ms per query", "one product + topk 0.015 ms", "1.22×"]]
    assert "NVIDIA H200" in table["note"] and "17 passed" in table["note"]
    assert rec["provenance"]["command"] == "bash bench/gpu/run.sh" and rec["provenance"]["date"][:2] == "20"

    results = _results(monkeypatch, tmp_path / "records")
    results.main(["add", str(out / "gpu.json"), "--name", "gpu"])
    page = results.render(benchmarks=True)
    assert page.startswith("### On one GPU: bench/gpu/run.sh")  # the record's own title, under the page's heading
    assert results.render() == "No results recorded yet."  # a benchmark is not a run's result
    assert "| full ranking 10M × 128, chunks of 8,192 | 0.012 ms per query |" in page
    assert "```bash\nbash bench/gpu/run.sh\n```" in page and rec["provenance"]["hardware"] in page


def test_a_record_of_several_tables_renders_each(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench/bench_x.py", "--seconds", "5"])
    path = write_record(tmp_path / "rec.json",
                        Table("HTTP", ["clients", "req/s"], [[1, "10.5"], [8, "40.0"]], note="loopback"),
                        Table("Index", ["index", "recall@10"], [["ivf", "0.9512"]]))
    assert not list(tmp_path.glob(".*partial"))  # written under a temporary name, renamed
    rec = json.loads(path.read_text())
    assert rec["tables"][0]["rows"] == [["1", "10.5"], ["8", "40.0"]]  # cells as printed
    assert rec["provenance"]["command"].endswith("bench/bench_x.py --seconds 5")
    results = _results(monkeypatch, tmp_path / "records")
    results.main(["add", str(path), "--name", "serve", "--title", "Serving"])
    page = results.render(benchmarks=True)
    assert page.index("### Serving") < page.index("#### HTTP") < page.index("loopback") < page.index("### Index")
    assert "| ivf | 0.9512 |" in page and "| 8 | 40.0 |" in page


def test_a_row_of_the_wrong_width_and_an_empty_record_are_refused(tmp_path):
    with pytest.raises(ValueError, match="a row has 1 cells for 2 columns"):
        Table("T", ["a", "b"], [["only one"]])
    with pytest.raises(ValueError, match="at least one table"):
        write_record(tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_a_file_that_is_not_an_output_is_named_with_what_was_expected(tmp_path, monkeypatch):
    results = _results(monkeypatch, tmp_path / "records")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "other.json").write_text('{"a": 1}')
    for path, msg in [(tmp_path / "missing.json", "missing.json: No such file or directory"),
                      (tmp_path / "broken.json", "broken.json: not JSON (Expecting property name"),
                      (tmp_path / "other.json", "other.json: not a run's metrics.json, a compare.json or a "
                                                "benchmark's --record file")]:
        with pytest.raises(SystemExit, match=msg.replace("(", r"\(").replace(".", r"\.")):
            results.main(["add", str(path), "--name", "x", "--title", "t"])
    assert not (tmp_path / "records").exists()  # nothing recorded


def test_the_commit_is_dirty_when_the_package_or_a_benchmark_changed(tmp_path, monkeypatch):
    """A record's commit says ``+dirty`` when ``src/lmrec`` or ``bench/`` differ from it or hold a Python file it
    lacks (not for other files, nor a benchmark's output), and ``$LMREC_COMMIT`` names the commit of a copy
    without ``.git``."""
    import shutil

    def git(*args, cwd=tmp_path):
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)

    (tmp_path / "src" / "lmrec").mkdir(parents=True)
    (tmp_path / "bench").mkdir()
    shutil.copy(ROOT / "src" / "lmrec" / "provenance.py", tmp_path / "src" / "lmrec" / "provenance.py")
    (tmp_path / "bench" / "bench_x.py").write_text("print(1)\n")
    (tmp_path / "README.md").write_text("x\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    spec = importlib.util.spec_from_file_location("prov_copy", tmp_path / "src" / "lmrec" / "provenance.py")
    prov = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "prov_copy", prov)  # (its dataclass looks itself up there)
    spec.loader.exec_module(prov)
    clean = prov._commit()
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "README.md").write_text("y\n")  # not the code that measures
    assert prov._commit() == clean
    (tmp_path / "bench" / "out.json").write_text("{}\n")  # a benchmark's output, not its code
    assert prov._commit() == clean
    (tmp_path / "bench" / "reference").mkdir()
    (tmp_path / "bench" / "reference" / "new_x.py").write_text("print(3)\n")  # a script not yet committed
    assert prov._commit() == clean + "+dirty"
    (tmp_path / "bench" / "reference" / "new_x.py").unlink()
    (tmp_path / "bench" / "bench_x.py").write_text("print(2)\n")
    assert prov._commit() == clean + "+dirty"
    shutil.rmtree(tmp_path / ".git")
    monkeypatch.setenv("LMREC_COMMIT", "abc1234")
    assert prov._commit() == "abc1234"


def test_the_target_popularity_groups_are_the_split_cut_at_its_quartiles():
    """bench/reference/target_popularity.py: the four groups hold every user of the split once, each its
    quarter of the targets' training counts (ties kept together), in ascending order."""
    spec = importlib.util.spec_from_file_location("target_popularity",
                                                  ROOT / "bench" / "reference" / "target_popularity.py")
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    from lmrec.data.dataset import Examples

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=40)
    targets = rng.integers(0, 40, size=200)
    ex = Examples(np.arange(200), [np.array([i % 40]) for i in range(200)], targets)
    groups = list(tp.groups(ex, counts).values())
    assert groups[0] is ex and len(groups) == 5
    users = np.concatenate([g.users for g in groups[1:]])
    assert sorted(users.tolist()) == list(range(200))
    for g in groups[1:]:
        assert all(ex.targets[u] == t and ex.histories[u][0] == h[0]
                   for u, t, h in zip(g.users, g.targets, g.histories, strict=True))
    c = [counts[g.targets] for g in groups[1:]]
    assert all(a.max() < b.min() for a, b in zip(c, c[1:]))  # disjoint ranges, ascending
    edges = np.quantile(counts[targets], [0.25, 0.5, 0.75])
    assert all(len(g) > 0 for g in groups[1:]) and c[0].max() <= edges[0] < c[1].min()
    assert all(e1 < c1.min() and c1.max() <= e2 for e1, e2, c1 in zip(edges, [*edges[1:], np.inf], c[1:]))
    tied = Examples(np.arange(200), ex.histories, np.where(np.arange(200) < 180, 0, 1))  # 90 % one count
    counts = np.array([5, 9])
    parts = list(tp.groups(tied, counts).items())[1:]  # coinciding quartiles: no empty group
    assert [len(g) for _, g in parts] == [180, 20] and parts[1][0].startswith("quartile 4: target seen 9–9")
