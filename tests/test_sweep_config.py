"""Sweep files: the shipped ones load, and a bad space fails before any trial starts, naming the path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.tuning.config import load_sweep
from vgmedgen.platform.tuning.space import search_algorithm, tune_space

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweeps_load_with_a_header(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep.base.name and sweep.config.trials >= 1
    header = {
        line.split(":")[0] for line in path.read_text().splitlines() if line.startswith("# ") and ":" in line
    }
    assert {"# What", "# Command", "# Runtime", "# Result"} <= header


def _write(tmp_path: Path, **fields) -> Path:
    data = {
        "base": str(REPO / "configs" / "tiny.yaml"),
        "space": {"train.dit.lr": {"loguniform": [1e-4, 1e-2]}},
    }
    data.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_space_becomes_tune_distributions_with_inclusive_randint(tmp_path: Path) -> None:
    space = {
        "train.dit.lr": {"loguniform": [1e-4, 1e-2]},
        "train.dit.warmup_steps": {"randint": [0, 3]},
        "model.sampler.guidance_style": {"uniform": [1.0, 5.0]},
        "model.generator.hffm.mode": {"choice": ["separate", "hybrid"]},
    }
    sweep = load_sweep(_write(tmp_path, space=space, search={"algorithm": "random", "seed": 3}))
    tune = tune_space(sweep)
    assert (tune["train.dit.warmup_steps"].lower, tune["train.dit.warmup_steps"].upper) == (0, 4)
    assert tune["train.dit.lr"].lower == 1e-4 and tune["model.generator.hffm.mode"].categories == [
        "separate",
        "hybrid",
    ]
    assert type(search_algorithm(sweep)).__name__ == "BasicVariantGenerator"
    trial = sweep.experiment({"train.dit.lr": 3e-3, "model.generator.hffm.mode": "hybrid"})
    assert trial.train.dit.lr == 3e-3 and trial.model.generator.hffm.mode == "hybrid"
    assert sweep.config.objective.direction == "min"


def test_overrides_of_the_sweep_file_and_of_its_base(tmp_path: Path) -> None:
    sweep = load_sweep(_write(tmp_path, overrides=["train.dit.steps=7"]), ["trials=3"])
    assert sweep.base.train.dit.steps == 7 and sweep.config.trials == 3


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (
            {"space": {"train.dit.lrr": {"uniform": [0.1, 0.2]}}},
            "train.dit.lrr does not exist.*did you mean train.dit.lr",
        ),
        ({"space": {"train.dit.lr.x": {"uniform": [0.1, 0.2]}}}, "train.dit.lr is a value"),
        ({"space": {"train.dit.lr": {"uniform": [0.1, 0.2], "choice": [1]}}}, "exactly one distribution"),
        ({"space": {"train.dit.lr": {"normal": [0, 1]}}}, "normal"),
        ({"space": {"train.dit.lr": {"uniform": [0.2, 0.1]}}}, "low < high"),
        ({"space": {"train.dit.lr": {"loguniform": [0, 0.1]}}}, "positive low bound"),
        ({"space": {"train.dit.lr": {"choice": []}}}, "at least one value"),
        ({"space": {"train.dit.lr": {"choice": [1e-3, -1.0]}}}, "train.dit.lr: the value -1.0 .*refuses"),
        (
            {"space": {"model.generator.hffm.mode": {"choice": ["separate", "fused"]}}},
            "hffm.mode: the value 'fused'",
        ),
        ({"space": {"model.generator.hffm.mode": {"grid": ["separate", "hybrid"]}}}, "Optuna cannot draw"),
        ({"space": {}}, "space"),
        ({"objective": {"metric": "psnr"}}, "unknown objective 'psnr'"),
        ({"objective": {"metric": "kid", "mode": "max"}}, "set mode: min"),
        ({"trails": 4}, "trails"),
    ],
)
def test_bad_sweeps_fail_before_any_trial_naming_the_path(tmp_path: Path, fields: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_sweep(_write(tmp_path, **fields))


@pytest.mark.parametrize(
    ("base", "fields", "words"),
    [
        (
            "busi.yaml",
            {"objective": {"metric": "adherence"}},
            "objective adherence reads SynthDerm.*trains on 'busi'",
        ),
        ("busi.yaml", {"report": {"adherence": "on"}}, "report.adherence=on reads SynthDerm.*auto or off"),
        (
            "tiny.yaml",
            {"objective": {"metric": "fid"}},
            "objective fid needs Inception features.*feature_extractor_weights_path.*is not set",
        ),
    ],
)
def test_a_measure_the_base_cannot_take_fails_when_the_file_is_read(
    tmp_path: Path, base: str, fields: dict, words: str
) -> None:
    path = _write(tmp_path, base=str(REPO / "configs" / base), **fields)
    with pytest.raises(ConfigError, match=words):
        load_sweep(path)
    if base == "busi.yaml":  # auto leaves adherence out on other data rather than failing
        assert (
            load_sweep(path, ["report.adherence=auto", "objective.metric=kid"]).config.report.adherence
            == "auto"
        )


def test_grid_trials_must_be_a_multiple_of_the_grid_points(tmp_path: Path) -> None:
    space = {"train.dit.lr": {"grid": [1e-4, 1e-3]}, "train.dit.warmup_steps": {"grid": [0, 1, 2]}}
    path = _write(tmp_path, space=space, search={"algorithm": "grid"}, trials=4)
    with pytest.raises(ConfigError, match="multiple of the 6 grid points"):
        load_sweep(path)
    assert load_sweep(path, ["trials=12"]).config.grid_points == 6


def test_trial_experiment_fixes_reporting_and_resources_and_refuses_them_in_the_space(tmp_path: Path) -> None:
    from vgmedgen.platform.tuning.trial import trial_experiment

    sweep = load_sweep(_write(tmp_path, report_every=4, resources={"workers": 1, "cpus_per_worker": 0.5}))
    cfg = trial_experiment(sweep, {"train.dit.lr": 3e-3})
    dit = cfg.train.dit
    assert dit.lr == 3e-3 and dit.val_every == dit.log_every == dit.checkpoint_every == 4
    assert cfg.train.scaling.num_workers == 1 and cfg.train.scaling.cpus_per_worker == 0.5
    with pytest.raises(ConfigError, match="set by the sweep for every trial"):
        trial_experiment(sweep, {"train.scaling.num_workers": 2})


def test_upstream_paths_are_the_ones_that_change_visual_or_align(tmp_path: Path) -> None:
    from vgmedgen.platform.tuning.runner import _upstream_combinations, upstream_paths

    assert upstream_paths(load_sweep(REPO / "configs" / "sweeps" / "dit.yaml")) == []  # dit and sampler only
    space = {"train.dit.lr": {"uniform": [1e-4, 1e-3]}, "model.visual.dice_weight": {"uniform": [0.5, 2.0]}}
    sweep = load_sweep(_write(tmp_path, space=space))
    assert upstream_paths(sweep) == ["model.visual.dice_weight"]
    assert (
        _upstream_combinations(sweep) is None
    )  # a continuous upstream dimension: the trials train it, locked
    space = {"train.dit.lr": {"uniform": [1e-4, 1e-3]}, "model.visual.dice_weight": {"choice": [0.5, 1.0]}}
    sweep = load_sweep(_write(tmp_path, space=space))
    assert _upstream_combinations(sweep) == [
        {"model.visual.dice_weight": 0.5},
        {"model.visual.dice_weight": 1.0},
    ]


def test_sweep_tables_plots_and_rows_round_trip(tmp_path: Path) -> None:
    from vgmedgen.platform.tuning.report import TrialRow, live_table, write_plots, write_tables

    done = TrialRow("s-trial-aaa", {"train.dit.lr": 1e-3, "model.generator.hffm.mode": "separate"}, "DONE")
    for step, value in [(2, 0.5), (4, 0.3), (4, 0.25)]:
        done.record(step, value)
    stopped = TrialRow(
        "s-trial-bbb", {"train.dit.lr": 30.0, "model.generator.hffm.mode": "hybrid"}, "STOPPED"
    )
    stopped.record(2, 9.0)
    assert done.history == [(2, 0.5), (4, 0.25)] and done.step == 4 and stopped.objective == 9.0
    assert TrialRow.from_json(done.to_json()) == done
    table = live_table([done, stopped], "kid", trials=3, max_t=4)
    assert "2/3 trials: 1 done, 1 stopped" in table and "STOPPED  2/4" in table
    csv_path, md_path = write_tables([stopped, done], tmp_path, "kid", best=done)
    lines = md_path.read_text().splitlines()
    assert lines[2].startswith("| aaa | * | DONE | 4 | 0.25") and "| bbb |  | STOPPED | 2 | 9 |" in lines[3]
    assert csv_path.read_text().splitlines()[0].startswith("trial,best,state,dit_step,kid")
    plots = write_plots([done, stopped], tmp_path, "kid", ["train.dit.lr", "model.generator.hffm.mode"])
    from PIL import Image

    assert [Image.open(p).size[0] > 400 for p in plots] == [True, True]


def test_variants_are_named_override_sets_checked_before_any_trial(tmp_path: Path) -> None:
    from vgmedgen.platform.tuning.runner import _upstream_combinations, upstream_paths
    from vgmedgen.platform.tuning.trial import trial_experiment

    variants = {
        "full": [],
        "caption": ["model.generator.hffm.mode=caption"],
        "area": ["model.visual.prior=area", "model.generator.colour.weight=0"],
    }
    space = {"variant": {"grid": ["full", "caption", "area"]}, "seed": {"grid": [0, 1]}}
    sweep = load_sweep(
        _write(tmp_path, variants=variants, space=space, search={"algorithm": "grid"}, trials=6)
    )
    caption = trial_experiment(sweep, {"variant": "caption", "seed": 1})
    assert caption.model.generator.hffm.mode == "caption" and caption.seed == 1
    area = trial_experiment(sweep, {"variant": "area", "seed": 0})
    assert area.model.visual.prior == "area" and area.model.generator.colour.weight == 0
    assert (
        area.model.generator.hffm.anatomy_dim != caption.model.generator.hffm.anatomy_dim
    )  # derived from it
    assert sorted(upstream_paths(sweep)) == ["seed", "variant"]
    # full and caption share their upstream stages: 2 distinct visual/align pairs per seed, not 3
    assert len(_upstream_combinations(sweep)) == 4

    def refused(match: str, **fields) -> None:
        with pytest.raises(ConfigError, match=match):
            load_sweep(_write(tmp_path, **{"search": {"algorithm": "grid"}, "trials": 6, **fields}))

    refused(
        "not variants of this sweep", variants=variants, space={**space, "variant": {"grid": ["full", "ful"]}}
    )
    refused("has no `variant` dimension", variants=variants, space={"seed": {"grid": [0, 1, 2, 3, 4, 5]}})
    refused(
        "use choice or grid",
        variants=variants,
        space={"variant": {"uniform": [0, 1]}},
        search={"algorithm": "random"},
    )
    bad_path = {**variants, "caption": ["model.generator.hfm.mode=caption"]}
    refused(r"variant caption, override .*did you mean model.generator.hffm", variants=bad_path, space=space)
    bad_value = {**variants, "caption": ["model.generator.hffm.mode=captions"]}
    refused(
        "variant caption: its overrides make a config the experiment refuses", variants=bad_value, space=space
    )


def test_report_overrides_are_checked_and_kept_out_of_the_sweep_identity(tmp_path: Path) -> None:
    from vgmedgen.platform.tuning.runner import _identity

    space = {"train.dit.lr": {"choice": [1e-3, 1e-2]}}
    plain = load_sweep(_write(tmp_path, space=space))
    report = {"evaluate": True, "overrides": ["evaluate.num_images=16"]}
    reported = load_sweep(_write(tmp_path, space=space, report=report))
    assert reported.config.report.evaluate and _identity(reported) == _identity(plain)

    def refused(match: str, overrides: list[str]) -> None:
        with pytest.raises(ConfigError, match=match):
            load_sweep(_write(tmp_path, space=space, report={"evaluate": True, "overrides": overrides}))

    refused("only evaluate and adherence settings", ["train.dit.lr=0.1"])
    refused("did you mean evaluate.num_images", ["evaluate.num_imags=16"])
    refused("report.overrides make a config the experiment refuses", ["evaluate.num_images=1"])


def test_comparison_groups_trials_by_all_but_their_seed_with_mean_and_std(tmp_path: Path) -> None:
    from vgmedgen.platform.tuning.compare import columns, group_name, summarise, write_comparison
    from vgmedgen.platform.tuning.report import TrialRow

    def row(variant: str, seed: int, fd: float, size: float | None) -> TrialRow:
        figures = {"eval/SFD": fd, "eval/memorisation_share": 0.1, "downstream/x1_balanced_accuracy_std": 0.5}
        if size is not None:
            figures["adherence/synthderm/size"] = size
        return TrialRow(
            f"s-trial-{variant}{seed}", {"variant": variant, "seed": seed}, "DONE", evaluation=figures
        )

    rows = [row("full", 0, 10.0, 0.8), row("caption", 0, 30.0, 0.4), row("full", 1, 14.0, 0.6)]
    rows.append(row("caption", 1, float("nan"), None))  # a figure that came out NaN is left out, not averaged
    assert group_name({"variant": "full", "seed": 2, "train.dit.lr": 0.1}) == "full, train.dit.lr=0.1"
    assert group_name({"seed": 1}) == "all trials"
    groups = summarise(rows, order=["full", "caption"])
    assert [g.name for g in groups] == ["full", "caption"]
    full, caption = groups
    assert full.trials == ["full0", "full1"] and full.mean("eval/SFD") == 12.0
    assert full.std("eval/SFD") == pytest.approx(2**0.5 * 2)  # sample std of 10 and 14
    assert caption.values["eval/SFD"] == [30.0] and caption.std("eval/SFD") == 0.0

    keys = set().union(*(r.evaluation for r in rows))
    cols = columns("synthderm", keys)
    assert [c.key for c in cols] == ["eval/SFD", "adherence/synthderm/size", "eval/memorisation_share"]
    paths = write_comparison(groups, cols, tmp_path / "out")
    assert [p.name for p in paths] == ["comparison.csv", "comparison.md", "comparison.png"]
    md = paths[1].read_text().splitlines()
    assert md[2].startswith("| full | 2 | **12 ± 2.8** | **0.7 ± 0.14** |")  # lower FD, higher size: bold
    assert md[3].startswith("| caption | 2 | 30 ± 0 | 0.4 ± 0 |")
    csv_rows = paths[0].read_text().splitlines()
    assert csv_rows[0].startswith("group,trials,eval/SFD_mean,eval/SFD_std") and csv_rows[1].startswith(
        "full,2,12,"
    )


def test_controllability_table_has_a_row_per_judged_factor_and_matched_over_swapped(tmp_path: Path) -> None:
    from vgmedgen.platform.tuning.compare import summarise, write_controllability
    from vgmedgen.platform.tuning.report import TrialRow

    def row(variant: str, seed: int, size: float, pigment: float) -> TrialRow:
        figures = {
            "control/matched_size": 0.9,
            "control/swapped_size": size,
            "control/judge_on_real_size": 0.97,
            "control/chance_size": 0.43,
            "control/matched_pigment": 0.8,
            "control/swapped_pigment": pigment,
        }
        return TrialRow(
            f"s-trial-{variant}{seed}", {"variant": variant, "seed": seed}, "DONE", evaluation=figures
        )

    groups = summarise(
        [row("full", 0, 0.7, 0.5), row("full", 1, 0.5, 0.5), row("caption", 0, 0.4, 0.6)],
        order=["full", "caption"],
    )
    paths = write_controllability(groups, tmp_path)
    assert [p.name for p in paths] == ["controllability.md", "controllability.png"]
    md = paths[0].read_text().splitlines()
    assert md[0] == "| factor | judge on real | chance | full | caption |"
    assert (
        md[2] == "| size | 0.97 | 0.43 | 0.90 ± 0.00 / **0.60 ± 0.14** | 0.90 ± 0.00 / 0.40 ± 0.00 |"
    )  # anatomy 1st
    assert md[3] == "| pigment | - | - | 0.80 ± 0.00 / 0.50 ± 0.00 | 0.80 ± 0.00 / **0.60 ± 0.00** |"
    assert paths[1].stat().st_size > 0
    assert (
        write_controllability(
            summarise([TrialRow("s-trial-x", {"seed": 0}, "DONE", evaluation={"eval/SFD": 1.0})]), tmp_path
        )
        == []
    )


def test_stage_lock_serialises_one_stage_run_and_leaves_others_free(tmp_path: Path, monkeypatch) -> None:
    """Concurrent trials that train an upstream stage themselves (a continuous upstream dimension) take the
    stage run's lock: a second trial needing the same run waits; one needing another run does not."""
    import threading

    monkeypatch.setenv("VGMEDGEN_OUTPUT_ROOT", str(tmp_path / "out"))  # not the user's ~/vgmedgen

    from vgmedgen.platform.tuning.trial import stage_lock, trial_experiment

    sweep = load_sweep(_write(tmp_path, space={"train.visual.lr": {"uniform": [1e-4, 1e-3]}}))
    same = trial_experiment(sweep, {"train.visual.lr": 2e-4})
    other = trial_experiment(sweep, {"train.visual.lr": 5e-4})
    entered: list[str] = []

    def trial(cfg, name: str) -> None:
        with stage_lock(cfg, "visual", {}):
            entered.append(name)

    with stage_lock(same, "visual", {}):
        waiting = threading.Thread(target=trial, args=(same, "same"))
        free = threading.Thread(target=trial, args=(other, "other"))
        waiting.start(), free.start()
        free.join(10)
        waiting.join(0.5)
        assert entered == ["other"] and waiting.is_alive()  # the same run waits for the holder
    waiting.join(10)
    assert entered == ["other", "same"]
    assert same.root == tmp_path / "out"
    assert len(list((same.root / "runs").glob("*.lock"))) == 2


