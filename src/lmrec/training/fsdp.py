"""Fully sharded data parallel training (``train.fsdp``): torch's FSDP2 (``fully_shard``) on any launcher.

DDP keeps a whole copy of the model, its gradients and the optimizer's moments on every process; FSDP2
keeps 1/N of each and gathers a layer's parameters only while it runs. What ``shard`` does:

- every decoder layer (the classes a transformers model lists in ``_no_split_modules``) is one shard
  group, then the root (the embeddings, the final norm and a head tied or not to the embeddings);
- parameters are stored sharded in fp32 — the master weights the optimizer updates — and gathered in bf16
  for compute when mixed precision is bf16; gradients are reduced in fp32 (``train.fsdp_reduce_fp32``,
  default) or in bf16 (half the traffic);
- activation checkpointing per decoder layer (``train.activation_checkpointing``; transformers' own,
  non-reentrant) trades a second forward of each layer for not keeping its activations.

``build_on_meta`` + ``materialize_and_load`` build a model on the meta device (no memory) and load it
once: rank 0 reads the safetensors files and every process receives only its shards, so an 8B model does
not need N host copies.

Why not Accelerate's FSDP plugin: Accelerate turns FSDP on only for its GPU/NPU distributed types, so the
sharded path could not be tested on CPU processes (gloo), and the loop would differ between the machine
where it is tested and the cluster. ``fully_shard`` is the same call on both.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from lmrec.errors import LmrecError


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one process (then nothing is sharded, and the checkpoints have the
    same sharded format, so a run can move between one process and many)."""
    if dist.is_available() and not dist.is_initialized():
        backend = dist.get_default_backend_for_device(device) if device.type != "cpu" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes it declares unsplittable (``_no_split_modules``)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise LmrecError(f"train.fsdp: {type(model).__name__} declares no decoder layer classes "
                         "(_no_split_modules); FSDP needs a transformers model")
    return layers


def compile_layers(lm: torch.nn.Module, backend: str = "inductor") -> int:
    """``train.compile``: ``torch.compile`` each decoder layer (regional compilation, as torchtitan does: one
    graph compiled once and reused by every layer, instead of the whole model with its graph breaks); before
    ``shard`` when both are on. Returns the number of layers compiled."""
    layers = decoder_layers(lm)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def shard(model: torch.nn.Module, lm: torch.nn.Module, device: torch.device, *, param_dtype: torch.dtype | None,
          reduce_fp32: bool = True, activation_checkpointing: bool = False, shard_size: int | None = None
          ) -> torch.nn.Module:
    """Shard ``model`` (the module the loop calls; ``lm`` is the transformers model inside it, or itself) over
    all processes on ``device``: one group per decoder layer of ``lm``; the input embeddings and the output
    layer in groups of their own when they are separate matrices (each gathered only while it runs, instead of
    staying whole in the root group from the first layer's forward to the end of the backward); the rest
    (final norm; embeddings tied to the head) at the root. ``shard_size``: shard within groups of that many
    processes and replicate across them (HSDP: a node's GPUs share the shards, nodes hold replicas)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ensure_process_group(device)
    mesh = device_mesh(device, shard_size)
    reduce = torch.float32 if reduce_fp32 or param_dtype is None else param_dtype
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce)
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        fully_shard(emb, mesh=mesh, mp_policy=policy)
        # the last module of the forward: its gathered weight stays for the backward that follows at once
        fully_shard(head, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def device_mesh(device: torch.device, shard_size: int | None = None):
    """A 1-D mesh over every process (FSDP), or 2-D (replicate × shard) with ``shard_size`` processes per shard
    group (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if shard_size is None or shard_size == world:
        return init_device_mesh(device.type, (world,))
    if world % shard_size:
        raise LmrecError(f"train.fsdp_shard_size={shard_size} must divide the number of processes ({world})")
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def build_on_meta(model_dir: str | Path):
    """The model of ``model_dir`` without memory for its parameters (fp32 master weights once materialised);
    buffers (rotary frequencies) are real, as they are not in the checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    if getattr(cfg, "is_encoder_decoder", False):
        raise LmrecError("train.fsdp applies to decoder-only models")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.tie_weights()  # a head tied to the embeddings is one parameter (as from_pretrained makes it)
    return model


def materialize_and_load(model: torch.nn.Module, model_dir: str | Path, device: torch.device, prefix: str = ""
                         ) -> None:
    """After ``shard``: allocate this process's shards on ``device`` and fill them from ``model_dir``'s
    safetensors, read on rank 0 only and broadcast shard by shard (``prefix``: where the transformers model
    sits in ``model``, "lm." in the loop's wrapper). Ties (an LM head that is the embedding
    matrix) survive: the shared parameter is one object before and after."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    full = _read_safetensors(Path(model_dir)) if dist.get_rank() == 0 else {}
    full = {prefix + k: v for k, v in full.items()}
    missing = [n for n, _ in model.named_parameters() if n not in full] if dist.get_rank() == 0 else []
    flag = torch.tensor([len(missing)], device=device)
    dist.broadcast(flag, 0)  # every rank learns of a bad checkpoint (instead of waiting for a broadcast)
    if int(flag):
        raise LmrecError(f"train.fsdp: {model_dir} lacks weights the model has: {missing[:5] or '(see rank 0)'}")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=False))


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LmrecError(f"train.fsdp: no *.safetensors weights in {model_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:  # in the stored dtype (bf16: half the host memory and broadcast): upcast on each shard
        out.update(load_file(str(f)))
    return out


def full_state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (empty on the other ranks): every rank must call it.
    ``prefix`` ("lm.") is stripped from the names (the wrapper the loop trains)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def unsharded(config, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain transformers model (its own class, not FSDP's) over a full state dict, without copying it:
    what rank 0 saves with ``save_pretrained``."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    return model


def load_sharded_weights(directory: Path, model: torch.nn.Module) -> None:
    """Fill a plain (unsharded) model in this one process from a sharded checkpoint's model state
    (``step-N/sharded``, written by any number of processes; the loop's wrapper prefix "lm." is found)."""
    import torch.distributed.checkpoint as dcp

    names = {k.removeprefix("model.") for k in dcp.FileSystemReader(str(directory)).read_metadata()
             .state_dict_metadata if k.startswith("model.")}
    prefix = "lm." if any(n.startswith("lm.") for n in names) else ""
    own = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in own if prefix + k not in names and k not in tied]
    if missing:
        raise LmrecError(f"{directory} does not hold this model's weights: missing {missing[:3]}")
    dcp.load({f"model.{prefix}{k}": v for k, v in own.items() if prefix + k in names},
             checkpoint_id=str(directory), no_dist=True)
