"""The generation plan: one Parquet row per image to make, built from the generate section's policies.

:func:`build_plan` turns ``cfg.generate.policies`` into a table of :data:`PLAN_SCHEMA`: the plan columns
(``sample_id``, ``policy``, ``label``, ``source_id``, ``model_id``, ``shard``) followed by the
:data:`~vgmedgen.platform.generation.request.REQUEST_SCHEMA` columns with ``n = 1``. Every row is a
whole sample request: given alone to :func:`~vgmedgen.platform.generation.sample.generate_samples` it
makes the image that the row makes inside any batch.

Policies, in the order the config lists them (rows of one policy stay together):

- ``balance``: every class of the train split topped up to its largest class;
- ``multiply: K``: ``round(K x rows)`` images per class;
- ``per_class: {label: n}``: exactly ``n`` images of each named label;
- ``from_records``: every train record's prompts again, ``repeats`` images each;
- ``swap_grid``: anatomy prompts x style prompts, ``seeds_per_cell`` images per cell, no label;
- ``prompts_csv``: a user's CSV (:data:`CSV_COLUMNS`), each line ``n`` images.

Prompts and labels come from the train split only (the test split is what generated images are
compared with). A row of balance, multiply or per_class takes the anatomy and style text of a train
record of its class, drawn seeded and as evenly as possible: every record of the class serves once
before any serves twice.

Seeds derive from ``generate.seed`` and a row's place in its policy (policy index, row counter), so
the same config, records and model give the same plan, a policy appended leaves the rows before it
as they were, and no two rows share a seed -- except the cells of a swap grid, which share their seeds
on purpose (along a grid row only the style prompt changes, as in
:class:`~vgmedgen.platform.generation.grid.SwapGrid`), and seeds a CSV gives explicitly.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.generation.config import (
    BalancePolicy,
    FromRecordsPolicy,
    GenerateConfig,
    MultiplyPolicy,
    PerClassPolicy,
    PromptsCsvPolicy,
    SwapGridPolicy,
)
from vgmedgen.platform.generation.request import (
    REQUEST_SCHEMA,
    SEED_LIMIT,
    RequestError,
    SampleRequest,
    parse_request,
    requests_from_table,
)
from vgmedgen.platform.records import RecordError, read_split
from vgmedgen.platform.runs import plan_name
from vgmedgen.platform.storage import row_key

if TYPE_CHECKING:
    from vgmedgen.platform.config import ExperimentConfig

__all__ = [
    "CSV_COLUMNS",
    "PLAN_COLUMNS",
    "PLAN_SCHEMA",
    "PlanError",
    "build_plan",
    "plan_counts",
    "proportional_counts",
    "plan_key",
    "plan_requests",
    "plan_summary",
    "read_plan",
    "write_plan",
]

# The columns a plan adds in front of the request's (the generation job's output keeps them all).
PLAN_COLUMNS = ("sample_id", "policy", "label", "source_id", "model_id", "shard")

PLAN_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("policy", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("shard", pa.int64(), nullable=False),
        *REQUEST_SCHEMA,
    ]
)

# The columns a prompts CSV may have: the prompts (anatomy_prompt + style_prompt, or caption), and per
# line an optional label, first seed and number of images.
CSV_COLUMNS = ("anatomy_prompt", "style_prompt", "caption", "label", "seed", "n")

# What a train record contributes to a plan row.
_TRAIN_COLUMNS = ["id", "label", "anatomy_text", "style_text"]
# Columns that may never be null in a plan.
_REQUIRED = ("sample_id", "policy", "model_id", "shard", "seed", "n")


class PlanError(ConfigError):
    """A generation plan that cannot be built or read; the message names the policy, CSV line or plan
    row and column, and the fix."""


# -- the rows of one policy ---------------------------------------------------------------------


@dataclass
class _Rows:
    """The rows one policy asks for, column by column (plan rows have n = 1).

    ``seeds`` holds an int for a seed a CSV gives, else a key: rows with the same key share the seed
    derived from it (the cells of a swap grid), every other row has its own key.
    """

    labels: list[str | None] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)
    anatomy: list[str | None] = field(default_factory=list)
    style: list[str | None] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    seeds: list[int | str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class _Train:
    """The train split's prompts: rows sorted by id, so part-file order never changes a plan."""

    where: str
    ids: list[str]
    labels: list[str]
    anatomy: list[str]
    style: list[str]

    @classmethod
    def read(cls, records_dir: Path) -> _Train:
        try:
            table = read_split(records_dir, "train", columns=_TRAIN_COLUMNS)
        except (RecordError, ValueError, OSError) as exc:
            raise PlanError(
                f"the generate policies take prompts and labels from the train split of {records_dir}, "
                f"which cannot be read: {exc}"
            ) from None
        table = table.sort_by("id")
        return cls(
            str(records_dir),
            table.column("id").to_pylist(),
            table.column("label").to_pylist(),
            table.column("anatomy_text").to_pylist(),
            table.column("style_text").to_pylist(),
        )

    def counts(self) -> dict[str, int]:
        """Train rows per label, labels sorted."""
        return dict(sorted(Counter(self.labels).items()))

    def members(self) -> dict[str, np.ndarray]:
        """The row indices of each label, labels sorted."""
        labels = np.array(self.labels, dtype=object)
        return {c: np.flatnonzero(labels == c) for c in self.counts()}

    def check_labels(self, labels: Sequence[str], where: str) -> None:
        unknown = [x for x in dict.fromkeys(labels) if x not in self.counts()]
        if unknown:
            raise PlanError(
                f"{where} names label(s) {unknown} that the train split of {self.where} does not have; "
                f"its labels: {list(self.counts())}"
            )

    def rows(self, index: Sequence[int] | np.ndarray, repeats: int = 1) -> _Rows:
        """Rows that reuse these records' prompts and labels, each record ``repeats`` times in a row."""
        idx = np.repeat(np.asarray(index, dtype=np.int64), repeats).tolist()
        return _Rows(
            labels=[self.labels[i] for i in idx],
            sources=[self.ids[i] for i in idx],
            anatomy=[self.anatomy[i] for i in idx],
            style=[self.style[i] for i in idx],
            captions=[None] * len(idx),
        )


