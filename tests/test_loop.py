"""The shared training loop without Ray: global-RNG draws (dropout) are a pure function of (seed, step, rank)."""

from __future__ import annotations

import builtins
import io
import logging
import sys
from pathlib import Path

import pytest
import torch
from loopcontext import LocalContext

from vgmedgen.platform.training.config import StageTrainConfig
from vgmedgen.platform.training.loop import train_loop

STEPS = 6


class _DropoutTask:
    """A linear model behind nn.Dropout; records each step's dropout mask."""

    name = "probe"

    def __init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        self.data = torch.linspace(-1, 1, 16 * 8).reshape(16, 8)
        self.masks: dict[int, torch.Tensor] = {}
        self.step = 0

    def trainable_parameters(self):
        return list(self.model.parameters())

    def wrap_for_ddp(self, prepare) -> None:  # one process plays one rank here: nothing to wrap
        pass

    def train_size(self) -> int:
        return len(self.data)

    def train_batch(self, idx, device):
        return self.data[torch.as_tensor(idx)]

    def loss(self, batch, generator):
        dropped = self.model[0](batch)
        self.masks[self.step] = dropped != 0
        out = self.model[1](dropped)
        return {"total": (out**2).mean()}

    def after_step(self, step: int) -> None:
        self.step = step + 1

    def validate(self) -> dict[str, float]:
        return {"loss": 0.0}

    def state_dict(self):
        return {"model": self.model.state_dict(), "step": self.step}

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])

    def export(self, directory: Path) -> None:
        pass

    def artifacts(self, step: int, directory: Path) -> list[Path]:
        return []


def _cfg(**extra) -> StageTrainConfig:
    return StageTrainConfig(steps=STEPS, batch_size=4, checkpoint_every=3, val_every=3, log_every=3, **extra)


def _run(task, store: Path, rank: int = 0, world: int = 1, **extra) -> None:
    train_loop(task, _cfg(**extra), 7, LocalContext(store, rank, world), torch.device("cpu"))


def test_dropout_draws_are_a_function_of_seed_step_and_rank(tmp_path: Path) -> None:
    torch.manual_seed(1)  # every worker process starts from torch's one default seed
    caller_state = torch.get_rng_state()
    clean = _DropoutTask()
    _run(clean, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), caller_state)  # the caller's RNG is left as it was

    torch.manual_seed(2)  # whatever the process drew before, the same masks
    again = _DropoutTask()
    _run(again, tmp_path / "b")
    assert all(torch.equal(again.masks[s], clean.masks[s]) for s in range(STEPS))

    torch.manual_seed(1)  # another rank from the same process state draws other masks
    other = _DropoutTask()
    _run(other, tmp_path / "c", rank=1, world=2)
    assert not any(torch.equal(other.masks[s], clean.masks[s]) for s in range(STEPS))


def test_resumed_run_repeats_the_undisturbed_runs_draws_and_weights(tmp_path: Path) -> None:
    clean = _DropoutTask()
    _run(clean, tmp_path / "clean")
    ctx, marker = LocalContext(tmp_path / "fault"), tmp_path / "fault_injected"
    first = _DropoutTask()
    with pytest.raises(RuntimeError, match="injected fault at step 4"):
        train_loop(first, _cfg(fail_at_step=4), 7, ctx, torch.device("cpu"), fault_marker=marker)
    resumed = _DropoutTask()
    train_loop(resumed, _cfg(fail_at_step=4), 7, ctx, torch.device("cpu"), fault_marker=marker)
    assert sorted(resumed.masks) == [3, 4, 5]  # from the checkpoint written after step 2
    assert all(torch.equal(first.masks[s], clean.masks[s]) for s in range(3))
    assert all(torch.equal(resumed.masks[s], clean.masks[s]) for s in (3, 4, 5))
    final = resumed.model.state_dict()
    assert all(torch.equal(p, final[name]) for name, p in clean.model.state_dict().items())


def test_progress_lines_print_once_under_ray_trains_print_patch(tmp_path: Path, monkeypatch) -> None:
    # A Ray Train worker: print patched by Train (log through the root logger's console handler, and
    # print too when sys.stdout is wrapped, which a Ray worker's always is).
    from ray.train.v2._internal.logging import patch_print

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setattr(builtins, "print", patch_print.redirected_print)
    root, handler = logging.getLogger(), logging.StreamHandler(stream)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        print("a line through the patched print")
        _run(_DropoutTask(), tmp_path)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    out = stream.getvalue().splitlines()
    assert out.count("a line through the patched print") == 2  # the patch this guards against is active
    progress = [line for line in out if line.startswith("[probe] step")]
    assert [line.split(" loss")[0] for line in progress] == [
        "[probe] step 1/6",
        "[probe] step 3/6",
        "[probe] step 6/6",
    ]
