"""The ``lmrec`` command line. Each subcommand parses its options, loads config and calls the library.

A :class:`~lmrec.errors.LmrecError` (bad file, bad config, unknown id) is printed as one message and exits
with code 2, without a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from lmrec.cli import backbone, compare, data, generative, recformer, serve  # noqa: F401  (they register the commands)
from lmrec.cli.common import _print_new_items, _report, app  # noqa: F401  (the console script's app; tests use these)
from lmrec.errors import LmrecError


class _ConsoleHandler(logging.Handler):
    """lmrec's own log records (``lmrec.*`` loggers: which attention implementation ran, ...) on the
    console and in the run's train.log — written to ``sys.stderr`` as it is at the time, which the run
    tees into its log — once, from the first process."""

    def emit(self, record: logging.LogRecord) -> None:
        if os.environ.get("RANK", "0") == "0":
            from lmrec.progress import tqdm

            tqdm.write(self.format(record), file=sys.stderr)  # above a live progress bar, not inside it


def _console_logging() -> None:
    logger = logging.getLogger("lmrec")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
        logger.setLevel(logging.INFO)


def main() -> None:
    from lmrec.progress import quiet_library_bars

    quiet_library_bars()
    _console_logging()
    try:
        app()
    except LmrecError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg="red")
        sys.exit(130)
    finally:
        _release_distributed()


def _release_distributed() -> None:
    """Under torchrun: close the process group and free what still holds it (sharded modules keep
    references) while the interpreter is fully alive. Left to interpreter teardown, a gloo group's worker
    threads can be destroyed after the GIL machinery is gone, and the process aborts ("terminate called
    without an active exception") although the run has finished."""
    if "torch.distributed" not in sys.modules or os.environ.get("WORLD_SIZE", "1") == "1":
        return
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


if __name__ == "__main__":
    main()
