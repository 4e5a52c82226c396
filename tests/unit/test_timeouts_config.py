"""`timeouts`, global and per model: each key its model's own, else the global one, else the
default; seconds or a duration, 0 for no limit; errors name the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest

from swapctl.config import Timeouts, json_schema, load_config, parse_config
from swapctl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = Timeouts(connect=10.0, response_header=None, idle=600.0)


def config(own: dict[str, Any] | None = None, shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model `chat` with `own` timeouts (none: the key left out), the global ones `shared`."""
    model: dict[str, Any] = {"image": "img"} if own is None else {"image": "img", "timeouts": own}
    return {"models": {"chat": model, "other": {"image": "img"}}, **({"timeouts": shared} if shared else {})}


@pytest.mark.parametrize(
    ("own", "shared", "chat", "other"),
    [
        (None, None, DEFAULTS, DEFAULTS),
        ({}, {}, DEFAULTS, DEFAULTS),
        # the global ones, over the defaults, key by key
        (None, {"idle": "2m"}, Timeouts(10.0, None, 120.0), Timeouts(10.0, None, 120.0)),
        (None, {"responseHeader": "1h30m"}, Timeouts(10.0, 5400.0, 600.0), Timeouts(10.0, 5400.0, 600.0)),
        # a model's own, over the global one, key by key; the others keep theirs
        ({"connect": 2.5}, {"idle": 30}, Timeouts(2.5, None, 30.0), Timeouts(10.0, None, 30.0)),
        ({"idle": "500ms"}, {"idle": 30}, Timeouts(10.0, None, 0.5), Timeouts(10.0, None, 30.0)),
        ({"responseHeader": "90s"}, None, Timeouts(10.0, 90.0, 600.0), DEFAULTS),
        # 0: no limit, even where the global one sets one
        ({"idle": 0, "connect": "0s"}, {"idle": 30}, Timeouts(None, None, None), Timeouts(10.0, None, 30.0)),
        (None, {"connect": 0, "idle": 0}, Timeouts(None, None, None), Timeouts(None, None, None)),
        # a model's own null is as if absent
        ({"idle": None}, {"idle": 30}, Timeouts(10.0, None, 30.0), Timeouts(10.0, None, 30.0)),
    ],
)
def test_each_limit_is_the_models_own_else_the_global_one_else_the_default(
    own: dict[str, Any] | None, shared: dict[str, Any] | None, chat: Timeouts, other: Timeouts
) -> None:
    models = parse_config(config(own, shared)).models
    assert (models["chat"].timeouts, models["other"].timeouts) == (chat, other)


@pytest.mark.parametrize(
    ("own", "shared", "path", "message"),
    [
        ({"idle": "soon"}, None, "models.chat.timeouts.idle", "expected seconds or a duration"),
        ({"responseHeader": -1}, None, "models.chat.timeouts.responseHeader", "from 0 to"),
        ({"connect": True}, None, "models.chat.timeouts.connect", "got True"),
        ({"conect": 1}, None, "models.chat.timeouts.conect", "unknown key 'conect'"),
        ([1], None, "models.chat.timeouts", "valid dictionary"),
        (None, {"idle": float("inf")}, "timeouts.idle", "from 0 to"),
        (None, {"responseHeader": "31d"}, "timeouts.responseHeader", "expected seconds or a duration"),
        (None, {"idle": None}, "timeouts.idle", "got None"),  # the global one has no absent
        (None, {"read": 5}, "timeouts.read", "unknown key 'read'"),
    ],
)
def test_a_bad_limit_names_its_key_path(own: Any, shared: Any, path: str, message: str) -> None:
    document = config(own, None)
    if shared is not None:
        document["timeouts"] = shared
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert caught.value.path == path
    assert message in caught.value.message


def test_the_schema_describes_both_and_rejects_what_the_parser_rejects() -> None:
    schema = json_schema()
    for found in (schema["$defs"]["TimeoutsConfig"], schema["$defs"]["ModelTimeoutsConfig"]):
        assert set(found["properties"]) == {"connect", "responseHeader", "idle"}
        assert all(field["description"] for field in found["properties"].values())
    assert schema["properties"]["timeouts"]["description"]
    jsonschema.validate(config({"idle": "1m30s", "connect": None}, {"responseHeader": 0}), schema)
    for bad in ({"idle": -1}, {"idle": "soon"}, {"idle": True}, {"read": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(config(bad), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config(None, {"idle": None}), schema)


def test_the_example_shows_them() -> None:
    example = load_config(ROOT / "config.example.yaml")
    assert example.models["tiny-chat"].timeouts != DEFAULTS
