"""Data parallelism without Ray: two gloo processes compute what one process computes on the whole batch.

Two ranks are spawned once for the module (plain ``torch.distributed`` over gloo on 127.0.0.1, the DDP
wrapper handed to the stage as Ray's ``prepare_model`` would be); they write their gradients and trained
weights to files and the tests compare them with one process here. Random draws are switched off where
the model allows (a constant Gumbel noise and ``z = mu`` in stage 1, dropout 0 in the text heads, a frozen
text encoder); the diffusion noise and timesteps of stage 3 cannot be, so there the one-process reference
replays each rank's own draws (``step_generator(seed, micro_step, rank)``) and reduces the terms globally.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from loopcontext import LocalContext

import vgmedgen.model.visual as visual_module
from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import ExperimentConfig, load_experiment
from vgmedgen.platform.datasets.synthderm import synthderm_record
from vgmedgen.platform.records import records_to_table
from vgmedgen.platform.training.data import batch_indices, seed_global_rng, step_generator
from vgmedgen.platform.training.driver import ensure_text_encoder
from vgmedgen.platform.training.loop import train_loop
from vgmedgen.platform.training.stages import DitTask, build_task

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 8  # the global batch of the gradient tests: 4 rows per rank
STEPS = 3  # K optimiser steps of the loop tests
GRAD_ACCUM = 2  # in the loop tests: 2 micro-batches of 4 rows, 2 per rank
RECORDS = 64
CPU = torch.device("cpu")
# float32 sums taken in another order (DDP averages two half-batch means where one process takes the mean
# of the whole batch; gloo adds the ranks' gradients; BERT pads a half batch to a shorter length) differ in
# the last bits, so equal means equal to float tolerance, not bitwise.
TOL = {"rtol": 1e-4, "atol": 1e-6}


def _cfg(root: Path, *extra: str) -> ExperimentConfig:
    return load_experiment(
        REPO / "configs/tiny.yaml",
        [
            f"output_root={root}",
            f"data.synthderm.num_records={RECORDS}",
            "model.text.head_dropout=0",  # the one dropout of a frozen-encoder text stage
            "model.text.standardize_priors=true",  # priors from the first rows, the same on every rank
            # A colour term strong enough that normalising it per rank instead of globally shows far above
            # the tolerance (checked in the dit gradient test).
            "model.generator.colour.weight=1.0",
            *[
                f"train.{s}.{k}={v}"
                for s in ("align", "dit")
                for k, v in (
                    ("steps", STEPS),
                    ("batch_size", BATCH),
                    ("grad_accum", GRAD_ACCUM),
                    ("lr", 1e-3),
                    ("checkpoint_every", STEPS),
                    ("val_every", STEPS),
                    ("log_every", 1),
                )
            ],
            "train.dit.weight_decay=0.01",
            *extra,
        ],
    )


# ---------------------------------------------------------------------------------------------------------
# No random draws in stage 1: eval mode gives z = mu and the argmax anatomy map; the argmax then gets the
# straight-through gradient of softmax(logits), i.e. gumbel_one_hot with its Gumbel noise held at 0, so the
# U-Net still trains. Nothing in the visual model keeps running statistics (InstanceNorm only), so eval
# mode changes nothing else.
# ---------------------------------------------------------------------------------------------------------


def _constant_gumbel_one_hot(logits: torch.Tensor) -> torch.Tensor:
    y_soft = torch.softmax(logits, dim=1)
    y_hard = F.one_hot(y_soft.argmax(dim=1), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    return y_hard + (y_soft - y_soft.detach())


@contextlib.contextmanager
def _no_visual_draws():
    original = visual_module.argmax_one_hot
    visual_module.argmax_one_hot = _constant_gumbel_one_hot
    try:
        yield
    finally:
        visual_module.argmax_one_hot = original


def _task(stage: str, cfg: ExperimentConfig, inputs: dict[str, Path], rank: int = 0, world: int = 1):
    task = build_task(stage, cfg, inputs, CPU, rank, world)
    if stage == "visual":
        task.module.eval()
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in task.module.modules())
    return task


def _named_trainable(task) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in task.module.named_parameters() if p.requires_grad}


def _grads(task) -> dict[str, torch.Tensor]:
    """Each trainable parameter's gradient (zeros where none reached it)."""
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in _named_trainable(task).items()
    }


