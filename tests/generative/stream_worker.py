"""torchrun worker: this rank's stream of a data config (2 dataloader workers); writes the uuids it read."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from lmrec.data.data_config import load_data_config, source_files
from lmrec.data.stream import ChatStream


def main(config: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mix = load_data_config(config)
    files = [source_files(s) for s in mix.sources]
    uuids: list[str] = []

    def encode(row):  # one token per sample, remembered by uuid
        uuids.append(row.uuid)
        return {"input_ids": [1, 2], "labels": [1, 2]}

    mix.local_shuffle_buffer_size = 0  # rows reach encode in this process only with workers=0
    stream = ChatStream(files, [s.name for s in mix.sources], mix, encode, rank=rank, world=world,
                        weights=[1.0] * len(files))
    list(StatefulDataLoader(stream, batch_size=None, num_workers=0))
    Path(out, f"rank{rank}.json").write_text(json.dumps(uuids))
    if rank == 0:
        every: list[str] = []
        one = ChatStream(files, [s.name for s in mix.sources], mix, lambda r: every.append(r.uuid) or
                         {"input_ids": [1, 2], "labels": [1, 2]}, weights=[1.0] * len(files))
        list(one)
        Path(out, "all.json").write_text(json.dumps(every))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
