"""The generation plan: every policy on a small imbalanced SynthDerm split, the errors a user can cause,
deterministic ids and seeds, shards, prompts CSVs, the checked writer and reader, and images that a plan
row makes the same alone as inside any batch."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_model_version import ANATOMY, CAPTIONS, STYLE, make_text_encoder, make_trained_model  # noqa: E402

from vgmedgen.model.configbase import ConfigError  # noqa: E402
from vgmedgen.platform.config import ExperimentConfig  # noqa: E402
from vgmedgen.platform.datasets.synthderm import synthderm_record  # noqa: E402
from vgmedgen.platform.generation.plan import (  # noqa: E402
    PLAN_SCHEMA,
    PlanError,
    build_plan,
    plan_counts,
    plan_key,
    plan_requests,
    plan_summary,
    proportional_counts,
    read_plan,
    write_plan,
)
from vgmedgen.platform.generation.request import REQUEST_SCHEMA, SampleRequest  # noqa: E402
from vgmedgen.platform.generation.sample import generate_samples  # noqa: E402
from vgmedgen.platform.records import encode_png, records_to_table  # noqa: E402

MODEL = "a1b2c3d4e5f6" + "0" * 52  # the shape of a model version id (a sha256)
OTHER_MODEL = "f6e5d4c3b2a1" + "0" * 52
# An imbalanced train split: rows per label.
TRAIN_SIZES = {"nv": 12, "mel": 5, "bkl": 3}


def _records() -> list[dict[str, Any]]:
    """SynthDerm records: TRAIN_SIZES train rows, and val rows (of other lesions) that no plan may use.

    A lesion's two views share a group, and a group never spans splits: a record takes its group's split.
    """
    split_of_group: dict[str, str] = {}
    taken: Counter[str] = Counter()
    out, n_val, index = [], 0, 0
    while sum(taken.values()) < sum(TRAIN_SIZES.values()) or n_val < 6:
        r = synthderm_record(3, index, 8)
        index += 1
        split = split_of_group.get(r["group"])
        if split is None:
            fits = taken[r["label"]] < TRAIN_SIZES.get(r["label"], 0)
            split = "train" if fits else "val" if n_val < 6 else None
            if split is None:
                continue
            split_of_group[r["group"]] = split
        if split == "train" and taken[r["label"]] >= TRAIN_SIZES.get(r["label"], 0):
            continue  # a second view beyond the class size: leave it out (its group stays train)
        taken[r["label"]] += split == "train"
        n_val += split == "val"
        out.append({**r, "split": split})
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output root with the records at records/recs."""
    base = tmp_path_factory.mktemp("root")
    directory = base / "records" / "recs"
    directory.mkdir(parents=True)
    pq.write_table(records_to_table(_records()), directory / "part-00000.parquet")
    return base


@pytest.fixture(scope="module")
def train(root: Path) -> dict[str, dict[str, Any]]:
    """The train records by id (what the plans may draw from)."""
    table = pq.read_table(root / "records" / "recs")
    return {r["id"]: r for r in table.to_pylist() if r["split"] == "train"}


def config(root: Path, policies: list[Any], **generate: Any) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {"output_root": str(root), "data": {"name": "recs"}, "generate": {"policies": policies, **generate}}
    )


def plan_of(root: Path, policies: list[Any], model: str = MODEL, **generate: Any) -> pa.Table:
    return build_plan(config(root, policies, **generate), model)


def _rows_from_sources(plan: pa.Table, train: dict[str, dict[str, Any]]) -> None:
    """Every row with a source is that train record's prompts and label."""
    for row in plan.to_pylist():
        source = train[row["source_id"]]
        assert (row["label"], row["anatomy_prompt"], row["style_prompt"]) == (
            source["label"],
            source["anatomy_text"],
            source["style_text"],
        )
        assert row["caption"] is None and row["reference"] is None and row["n"] == 1


def _even(plan: pa.Table) -> None:
    """Within each class, the records serve as evenly as possible (use counts differ by at most one)."""
    for label in set(plan.column("label").to_pylist()):
        rows = [r for r in plan.to_pylist() if r["label"] == label]
        uses = Counter(r["source_id"] for r in rows)
        if len(rows) >= TRAIN_SIZES[label]:
            assert len(uses) == TRAIN_SIZES[label], f"{label}: not every record served"
        assert max(uses.values()) - min(uses.values()) <= 1, f"{label}: uneven draws {uses}"


# -- the split the tests use ------------------------------------------------------------------------