# ---------------------------------------------------------------------------------------------------------
# The two ranks
# ---------------------------------------------------------------------------------------------------------


def _ddp(module: torch.nn.Module, parallel_strategy_kwargs: dict | None = None) -> torch.nn.Module:
    """What ray.train.torch.prepare_model does on CPU, over the process group the test made."""
    return torch.nn.parallel.DistributedDataParallel(module, **(parallel_strategy_kwargs or {}))


def _rank_gradient(stage: str, cfg: ExperimentConfig, inputs: dict[str, Path], rank: int) -> dict:
    task = _task(stage, cfg, inputs, rank, WORLD)
    task.wrap_for_ddp(_ddp)
    assert isinstance(task.loss_module, torch.nn.parallel.DistributedDataParallel)
    idx = batch_indices(task.train_size(), BATCH, cfg.seed, 0, rank, WORLD)
    gen = step_generator(cfg.seed, 0, rank)
    seed_global_rng(cfg.seed, 0, rank)
    losses = task.loss(task.train_batch(idx, CPU), gen)
    losses["total"].backward()
    out = {
        "grads": _grads(task),
        "index": idx.tolist(),
        "find_unused": task.loss_module.find_unused_parameters,
    }
    if stage == "dit":
        out["active"] = int(losses["colour"].numel())
    return out


def _rank_steps(stage: str, cfg: ExperimentConfig, inputs: dict[str, Path], rank: int, store: Path) -> dict:
    task = _task(stage, cfg, inputs, rank, WORLD)
    ctx = LocalContext(store / f"rank{rank}", rank, WORLD)
    metrics = train_loop(task, getattr(cfg.train, stage), cfg.seed, ctx, CPU, prepare_model=_ddp)
    return {"state": task.state_dict(), "metrics": metrics}


def _rank_main(rank: int, port: int, job_file: str) -> None:
    """One spawned rank: the gradients of every stage, then K loop steps of align and dit."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
    job = json.loads(Path(job_file).read_text())
    cfg = ExperimentConfig.model_validate(job["experiment"])
    inputs = {k: Path(v) for k, v in job["inputs"].items()}
    out = Path(job["out"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for stage in ("visual", "align", "dit"):
            with _no_visual_draws() if stage == "visual" else contextlib.nullcontext():
                torch.save(_rank_gradient(stage, cfg, inputs, rank), out / f"grad-{stage}-{rank}.pt")
        for stage in ("align", "dit"):
            torch.save(
                _rank_steps(stage, cfg, inputs, rank, out / f"store-{stage}"),
                out / f"steps-{stage}-{rank}.pt",
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Records, the earlier stages' exports (untrained: what matters is that every process loads the same),
    and the two ranks' results."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = _cfg(root)
    # SynthDerm records without Ray (prepare_records runs Ray Data): all rows in train (validation reads them too).
    cfg.records_dir.mkdir(parents=True)
    rows = [
        {**synthderm_record(cfg.data.synthderm.seed, i, cfg.data.resolution), "split": "train"}
        for i in range(RECORDS)
    ]
    pq.write_table(records_to_table(rows), cfg.records_dir / "part-00000.parquet")
    inputs = {"text_encoder": ensure_text_encoder(cfg), "visual": root / "visual", "text": root / "text"}
    build_task("visual", cfg, inputs, CPU, 0, 1).export(inputs["visual"])
    build_task("align", cfg, inputs, CPU, 0, 1).export(inputs["text"])

    out = root / "ranks"
    out.mkdir()
    job = root / "job.json"
    job.write_text(
        json.dumps(
            {
                "experiment": cfg.model_dump(mode="json"),
                "inputs": {k: str(v) for k, v in inputs.items()},
                "out": str(out),
            }
        )
    )
    # A failure in a rank ends the other and raises here with the rank's traceback.
    mp.spawn(_rank_main, args=(_free_port(), str(job)), nprocs=WORLD, join=True)
    return {"cfg": cfg, "inputs": inputs, "out": out}


def _load(setup: dict, kind: str, stage: str) -> list[dict]:
    return [torch.load(setup["out"] / f"{kind}-{stage}-{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------------------


def _dit_global_loss(
    task: DitTask, seed: int, micro_step: int, global_batch: int
) -> tuple[torch.Tensor, dict]:
    """The loss of the whole micro-batch in one process, each row with the draws its rank made:
    ``mean(eps) + colour.weight * sum(colour over active rows) / active rows``, over all ranks' rows."""
    eps, colour, mask, per_rank = [], [], [], []
    for rank in range(WORLD):
        idx = batch_indices(task.train_size(), global_batch, seed, micro_step, rank, WORLD)
        batch = task.train_batch(idx, CPU)
        gen = step_generator(seed, micro_step, rank)
        seed_global_rng(seed, micro_step, rank)
        terms = DitTask._terms(task.module, batch["image"], task._conditions(batch), gen, task.step)
        eps.append(terms["eps"])
        colour.append(terms["colour"])
        mask.append(terms["colour_mask"])
        per_rank.append(terms)
    eps_all, colour_all, mask_all = torch.cat(eps), torch.cat(colour), torch.cat(mask).float()
    loss = eps_all.mean()
    if mask_all.sum() > 0:
        loss = loss + task.module.cfg.colour.weight * (colour_all * mask_all).sum() / mask_all.sum()
    return loss, {
        "per_rank": per_rank,
        "eps": eps_all.detach(),
        "colour": colour_all[mask_all.bool()].detach(),
    }


