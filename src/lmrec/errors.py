"""User-facing errors.

Anything a user can cause (a bad file, a wrong key in a config, an unknown item id) is raised as a
:class:`LmrecError`. The CLI prints its message and exits with code 2, without a traceback; any other
exception is a bug in lmrec and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class LmrecError(Exception):
    """An error the user can fix; its message says where and what was expected."""


class DataError(LmrecError):
    """Bad input data. The message names the file, the row (1-based, header = row 1) and the column."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        row: int | None = None,
        column: str | None = None,
    ):
        self.file, self.row, self.column, self.reason = file, row, column, message
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class TrainingDiverged(LmrecError):
    """The training loss became NaN or inf: the run stops and keeps what it wrote before (checkpoints, the best
    model), unlike other user errors, which leave no run directory behind."""


class ConfigError(LmrecError):
    """A bad run configuration (unknown key, wrong type, missing value)."""


def optional(module: str, extra: str, what: str):
    """Import an optional dependency (``pip install 'lmrec[EXTRA]'`` installs it), or stop with one message
    naming the extra: ``pip install lmrec`` stays light, and what needs more says so when it is used."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LmrecError(f"{what} needs {module.split('.')[0]}, an optional dependency of lmrec: "
                         f"pip install 'lmrec[{extra}]'") from None
