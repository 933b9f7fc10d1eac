"""Run identity: the names sweeps and the generation job will use are stable, order-free where the
input is a mapping, change with what they name, and refuse what names nothing."""

from __future__ import annotations

import pytest

from vgmedgen.platform.runs import plan_name, shard_name, trial_name

MODEL = "ab" * 32  # a manifest sha256


def test_trial_names_follow_the_overrides_not_their_order():
    a = trial_name("lr-sweep", {"train.dit.lr": 1e-4, "train.dit.batch_size": 32})
    assert a == trial_name("lr-sweep", {"train.dit.batch_size": 32, "train.dit.lr": 1e-4})
    assert a.startswith("lr-sweep-trial-") and len(a) == len("lr-sweep-trial-") + 12
    assert a != trial_name("lr-sweep", {"train.dit.lr": 2e-4, "train.dit.batch_size": 32})
    assert a != trial_name("other", {"train.dit.lr": 1e-4, "train.dit.batch_size": 32})
    with pytest.raises(ValueError, match="needs at least one override"):
        trial_name("lr-sweep", {})


def test_plan_names_follow_the_model_and_every_request_in_order():
    rows = [{"anatomy_prompt": "a small lesion", "style_prompt": "pink", "seed": s} for s in range(3)]
    name = plan_name(MODEL, rows)
    assert name.startswith(MODEL[:12] + "-plan-") and name == plan_name(MODEL, list(rows))
    assert name != plan_name(MODEL, rows[::-1])
    assert name != plan_name("cd" * 32, rows)
    assert name != plan_name(MODEL, [*rows[:2], {**rows[2], "seed": 7}])


def test_shard_names_sort_in_index_order_and_refuse_a_shard_outside_the_plan():
    names = [shard_name("p", i, 12) for i in range(12)]
    assert names == sorted(names) and names[3] == "p-shard-00003-of-00012"
    wide = [shard_name("p", i, 200_000) for i in (9, 10, 199_999)]
    assert wide == sorted(wide) and wide[2] == "p-shard-199999-of-200000"
    for bad in (-1, 12):
        with pytest.raises(ValueError, match=r"shard index must lie in \[0, 12\)"):
            shard_name("p", bad, 12)
