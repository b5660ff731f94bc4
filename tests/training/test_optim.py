"""The optimizer and schedule: warmup then cosine decay to min_lr (values against a hand computation), a first
step that trains, betas, weight-decay groups chosen by module type, and the config's checks."""

import math

import pytest
import torch

from lmrec.config import GenRunConfig, load_config
from lmrec.errors import ConfigError
from lmrec.training.loop import Optim, optimizer_groups


def lrs(optim: Optim, lr: float, total: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt, sched = optim.build(model, lr, total)
    out = []
    for _ in range(total + 3):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_min_lr_equals_a_hand_computation():
    lr, floor, total = 1e-3, 1e-4, 100
    got = lrs(Optim(warmup_ratio=0.1, schedule="cosine", min_lr=floor), lr, total)
    for step, value in enumerate(got):
        if step < 10:
            expected = lr * (step + 1) / 11  # the first step trains too: lr / 11, the peak at step 10
        else:
            progress = min(1.0, (step - 10) / 90)
            expected = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-15), step
    assert got[-1] == pytest.approx(floor)  # training past num_training_steps stays at the floor


def test_linear_schedule_and_betas():
    got = lrs(Optim(warmup_ratio=0.0), 2e-3, 10)
    assert got[:11] == pytest.approx([2e-3 * (10 - s) / 10 for s in range(11)])
    opt, _ = Optim(betas=(0.9, 0.95)).build(torch.nn.Linear(2, 2), 1e-3, 5)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_no_weight_decay_on_norms_biases_and_optionally_embeddings_by_module_type():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         tie_word_embeddings=True))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, free = optimizer_groups(model, 0.1)
    assert {names[id(p)] for p in free["params"]} == {n for n in names.values() if "norm" in n}
    assert "model.embed_tokens.weight" in {names[id(p)] for p in decay["params"]}
    decay, free = optimizer_groups(model, 0.1, no_decay_embeddings=True)
    assert "model.embed_tokens.weight" in {names[id(p)] for p in free["params"]}  # the tied head with it
    assert len(decay["params"]) + len(free["params"]) == len(list(model.parameters()))


def test_recformer_groups_are_the_same_as_before(tiny_backbone):
    """Module types pick exactly the parameters the former name rule picked on RecFormer."""
    from lmrec.recformer.backbones import build_recformer
    from lmrec.recformer.modeling_recformer import RecformerForPretraining

    model, _, _ = build_recformer(tiny_backbone, model_cls=RecformerForPretraining, max_token_num=64)
    old_rule = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    expected = {n for n, p in model.named_parameters() if n.endswith(old_rule)}
    names = {id(p): n for n, p in model.named_parameters()}
    _, free = optimizer_groups(model, 0.01)
    assert {names[id(p)] for p in free["params"]} == expected


def test_schedule_settings_are_checked():
    cfg = load_config(None, ["train.lr_schedule=cosine", "train.min_lr=1e-5", "train.adam_betas=[0.9, 0.95]"],
                      schema=GenRunConfig)
    assert Optim.from_train(cfg.train).betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="min_lr needs lr_schedule: cosine"):
        load_config(None, ["train.min_lr=1e-5"], schema=GenRunConfig)
    with pytest.raises(ConfigError, match="must be below lr"):
        load_config(None, ["train.lr_schedule=cosine", "train.min_lr=1"], schema=GenRunConfig)


@pytest.mark.parametrize("schedule", ["linear", "constant", "cosine"])
def test_the_first_optimizer_step_trains_and_the_rest_is_transformers_schedule(schedule):
    """transformers' warmup starts at lr 0: a run of one optimizer step (one epoch on small data) trained
    nothing. The warmup is theirs shifted by one step; after it the schedule is theirs unchanged."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    lr, total = 1e-3, 100
    optim = Optim(warmup_ratio=0.05, schedule=schedule, min_lr=1e-5 if schedule == "cosine" else 0.0)
    assert lrs(optim, lr, 1)[0] == pytest.approx(lr / 2)  # one step, one warmup step: half the peak, not 0
    got = lrs(optim, lr, total)
    assert got[:6] == pytest.approx([lr * (s + 1) / 6 for s in range(5)] + [lr])  # 5 warmup steps, then the peak
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ref = {"linear": get_linear_schedule_with_warmup(opt, 5, total),
           "constant": get_constant_schedule_with_warmup(opt, 5)}.get(schedule)
    if ref is not None:
        theirs = []
        for _ in range(total + 3):
            theirs.append(ref.get_last_lr()[0])
            opt.step()
            ref.step()
        assert theirs[0] == 0.0 and got[5:] == pytest.approx(theirs[5:], rel=1e-12, abs=1e-15)


def test_one_optimizer_step_moves_the_weights_and_few_steps_are_warned(tmp_path):
    from lmrec.config import IdRunConfig
    from lmrec.training.loop import Stage, data_loader
    from lmrec.training.run import Run
    from tests.training.toy import Toy

    model, logged = Toy(target=1.0), []
    before = model.lin.weight.detach().clone()
    cfg = IdRunConfig(output_dir=str(tmp_path / "run"), train={"warmup_ratio": 0.05})
    with Run(cfg, "t", log=logged.append) as run:
        r = run.fit(model, lambda e: data_loader([{"x": torch.ones(4, 2)}], seed=e), Stage("one", 1, 0.1))
    assert r.global_step == 1 and not torch.equal(model.lin.weight.detach(), before)
    assert any("only 1 optimizer step(s)" in line for line in logged)
