"""Packed samples never see each other, on every attention backend runnable here, with several packs per
batch: the logits of a packed batch equal each sample's own forward. A backend that is not known to keep
packs apart is refused; the backend choice is explicit and recorded."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lmrec.data.stream import Sample, collate_packs, pack_samples
from lmrec.errors import ConfigError, LmrecError
from lmrec.training import attention


def tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return Qwen3ForCausalLM(cfg).eval()


def packs(seed=0):
    """Two rows, each holding several samples and some padding."""
    g = torch.Generator().manual_seed(seed)

    def sample(n):
        ids = torch.randint(5, 290, (n,), generator=g).tolist()
        return Sample([0, 0, 0], 0, ids, list(ids))

    rows = [[sample(7), sample(12), sample(5)], [sample(9), sample(3), sample(14)]]
    return rows, collate_packs([pack_samples(r) for r in rows], pad_id=0, length=32, segments=True)


BACKENDS = ["eager", "sdpa", "flex_attention", "varlen"]


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_packed_logits_equal_the_per_sample_forward_on_every_backend(backend):
    model = tiny_qwen3()
    name = attention.resolve(backend, torch.device("cpu"), packed=True, mixed_precision="no")
    attention.apply(model, name)
    rows, batch = packs()
    assert batch["input_ids"].shape[0] == 2  # several packs per batch: the case flash attention got wrong
    keys = ("input_ids", "position_ids", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    packed = model(**{k: batch[k] for k in keys}).logits
    attention.apply(model, "sdpa")
    for r, samples in enumerate(rows):
        start = 0
        for s in samples:
            alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
            diff = (packed[r, start: start + len(s.input_ids)] - alone).abs().max()
            assert diff < 1e-4, f"{backend}: row {r} sample at {start} differs by {diff}"
            start += len(s.input_ids)


@torch.no_grad()
def test_a_leaky_pack_is_detected_by_the_same_comparison():
    """The comparison above can fail: without the segment boundaries varlen runs one causal sequence per
    flattened batch, and the later samples see the earlier ones."""
    model = tiny_qwen3()
    attention.apply(model, attention.VARLEN)
    rows, batch = packs()
    whole = torch.tensor([0, batch["input_ids"].numel()], dtype=torch.int32)
    leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  cu_seq_lens_q=whole, cu_seq_lens_k=whole, max_length_q=64, max_length_k=64).logits
    attention.apply(model, "sdpa")
    second = rows[0][1]
    alone = model(input_ids=torch.tensor([second.input_ids])).logits[0]
    assert (leaky[0, 7:19] - alone).abs().max() > 1e-3


def test_varlen_needs_the_segment_boundaries():
    model = tiny_qwen3()
    attention.apply(model, attention.VARLEN)
    with pytest.raises(LmrecError, match="segment boundaries"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_segments_of_a_right_padded_batch():
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    out = attention.with_segments(batch)
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5, 10]
    assert out["max_length_q"] == 5 and out["cu_seq_lens_q"].dtype == torch.int32


@torch.no_grad()
def test_varlen_on_a_right_padded_batch_equals_sdpa_with_its_mask():
    model = tiny_qwen3()
    ids = torch.randint(5, 290, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 2 + [0] * 8])
    ref = model(input_ids=ids, attention_mask=mask).logits
    attention.apply(model, attention.VARLEN)
    seg = attention.with_segments({"input_ids": ids, "attention_mask": mask})
    got = model(**{k: v for k, v in seg.items() if k != "attention_mask"}).logits
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() < 1e-4


def test_the_backend_is_chosen_on_purpose():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.resolve("auto", cpu, packed=True, mixed_precision="no") == "sdpa"
    if attention.varlen_available():
        assert attention.resolve("auto", cuda, packed=True, mixed_precision="bf16") == attention.VARLEN
    assert attention.resolve("auto", cuda, packed=False, mixed_precision="bf16") == "sdpa"
    assert attention.resolve("auto", cuda, packed=True, mixed_precision="no") == "sdpa"
    with pytest.raises(ConfigError, match="bf16"):
        attention.resolve("varlen", cuda, packed=True, mixed_precision="no")


def test_a_varlen_kernel_without_scale_and_window_is_never_chosen(monkeypatch):
    """torch 2.10's varlen_attn takes no ``scale`` or ``window_size`` (the kernel call passes both): ``auto`` does
    not choose it and asking for it names the torch it needs; a kernel that takes both is used."""
    import sys
    import types

    def old_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError("not called here")

    def new_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1)):
        raise AssertionError("not called here")

    fake = types.ModuleType("torch.nn.attention.varlen")
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", fake)
    cuda = torch.device("cuda")
    fake.varlen_attn = old_kernel
    assert not attention.varlen_available()
    assert attention.resolve("auto", cuda, packed=True, mixed_precision="bf16") == "sdpa"
    with pytest.raises(ConfigError, match=r"torch >= 2\.11"):
        attention.resolve("varlen", cuda, packed=True, mixed_precision="bf16")
    fake.varlen_attn = new_kernel
    assert attention.varlen_available()
    assert attention.resolve("auto", cuda, packed=True, mixed_precision="bf16") == attention.VARLEN


def test_a_backend_that_cannot_isolate_packs_is_refused():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("my_kernel", sdpa_attention_forward)
    with pytest.raises(ConfigError, match="packed samples apart"):
        attention.check_isolates("my_kernel", packed=True)
    attention.check_isolates("my_kernel", packed=False)  # unpacked batches carry their own mask


def test_an_uninstalled_backend_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="flash_attention_2"):
        attention.apply(tiny_qwen3(), "flash_attention_2")


def test_compiled_layers_compute_what_the_plain_model_computes():
    """train.compile's regional compilation (traced by dynamo; the eager backend here, inductor on a GPU)."""
    from lmrec.training.fsdp import compile_layers

    model, ref = tiny_qwen3(), tiny_qwen3()
    assert compile_layers(model, backend="eager") == 2
    _, batch = packs()
    ids, pos = batch["input_ids"], batch["position_ids"]
    got = model(input_ids=ids, position_ids=pos, labels=ids)
    want = ref(input_ids=ids, position_ids=pos, labels=ids)
    got.loss.backward()
    want.loss.backward()
    assert (got.logits - want.logits).abs().max() < 1e-5
    assert (model.model.layers[0].mlp.up_proj.weight.grad - ref.model.layers[0].mlp.up_proj.weight.grad
            ).abs().max() < 1e-5