def test_output_root_precedence_is_every_jobs(tmp_path: Path, monkeypatch) -> None:
    """A sweep's output root as every job's: an output_root override > $VGMEDGEN_OUTPUT_ROOT > the base YAML (a
    RayJob sets the variable on the shared volume; a base config that names a root must not win over it)."""
    base = tmp_path / "base.yaml"
    base.write_text((REPO / "configs" / "tiny.yaml").read_text() + f"output_root: {tmp_path / 'yaml'}\n")
    monkeypatch.setenv("VGMEDGEN_OUTPUT_ROOT", str(tmp_path / "env"))
    assert load_sweep(_write(tmp_path, base=str(base))).base.root == tmp_path / "env"
    pinned = load_sweep(_write(tmp_path, base=str(base), overrides=[f"output_root={tmp_path / 'cli'}"]))
    assert pinned.base.root == tmp_path / "cli"
    # on the sweep's command line, output_root= goes to the base experiment, beside the sweep file's overrides
    typed = load_sweep(_write(tmp_path, base=str(base)), ["trials=2", f"output_root={tmp_path / 'typed'}"])
    assert typed.base.root == tmp_path / "typed" and typed.config.trials == 2
    assert typed.experiment({"train.dit.lr": 1e-3}).root == tmp_path / "typed"  # every trial writes there
    monkeypatch.delenv("VGMEDGEN_OUTPUT_ROOT")
    assert load_sweep(_write(tmp_path, base=str(base))).base.root == tmp_path / "yaml"


