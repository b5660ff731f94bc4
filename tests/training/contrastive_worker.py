"""Under torchrun (2 CPU processes): each rank encodes its half of a global batch, the contrastive loss
gathers the items across ranks; writes the mean loss over ranks, the single-process loss on the whole
batch, and the largest difference between the DDP gradient and the single-process gradient."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmrec.recformer.backbones import build_recformer
from lmrec.recformer.modeling_recformer import RecformerForPretraining

ITEMS = [[("title", t), ("genres", g)] for t, g in [
    ("Toy Story", "Animation Comedy"), ("GoldenEye", "Action Thriller"), ("Four Rooms", "Thriller"),
    ("Get Shorty", "Action Comedy Drama"), ("Copycat", "Crime Drama"), ("Toy Story", "Comedy"),
    ("GoldenEye", "Adventure"), ("Copycat", "Thriller Drama"), ("Four Rooms", "Comedy")]]


def main(backbone: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, tok, _ = build_recformer(Path(backbone), model_cls=RecformerForPretraining, max_token_num=64)
    model.double().eval()  # no dropout: both computations see the same function; float64: exact comparison
    single = copy.deepcopy(model)
    hist = tok([[ITEMS[i], ITEMS[(i + 1) % 9]] for i in range(8)])
    items = tok([[ITEMS[(i + 2) % 9]] for i in range(8)])
    n = 8 // world
    local = slice(rank * n, (rank + 1) * n)
    # find_unused_parameters: the MLM head gets no gradient in a contrastive-only step
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    out_local = ddp(**{k: v[local] for k, v in hist.items()}, item_inputs={k: v[local] for k, v in items.items()})
    out_local.contrastive_loss.backward()
    loss = out_local.contrastive_loss.detach().clone()
    dist.all_reduce(loss)
    full = single(**hist, item_inputs=items, gather=False).contrastive_loss
    full.backward()
    diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), single.parameters())
               if q.grad is not None)
    scale = max(float(q.grad.abs().max()) for q in single.parameters() if q.grad is not None)
    if rank == 0:
        Path(out).write_text(json.dumps({"ddp_loss": float(loss) / world, "single_loss": float(full),
                                         "grad_max_diff": diff, "grad_max": scale}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