def _dit_rank_local_loss(task: DitTask, per_rank: list[dict]) -> torch.Tensor:
    """What each rank would backpropagate if it normalised the colour term by its own active rows (the
    ranks' average of these is not the one-process loss when the ranks' active counts differ)."""
    losses = [task.module.reduce_loss(t) for t in per_rank]  # world=1: the rank's own count
    return torch.stack(losses).mean()


def _reference_gradient(stage: str, cfg: ExperimentConfig, inputs: dict[str, Path]) -> tuple[dict, dict]:
    task = _task(stage, cfg, inputs)
    info: dict = {}
    if stage == "dit":
        loss, info = _dit_global_loss(task, cfg.seed, 0, BATCH)
    else:
        whole = batch_indices(task.train_size(), BATCH, cfg.seed, 0, 0, 1)
        info["index"] = whole.tolist()
        loss = task.loss(task.train_batch(whole, CPU), step_generator(cfg.seed, 0, 0))["total"]
    loss.backward()
    return _grads(task), info


def _assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _grads_differ(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[n], b[n], **TOL) for n in a)


@pytest.mark.parametrize("stage", ["visual", "align", "dit"])
def test_gradients_of_two_ranks_equal_one_process(setup: dict, stage: str, monkeypatch) -> None:
    cfg, inputs = setup["cfg"], setup["inputs"]
    ranks = _load(setup, "grad", stage)
    if stage == "visual":
        monkeypatch.setattr(visual_module, "argmax_one_hot", _constant_gumbel_one_hot)
    expected, info = _reference_gradient(stage, cfg, inputs)
    assert sum(float(g.norm()) for g in expected.values()) > 0

    # The ranks took disjoint halves of the global batch, and DDP left them the same averaged gradient.
    shares = [set(r["index"]) for r in ranks]
    assert len(shares[0]) == len(shares[1]) == BATCH // WORLD and not shares[0] & shares[1]
    if stage != "dit":
        assert shares[0] | shares[1] == set(info["index"])
    for rank in ranks:
        _assert_grads_close(rank["grads"], expected)

    if stage == "dit":
        # The colour term is on: on some but not all rows of each rank, unequally many per rank (so a colour
        # mean per rank would weigh rows differently), with non-zero values; the reference replays the ranks'
        # draws (the same active rows as they saw).
        active = [int(t["colour_mask"].sum()) for t in info["per_rank"]]
        assert active == [r["active"] for r in ranks]
        assert all(0 < a < BATCH // WORLD for a in active) and active[0] != active[1], active
        assert bool((info["colour"] != 0).all())
        # ... and it matters: the ranks' average of per-rank colour means has another gradient.
        task = _task("dit", cfg, inputs)
        _, local = _dit_global_loss(task, cfg.seed, 0, BATCH)
        _dit_rank_local_loss(task, local["per_rank"]).backward()
        assert _grads_differ(_grads(task), expected)
    else:
        # One rank's share alone has another gradient: the comparison sees whether the ranks averaged.
        task = _task(stage, cfg, inputs)
        share = task.train_batch(batch_indices(task.train_size(), BATCH, cfg.seed, 0, 0, WORLD), CPU)
        task.loss(share, step_generator(cfg.seed, 0, 0))["total"].backward()
        assert _grads_differ(_grads(task), expected)


def _schedule(opt: torch.optim.Optimizer, stage_cfg):
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if stage_cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(opt, stage_cfg.warmup_steps, stage_cfg.steps)
    return get_constant_schedule_with_warmup(opt, stage_cfg.warmup_steps)


def _simulate(stage: str, cfg: ExperimentConfig, inputs: dict[str, Path]) -> tuple[object, dict, dict]:
    """K steps of the two ranks in one process: each rank's loss on its share with its draws, gradients
    averaged over ranks (dit: the colour term normalised by the global active count), clipped, AdamW."""
    sc = getattr(cfg.train, stage)
    task = _task(stage, cfg, inputs)
    initial = {k: v.clone() for k, v in _flat_state(task.state_dict()).items()}
    params = task.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=sc.lr, betas=sc.betas, weight_decay=sc.weight_decay)
    sched = _schedule(opt, sc)
    micro = sc.batch_size // sc.grad_accum
    metrics: dict[str, float] = {}
    for step in range(sc.steps):
        opt.zero_grad(set_to_none=True)
        totals, eps = [], []
        for k in range(sc.grad_accum):
            micro_step = step * sc.grad_accum + k
            if stage == "dit":
                loss, info = _dit_global_loss(task, cfg.seed, micro_step, micro)
                eps.append(info["eps"])
            else:
                per_rank = []
                for rank in range(WORLD):
                    idx = batch_indices(task.train_size(), micro, cfg.seed, micro_step, rank, WORLD)
                    gen = step_generator(cfg.seed, micro_step, rank)
                    seed_global_rng(cfg.seed, micro_step, rank)
                    per_rank.append(task.loss(task.train_batch(idx, CPU), gen)["total"])
                loss = torch.stack(per_rank).mean()
            (loss / sc.grad_accum).backward()
            totals.append(float(loss.detach()))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, sc.clip_norm))
        opt.step()
        sched.step()
        task.after_step(step)
        metrics = {f"{stage}/total": sum(totals) / len(totals), f"{stage}/grad_norm": grad_norm}
        if stage == "dit":
            metrics["dit/eps"] = float(torch.cat(eps).mean())
    return task, initial, metrics