def test_the_split_is_imbalanced_and_has_val_rows(train: dict[str, dict[str, Any]], root: Path) -> None:
    assert Counter(r["label"] for r in train.values()) == Counter(TRAIN_SIZES)
    assert pq.read_table(root / "records" / "recs").num_rows > len(train)


# -- policies ---------------------------------------------------------------------------------------


def test_balance_tops_every_class_up_to_the_largest(root: Path, train: dict[str, dict[str, Any]]) -> None:
    plan = plan_of(root, [{"balance": {}}])
    top = max(TRAIN_SIZES.values())
    want = {c: top - n for c, n in TRAIN_SIZES.items() if n < top}
    assert Counter(plan.column("label").to_pylist()) == Counter(want)
    assert set(plan.column("policy").to_pylist()) == {"balance"}
    _rows_from_sources(plan, train)
    _even(plan)


@pytest.mark.parametrize("k", [2, 1.5, 0.3])
def test_multiply_makes_k_times_each_class(root: Path, train: dict[str, dict[str, Any]], k: float) -> None:
    plan = plan_of(root, [{"multiply": k}])
    # round half up: 1.5 x 5 = 7.5 -> 8, 1.5 x 3 = 4.5 -> 5
    want = {c: math.floor(k * n + 0.5) for c, n in TRAIN_SIZES.items()}
    assert Counter(plan.column("label").to_pylist()) == Counter({c: n for c, n in want.items() if n})
    _rows_from_sources(plan, train)
    _even(plan)
    if k == 2:  # a whole K: every record exactly K times
        assert set(Counter(plan.column("source_id").to_pylist()).values()) == {2}


def test_per_class_makes_exact_counts_in_the_order_given(
    root: Path, train: dict[str, dict[str, Any]]
) -> None:
    plan = plan_of(root, [{"per_class": {"mel": 7, "nv": 2}}])
    assert plan.column("label").to_pylist() == ["mel"] * 7 + ["nv"] * 2
    _rows_from_sources(plan, train)
    _even(plan)


def test_from_records_repeats_every_train_record(root: Path, train: dict[str, dict[str, Any]]) -> None:
    plan = plan_of(root, [{"from_records": {"repeats": 3}}])
    assert Counter(plan.column("source_id").to_pylist()) == Counter({i: 3 for i in train})
    _rows_from_sources(plan, train)  # and so no val record: every source is a train id
    assert len(set(plan.column("seed").to_pylist())) == plan.num_rows


def test_swap_grid_crosses_prompts_and_shares_seeds_across_cells(root: Path) -> None:
    grid = {"anatomy_prompts": ANATOMY, "style_prompts": STYLE, "seeds_per_cell": 3}
    plan = plan_of(root, [{"swap_grid": grid}]).to_pylist()
    assert len(plan) == len(ANATOMY) * len(STYLE) * 3
    assert all(r["label"] is None and r["source_id"] is None for r in plan)
    cells = [(a, s) for a in ANATOMY for s in STYLE]
    assert [(r["anatomy_prompt"], r["style_prompt"]) for r in plan] == [c for c in cells for _ in range(3)]
    seeds = [[r["seed"] for r in plan[i * 3 : i * 3 + 3]] for i in range(len(cells))]
    assert all(s == seeds[0] for s in seeds), "every cell takes the same seeds: only the prompts change"
    assert len(set(seeds[0])) == 3


def test_policies_follow_each_other_and_settings_come_from_the_generate_section(root: Path) -> None:
    plan = plan_of(
        root,
        [{"per_class": {"bkl": 2}}, {"swap_grid": {"anatomy_prompts": ["a"], "style_prompts": ["b"]}}],
        num_steps=7,
        guidance_anatomy=2.5,
        guidance_style=1.0,
    )
    assert plan.schema == PLAN_SCHEMA
    assert plan.column("policy").to_pylist() == ["per_class", "per_class", "swap_grid"]
    assert set(plan.column("num_steps").to_pylist()) == {7}
    assert set(plan.column("guidance_anatomy").to_pylist()) == {2.5}
    assert set(plan.column("guidance_style").to_pylist()) == {1.0}
    assert set(plan.column("model_id").to_pylist()) == {MODEL}
    assert plan_counts(plan) == [("per_class", "bkl", 2), ("swap_grid", None, 1)]
    summary = plan_summary(plan)
    assert "per_class" in summary and "bkl" in summary and "3 images in 1 shards" in summary


# -- prompts CSV ------------------------------------------------------------------------------------


def csv_plan(root: Path, tmp_path: Path, text: str | bytes, **generate: Any) -> pa.Table:
    path = tmp_path / "prompts.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return plan_of(root, [{"prompts_csv": {"path": str(path)}}], **generate)


