"""MkDocs hooks: the reference pages are generated from the code at build time, never copied by hand.

A page holds a marker comment; the build replaces it:

    <!-- lmrec:cli -->       every command and option of ``lmrec`` (from the typer app)
    <!-- lmrec:config -->    every run-configuration key: type, default, bounds, meaning (from the pydantic
                             models of ``lmrec.config``; the meaning is the comment written beside the field)
    <!-- lmrec:results -->   the recorded results (``docs/results.py``: figures read from run outputs, each
                             with its date, commit, hardware and command)
    <!-- lmrec:benchmarks --> the recorded benchmarks (the ``--record`` files of ``bench/``, the same way)
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
import types
import typing

from pydantic import BaseModel

SCHEMAS = {  # the run configs, by the commands that read them
    "RunConfig": "`lmrec finetune`, `lmrec quickstart` (RecFormer)",
    "PretrainRunConfig": "`lmrec pretrain`",
    "MlmRunConfig": "`lmrec backbone pretrain-mlm`",
    "GenRunConfig": "`lmrec gen train` (each stage)",
    "IdRunConfig": "`lmrec baseline` (SASRec, GRU4Rec, hybrid)",
    "FusionRunConfig": "`lmrec compare` (the fusion row: SASRec or GRU4Rec × the generative model)",
}


def on_page_markdown(markdown: str, **_) -> str:
    if "<!-- lmrec:cli -->" in markdown:
        markdown = markdown.replace("<!-- lmrec:cli -->", cli_reference())
    if "<!-- lmrec:config -->" in markdown:
        markdown = markdown.replace("<!-- lmrec:config -->", config_reference())
    if "<!-- lmrec:results -->" in markdown or "<!-- lmrec:benchmarks -->" in markdown:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location("results", Path(__file__).parent / "results.py")
        results = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(results)
        markdown = markdown.replace("<!-- lmrec:results -->", results.render())
        markdown = markdown.replace("<!-- lmrec:benchmarks -->", results.render(benchmarks=True))
    return markdown


# ------------------------------------------------------------------------------------------------ CLI
def cli_reference() -> str:
    import typer

    from lmrec.cli.main import app

    root = typer.main.get_command(app)
    out: list[str] = []
    _command(root, ["lmrec"], out)
    return "\n".join(out)


def _command(cmd, path: list[str], out: list[str]) -> None:
    """One command's section, then its subcommands' (typer ships its own copy of click: duck-typed here)."""
    ctx = cmd.context_class(cmd, info_name=" ".join(path))
    if len(path) > 1:
        out += [f"{'#' * min(len(path), 4)} `{' '.join(path)}`", ""]
        out += [inspect.cleandoc(cmd.help or ""), "", "```text", cmd.get_usage(ctx), "```", ""]
        rows = []
        for p in cmd.get_params(ctx):
            if p.name == "help":
                continue
            rows.append(_param_row(p))
        if rows:
            out += ["| argument / option | meaning | default |", "| --- | --- | --- |", *rows, ""]
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            _command(cmd.get_command(ctx, name), [*path, name], out)


def _param_row(p) -> str:
    if p.param_type_name == "argument":
        name = f"`{p.name.upper()}`" + (" …" if p.nargs == -1 else "")
        meaning = getattr(p, "help", "") or ""
    else:
        name = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        meaning = p.help or ""
    if p.required:
        default = "required"
    elif getattr(p, "is_flag", False) and p.secondary_opts:
        default = f"`{p.opts[0] if p.default else p.secondary_opts[0]}`"
    else:
        default = "" if p.default in (None, (), []) else f"`{p.default}`"
    return f"| {name} | {_cell(meaning)} | {default} |"


def _cell(text: str) -> str:
    """A help text as one table cell: on one line, its pipes escaped, and its angle brackets outside code
    spans written as entities (``checkpoints/<stage>/`` would otherwise be read as an HTML tag and vanish)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;").replace(">", "&gt;") for i, part in enumerate(parts))


# --------------------------------------------------------------------------------------------- config
def config_reference() -> str:
    import lmrec.config as config

    notes = _field_comments(config)
    out = []
    for name, readers in SCHEMAS.items():
        model = getattr(config, name)
        out += [f"## {name}", "", f"Read by {readers}. Keys as a YAML file nests them, or `key.sub=value` "
                "on the command line.", "",
                "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += _rows(model, "", notes)
        out.append("")
    return "\n".join(out)


def _rows(model: type[BaseModel], prefix: str, notes: dict) -> list[str]:
    rows = []
    for key, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None:
            rows += _rows(sub, f"{prefix}{key}.", notes)
            continue
        default = field.get_default(call_default_factory=True)
        bounds = [f"{_OPS[type(m).__name__]} {getattr(m, next(iter(m.__dataclass_fields__)))}"
                  for m in field.metadata if type(m).__name__ in _OPS]
        kind = _type_name(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
        note = notes.get((model.__name__, key)) or _inherited(model, key, notes) or field.description or ""
        rows.append(f"| `{prefix}{key}` | {_cell(kind)} | `{default!r}` | {_cell(note)} |")
    return rows


_OPS = {"Ge": "≥", "Gt": ">", "Le": "≤", "Lt": "<", "MinLen": "length ≥", "MaxLen": "length ≤"}


def _model_of(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _inherited(model: type, key: str, notes: dict) -> str | None:
    for base in model.__mro__[1:]:
        if (base.__name__, key) in notes:
            return notes[(base.__name__, key)]
    return None


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _field_comments(module) -> dict[tuple[str, str], str]:
    """(class, field) → the comment beside the field (on its lines) or on the lines just above it."""
    source = inspect.getsource(module)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, n = [], stmt.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            beside = [comments[i] for i in range(stmt.lineno, stmt.end_lineno + 1) if i in comments]
            text = " ".join(above + beside)
            if text:
                out[(node.name, stmt.target.id)] = text
    return out
