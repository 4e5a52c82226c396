"""Request filters: the config's keys, their errors, and what they do to a body."""

from __future__ import annotations

from typing import Any

import pytest

from swapctl.config import parse_config
from swapctl.config.filters import Filters, Settings
from swapctl.errors import ConfigError


def config(filters: dict[str, Any], **more: Any) -> Any:
    return parse_config(
        {"models": {"chat": {"image": "x", "filters": filters, **more}, "code": {"image": "y"}}}
    )


def test_strip_set_and_by_id_in_llama_swaps_order() -> None:
    filters = (
        config(
            {
                "stripParams": "temperature, top_p",
                "setParams": {"top_k": 20, "temperature": 0.6},
                "setParamsByID": {"chat:hot": {"temperature": 1.2}},
            }
        )
        .models["chat"]
        .filters
    )
    body = {"model": "chat:hot", "temperature": 0.1, "top_p": 0.5, "top_k": 1, "messages": []}
    assert filters.apply(body, "chat:hot") == {
        "model": "chat:hot",
        "temperature": 1.2,
        "top_k": 20,
        "messages": [],
    }
    assert filters.apply(body, "chat") == {
        "model": "chat:hot",
        "temperature": 0.6,
        "top_k": 20,
        "messages": [],
    }


def test_a_key_ending_in_a_question_mark_only_fills_what_the_request_left_out() -> None:
    filters = Filters(set=Settings.of({"temperature?": 0.7, "seed?": 1, "top_k": 5}))
    assert filters.apply({"temperature": 0.1, "seed": None}, "m") == {
        "temperature": 0.1,
        "seed": 1,
        "top_k": 5,
    }


def test_dotted_keys_reach_into_objects_without_changing_the_original() -> None:
    filters = (
        config(
            {
                "setParams": {"chat_template_kwargs.enable_thinking": False},
                "stripParams": ["options.mirostat"],
            }
        )
        .models["chat"]
        .filters
    )
    body = {"chat_template_kwargs": {"other": 1}, "options": {"mirostat": 2, "keep": 3}}
    assert filters.apply(body, "chat") == {
        "chat_template_kwargs": {"other": 1, "enable_thinking": False},
        "options": {"keep": 3},
    }
    assert body == {"chat_template_kwargs": {"other": 1}, "options": {"mirostat": 2, "keep": 3}}
    # a soft default yields to a value of another kind where it would reach in
    soft = Filters(set=Settings.of({"a.b?": 1}))
    assert soft.apply({"a": "text"}, "m") == {"a": "text"}
    assert soft.apply({}, "m") == {"a": {"b": 1}}


def test_set_params_by_id_ids_route_to_their_model_as_aliases_do() -> None:
    parsed = config({"setParamsByID": {"chat": {"t": 0}, "chat:think": {"t": 1}}}, aliases=["assistant"])
    assert parsed.variants == {"chat:think": "chat"}
    assert parsed.resolve("chat:think") == "chat"
    assert parsed.resolve_any("chat:think") == "chat"
    assert "chat:think" in parsed.longest_names
    # the model's own ID and aliases take settings and add no ID
    assert config({"setParamsByID": {"assistant": {"t": 2}}}, aliases=["assistant"]).variants == {}


@pytest.mark.parametrize(
    ("filters", "path", "says"),
    [
        ({"stripParams": "top_p, model"}, "models.chat.filters.stripParams", "'model' is swapctl's own"),
        ({"setParams": {"model": "x"}}, "models.chat.filters.setParams", "'model' is swapctl's own"),
        ({"setParams": {"model?": "x"}}, "models.chat.filters.setParams", "'model?' is swapctl's own"),
        ({"setParamsByID": {"c2": {"model": 1}}}, "models.chat.filters.setParamsByID.c2", "'model'"),
        (
            {"setParamsByID": {"code": {}}},
            "models.chat.filters.setParamsByID.code",
            "already names model 'code'",
        ),
        ({"stripParam": "x"}, "models.chat.filters.stripParam", "unknown key"),
        ({"setParams": ["x"]}, "models.chat.filters.setParams", "valid dictionary"),
    ],
)
def test_errors_name_the_key_path(filters: dict[str, Any], path: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(filters)
    assert caught.value.path == path
    assert says in str(caught.value)


def test_an_alias_of_another_model_is_not_a_variant() -> None:
    with pytest.raises(ConfigError, match="already names model 'code'") as caught:
        parse_config(
            {
                "models": {
                    "chat": {"image": "x", "filters": {"setParamsByID": {"coder": {}}}},
                    "code": {"image": "y", "aliases": ["coder"]},
                }
            }
        )
    assert caught.value.path == "models.chat.filters.setParamsByID.coder"