def test_prompts_csv_with_labels_seeds_and_counts(root: Path, tmp_path: Path) -> None:
    text = (
        "anatomy_prompt,style_prompt,label,seed,n\n"
        '"small lesion, centred",pink,mel,100,3\n'
        "large lesion,dark brown,,,2\n"
    )
    rows = csv_plan(root, tmp_path, text).to_pylist()
    assert [r["anatomy_prompt"] for r in rows] == ["small lesion, centred"] * 3 + ["large lesion"] * 2
    assert [r["label"] for r in rows] == ["mel"] * 3 + [None] * 2
    assert [r["seed"] for r in rows[:3]] == [100, 101, 102]  # the line's seed, then seed + k
    assert len({r["seed"] for r in rows}) == 5  # derived seeds avoid the explicit ones
    assert all(r["source_id"] is None and r["n"] == 1 for r in rows)


def test_prompts_csv_with_captions_and_a_byte_order_mark(root: Path, tmp_path: Path) -> None:
    text = "\ufeffcaption\n" + "".join(f'"{c}"\n' for c in CAPTIONS)
    rows = csv_plan(root, tmp_path, text.encode("utf-8")).to_pylist()
    assert [r["caption"] for r in rows] == CAPTIONS
    assert all(r["anatomy_prompt"] is None and r["style_prompt"] is None for r in rows)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "anatomy_prompt,label\nsmall,nv\n",
            r"needs the columns anatomy_prompt and style_prompt, or caption.*",
        ),
        (
            "anatomy,style_prompt\nsmall,pink\n",
            r"unknown column\(s\) \['anatomy'\].*found \['anatomy', 'style_prompt'\]",
        ),
        ("caption,caption\na,b\n", r"repeats column\(s\) \['caption'\]"),
        ("caption\n", r"has no rows below its header"),
        ("", r"is empty; its first line must name the columns"),
        (
            "caption,label\nsome lesion,melanoma\n",
            r"line 2 names label\(s\) \['melanoma'\].*its labels: \['bkl', 'mel', 'nv'\]",
        ),
        (
            "caption,n\nsome lesion,1\nother lesion,0\n",
            r"line 3: invalid sample request: n must be a positive integer, got 0",
        ),
        (
            "caption,seed\nsome lesion,x\n",
            r"line 2: invalid sample request: seed input should be a valid integer",
        ),
        (
            "anatomy_prompt,style_prompt\nsmall,\n",
            r"line 2: invalid sample request: `anatomy_prompt` needs `style_prompt`",
        ),
        ("caption\nsmall, round\n", r"line 2 has more cells than the header has columns"),
        (b"caption\n\xff\xfe lesion\n", r"is not a readable UTF-8 text file"),
    ],
)
def test_prompts_csv_errors_name_the_problem_and_the_line(
    root: Path, tmp_path: Path, text: str | bytes, expected: str
) -> None:
    with pytest.raises(PlanError, match=expected):
        csv_plan(root, tmp_path, text)


def test_a_missing_prompts_csv_is_named(root: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"prompts_csv .*nothere.csv: no such file"):
        plan_of(root, [{"prompts_csv": {"path": str(tmp_path / "nothere.csv")}}])


# -- errors -----------------------------------------------------------------------------------------


def test_errors_before_any_image(root: Path, tmp_path: Path) -> None:
    assert issubclass(PlanError, ConfigError)
    with pytest.raises(
        PlanError, match=r"per_class\) names label\(s\) \['melanoma'\].*\['bkl', 'mel', 'nv'\]"
    ):
        plan_of(root, [{"per_class": {"melanoma": 3}}])
    with pytest.raises(PlanError, match=r"multiply: 0.01\) has nothing to generate.*raise K"):
        plan_of(root, [{"multiply": 0.01}])
    with pytest.raises(PlanError, match=r"train split of .*nowhere.* cannot be read: No records at"):
        build_plan(
            config(root, [{"balance": {}}]).model_copy(update={"output_root": tmp_path / "nowhere"}), MODEL
        )
    with pytest.raises(PlanError, match="model_id is empty"):
        plan_of(root, [{"balance": {}}], model="")


def test_balance_on_a_balanced_split_says_there_is_nothing_to_do(tmp_path: Path) -> None:
    directory = tmp_path / "records" / "recs"
    directory.mkdir(parents=True)
    rows = [{**synthderm_record(5, i, 8), "split": "train", "label": "a" if i % 2 else "b"} for i in range(6)]
    rows = [{**r, "group": r["id"]} for r in rows]  # one group per row: no group may span labels' splits
    pq.write_table(records_to_table(rows), directory / "part-00000.parquet")
    with pytest.raises(
        PlanError, match=r"balance\) has nothing to generate: every class .* already has 3 rows"
    ):
        plan_of(tmp_path, [{"balance": {}}])


