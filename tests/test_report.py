"""Run reports: the HTML a training command writes at its end and `lmrec report` writes for several runs holds
the run's real numbers and plots, and a real headless Chromium renders every plot."""

import json
import re
import shutil
import subprocess

import pytest

from tests.conftest import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_training_writes_a_report_with_its_numbers_and_curves(trained):
    run = trained / "run"
    page = (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['test']['ndcg@10']:.4f}" in page  # the test table holds the run's own numbers
    assert f"{metrics['baselines']['popularity']['ndcg@10']:.4f}" in page
    # loss, learning rate and validation per stage of the two-stage finetuning: 2 figures
    assert len(re.findall(r'<img alt="plot" src="data:image/png;base64,', page)) == 2
    assert "stage1: loss" not in page  # titles are inside the PNGs, not text: the count above is the check
    assert "src=\"http" not in page and "<script" not in page  # self-contained


def test_report_of_several_runs_compares_them(trained, tmp_path):
    other = shutil.copytree(trained / "run", tmp_path / "again", ignore=shutil.ignore_patterns("model", "checkpoints"))
    m = json.loads((other / "metrics.json").read_text())
    m["test"]["ndcg@10"] = 0.123456
    (other / "metrics.json").write_text(json.dumps(m))
    out = tmp_path / "cmp.html"
    res = run_cli("report", trained / "run", other, "--out", out, "--title", "two runs")
    assert res.returncode == 0, res.stderr
    page = out.read_text()
    assert "<h2>Comparison (test)</h2>" in page and "0.1235" in page and "<title>two runs</title>" in page
    assert page.count("<td>popularity</td>") == 3  # once in the comparison (same numbers twice), once per run
    (tmp_path / "empty").mkdir()
    for args, msg in [((tmp_path / "nope",), "no such run directory"), ((tmp_path / "empty",), "holds no run"),
                      ((trained / "run", "--out", tmp_path / "r.txt"), "expected an .html")]:
        res = run_cli("report", *args, cwd=tmp_path)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (bash run.sh test installs Debian's as root)")
def test_a_real_browser_renders_every_plot(trained, tmp_path):
    page = (trained / "run" / "report.html").read_text()
    n = page.count("<img ")
    # a copy that writes, once loaded, how many of its images decoded into pixels
    probe = page.replace("</body>", "<script>window.onload=()=>{const i=[...document.images];"
                                    "document.title='decoded '+i.filter(x=>x.complete&&x.naturalWidth>100).length"
                                    "+' of '+i.length};</script></body>")
    (tmp_path / "probe.html").write_text(probe)
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          f"file://{tmp_path / 'probe.html'}"], capture_output=True, text=True, timeout=120)
    assert f"<title>decoded {n} of {n}</title>" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1200,1600", f"file://{trained / 'run' / 'report.html'}"],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    dark = sum(1 for p in img.getdata() if p < 200)
    assert dark > 0.02 * img.width * img.height  # text, tables and plotted lines, not a blank page


def test_a_report_that_cannot_be_drawn_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    """The model and its metrics are saved before the report is drawn: a report that fails says so in one
    line and the command still succeeds."""
    import lmrec.training.report as report
    from lmrec.training.run import write_run_report

    def broken(*a, **k):
        raise ValueError("no figure today")

    monkeypatch.setattr(report, "write_report", broken)
    monkeypatch.setenv("LMREC_REPORT", "1")  # (the suite turns reports off by default)
    lines = []
    assert write_run_report(tmp_path, lines.append) is None
    assert lines == ["warning: no report.html (ValueError: no figure today)"]
    monkeypatch.setenv("LMREC_REPORT", "0")
    assert write_run_report(tmp_path, lines.append) is None and len(lines) == 1  # turned off: not even tried
