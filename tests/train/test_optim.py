"""AdamW param groups and the warm-up schedules."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import make_cfg

from tunesmith.train.optim import build_scheduler, lr_lambda, total_steps
from tunesmith.train.optimizers import build_optimizer, param_groups


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.input_layernorm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_biases_and_norms_and_frozen_params_left_out(tmp_path):
    model = _Tiny()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and decay["params"] == [model.proj.weight]
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {
        id(model.proj.bias),
        id(model.input_layernorm.weight),
        id(model.input_layernorm.bias),
    }
    opt = build_optimizer(model, *[make_cfg(tmp_path, weight_decay=0.1, adam_beta2=0.95, learning_rate=3e-4)] * 2)
    assert (
        isinstance(opt, torch.optim.AdamW)
        and opt.defaults["betas"] == (0.9, 0.95)
        and opt.defaults["lr"] == 3e-4
    )


def test_total_steps_from_epochs_or_max_steps(tmp_path):
    # 10 micro-batches, accumulation 4 → 3 steps per epoch (the last window is short)
    assert (
        total_steps(make_cfg(tmp_path, max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=4), 10)
        == 6
    )
    assert (
        total_steps(make_cfg(tmp_path, max_steps=-1, num_train_epochs=0.5, gradient_accumulation_steps=1), 5)
        == 3
    )
    assert total_steps(make_cfg(tmp_path, max_steps=17, num_train_epochs=2), 10) == 17


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("constant", [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
        ("constant_with_warmup", [0, 0.5, 1, 1, 1, 1, 1, 1, 1, 1]),
        ("linear", [0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
        ("cosine", [0, 0.5, 1] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 8)]),
    ],
)
def test_schedules_warm_up_then_follow_their_shape(kind, expected):
    f = lr_lambda(kind, warmup=2, total=10)
    assert [f(s) for s in range(10)] == pytest.approx(expected)


def test_scheduler_uses_warmup_ratio_and_steps(tmp_path):
    model = torch.nn.Linear(2, 2)
    cfg = make_cfg(tmp_path, lr_scheduler_type="linear", warmup_ratio=0.25, learning_rate=1.0)
    opt = build_optimizer(model, cfg, cfg)
    sched = build_scheduler(opt, cfg, total=8)  # ceil(0.25 × 8) = 2 warm-up steps
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0, 0.5, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    cfg2 = make_cfg(tmp_path, lr_scheduler_type="cosine", warmup_ratio=0.5, warmup_steps=1, learning_rate=1.0)
    sched2 = build_scheduler(build_optimizer(model, cfg2, cfg2), cfg2, total=8)
    assert sched2.lr_lambdas[0](1) == pytest.approx(1.0)  # warmup_steps wins over warmup_ratio


@pytest.mark.parametrize("kind, options", [
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("cosine_with_min_lr", {"min_lr": 2e-4, "num_cycles": 0.5}),
    ("cosine_with_restarts", {"num_cycles": 2}), ("polynomial", {"power": 2.0, "lr_end": 1e-5}),
])
def test_schedules_with_lr_scheduler_kwargs_follow_transformers(kind, options):
    import transformers

    from tunesmith.config import Config

    cfg = Config(lr_scheduler_type=kind, lr_scheduler_kwargs=options, learning_rate=1e-3, warmup_steps=3)
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = build_scheduler(ours, cfg, total=20)
    reference = transformers.get_scheduler(kind, theirs, num_warmup_steps=3, num_training_steps=20,
                                           scheduler_specific_kwargs=options)
    for _ in range(20):
        assert schedule.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        ours.step(), theirs.step(), schedule.step(), reference.step()


@pytest.mark.parametrize("kind, options, message", [
    ("cosine", {"min_lr": 1e-5}, "min_lr is not an option of lr_scheduler_type cosine"),
    ("cosine_with_min_lr", {}, "needs exactly one of min_lr and min_lr_rate"),
])
def test_scheduler_options_that_do_not_fit_are_refused(kind, options, message):
    from tunesmith.config import Config
    from tunesmith.errors import ConfigError

    cfg = Config(lr_scheduler_type=kind, lr_scheduler_kwargs=options)
    with pytest.raises(ConfigError, match=message):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), cfg, total=10)
