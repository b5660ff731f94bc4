"""Under torchrun: `lmrec pretrain`'s training on this rank, recording every batch its collator builds
(the batch index and the pairs) in order; writes them to OUT/rank<r>.json."""

import json
import os
import sys
from pathlib import Path

from lmrec.config import PretrainRunConfig, load_config
from lmrec.recformer import collator
from lmrec.recformer.pretrain import pretrain

seen: list = []
original = collator.PretrainCollator.__call__


def recording(self, batch):
    b, pairs = batch
    seen.append([b, [[d, [int(x) for x in h], int(t)] for d, h, t in pairs]])
    return original(self, batch)


def main(data: str, out: str, *overrides: str) -> None:
    collator.PretrainCollator.__call__ = recording
    cfg = load_config(None, [f"data.paths=[{data}]", *overrides], schema=PretrainRunConfig)
    pretrain(cfg, log=lambda m: None)
    (Path(out) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:])
