"""The sample request: its three ways to condition, its limits and messages, JSON and Parquet round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.sampler import SamplerConfig
from vgmedgen.platform.generation.request import (
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    REQUEST_SCHEMA,
    RequestError,
    SampleRequest,
    parse_request,
    requests_from_table,
    requests_to_table,
)

PROMPTS = {"anatomy_prompt": "a small round lesion, centred", "style_prompt": "dark brown, light skin"}


def test_each_mode_and_its_seeds() -> None:
    prompts = parse_request({**PROMPTS, "seed": 7, "n": 3})
    assert prompts.mode == "prompts" and prompts.seeds == [7, 8, 9]
    assert prompts.conditions() == PROMPTS
    caption = parse_request({"caption": "A small round lesion; dark brown on light skin."})
    assert caption.mode == "caption" and caption.seeds == [0] and list(caption.conditions()) == ["caption"]
    reference = parse_request({"reference": "/data/real.png"})
    assert reference.mode == "reference" and reference.conditions() == {"reference": "/data/real.png"}
    restyled = parse_request({"reference": "/data/real.png", "style_prompt": "pink"})
    assert restyled.mode == "reference" and restyled.conditions()["style_prompt"] == "pink"


def test_sampler_settings_override_the_models_only_where_given() -> None:
    base = SamplerConfig(num_steps=20, guidance_anatomy=4.5, guidance_style=4.5, solver_order=3)
    assert parse_request(PROMPTS).sampler(base) == base
    mine = parse_request({**PROMPTS, "num_steps": 5, "guidance_style": 2.0}).sampler(base)
    assert (mine.num_steps, mine.guidance_anatomy, mine.guidance_style, mine.solver_order) == (5, 4.5, 2.0, 3)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({}, "", "no prompt given; give `anatomy_prompt` and `style_prompt`, or `caption`"),
        ({"anatomy_prompt": "a lesion"}, "", "`anatomy_prompt` needs `style_prompt` too"),
        ({"style_prompt": "pink"}, "", "`style_prompt` needs `anatomy_prompt` too"),
        ({**PROMPTS, "caption": "x"}, "", "`caption` (a whole caption) cannot be combined"),
        ({"caption": "x", "reference": "/r.png"}, "", "cannot be combined"),
        ({"reference": "/r.png", "anatomy_prompt": "a"}, "", "the anatomy comes from the image; drop one"),
        ({**PROMPTS, "n": 0}, "n", "must be a positive integer, got 0"),
        (
            {**PROMPTS, "n": MAX_IMAGES + 1},
            "n",
            f"send several requests (the next one starting at seed + {MAX_IMAGES})",
        ),
        ({**PROMPTS, "n": True}, "n", "must be an integer, not a boolean (got True)"),
        ({**PROMPTS, "seed": -1}, "seed", "must lie in [0, 2**31), got -1"),
        ({**PROMPTS, "seed": 2**31 - 2, "n": 4}, "", "must stay below 2**31; lower `seed`"),
        ({**PROMPTS, "num_steps": 0}, "num_steps", "must be a positive integer, got 0"),
        ({**PROMPTS, "num_steps": 5000}, "num_steps", "must be at most 1000, got 5000"),
        ({**PROMPTS, "guidance_anatomy": float("nan")}, "guidance_anatomy", "must be a number in [0, 50.0]"),
        ({**PROMPTS, "guidance_style": -1.0}, "guidance_style", "must be a number in [0, 50.0]"),
        (
            {**PROMPTS, "caption": None, "anatomy_prompt": "   "},
            "anatomy_prompt",
            "is empty; describe the image",
        ),
        ({"caption": "x" * (MAX_PROMPT_CHARS + 1)}, "caption", f"more than {MAX_PROMPT_CHARS}; shorten it"),
        ({"reference": ""}, "reference", "is empty; give the path of a real image"),
        ({**PROMPTS, "seed": 1.5}, "seed", "fractional part (got 1.5)"),
        (
            {**PROMPTS, "steps": 3},
            "steps",
            "is not a field of a sample request; valid fields: anatomy_prompt",
        ),
    ],
)
def test_bad_requests_name_the_field_and_the_fix(fields: dict, field: str, message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(fields)
    ((got_field, got_message),) = info.value.problems  # exactly one problem
    assert got_field == field and message in got_message
    assert isinstance(info.value, ConfigError)  # jobs print it as one line, exit status 2
    assert message in str(info.value) and str(info.value).startswith("invalid sample request: ")


def test_several_problems_are_listed_and_flags_replace_field_names() -> None:
    with pytest.raises(RequestError) as info:
        parse_request({**PROMPTS, "n": 0, "num_steps": 0}, names={"n": "--n", "num_steps": "--steps"})
    assert str(info.value).splitlines() == [
        "invalid sample request:",
        "  --n must be a positive integer, got 0",
        "  --steps must be a positive integer, got 0",
    ]


def test_http_validation_keeps_the_field_path() -> None:
    """A web framework reports pydantic's own errors: the location is the field, the message ours."""
    with pytest.raises(ValidationError) as info:
        SampleRequest.model_validate_json(json.dumps({**PROMPTS, "n": 0}))
    (error,) = info.value.errors()
    assert error["loc"] == ("n",) and error["msg"] == "must be a positive integer, got 0"


def test_json_round_trip() -> None:
    request = parse_request({"reference": "/data/r.png", "style_prompt": "blue-grey, é", "seed": 3, "n": 2,
                             "num_steps": 7, "guidance_anatomy": 1.0, "guidance_style": 3.5})  # fmt: skip
    text = request.model_dump_json()
    assert parse_request(text) == request and parse_request(text.encode()) == request
    assert parse_request(json.loads(text)) == request
    with pytest.raises(RequestError, match="invalid sample request: "):
        parse_request("{not json")


def test_plan_table_round_trip_through_parquet(tmp_path: Path) -> None:
    requests = [
        parse_request({**PROMPTS, "seed": 1, "n": 2}),
        parse_request({"caption": "a caption", "num_steps": 4}),
        parse_request({"reference": "/r.png", "guidance_style": 2.0}),
    ]
    pq.write_table(requests_to_table(requests), tmp_path / "plan.parquet")
    table = pq.read_table(tmp_path / "plan.parquet")
    assert table.schema == REQUEST_SCHEMA and table.schema.names == list(SampleRequest.model_fields)
    assert requests_from_table(table) == requests
    # A column null in every row keeps its type.
    only_prompts = requests_to_table([requests[0]])
    assert only_prompts.schema.field("caption").type == pa.string()


def test_a_bad_plan_row_names_its_index_and_field() -> None:
    table = requests_to_table([parse_request(PROMPTS), parse_request(PROMPTS)])
    table = table.set_column(table.schema.get_field_index("n"), "n", pa.array([1, 0], pa.int64()))
    with pytest.raises(
        RequestError, match=r"invalid sample request in plan row 1: n must be a positive integer"
    ):
        requests_from_table(table)
    with pytest.raises(RequestError, match=r"lacks the columns \['seed'\]"):
        requests_from_table(table.drop_columns(["seed"]))


def test_requests_are_frozen() -> None:
    request = parse_request(PROMPTS)
    with pytest.raises(ValidationError):
        request.n = 5  # type: ignore[misc]