def test_swap_grid_and_captions_need_no_records(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, [{"swap_grid": {"anatomy_prompts": ["a"], "style_prompts": ["b", "c"]}}])
    assert plan.num_rows == 2


# -- identity: ids, seeds, shards, names ------------------------------------------------------------

POLICIES: list[Any] = [
    {"balance": {}},
    {"multiply": 1.5},
    {"from_records": {"repeats": 2}},
    {"swap_grid": {"anatomy_prompts": ANATOMY, "style_prompts": STYLE, "seeds_per_cell": 2}},
]


def test_ids_and_seeds_are_deterministic_unique_and_readable(root: Path) -> None:
    plan = plan_of(root, POLICIES, seed=11)
    again = plan_of(root, POLICIES, seed=11)
    assert plan.equals(again)
    ids = plan.column("sample_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert ids[0].startswith("p0-balance-bkl-000000-") and any(
        i.startswith("p3-swap_grid-unlabelled-") for i in ids
    )
    rows = plan.to_pylist()
    drawn = [r["seed"] for r in rows if r["policy"] != "swap_grid"]
    assert len(set(drawn)) == len(drawn), "every row outside a swap grid has its own seed"
    images = {(r["anatomy_prompt"], r["style_prompt"], r["seed"]) for r in rows}
    assert len(images) == len(rows), "no two rows make the same image"
    # Another model or seed: no shared id; another seed: other seeds.
    assert not set(ids) & set(
        plan_of(root, POLICIES, model=OTHER_MODEL, seed=11).column("sample_id").to_pylist()
    )
    reseeded = plan_of(root, POLICIES, seed=12)
    assert not set(ids) & set(reseeded.column("sample_id").to_pylist())
    assert sum(a == b for a, b in zip(drawn, reseeded.column("seed").to_pylist())) <= 1


def test_a_policy_added_after_leaves_the_rows_before_as_they_were(root: Path) -> None:
    first = plan_of(root, POLICIES[:2], seed=3)
    longer = plan_of(root, POLICIES, seed=3)
    columns = [c for c in PLAN_SCHEMA.names if c != "shard"]
    assert longer.slice(0, first.num_rows).select(columns).equals(first.select(columns))


def test_shards_are_consecutive_runs_of_shard_size(root: Path) -> None:
    plan = plan_of(root, POLICIES, shard_size=7, batch_size=4)
    assert plan.column("shard").to_pylist() == [i // 7 for i in range(plan.num_rows)]
    assert plan_summary(plan).endswith(f"{plan.num_rows} images in {math.ceil(plan.num_rows / 7)} shards")


def test_plan_key_names_the_content(root: Path) -> None:
    plan = plan_of(root, POLICIES)
    key = plan_key(plan)
    assert key.startswith(f"{MODEL[:12]}-plan-") and key == plan_key(plan_of(root, POLICIES))
    assert plan_key(plan_of(root, POLICIES, seed=1)) != key
    assert plan_key(plan_of(root, POLICIES, model=OTHER_MODEL)) != key
    assert plan_key(plan_of(root, POLICIES, shard_size=8, batch_size=8)) != key  # other shards: resumed apart
    with pytest.raises(PlanError, match="one model's rows"):
        plan_key(pa.concat_tables([plan, plan_of(root, POLICIES, model=OTHER_MODEL)]))


# -- writing and reading ----------------------------------------------------------------------------


def test_write_and_read_round_trip_and_requests(root: Path, tmp_path: Path) -> None:
    plan = plan_of(root, POLICIES, num_steps=3)
    path = write_plan(plan, tmp_path / "sub" / "plan.parquet")
    back = read_plan(path)
    assert back.equals(plan)
    assert not list(path.parent.glob(".*"))  # no temporary file left behind
    requests = plan_requests(back)
    assert all(isinstance(r, SampleRequest) for r in requests)
    assert [r.model_dump() for r in requests] == back.select(REQUEST_SCHEMA.names).to_pylist()


def _broken(plan: pa.Table, column: str, row: int, value: Any) -> pa.Table:
    values = plan.column(column).to_pylist()
    values[row] = value
    index = plan.schema.get_field_index(column)
    return plan.set_column(index, pa.field(column, plan.schema.field(column).type), [values])


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("n", 2, r"row 4 \(sample_id '.*'\) column 'n' is not 1"),
        ("seed", None, r"row 4 \(sample_id '.*'\) column 'seed' is null"),
        ("seed", 2**31, r"row 4 \(sample_id '.*'\) column 'seed' must lie in \[0, 2\*\*31\)"),
        (
            "guidance_style",
            99.0,
            r"row 4 \(sample_id '.*'\) column 'guidance_style' must be a number in \[0, 50",
        ),
        (
            "style_prompt",
            None,
            r"row 4 \(sample_id '.*'\) column 'request' `anatomy_prompt` needs `style_prompt`",
        ),
        ("sample_id", "p0-balance-bkl-000000", r"row 4 .*column 'sample_id' repeats the id of row 0"),
        ("shard", -1, r"row 4 .*column 'shard' is negative"),
    ],
)
def test_read_plan_names_the_bad_row_and_column(
    root: Path, tmp_path: Path, column: str, value: Any, expected: str
) -> None:
    plan = plan_of(root, POLICIES)
    if column == "sample_id":
        plan = _broken(plan, "sample_id", 0, value)
    path = tmp_path / "plan.parquet"
    pq.write_table(_broken(plan, column, 4, value), path)
    with pytest.raises(PlanError, match=expected):
        read_plan(path)
    with pytest.raises(PlanError, match=expected):
        write_plan(_broken(plan, column, 4, value), tmp_path / "other.parquet")


