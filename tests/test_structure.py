"""The code's shape, checked: the layer contracts (import-linter, declared in pyproject.toml) hold and can
fail, and no function in src/ is longer than 60 lines unless a comment right above it says why."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_layer_contracts_hold():
    r = lint_imports(ROOT / "src", ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def test_layer_contracts_catch_a_family_importing_the_other(tmp_path):
    shutil.copytree(ROOT / "src" / "lmrec", tmp_path / "src" / "lmrec")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "src" / "lmrec" / "recformer" / "collator.py"
    bad.write_text(bad.read_text() + "\nfrom lmrec.generative.prompts import NEXT_ITEM  # noqa\n")
    spine = tmp_path / "src" / "lmrec" / "eval" / "metrics.py"
    spine.write_text(spine.read_text() + "\nimport lmrec.recformer.recommender  # noqa\n")
    r = lint_imports(tmp_path / "src", tmp_path)
    assert r.returncode != 0
    assert "the two families and the ID-based baselines never import each other BROKEN" in r.stdout
    assert "the shared spine never imports a family or a layer above it BROKEN" in r.stdout


def long_functions(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                why = lines[first - 2].strip() if first >= 2 else ""
                if n > MAX_LINES and not why.startswith("# long:"):
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_in_src_is_longer_than_60_lines(tmp_path):
    assert long_functions(ROOT / "src") == []
    sample = tmp_path / "m.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    sample.write_text(f"def too_long():\n{body}\n\n\n# long: one table, read top to bottom\ndef kept():\n{body}\n")
    assert long_functions(tmp_path) == ["m.py:1 too_long (61 lines)"]


def test_every_command_is_defined_once():
    """The CLI is split over modules by command group: a command defined in two of them registers twice and
    the later one wins silently."""
    import re

    names = [m for f in (ROOT / "src" / "lmrec" / "cli").glob("*.py")
             for m in re.findall(r"^@\w+\.command\((?:\"([\w-]+)\")?\)\ndef (\w+)", f.read_text(), re.M)]
    assert len(names) >= 25 and len(set(names)) == len(names), sorted(names)