def test_comparison_plot_texts_stay_apart_with_the_downstream_figures() -> None:
    """Every panel title fits its panel and no two titles (nor the figure's own) overlap, with the long
    downstream labels of the ablation's report (they ran into their neighbours and under the figure title)."""
    from vgmedgen.platform.tuning.compare import GroupSummary, _figure, columns

    plans = ("balance", "x0.5", "x1", "x2")
    keys = {"eval/SFD", "eval/SKD", "adherence/synthderm/size", "control/swapped_style_mean"}
    keys |= {
        f"downstream/{p}_{m}{g}"
        for p in plans
        for m in ("balanced_accuracy", "macro_f1")
        for g in ("", "_gain")
    }
    cols = columns("synthderm", keys)
    assert len(cols) > 16
    groups = [
        GroupSummary(v, [f"{v}{s}" for s in range(3)], {c.key: [0.1, 0.2, 0.3] for c in cols})
        for v in ("a", "b")
    ]
    fig = _figure(groups, cols)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_title()]
    boxes = [ax.title.get_window_extent(renderer) for ax in axes] + [
        fig._suptitle.get_window_extent(renderer)
    ]
    for ax, box in zip(axes, boxes):
        panel = ax.get_window_extent(renderer)
        assert box.x0 >= panel.x0 - 20 and box.x1 <= panel.x1 + 20, ax.get_title()
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)


