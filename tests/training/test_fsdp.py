"""train.fsdp: FSDP2 (per decoder layer + root ``fully_shard``, meta-device build, rank-0 load) on 2 gloo
processes trains exactly as one process on the same global batch, and its sharded checkpoints (torch
distributed checkpointing) resume on another number of processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.test_launch import torchrun

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _run(model: Path, out: Path, processes: int, resume: Path | None = None, shard_size: int | None = None) -> dict:
    """Weights and history after 2 epochs of 4 micro-batches: 2 processes × 1, or 1 process × 2 accumulated."""
    launch = [sys.executable] if processes == 1 else torchrun(out.parent / f"{out.name}-logs")
    args = [str(model), str(out), str(3 - processes), str(resume or ""), str(shard_size or "")]
    res = subprocess.run([*launch, str(WORKER), *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return {"weights": load_file(str(out / "weights.safetensors")),
            "history": json.loads((out / "history.json").read_text()), "log": res.stdout + res.stderr}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("fsdp")
    for name, tied in (("model", True), ("untied", False)):
        torch.manual_seed(0)
        Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     tie_word_embeddings=tied)).save_pretrained(root / name)
    return root, _run(root / "model", root / "one", 1), _run(root / "model", root / "two", 2)


def _close(a: dict, b: dict, tol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)) for k in a)
    assert worst <= tol, worst
    return worst


def test_two_sharded_processes_train_as_one(runs):
    root, one, two = runs
    _close(one["weights"], two["weights"])
    for a, b in zip(one["history"], two["history"]):  # the epoch loss is over all the data, not rank 0's share
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"]
    start = load_file(str(root / "model" / "model.safetensors"))
    assert all((one["weights"][k] - start[k]).abs().max() > 1e-3 for k in start)  # every weight trained
    shards = sorted(p.name for p in (root / "two" / "checkpoints" / "s" / "step-00000002" / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shards


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path):
    root, one, two = runs
    from_two = _run(root / "model", tmp_path / "a", 1, root / "two" / "checkpoints" / "s" / "step-00000002")
    assert "resumed from" in from_two["log"]
    _close(one["weights"], from_two["weights"])
    from_one = _run(root / "model", tmp_path / "b", 2, root / "one" / "checkpoints" / "s" / "step-00000002")
    _close(one["weights"], from_one["weights"])
    assert from_one["history"][-1]["loss"] == pytest.approx(one["history"][-1]["loss"], rel=1e-5)


def test_a_checkpoint_resumes_only_in_its_own_kind(tmp_path):
    from lmrec.errors import LmrecError
    from lmrec.training.checkpoints import Sharded, load_checkpoint
    from lmrec.training.loop import make_accelerator

    acc = make_accelerator("no", seed=0)
    sharded, plain = tmp_path / "step-1", tmp_path / "step-2"
    (sharded / "sharded").mkdir(parents=True)
    plain.mkdir()
    for d in (sharded, plain):
        (d / "trainer_state.json").write_text(json.dumps({"tag": "s"}))
    with pytest.raises(LmrecError, match="resume it with train.fsdp: true"):
        load_checkpoint(acc, sharded, "s")
    with pytest.raises(LmrecError, match="saved without train.fsdp"):
        load_checkpoint(acc, plain, "s", sharded=Sharded(None, None, None))



def test_an_untied_head_and_the_embeddings_are_groups_of_their_own_and_train_as_one_process(runs, tmp_path):
    """Untied (Qwen3-8B's layout): 2 layer groups + the embeddings + the head (whose forward computes the
    chunked loss) + the root; 2 sharded processes end where 1 process ends."""
    root, _, _ = runs
    one = _run(root / "untied", tmp_path / "one", 1)
    two = _run(root / "untied", tmp_path / "two", 2)
    assert "FSDP groups: 5" in two["log"] and "FSDP groups: 5" in one["log"]
    _close(one["weights"], two["weights"])
    start = load_file(str(root / "untied" / "model.safetensors"))
    assert (one["weights"]["lm_head.weight"] - start["lm_head.weight"]).abs().max() > 1e-3  # the head trained


def test_hsdp_replicates_across_shard_groups_and_trains_as_one_process(runs, tmp_path):
    """A 2-D mesh (replicate 2 × shard 1): what HSDP does across nodes, here on 2 gloo processes."""
    root, one, _ = runs
    hsdp = _run(root / "model", tmp_path / "hsdp", 2, shard_size=1)
    _close(one["weights"], hsdp["weights"])


@pytest.fixture
def one_process_group():
    """A process group of one in this test process, closed afterwards (other tests run without one)."""
    import torch.distributed as dist

    from lmrec.training.fsdp import ensure_process_group

    ensure_process_group(torch.device("cpu"))
    yield
    dist.destroy_process_group()


def test_shard_size_must_divide_the_processes(one_process_group):
    from lmrec.errors import LmrecError
    from lmrec.training.fsdp import device_mesh

    with pytest.raises(LmrecError, match="must divide"):
        device_mesh(torch.device("cpu"), 3)  # one process here: 3 does not divide 1


def test_a_bf16_checkpoint_is_read_as_stored_and_upcast_on_the_shard(tmp_path, one_process_group):
    """Rank 0 reads the stored bf16 (half the host memory of fp32) and each shard holds fp32 master weights
    equal to the stored values."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lmrec.training.fsdp import _read_safetensors, build_on_meta, materialize_and_load, shard

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
                     ).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    stored = _read_safetensors(tmp_path / "bf16")
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    model = build_on_meta(tmp_path / "bf16")
    shard(model, model, torch.device("cpu"), param_dtype=None)
    materialize_and_load(model, tmp_path / "bf16", torch.device("cpu"))
    for name, p in model.named_parameters():
        full = p.full_tensor()
        assert full.dtype == torch.float32 and torch.equal(full, stored[name].float()), name


def test_a_damaged_sharded_checkpoint_is_one_message_naming_it(tmp_path, one_process_group):
    """--resume-from a sharded checkpoint whose files were cut short (a copy synced half-way): one user
    error naming the directory, not torch's CheckpointException."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lmrec.errors import LmrecError
    from lmrec.training.checkpoints import SHARDED, Sharded
    from lmrec.training.fsdp import shard

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    shard(model, model, torch.device("cpu"), param_dtype=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    opt.step()
    ck = Sharded(model, opt, sched)
    ck.save(tmp_path, 0)
    ck.load(tmp_path, 0)  # intact: loads
    files = sorted((tmp_path / SHARDED).glob("*.distcp"))
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LmrecError, match=f"{SHARDED}: .*cannot be read") as e:
        ck.load(tmp_path, 0)
    assert str(tmp_path / SHARDED) in str(e.value) and len(str(e.value).splitlines()) == 1
