import math

import pytest
import torch

from lightning_tfm.tasks.schedules import InverseSqrtSchedule, WarmupCosineSchedule


def _lrs(schedule_cls, steps, **kwargs):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1.0)
    schedule = schedule_cls(optimizer, **kwargs)
    lrs = {}
    for step in range(1, max(steps) + 1):                  # the lr in force for optimizer step `step`
        lrs[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
    return [lrs[s] for s in steps]


def test_inverse_sqrt_schedule_equals_the_papers_formula():
    steps = [1, 2, 100, 3999, 4000, 4001, 10000, 100000]
    got = _lrs(InverseSqrtSchedule, steps, d_model=512, warmup_steps=4000)
    for step, lr in zip(steps, got):
        want = 512 ** -0.5 * min(step ** -0.5, step * 4000 ** -1.5)        # §5.3, equation 3
        assert math.isclose(lr, want, rel_tol=1e-9), (step, lr, want)
    assert max(got) == got[steps.index(4000)]                              # peak at the end of warmup


def test_warmup_cosine_schedule():
    got = _lrs(WarmupCosineSchedule, [1, 10, 11, 55, 100, 200], warmup_steps=10, total_steps=100, min_ratio=0.1)
    assert math.isclose(got[0], 0.1) and math.isclose(got[1], 1.0)
    assert math.isclose(got[2], 1.0)
    assert math.isclose(got[3], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 90)))
    assert math.isclose(got[5], 0.1)


@pytest.mark.parametrize("build, message", [
    (lambda o: InverseSqrtSchedule(o, warmup_steps=0), "warmup_steps=0"),
    (lambda o: WarmupCosineSchedule(o, warmup_steps=10, total_steps=10), "warmup_steps=10, total_steps=10"),
])
def test_bad_schedules_name_the_values(build, message):
    with pytest.raises(ValueError, match=message):
        build(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