def _flat_state(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat_state(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = torch.tensor(float(v), dtype=torch.float64)
    return out


@pytest.mark.parametrize("stage", ["align", "dit"])
def test_k_steps_of_two_ranks_equal_one_process_simulation(setup: dict, stage: str) -> None:
    cfg, inputs = setup["cfg"], setup["inputs"]
    ranks = _load(setup, "steps", stage)
    task, initial, expected_metrics = _simulate(stage, cfg, inputs)
    expected = _flat_state(task.state_dict())

    # The replicas stayed identical, and equal the simulation: weights (and dit's EMA and step).
    states = [_flat_state(r["state"]) for r in ranks]
    assert states[0].keys() == states[1].keys() == expected.keys()
    for name in expected:
        assert torch.equal(states[0][name], states[1][name]), name
        torch.testing.assert_close(states[0][name], expected[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    # The steps trained something: the comparison is not of initial weights.
    trained = [n for n in expected if n.startswith("model.")]
    assert any(not torch.allclose(initial[n], expected[n], **TOL) for n in trained)
    if stage == "dit":
        assert int(expected["step"]) == int(expected["ema.num_updates"]) == STEPS
        shadows = [n for n in expected if n.startswith("ema.shadow.")]
        assert shadows and any(not torch.allclose(initial[n], expected[n], **TOL) for n in shadows)

    # The logged terms are the global batch's means on every rank, and the clipped norm is that of the
    # averaged gradient.
    for rank in ranks:
        for key, value in expected_metrics.items():
            assert math.isclose(rank["metrics"][key], value, rel_tol=1e-4, abs_tol=1e-6), (
                key,
                rank["metrics"][key],
                value,
            )
    # Only rank 0 checkpoints.
    assert [p.name for p in sorted((setup["out"] / f"store-{stage}" / "rank0").iterdir())] == [
        f"ckpt-{STEPS - 1:04d}"
    ]
    assert not any((setup["out"] / f"store-{stage}" / "rank1").iterdir())


def test_dit_runs_ddp_without_the_unused_parameter_search(setup: dict) -> None:
    """train.find_unused_parameters=auto: the search is off for dit only (align's BERT pooler is unused); the
    dit gradient and K-step tests above ran so, and test_generator checks every parameter takes part."""
    assert [r["find_unused"] for r in _load(setup, "grad", "dit")] == [False, False]
    for stage in ("visual", "align"):
        assert [r["find_unused"] for r in _load(setup, "grad", stage)] == [True, True]


def test_cached_conditions_are_the_ones_each_step_computes(setup: dict) -> None:
    cfg, inputs = setup["cfg"], setup["inputs"]
    cached = _task("dit", cfg, inputs)
    fresh = _task("dit", _cfg(cfg.root, "train.cache_conditions=false"), inputs)
    assert fresh._condition_cache() is None
    for micro_step in range(3):
        idx = batch_indices(cached.train_size(), BATCH, cfg.seed, micro_step, 0, 1)
        got = cached.train_batch(idx, CPU)["conditions"]
        batch = fresh.train_batch(idx, CPU)
        assert "conditions" not in batch
        want = fresh._conditions(batch)
        assert got.keys() == want.keys()
        for k in want:  # the same shapes (captions padded to the batch's longest) and values
            assert got[k].shape == want[k].shape, k
            torch.testing.assert_close(got[k].to(want[k].dtype), want[k], rtol=1e-5, atol=1e-5, msg=k)
    assert len(cached._cache["prior_a"]) == cached.train_size()


def test_batch_not_shared_equally_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg_only(tmp_path, "train.dit.batch_size=9")
    message = str(err.value)
    for part in ("train.dit.batch_size 9", "num_workers 2", "grad_accum 1", "8 or 10"):
        assert part in message, (part, message)

    with pytest.raises(ConfigError) as err:
        _cfg_only(tmp_path, "train.visual.grad_accum=2", "train.visual.batch_size=6")  # 6 % (2 x 2) != 0
    message = str(err.value)
    for part in ("train.visual.batch_size 6", "num_workers 2", "grad_accum 2", "4 or 8"):
        assert part in message, (part, message)

    ok = _cfg_only(tmp_path, "train.visual.grad_accum=2", "train.visual.batch_size=8")
    assert (ok.train.visual.batch_size, ok.train.visual.grad_accum, ok.train.scaling.world_size) == (8, 2, 2)
    # In-process (one rank) any multiple of grad_accum is a fair share.
    one = _cfg_only(tmp_path, "train.scaling.num_workers=0", "train.dit.batch_size=9")
    assert one.train.dit.batch_size == 9


def _cfg_only(root: Path, *extra: str) -> ExperimentConfig:
    return load_experiment(REPO / "configs/tiny.yaml", [f"output_root={root}", *extra])