def test_a_sweep_leaving_before_its_trials_ends_their_running_runs_and_no_others(tmp_path: Path) -> None:
    """Interrupted, the sweep's driver leaves while a trial trains; Ray ends the trial's actor with the job, and
    that actor unwinds nothing. The driver ends that trial's run and its dit run KILLED; finished trials and
    another sweep's running trial keep their status."""
    from vgmedgen.platform.tracking import RUN_KEY_TAG, Tracker, TrackingConfig
    from vgmedgen.platform.tuning.runner import _Sweep

    sweep = load_sweep(_write(tmp_path))
    tracker = Tracker(TrackingConfig(), tmp_path / "root", "sweep-test")
    client = tracker.client

    def run(name: str, tags: dict[str, str], status: str = "RUNNING") -> str:
        run_id = client.create_run(
            tracker.experiment_id, run_name=name, tags={RUN_KEY_TAG: name, **tags}
        ).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status=status)
        return run_id

    parent = run("tiny-sweep-k1", {"job": "sweep"})
    done = run("trial-done", {"sweep": "tiny-sweep-k1", "mlflow.parentRunId": parent}, "FINISHED")
    done_dit = run("dit-done", {"mlflow.parentRunId": done}, "FINISHED")
    training = run("trial-training", {"sweep": "tiny-sweep-k1", "mlflow.parentRunId": parent})
    training_dit = run("dit-training", {"mlflow.parentRunId": training})
    elsewhere = run("trial-of-another-sweep", {"sweep": "tiny-sweep-k2"})

    state = _Sweep(sweep, "tiny-sweep-k1", tmp_path / "sweeps", tracker, parent)
    assert sorted(state.end_unfinished("KILLED")) == sorted([training, training_dit])
    status = {
        r: client.get_run(r).info.status for r in (parent, done, done_dit, training, training_dit, elsewhere)
    }
    assert status == {
        parent: "RUNNING",  # the driver's own run: its open_run block ends it
        done: "FINISHED",
        done_dit: "FINISHED",
        training: "KILLED",
        training_dit: "KILLED",
        elsewhere: "RUNNING",
    }
    assert state.end_unfinished("KILLED") == []  # nothing left running: a second call changes nothing