def test_read_plan_names_missing_columns_and_unreadable_files(root: Path, tmp_path: Path) -> None:
    plan = plan_of(root, POLICIES)
    path = tmp_path / "plan.parquet"
    pq.write_table(plan.drop_columns(["shard", "label"]), path)
    with pytest.raises(PlanError, match=r"lacks the plan column\(s\) \['label', 'shard'\]"):
        read_plan(path)
    pq.write_table(plan.set_column(5, "shard", pa.array(["x"] * plan.num_rows)), path)
    with pytest.raises(PlanError, match=r"column 'shard' holds string, not int64"):
        read_plan(path)
    path.write_bytes(b"not parquet")
    with pytest.raises(PlanError, match="is not a readable Parquet file"):
        read_plan(path)
    with pytest.raises(PlanError, match="no plan at"):
        read_plan(tmp_path / "absent.parquet")


# -- every image reproducible from its row alone ----------------------------------------------------


def test_a_row_alone_makes_the_image_it_makes_in_any_batch(root: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = make_trained_model(make_text_encoder(tmp_path / "bert"))
    captions = tmp_path / "captions.csv"
    captions.write_text("caption\n" + "".join(f'"{c}"\n' for c in CAPTIONS))
    grid = {"anatomy_prompts": ANATOMY, "style_prompts": STYLE, "seeds_per_cell": 2}
    plan = plan_of(root, [{"swap_grid": grid}, {"prompts_csv": {"path": str(captions)}}], num_steps=2)
    requests = plan_requests(plan)
    n = len(requests)

    def images(batches: list[list[int]]) -> np.ndarray:
        """uint8 images of the plan rows, made in the given batches, put back in plan order."""
        made: dict[int, np.ndarray] = {}
        for rows in batches:
            made.update(
                zip(
                    rows,
                    generate_samples(model, [requests[i] for i in rows], batch_size=len(rows)).images_uint8(),
                )
            )
        return np.stack([made[i] for i in range(n)])

    whole = images([list(range(n))])
    again = images([list(range(n))])
    alone = images([[i] for i in range(n)])
    mixed = images([list(range(n))[::-1][i : i + 3] for i in range(0, n, 3)])
    # The same batch composition: the same bytes.
    assert all(encode_png(a) == encode_png(b) for a, b in zip(whole, again))
    diffs = {
        name: int(np.abs(other.astype(int) - whole.astype(int)).max())
        for name, other in (("alone", alone), ("mixed", mixed))
    }
    print(f"max pixel difference against one batch of {n}: {diffs} (8-bit levels)")
    assert max(diffs.values()) <= 1, diffs
    assert len({a.tobytes() for a in whole}) == n, "every row makes its own image"


def test_proportional_counts_follow_the_class_mix_and_sum_to_the_total() -> None:
    labels = ["nv"] * 67 + ["mel"] * 11 + ["bcc"] * 5 + ["akiec"] * 1
    counts = proportional_counts(labels, 20)
    assert sum(counts.values()) == 20 and counts == {"bcc": 1, "mel": 3, "nv": 16}  # akiec gets none
    assert proportional_counts(labels, 84) == dict(sorted(Counter(labels).items()))
    assert proportional_counts(["a", "b"], 3) == {"a": 2, "b": 1}  # a tie goes by name
    with pytest.raises(PlanError, match="at least one"):
        proportional_counts(labels, 0)