def _draw(members: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of ``members``, as evenly as possible: whole shuffled rounds, then part of one more."""
    rounds = math.ceil(count / len(members))
    return np.concatenate([rng.permutation(members) for _ in range(rounds)])[:count]


def _class_draws(train: _Train, counts: Mapping[str, int], seed: int, policy_index: int) -> _Rows:
    """``counts[label]`` rows per label, each a train record of that label drawn by :func:`_draw`."""
    members = train.members()
    rows = _Rows()
    for label, count in counts.items():
        if count <= 0:
            continue
        # Each class has its own stream: changing one class's count leaves the others' draws alone.
        rng = np.random.default_rng([seed, policy_index, row_key(0, label, 4)])
        part = train.rows(_draw(members[label], count, rng))
        for name in ("labels", "sources", "anatomy", "style", "captions"):
            getattr(rows, name).extend(getattr(part, name))
    return rows


def _balance(train: _Train, policy_index: int, seed: int) -> _Rows:
    counts = train.counts()
    top = max(counts.values())
    if all(n == top for n in counts.values()):
        raise PlanError(
            f"policy {policy_index} (balance) has nothing to generate: every class of the train split of "
            f"{train.where} already has {top} rows ({', '.join(counts)}); drop it, or use `multiply` or "
            "`per_class`"
        )
    return _class_draws(train, {c: top - n for c, n in counts.items()}, seed, policy_index)


def _multiply(train: _Train, k: float, policy_index: int, seed: int) -> _Rows:
    # round half up (Python's round() rounds half to even: 2.5 -> 2).
    counts = {c: int(math.floor(k * n + 0.5)) for c, n in train.counts().items()}
    if not any(counts.values()):
        raise PlanError(
            f"policy {policy_index} (multiply: {k:g}) has nothing to generate: {k:g} x the rows of each class "
            f"rounds to 0 (train rows per class: {train.counts()}); raise K"
        )
    return _class_draws(train, counts, seed, policy_index)


def _per_class(train: _Train, counts: Mapping[str, int], policy_index: int, seed: int) -> _Rows:
    train.check_labels(list(counts), f"policy {policy_index} (per_class)")
    return _class_draws(train, counts, seed, policy_index)


def _swap_grid(options: SwapGridPolicy.Options, policy_index: int) -> _Rows:
    rows = _Rows()
    for a in options.anatomy_prompts:
        for s in options.style_prompts:
            for k in range(options.seeds_per_cell):
                rows.labels.append(None)
                rows.sources.append(None)
                rows.anatomy.append(a)
                rows.style.append(s)
                rows.captions.append(None)
                rows.seeds.append(f"{policy_index}:cell-seed-{k}")  # shared by every cell
    return rows


def _csv_lines(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, non-blank cells) of every data line of a prompts CSV; header checked."""
    try:
        # utf-8-sig: spreadsheets put a byte-order mark in front of the first column's name.
        text = path.expanduser().read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PlanError(
            f"prompts_csv {path}: no such file; give the path of a CSV with columns anatomy_prompt and "
            "style_prompt (or caption), optionally label, seed and n"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"prompts_csv {path} is not a readable UTF-8 text file ({exc})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\x00extra")
    try:
        header = [c.strip() for c in reader.fieldnames or []]
        if not header:
            raise PlanError(f"prompts_csv {path} is empty; its first line must name the columns")
        reader.fieldnames = header
        unknown = [c for c in header if c not in CSV_COLUMNS]
        repeated = [c for c, n in Counter(header).items() if n > 1]
        prompts = {"anatomy_prompt", "style_prompt"} <= set(header) or "caption" in header
        if unknown or repeated or not prompts:
            problem = (
                f"has unknown column(s) {unknown}"
                if unknown
                else f"repeats column(s) {repeated}"
                if repeated
                else "lacks the prompt columns"
            )
            raise PlanError(
                f"prompts_csv {path} {problem}: it needs the columns anatomy_prompt and style_prompt, or "
                f"caption (optional: label, seed, n); found {header}"
            )
        for row in reader:
            if "\x00extra" in row:
                raise PlanError(
                    f"prompts_csv {path} line {reader.line_num} has more cells than the header has columns "
                    f"({header}); quote cells that contain commas"
                )
            yield reader.line_num, {k: v for k, v in row.items() if v is not None and v.strip()}
    except csv.Error as exc:
        raise PlanError(f"prompts_csv {path} line {reader.line_num} is not valid CSV: {exc}") from None


def _prompts_csv(path: Path, train: Callable[[], _Train], policy_index: int) -> _Rows:
    rows = _Rows()
    for line, cells in _csv_lines(path):
        label = cells.pop("label", None)
        try:
            request = parse_request(cells)
        except RequestError as err:
            raise PlanError(f"prompts_csv {path} line {line}: {err}") from None
        if label is not None:
            train().check_labels([label], f"prompts_csv {path} line {line}")
        # A line without a seed gets derived ones; with a seed, its n images take seed .. seed + n - 1.
        explicit = "seed" in cells
        for k in range(request.n):
            rows.labels.append(label)
            rows.sources.append(None)
            rows.anatomy.append(request.anatomy_prompt)
            rows.style.append(request.style_prompt)
            rows.captions.append(request.caption)
            rows.seeds.append(request.seed + k if explicit else f"{policy_index}:line-{line}-{k}")
    if not rows:
        raise PlanError(f"prompts_csv {path} has no rows below its header; add one line per prompt")
    return rows


# -- the plan ---------------------------------------------------------------------------------------


def _slug(label: str | None) -> str:
    """A label as it reads in a sample id (and a file name): letters, digits, '_' and '.'."""
    if label is None:
        return "unlabelled"
    return re.sub(r"[^A-Za-z0-9_.]+", "_", label).strip("_") or "label"


def _derive_seeds(keys: Sequence[int | str], seed: int) -> list[int]:
    """Each key's seed: a hash of (generate.seed, key) in [0, 2**31), moved on by rehashing where it would
    meet a seed already taken (explicit seeds first, then derived ones in row order)."""
    used = {k for k in keys if isinstance(k, int)}
    derived: dict[str, int] = {}
    out = []
    for key in keys:
        if isinstance(key, int):
            out.append(key)
            continue
        if key not in derived:
            value, attempt = row_key(seed, key, 4) % SEED_LIMIT, 0
            while value in used:
                attempt += 1
                value = row_key(seed, f"{key}#{attempt}", 4) % SEED_LIMIT
            used.add(value)
            derived[key] = value
        out.append(derived[key])
    return out


def _check_record_prompts(rows: _Rows) -> None:
    """Every train record used must make a valid request (its texts are prompts now): checked once per
    record, so that a bad record fails the plan and not an actor mid-job."""
    seen: set[str] = set()
    for source, a, s in zip(rows.sources, rows.anatomy, rows.style):
        if source is None or source in seen:
            continue
        seen.add(source)
        try:
            parse_request({"anatomy_prompt": a, "style_prompt": s})
        except RequestError as err:
            raise PlanError(
                f"train record {source!r} cannot serve as a prompt ({err}); fix its anatomy_text/style_text "
                "or re-run prepare"
            ) from None


def _build(gen: GenerateConfig, model_id: str, train: Callable[[], _Train]) -> pa.Table:
    """The plan of ``gen.policies`` for model ``model_id`` (see :func:`build_plan`); ``train`` is called
    once, and only when a policy needs the train split."""
    if not model_id or not model_id.strip():
        raise PlanError("model_id is empty; pass the model version's content id (ModelRef.id)")
    loaded: list[_Train] = []

    def get_train() -> _Train:
        if not loaded:
            loaded.append(train())
        return loaded[0]

    parts: list[tuple[int, str, _Rows]] = []
    for i, policy in enumerate(gen.policies):
        kind = next(iter(type(policy).model_fields))
        if isinstance(policy, BalancePolicy):
            rows = _balance(get_train(), i, gen.seed)
        elif isinstance(policy, MultiplyPolicy):
            rows = _multiply(get_train(), policy.multiply, i, gen.seed)
        elif isinstance(policy, PerClassPolicy):
            rows = _per_class(get_train(), policy.per_class, i, gen.seed)
        elif isinstance(policy, FromRecordsPolicy):
            t = get_train()
            rows = t.rows(range(len(t.ids)), policy.from_records.repeats)
        elif isinstance(policy, SwapGridPolicy):
            rows = _swap_grid(policy.swap_grid, i)
        elif isinstance(policy, PromptsCsvPolicy):
            rows = _prompts_csv(policy.prompts_csv.path, get_train, i)
        else:  # a new policy kind in config.py without a builder here
            raise PlanError(f"policy {i} ({kind}) has no plan builder")
        if not rows.seeds:  # record-drawn rows: one seed of their own each
            rows.seeds = [f"{i}:{j}" for j in range(len(rows))]
        _check_record_prompts(rows)
        parts.append((i, kind, rows))

    seeds = _derive_seeds([k for _, _, r in parts for k in r.seeds], gen.seed)
    settings = [gen.num_steps, gen.guidance_anatomy, gen.guidance_style]
    ids: list[str] = []
    policies: list[str] = []
    row = 0
    for i, kind, rows in parts:
        for j in range(len(rows)):
            # The hash covers everything that makes the image, so plans of other models, seeds or prompts
            # never share an id; the readable part makes ids unique within the plan.
            content = [model_id, rows.anatomy[j], rows.style[j], rows.captions[j], seeds[row], *settings]
            digest = f"{row_key(0, repr(content), 4):08x}"
            ids.append(f"p{i}-{kind}-{_slug(rows.labels[j])}-{j:06d}-{digest}")
            row += 1
        policies += [kind] * len(rows)
    n = len(ids)

    def column(name: str) -> list[Any]:
        return [v for _, _, r in parts for v in getattr(r, name)]

    return pa.table(
        {
            "sample_id": ids,
            "policy": policies,
            "label": column("labels"),
            "source_id": column("sources"),
            "model_id": [model_id] * n,
            "shard": np.arange(n, dtype=np.int64) // gen.shard_size,
            "anatomy_prompt": column("anatomy"),
            "style_prompt": column("style"),
            "caption": column("captions"),
            "reference": pa.nulls(n, pa.string()),
            "seed": seeds,
            "n": np.ones(n, dtype=np.int64),
            "num_steps": [gen.num_steps] * n,
            "guidance_anatomy": [gen.guidance_anatomy] * n,
            "guidance_style": [gen.guidance_style] * n,
        },
        schema=PLAN_SCHEMA,
    )


def build_plan(cfg: ExperimentConfig, model_id: str, *, records_dir: Path | None = None) -> pa.Table:
    """The generation plan of an experiment's generate section: one row per image, in policy order.

    Args:
        cfg: the experiment; its ``generate`` section says what to make, and the train split of
            ``cfg.records_dir`` gives prompts and labels (read only when a policy needs it).
        model_id: the model version's content id (its manifest sha256), written into every row and
            hashed into every sample id.
        records_dir: records to read the train split of instead of ``cfg.records_dir`` (the downstream
            benchmark's low-data subset).

    Returns:
        A table of :data:`PLAN_SCHEMA`: ``policy`` is the policy's kind (``multiply``, ...), ``sample_id``
        reads ``p<policy index>-<kind>-<label>-<counter in the policy>-<hash>`` (the hash covers the model id,
        prompts, seed and sampler settings), ``shard`` is the row index // ``generate.shard_size``.

    Raises:
        PlanError: an unknown label, an unreadable or malformed prompts CSV (naming the line), a policy
            that yields no rows, or records that cannot be read.
    """
    return _build(cfg.generate, model_id, lambda: _Train.read(records_dir or cfg.records_dir))


def proportional_counts(labels: Sequence[str], total: int) -> dict[str, int]:
    """``total`` images split over the classes of ``labels`` in their proportions (largest remainder, ties
    to the larger class, then by name); classes that get none are left out. The ``per_class`` policy of a
    set that follows the train split's class mix (the evaluate job's generated set)."""
    if total < 1:
        raise PlanError(f"asked for {total} images; ask for at least one")
    counts = Counter(labels)
    if not counts:
        raise PlanError("the train split has no rows to take a class mix from; re-run prepare")
    n = sum(counts.values())
    exact = {c: total * k / n for c, k in counts.items()}
    out = {c: int(math.floor(v)) for c, v in exact.items()}
    order = sorted(counts, key=lambda c: (-(exact[c] - out[c]), -counts[c], c))
    for c in order[: total - sum(out.values())]:
        out[c] += 1
    return {c: k for c, k in sorted(out.items()) if k > 0}


# -- reading, writing, naming -----------------------------------------------------------------------


def _check(table: pa.Table, where: str) -> pa.Table:
    """``table`` with exactly the plan's columns and types, every row checked; PlanError names the first
    bad row (index and sample id) and column."""
    missing = [c for c in PLAN_SCHEMA.names if c not in table.column_names]
    if missing:
        raise PlanError(
            f"{where} lacks the plan column(s) {missing} (found {table.column_names}); build plans with "
            "build_plan"
        )
    table = table.select(PLAN_SCHEMA.names)
    columns = []
    for f in PLAN_SCHEMA:
        try:
            columns.append(table.column(f.name).cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise PlanError(
                f"{where} column {f.name!r} holds {table.column(f.name).type}, not {f.type} ({exc})"
            ) from None
    table = pa.Table.from_arrays(columns, schema=PLAN_SCHEMA)
    ids = table.column("sample_id")

    def bad(row: int, column: str, problem: str) -> PlanError:
        return PlanError(f"{where} row {row} (sample_id {ids[row].as_py()!r}) column {column!r} {problem}")

    for name in _REQUIRED:
        nulls = pc.is_null(table.column(name))
        if pc.any(nulls).as_py():
            first = int(pc.index(nulls, True).as_py())
            raise (
                bad(first, name, "is null")
                if name != "sample_id"
                else PlanError(f"{where} row {first} column 'sample_id' is null")
            )
    unique = pc.unique(ids)
    if len(unique) != table.num_rows:
        counts = pc.value_counts(ids)
        dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()
        rows = np.flatnonzero(pc.equal(ids, dup).to_numpy(zero_copy_only=False))
        raise bad(int(rows[1]), "sample_id", f"repeats the id of row {int(rows[0])}; sample ids are unique")
    for name, test, problem in (
        ("n", lambda c: pc.not_equal(c, 1), "is not 1; a plan row is one image"),
        ("shard", lambda c: pc.less(c, 0), "is negative"),
    ):
        wrong = test(table.column(name))
        if pc.any(wrong).as_py():
            row = int(pc.index(wrong, True).as_py())
            raise bad(row, name, f"{problem} (got {table.column(name)[row].as_py()})")
    # Validate each distinct request once (seed by seed would cost 100k pydantic calls for nothing).
    fields = [c for c in REQUEST_SCHEMA.names if c != "seed"]
    first_row: dict[tuple[Any, ...], int] = {}
    for row, values in enumerate(zip(*(table.column(c).to_pylist() for c in fields))):
        first_row.setdefault(values, row)
    seeds = table.column("seed").to_numpy()
    out_of_range = np.flatnonzero((seeds < 0) | (seeds >= SEED_LIMIT))
    checks = [(v, r) for v, r in first_row.items()]
    if out_of_range.size:  # validate that row too, for the request's own message
        r = int(out_of_range[0])
        checks.insert(0, (tuple(table.column(c)[r].as_py() for c in fields), r))
    for values, row in checks:
        try:
            parse_request({**dict(zip(fields, values)), "seed": int(seeds[row])})
        except RequestError as err:
            column, problem = err.problems[0]
            raise bad(row, column or "request", problem) from None
    return table


def write_plan(table: pa.Table, path: str | Path) -> Path:
    """Check a plan (columns, types, unique ids, valid requests) and write it as one Parquet file, all at
    once (a temporary sibling renamed into place)."""
    path = Path(path)
    table = _check(table, "plan")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_plan(path: str | Path) -> pa.Table:
    """Read a plan written by :func:`write_plan`, checked: PlanError names a missing column, or the first
    bad row and its column."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"no plan at {path}; build one with build_plan and write_plan")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PlanError(f"plan {path} is not a readable Parquet file ({exc})") from None
    return _check(table, f"plan {path}")


def plan_key(table: pa.Table) -> str:
    """The plan's name by content, ``<model id>-plan-<hash>`` (:func:`~vgmedgen.platform.runs.plan_name`):
    the same rows from the same model give the same name, so a re-run finds its output and resumes."""
    models = pc.unique(table.column("model_id")).to_pylist()
    if len(models) != 1:
        raise PlanError(f"a plan holds one model's rows; this one has model ids {models[:5]}")
    return plan_name(models[0], table.select(PLAN_SCHEMA.names).to_pylist())


def plan_requests(table: pa.Table) -> list[SampleRequest]:
    """One single-image request per plan row, in order (each validated; a bad row is named)."""
    return requests_from_table(table)


def plan_counts(table: pa.Table) -> list[tuple[str, str | None, int]]:
    """(policy, label, images) for each policy and label of the plan, in plan order."""
    counts = Counter(zip(table.column("policy").to_pylist(), table.column("label").to_pylist()))
    return [(p, label, n) for (p, label), n in counts.items()]


def plan_summary(table: pa.Table) -> str:
    """A printable table of images per policy and label, with the shard count and total."""
    counts = plan_counts(table)
    width = max([len("policy")] + [len(p) for p, _, _ in counts])
    lwidth = max([len("label")] + [len(str(label)) for _, label, _ in counts])
    lines = [f"{'policy':<{width}}  {'label':<{lwidth}}  images"]
    lines += [f"{p:<{width}}  {label or '-':<{lwidth}}  {n:>6}" for p, label, n in counts]
    shards = len(pc.unique(table.column("shard"))) if table.num_rows else 0
    lines.append(f"{table.num_rows} images in {shards} shards")
    return "\n".join(lines)
