"""``from_main_process`` on two gloo processes: the main process computes, the other receives the value; an
error on the main process reaches the other one (a user error with its message), so no process waits for
ever at start-up."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp

from lmrec.errors import DataError, LmrecError
from lmrec.training.distributed import from_main_process
from tests.training.test_launch import _free_port


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    acc = SimpleNamespace(num_processes=2, is_main_process=rank == 0)
    calls = []

    def compute(value):
        def f():
            calls.append(value)
            return value
        return f

    def fail(error):
        def f():
            raise error
        return f

    seen = {"value": from_main_process(acc, compute({"files": [[f"p{rank}"]]}))}
    for name, error in (("user", DataError("the file is empty", file="x.parquet")), ("bug", KeyError("k"))):
        try:
            from_main_process(acc, fail(error))
        except LmrecError as e:
            seen[name] = ["LmrecError", str(e)]
        except Exception as e:  # what the other process raises is what is tested
            seen[name] = [type(e).__name__, str(e)]
    seen["calls"] = len(calls)
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_the_main_process_computes_and_every_process_gets_the_value_or_the_error(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert main["value"] == other["value"] == {"files": [["p0"]]}  # rank 0's, computed once
    assert main["calls"] == 1 and other["calls"] == 0
    assert main["user"] == other["user"] == ["LmrecError", "x.parquet: the file is empty"]
    assert main["bug"] == ["KeyError", "'k'"]  # the main process keeps its own exception
    assert other["bug"] == ["RuntimeError", "the main process failed (KeyError: 'k')"]
