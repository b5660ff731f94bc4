"""Started twice by hand with OpenMPI's variables only (as mpirun would): joins the process group through
lmrec's accelerator and writes the all-reduced rank sum."""

import sys
from pathlib import Path

import torch

from lmrec.training.loop import make_accelerator

acc = make_accelerator("no", seed=0)
total = acc.reduce(torch.tensor([float(acc.process_index + 1)]), reduction="sum")
Path(sys.argv[1], f"rank{acc.process_index}-of-{acc.num_processes}.txt").write_text(str(float(total)))
