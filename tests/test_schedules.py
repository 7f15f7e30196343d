"""The per-step learning-rate schedule (captioning.schedules) and how the module sizes it from the run."""

from __future__ import annotations

import functools

import pytest
import torch

from captioning.schedules import OneCycleLR, fill_run_arguments


def _optimizer(*rates):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in rates]
    return torch.optim.AdamW(groups)


def _rates(scheduler, optimizer, steps):
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def test_it_is_torchs_one_cycle_up_to_its_last_step_and_holds_the_final_rate_after():
    ours_opt, torch_opt = _optimizer(0.003), _optimizer(0.003)
    ours = OneCycleLR(ours_opt, max_lr=0.003, total_steps=20, pct_start=0.1)
    theirs = torch.optim.lr_scheduler.OneCycleLR(torch_opt, max_lr=0.003, total_steps=20, pct_start=0.1)
    # the 20 rates the 20 optimizer steps of the run use: torch's
    ours_rates, torch_rates = _rates(ours, ours_opt, 20), _rates(theirs, torch_opt, 20)
    assert ours_rates == torch_rates
    # the warm-up reaches the peak after 10% of the run, the cycle ends at max_lr / (25 * 1e4)
    final = 0.003 / 25 / 1e4
    assert max(ours_rates) == [pytest.approx(0.003)] and ours_rates[-1] == [pytest.approx(final, rel=1e-6)]
    with pytest.raises(ValueError, match="Tried to step"):
        _rates(theirs, torch_opt, 2)
    # a resumed run given more epochs goes on at the final rate instead of stopping
    assert _rates(ours, ours_opt, 5) == [[pytest.approx(final, rel=1e-6)]] * 5


def test_the_run_fills_in_its_length_and_each_groups_peak():
    optimizer = _optimizer(0.003, 0.0005)  # decoder at optimizer.lr, encoder at module.encoder_lr
    scheduler = fill_run_arguments(functools.partial(OneCycleLR, pct_start=0.1), optimizer, 50)
    assert scheduler.total_steps == 50
    rates = _rates(scheduler, optimizer, 50)
    peak = max(rates, key=lambda r: r[0])
    assert peak == [pytest.approx(0.003), pytest.approx(0.0005)] and rates.index(peak) == 4
    # what the config gives is kept
    given = fill_run_arguments(functools.partial(OneCycleLR, max_lr=0.01, total_steps=7), _optimizer(0.003), 50)
    assert given.total_steps == 7 and given.optimizer.param_groups[0]["max_lr"] == 0.01
    # schedules that take neither are called as they are
    cosine = fill_run_arguments(functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3),
                                _optimizer(0.003), 50)
    assert cosine.T_max == 3


@pytest.mark.parametrize("steps", [None, float("inf"), 0])
def test_a_run_of_unknown_length_is_named(steps):
    with pytest.raises(ValueError, match="trainer.max_epochs or trainer.max_steps"):
        fill_run_arguments(functools.partial(OneCycleLR), _optimizer(0.003), steps)


@pytest.mark.parametrize("total", [1, 2, 3, 10, 11])
def test_short_runs_step_through_without_error(total):
    # torch's divides by zero where pct_start * total_steps == 1 (a 10-step run); every rate stays in (0, max_lr]
    optimizer = _optimizer(0.003)
    rates = _rates(OneCycleLR(optimizer, max_lr=0.003, total_steps=total, pct_start=0.1), optimizer, total + 2)
    assert all(0 < r[0] <= 0.003 + 1e-12 for r in rates)
