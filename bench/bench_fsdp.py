"""``train.fsdp`` vs DDP on 2 processes: what each process holds, and the cost of a step.

A Qwen3-shaped model (hidden 512, 8 layers, vocabulary 32,768, tied head: ≈ 44 M parameters) is trained
for a few AdamW steps on 2 processes (gloo on CPU, NCCL on GPUs), once with DDP (every process loads the
whole checkpoint and keeps whole parameters, gradients and moments) and once with lmrec's FSDP path
(meta-device build, rank 0 reads the checkpoint, per-layer + root ``fully_shard``; an untied head and the
embeddings in groups of their own). Per process it prints its measured peak memory above what the process
held before the model existed (peak resident memory minus the runtime's on CPU; the allocator's peak on a GPU),
the time per step, and — as accounting, not a measurement — the bytes of parameters + gradients + optimizer
state it holds (16·P/N), then the FSDP/DDP ratios.

    python bench/bench_fsdp.py [--hidden 512] [--layers 8] [--steps 4] [--tokens 512] [--untied] [--record OUT.json]

``--record PATH`` also writes the table with its provenance, for ``docs/results.py add``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _state_bytes(model, optimizer) -> int:
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = [local(p) for p in model.parameters()] + [local(p.grad) for p in model.parameters()
                                                        if p.grad is not None]
    tensors += [local(v) for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel") and v.dim()]
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(mode: str, model_dir: str, steps: int, tokens: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch and the process group, no model
    if mode == "fsdp":
        from lmrec.training.fsdp import build_on_meta, materialize_and_load, shard

        model = build_on_meta(model_dir)
        shard(model, model, device, param_dtype=None)
        materialize_and_load(model, model_dir, device)
    else:
        from transformers import AutoModelForCausalLM

        model = torch.nn.parallel.DistributedDataParallel(AutoModelForCausalLM.from_pretrained(model_dir).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, 32_768, (1, tokens), generator=g).to(device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        state = _state_bytes(model, opt)
        opt.zero_grad(set_to_none=False)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - runtime
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps(
        {"state_mib": state / 2**20, "peak_mib": peak, "step_s": sorted(times[1:] or times)[len(times[1:]) // 2]}))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--untied", action="store_true", help="an untied head (Qwen3-8B's layout)")
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    a = ap.parse_args()
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Qwen3Config(vocab_size=32_768, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                          num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=a.hidden // 8, tie_word_embeddings=not a.untied)
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(cfg)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(tmp, "model"))
        del model
        print(f"Qwen3-shaped model: hidden {a.hidden}, {a.layers} layers, {params / 1e6:.1f} M parameters; "
              f"2 processes, {a.tokens} tokens per process per step")
        res = {}
        for mode in ("ddp", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
                   f"--log-dir={Path(tmp, 'logs')}", __file__, "--worker", mode,
                   str(Path(tmp, "model")), str(a.steps), str(a.tokens), tmp]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
            res[mode] = [json.loads(Path(tmp, f"{mode}-{r}.json").read_text()) for r in range(2)]
            for r, m in enumerate(res[mode]):
                print(f"{mode:4s} rank {r}: measured peak {m['peak_mib']:8.1f} MiB   step {m['step_s']:.3f} s   "
                      f"(accounting: params+grads+AdamW state {m['state_mib']:8.1f} MiB)")
    mean = {k: {f: sum(m[f] for m in v) / 2 for f in v[0]} for k, v in res.items()}
    print(f"measured peak memory per process FSDP / DDP: {mean['fsdp']['peak_mib'] / mean['ddp']['peak_mib']:.3f}")
    print(f"time per step FSDP / DDP: {mean['fsdp']['step_s'] / mean['ddp']['step_s']:.3f}")
    print(f"(accounting, true by construction: model state FSDP / DDP "
          f"{mean['fsdp']['state_mib'] / mean['ddp']['state_mib']:.3f}, 16·P/N = 0.5 for N = 2; "
          f"{16 * params / 2**20:.0f} MiB unsharded)")
    if a.record:
        from lmrec.provenance import Table, write_record

        rows = [[mode, r, f"{m['peak_mib']:.1f}", f"{m['step_s']:.3f}", f"{m['state_mib']:.1f}"]
                for mode in ("ddp", "fsdp") for r, m in enumerate(res[mode])]
        rows.append(["FSDP / DDP", "mean", f"{mean['fsdp']['peak_mib'] / mean['ddp']['peak_mib']:.3f}",
                     f"{mean['fsdp']['step_s'] / mean['ddp']['step_s']:.3f}",
                     f"{mean['fsdp']['state_mib'] / mean['ddp']['state_mib']:.3f}"])
        write_record(a.record, Table(
            title="FSDP vs DDP on 2 processes",
            columns=["mode", "rank", "measured peak MiB", "step s", "params + grads + AdamW MiB (accounting)"],
            rows=rows,
            note=f"Qwen3-shaped model, hidden {a.hidden}, {a.layers} layers, "
                 f"{params / 1e6:.1f} M parameters, {'untied' if a.untied else 'tied'} head; "
                 f"{a.tokens} tokens per process per step, {a.steps} steps"))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:3], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main()
