"""Pickle-free checkpoints: nested states (optimizer state dicts included) round-trip exactly."""

from __future__ import annotations

import pytest
import torch

from vgmedgen.platform.checkpoint import CheckpointError, load_state, rng_state, save_state, set_rng_state


def test_optimizer_and_model_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "step": 7,
        "rng": rng_state(),
        "name": "x",
        "t": (1, None),
    }
    save_state(tmp_path, "ckpt", state)
    back = load_state(tmp_path, "ckpt")
    assert back["step"] == 7 and back["name"] == "x" and back["t"] == (1, None)
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    assert set(back["opt"]["state"]) == {0, 1, 2, 3}  # int keys stay int
    assert back["opt"]["param_groups"][0]["lr"] == 1e-3
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    opt2.load_state_dict(back["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert opt2.param_groups[0]["lr"] == 1e-3


def test_rng_state_restores_the_stream(tmp_path):
    torch.manual_seed(3)
    save_state(tmp_path, "rng", rng_state())
    a = torch.rand(4)
    set_rng_state(load_state(tmp_path, "rng"))
    assert torch.equal(torch.rand(4), a)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="ckpt.safetensors"):
        load_state(tmp_path, "ckpt")


def test_unsupported_objects_fail_loudly(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_state(tmp_path, "bad", {"x": object()})
