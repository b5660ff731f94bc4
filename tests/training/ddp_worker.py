"""Run under torchrun: finetunes with the library's own entry point, then writes a hash of this rank's
final weights so the test can compare ranks."""

import hashlib
import os
import sys
from pathlib import Path

from lmrec.config import load_config
from lmrec.recformer.finetune import finetune


def main(data: str, out: str, *overrides: str) -> None:
    cfg = load_config(None, [f"output_dir={out}", *overrides])
    result = finetune(cfg, data, log=lambda m: None)
    h = hashlib.sha256()
    for name, p in sorted(result.recommender.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().float().numpy().tobytes())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    (Path(out) / f"rank{rank}-of-{world}.sha256").write_text(h.hexdigest())


if __name__ == "__main__":
    main(*sys.argv[1:])
