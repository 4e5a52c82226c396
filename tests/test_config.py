"""Configuration: every error names its key path; the example and the schema agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from swapctl.config import json_schema, load_config, parse_config, parse_duration
from swapctl.errors import ConfigError
from swapctl.matrix import GroupPolicy, MatrixPolicy

ROOT = Path(__file__).parent.parent


def base(**extra: Any) -> dict[str, Any]:
    return {"models": {"a": {"image": "img"}, "b": {"image": "img", "aliases": ["bee"]}}, **extra}


def with_model(**keys: Any) -> dict[str, Any]:
    return {"models": {"a": {"image": "img", **keys}}}


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        ([1, 2], "", "must be a mapping"),
        ({}, "models", "required key is missing"),
        ({"models": {}}, "models", "no models"),
        ({"models": {"a": {}}}, "models.a.image", "required key is missing"),
        ({"models": {"a": {"imag": "x"}}}, "models.a.imag", "unknown key 'imag'"),
        ({**base(), "modles": 1}, "modles", "unknown key 'modles'"),
        (with_model(port=0), "models.a.port", "greater than or equal to 1"),
        (with_model(port="http"), "models.a.port", "valid integer"),
        (with_model(gpus="some"), "models.a.gpus", "expected 'all', a count of at least 1 or a list"),
        (with_model(gpus=0), "models.a.gpus", "a count of at least 1"),
        (with_model(health="health"), "models.a.health", "starting with '/' or 'none'"),
        (with_model(ttl=-1), "models.a.ttl", "greater than or equal to 0"),
        (with_model(stop_grace_period="soon"), "models.a.stop_grace_period", "duration"),
        (with_model(template="nope"), "models.a.template", "no template 'nope'"),
        (with_model(healthCheckTimeout=0), "models.a.healthCheckTimeout", "greater than or equal to 1"),
        ({**base(), "instance": "bad name"}, "instance", "should match pattern"),
        (
            {"models": {"a": {"image": "i", "aliases": ["b"]}, "b": {"image": "i"}}},
            "models.a.aliases",
            "also a model ID",
        ),
        (
            {"models": {"a": {"image": "i", "aliases": ["x"]}, "b": {"image": "i", "aliases": ["x"]}}},
            "models.b.aliases",
            "duplicate alias 'x'",
        ),
        (base(matrix={"sets": {"s": "a"}}, groups={"g": {"members": ["a"]}}), "groups", "not both"),
        (base(matrix={"sets": {}}), "matrix.sets", "no sets"),
        (base(matrix={"vars": {}}), "matrix.sets", "required key is missing"),
        (
            base(matrix={"sets": {"creative": "a & zz"}}),
            "matrix.sets.creative",
            "unknown name 'zz' at position 5",
        ),
        (
            base(matrix={"sets": {"s": "bee"}}),
            "matrix.sets.s",
            "'bee' at position 1 in 'bee' is an alias of model 'b'",
        ),
        (base(matrix={"vars": {"x": "bee"}, "sets": {"s": "a"}}), "matrix.vars.x", "alias of model 'b'"),
        (
            base(matrix={"evict_costs": {"a": "lots"}, "sets": {"s": "a"}}),
            "matrix.evict_costs.a",
            "valid integer",
        ),
        (
            base(matrix={"evict_costs": {"a": 0}, "sets": {"s": "a"}}),
            "matrix.evict_costs.a",
            "positive integer",
        ),
        (
            base(matrix={"evict_costs": {"a": True}, "sets": {"s": "a"}}),
            "matrix.evict_costs.a",
            "valid integer",
        ),
        (base(matrix={"sets": {"s": 5}}), "matrix.sets.s", "valid string"),
        (base(groups={"g": {"members": ["zz"]}}), "groups.g.members", "unknown model 'zz'"),
        (
            base(groups={"g": {"members": ["a"]}, "h": {"members": ["a"]}}),
            "groups.h.members",
            "already a member of group 'g'",
        ),
        (base(groups={"g": {"members": ["a"], "swapp": True}}), "groups.g.swapp", "unknown key"),
    ],
)
def test_errors_name_the_key_path(raw: Any, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.path == path
    assert message in caught.value.message


def test_compose_forms_are_normalised() -> None:
    config = parse_config(
        with_model(
            command="llama-server -m '/models/a b.gguf' --port 8080",
            environment=["A=1", "B=x=y"],
            gpus=[0, 1],
            stop_grace_period="1m30s",
            labels={"flag": True, "n": 3},
        )
    )
    model = config.models["a"]
    assert model.command == ("llama-server", "-m", "/models/a b.gguf", "--port", "8080")
    assert model.environment == {"A": "1", "B": "x=y"}
    assert model.gpus == ("0", "1")
    assert model.stop_grace_period == 90.0
    assert model.labels == {"flag": "true", "n": "3"}
    assert parse_config(with_model(gpus="all")).models["a"].gpus == "all"
    assert parse_config(with_model(gpus=2)).models["a"].gpus == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), (2.5, 2.5), ("10s", 10.0), ("1m", 60.0), ("1h2m3s", 3723.0), ("500ms", 0.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_no_matrix_nor_groups_runs_one_at_a_time() -> None:
    config = parse_config(base())
    assert isinstance(config.policy, GroupPolicy)
    assert config.policy.decide("a", ["b"]).evict == ("b",)


def test_names_resolve_as_people_and_clients_type_them() -> None:
    config = parse_config(base(matrix={"vars": {"x": "a"}, "sets": {"s": "x & b"}}))
    assert isinstance(config.policy, MatrixPolicy)
    assert [config.resolve_any(n) for n in ("x", "a", "bee", "b")] == ["a", "a", "b", "b"]
    assert config.resolve("x") is None  # clients never name vars
    assert config.resolve("bee") == "b"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "swapctl.yaml"
    path.write_text(text)
    return path


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  a:\n    image: x\n   bad: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == str(path)
    assert "invalid YAML: line 4" in caught.value.message


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  a: {image: x}\n  a: {image: y}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "line 3" in caught.value.message and "duplicate key 'a'" in caught.value.message


def test_templates_supply_keys_and_the_model_wins(tmp_path: Path) -> None:
    (tmp_path / "compose-templates").mkdir()
    (tmp_path / "compose-templates" / "srv.yaml").write_text(
        "services:\n  m:\n    image: tmpl-image\n    environment: {A: '1', B: '2'}\n"
        "    x-swapctl: {port: 9000, health: /ready}\n"
    )
    path = write(
        tmp_path, "models:\n  a: {template: srv, environment: {B: three}}\n  b: {template: srv, port: 1}\n"
    )
    config = load_config(path)
    a, b = config.models["a"], config.models["b"]
    assert (a.image, a.port, a.health, a.environment) == (
        "tmpl-image",
        9000,
        "/ready",
        {"A": "1", "B": "three"},
    )
    assert b.port == 1
    assert config.base_dir == tmp_path.resolve()


def test_bundled_template_is_found_from_anywhere(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "models:\n  a: {template: llama-server}\n"))
    assert config.models["a"].image == "swapctl/llama-server:sid"


def test_example_config_is_valid_and_matches_the_schema() -> None:
    example = ROOT / "config.example.yaml"
    config = load_config(example)
    assert set(config.models) == {"tiny-chat", "tiny-code", "tiny-big"}
    jsonschema.validate(yaml.safe_load(example.read_text()), json_schema())


def test_schema_rejects_what_the_parser_rejects() -> None:
    schema = json_schema()
    json.dumps(schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(with_model(tll=3), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"models": {"a": {"image": "i", "gpus": "some"}}}, schema)
