"""Configuration: every error names its key path; the example and the schema agree."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from swapctl.cli import main
from swapctl.config import Config, Model, json_schema, load_config, parse_config, parse_duration, parse_listen
from swapctl.errors import ConfigError
from swapctl.matrix import GroupPolicy, MatrixPolicy
from swapctl.names import Kind, Names

ROOT = Path(__file__).resolve().parents[2]


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
            "a cost is a positive integer or 'auto'",
        ),
        (
            base(matrix={"evict_costs": {"a": 0}, "sets": {"s": "a"}}),
            "matrix.evict_costs.a",
            "positive integer",
        ),
        (
            base(matrix={"evict_costs": {"a": True}, "sets": {"s": "a"}}),
            "matrix.evict_costs.a",
            "a cost is a positive integer or 'auto'",
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


NAMES = Names(frozenset({"a", "b", "x"}), aliases={"bee": "b"}, vars={"x": "a", "v": "b"})


@pytest.mark.parametrize(
    ("name", "accept", "found"),
    [
        ("a", Kind.ID | Kind.ALIAS, "a"),
        ("bee", Kind.ID | Kind.ALIAS, "b"),
        ("x", Kind.ID | Kind.ALIAS, "x"),  # a request names the model x, never the var
        ("x", Kind.VAR | Kind.ID, "a"),  # a var wins over a model ID of the same spelling
        ("x", Kind.VAR | Kind.ID | Kind.ALIAS, "a"),
        ("v", Kind.VAR | Kind.ID | Kind.ALIAS, "b"),
        ("bee", Kind.VAR | Kind.ID | Kind.ALIAS, "b"),
        ("b", Kind.ID, "b"),
    ],
)
def test_one_function_resolves_every_name(name: str, accept: Kind, found: str) -> None:
    assert NAMES.resolve(name, accept) == found


@pytest.mark.parametrize(
    ("name", "accept", "message"),
    [
        ("v", Kind.ID | Kind.ALIAS, "unknown model 'v'"),
        ("zz", Kind.VAR | Kind.ID, "unknown name 'zz' at position 5 in 'a & zz' (not a var nor a model ID)"),
        ("bee", Kind.VAR | Kind.ID, "'bee' at position 5 in 'a & zz' is an alias of model 'b'; sets and"),
        ("v", Kind.ID, "unknown model 'v' at position 5 in 'a & zz' (not in models:)"),
        ("bee", Kind.ID, "'bee' at position 5 in 'a & zz' is an alias of model 'b'; vars and group"),
        (5, Kind.ID, "unknown model '5'"),
    ],
)
def test_a_name_refused_says_what_it_is(name: object, accept: Kind, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        NAMES.resolve(name, accept, where="here", text=(5, "a & zz") if name != 5 else None)
    assert caught.value.path == "here"
    assert caught.value.message.startswith(message)


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (
            base(hooks={"on_startup": {"preload": ["a", "nope"]}}),
            "hooks.on_startup.preload.1",
            "unknown model",
        ),
        (
            base(matrix={"vars": {"x": "a"}, "sets": {"s": "a"}}, hooks={"on_startup": {"preload": ["x"]}}),
            "hooks.on_startup.preload.0",
            "unknown model 'x'",  # hooks name models as requests do: no vars
        ),
        (base(groups={"g": {"members": ["bee"]}}), "groups.g.members", "'bee' is an alias of model 'b'"),
        (base(matrix={"evict_costs": {"bee": 2}, "sets": {"s": "a"}}), "matrix.evict_costs.bee", "alias"),
    ],
)
def test_names_in_the_file_resolve_by_where_they_stand(raw: Any, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.path == path
    assert message in caught.value.message


def test_preload_takes_ids_and_aliases() -> None:
    assert parse_config(base(hooks={"on_startup": {"preload": ["bee", "a"]}})).preload == ("b", "a")


@pytest.mark.parametrize(
    ("own", "file", "ttl", "health_check_timeout"),
    [
        ({}, {}, 0, 120),
        ({}, {"globalTTL": 60}, 60, 120),  # an absent ttl takes globalTTL
        ({"ttl": 0}, {"globalTTL": 60}, 0, 120),  # 0 is the model's own: never, even so
        ({"ttl": 30}, {"globalTTL": 60}, 30, 120),
        ({}, {"healthCheckTimeout": 5}, 0, 5),  # an absent healthCheckTimeout takes the global one
        ({"healthCheckTimeout": 7}, {"healthCheckTimeout": 5}, 0, 7),
    ],
)
def test_each_model_holds_its_resolved_values(
    own: dict[str, Any], file: dict[str, Any], ttl: int, health_check_timeout: int
) -> None:
    model = parse_config({**with_model(**own), **file}).models["a"]
    assert (model.ttl, model.health_check_timeout) == (ttl, health_check_timeout)


def test_defaults_live_only_in_the_file_shape() -> None:
    for built in (Config, Model):
        assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(built))
    schema = json_schema()
    assert "ttl" not in schema["$defs"]["ModelConfig"].get("required", [])
    assert schema["properties"]["globalTTL"]["default"] == 0


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
    # the bounds; a duration string past its bound, or a size string, is for the parser alone
    for raw in [
        *(with_model(stop_grace_period=v) for v in (float("inf"), 1e300, 10**400, 3601, -1, True, "soon")),
        *(with_model(port=v) for v in (0, 65536, True, "8080")),
        *(with_model(ttl=v) for v in (-1, 30 * 86400 + 1, True, float("inf"))),
        *(with_model(healthCheckTimeout=v) for v in (0, 86401)),
        *(with_model(concurrencyLimit=v) for v in (0, 100001)),
        *(with_model(gpus=v) for v in (True, 0, 1025)),
        *(with_model(shm_size=v) for v in (True, -1, 2**50, "lots")),
        *(with_model(template=v) for v in ("../x", "/etc/passwd", "a..b", "a/b", ".a", ["x"])),
        *(
            {**base(), key: value}
            for key in ("healthCheckTimeout", "globalTTL", "maxRequestBytes")
            for value in (-1, 2**40, False)
        ),
        base(matrix={"evict_costs": {"a": 10**12}, "sets": {"s": "a"}}),
        base(matrix={"evict_costs": {"a": 0}, "sets": {"s": "a"}}),
    ]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(raw, schema)
        with pytest.raises(ConfigError):
            parse_config(raw)
    for raw in [with_model(stop_grace_period="1m30s", shm_size="1.5gb", gpus=1024, template="llama-server")]:
        jsonschema.validate(raw, schema)


DAY = 86400


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (with_model(stop_grace_period=float("inf")), "models.a.stop_grace_period", "from 0 to 3600"),
        (with_model(stop_grace_period=float("nan")), "models.a.stop_grace_period", "from 0 to 3600"),
        (with_model(stop_grace_period=1e300), "models.a.stop_grace_period", "from 0 to 3600"),
        (with_model(stop_grace_period=10**400), "models.a.stop_grace_period", "from 0 to 3600"),
        (with_model(stop_grace_period=3601), "models.a.stop_grace_period", "from 0 to 3600"),
        (with_model(stop_grace_period="2h"), "models.a.stop_grace_period", "from 0 to 3600"),
        (with_model(stop_grace_period="9" * 400 + "h"), "models.a.stop_grace_period", "from 0 to 3600"),
        (with_model(stop_grace_period=-1), "models.a.stop_grace_period", "duration"),
        (with_model(stop_grace_period=True), "models.a.stop_grace_period", "duration"),
        (with_model(port=65536), "models.a.port", "less than or equal to 65535"),
        (with_model(port=True), "models.a.port", "valid integer"),
        (with_model(port=8080.0), "models.a.port", "valid integer"),
        (with_model(ttl=30 * DAY + 1), "models.a.ttl", "less than or equal to 2592000"),
        (with_model(ttl=10**400), "models.a.ttl", "less than or equal to 2592000"),
        (with_model(ttl=True), "models.a.ttl", "valid integer"),
        (with_model(ttl=float("inf")), "models.a.ttl", "valid integer"),
        (
            with_model(healthCheckTimeout=DAY + 1),
            "models.a.healthCheckTimeout",
            "less than or equal to 86400",
        ),
        (with_model(concurrencyLimit=0), "models.a.concurrencyLimit", "greater than or equal to 1"),
        (with_model(concurrencyLimit=100001), "models.a.concurrencyLimit", "less than or equal to 100000"),
        (with_model(gpus=True), "models.a.gpus", "a count of at least 1"),
        (with_model(gpus=100000), "models.a.gpus", "at most 1024"),
        (with_model(shm_size=True), "models.a.shm_size", "size"),
        (with_model(shm_size=2**50), "models.a.shm_size", "size"),
        (with_model(shm_size="lots"), "models.a.shm_size", "size"),
        (with_model(shm_size="2000000g"), "models.a.shm_size", "size"),
        ({**base(), "healthCheckTimeout": DAY + 1}, "healthCheckTimeout", "less than or equal to 86400"),
        ({**base(), "healthCheckTimeout": False}, "healthCheckTimeout", "valid integer"),
        ({**base(), "globalTTL": 30 * DAY + 1}, "globalTTL", "less than or equal to 2592000"),
        ({**base(), "maxRequestBytes": 16 * 2**30 + 1}, "maxRequestBytes", "less than or equal to"),
        ({**base(), "maxRequestBytes": 0}, "maxRequestBytes", "greater than or equal to 1"),
        (base(matrix={"evict_costs": {"a": 10**12}, "sets": {"s": "a"}}), "matrix.evict_costs.a", "at most"),
        ({**base(), "listen": "127.0.0.1:99999"}, "listen", "port from 1 to 65535"),
        ({**base(), "listen": "::1:8080"}, "listen", "brackets"),
        ({**base(), "listen": 8080}, "listen", "valid string"),
        (with_model(template="../x"), "models.a.template", "a template name is"),
        (with_model(template="/etc/passwd"), "models.a.template", "a template name is"),
        (with_model(template="a..b"), "models.a.template", "a template name is"),
        (with_model(template=["x"]), "models.a.template", "a template name is"),
    ],
)
def test_every_value_is_bounded(raw: Any, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.path == path
    assert message in caught.value.message


def test_bounds_are_inclusive() -> None:
    model = parse_config(
        with_model(stop_grace_period="1h", ttl=30 * DAY, healthCheckTimeout=DAY, concurrencyLimit=100000)
    ).models["a"]
    assert (model.stop_grace_period, model.ttl, model.health_check_timeout) == (3600.0, 30 * DAY, DAY)
    assert parse_config(with_model(shm_size="1.5gb", port=65535, gpus=1024)).models["a"].shm_size == "1.5gb"
    config = parse_config({**base(), "maxRequestBytes": 16 * 2**30, "globalTTL": 30 * DAY})
    assert (config.max_request_bytes, config.global_ttl) == (16 * 2**30, 30 * DAY)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 10**400, "1e400", "9" * 400 + "s", True])
def test_durations_reject_the_absurd(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        (":8080", ("0.0.0.0", 8080)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:65535", ("::", 65535)),
        ("localhost:80", ("localhost", 80)),
        ("my-host.example.com:443", ("my-host.example.com", 443)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected
    assert parse_config({**base(), "listen": text}).listen == text


@pytest.mark.parametrize(
    "text",
    [
        "8080",
        "127.0.0.1:99999",
        "127.0.0.1:0",
        "127.0.0.1:080",
        "127.0.0.1:",
        "127.0.0.1:８０",
        "256.1.1.1:80",
        "1.2.3:80",
        "::1:8080",
        "[::1:8080",
        "[zz]:80",
        "-bad:80",
        "a..b:80",
        "a_b:80",
        "host name:80",
        "a" * 64 + ":80",
    ],
)
def test_bad_listen_addresses(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_listen(text)
    with pytest.raises(ConfigError) as caught:
        parse_config({**base(), "listen": text})
    assert caught.value.path == "listen"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**base(), "listen": text}, json_schema())
    with pytest.raises(SystemExit) as done:
        main(["up", "-c", str(ROOT / "config.example.yaml"), "--listen", text])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("error: --listen: expected HOST:PORT")


def template(tmp_path: Path, text: str, name: str = "srv") -> None:
    (tmp_path / "compose-templates").mkdir(exist_ok=True)
    (tmp_path / "compose-templates" / f"{name}.yaml").write_text(text)


def test_templates_resolve_only_by_name(tmp_path: Path) -> None:
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    template(config_dir, "services: {m: {image: fine}}\n")
    (tmp_path / "evil.yaml").write_text("services: {m: {image: evil}}\n")
    for name in ("../../evil", str(tmp_path / "evil"), "../compose-templates/srv", "srv/", ".hidden"):
        path = write(config_dir, f"models:\n  a: {{template: {json.dumps(name)}}}\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.path == "models.a.template"
        assert "a template name is" in caught.value.message
    assert load_config(write(config_dir, "models:\n  a: {template: srv}\n")).models["a"].image == "fine"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]\n", "a template is a Compose file"),
        ("services: [m]\n", "exactly one service"),
        ("services: {m: just-a-string}\n", "services.m: a service is a mapping"),
        ("services: {m: [image, x]}\n", "services.m: a service is a mapping"),
        ("services: {m: {image: x, x-swapctl: [port]}}\n", "services.m.x-swapctl: must be a mapping"),
        ("services: {m: {image: x, x-swapctl: 0}}\n", "services.m.x-swapctl: must be a mapping"),
    ],
)
def test_templates_of_the_wrong_shape_are_errors(tmp_path: Path, text: str, message: str) -> None:
    template(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "models:\n  a: {template: srv}\n"))
    assert caught.value.path == str(tmp_path / "compose-templates" / "srv.yaml")
    assert message in caught.value.message


BILLION_LAUGHS = (  # 10^9 labels once expanded; before, validation turned them into strings for ever
    "x-a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"x-{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9))
    + "models: {a: {image: x, labels: *j}}\n"
)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BILLION_LAUGHS, "aliases would expand it by more than 10000 nodes"),
        ("a: &a [" + ", ".join(["x"] * 200) + "]\nb: [" + ", ".join(["*a"] * 200) + "]\n", "10000 nodes"),
        ("a: &a [x, *a]\n", "refers to itself"),
        ("a: &a {b: *a}\n", "refers to itself"),
        ("[" * 5000 + "]" * 5000 + "\n", "nested more than 100 levels deep"),
        ("{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested more than 100 levels deep"),
        (
            "a: &a " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 60 + "*a" + "]" * 60 + "\n",
            "nested more than 100 levels deep once its aliases are expanded",
        ),
        ("? [a, b]\n: 1\n", "unhashable key"),
    ],
)
def test_hostile_yaml_is_refused_quickly(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == str(path)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("text", "where", "tag"),
    [
        ("globalTTL: !!bool sk-secret\n", "globalTTL", "!!bool"),
        ("apiKeys: [k1, !!int sk-secret]\n", "apiKeys.1", "!!int"),
        ("models:\n  a: {image: x, ttl: !!float sk-secret}\n", "models.a.ttl", "!!float"),
        ("x-base: &b {ttl: !!int ''}\nmodels: {a: {<<: *b, image: x}}\n", "x-base.ttl", "!!int"),
        ("models: {a: {image: !!timestamp sk-secret}}\n", "models.a.image", "!!timestamp"),
        ("models: {a: {image: !!binary sk-secret\u00e9}}\n", "models.a.image", "!!binary"),
        ("globalTTL: " + "9" * 5000 + "\n", "globalTTL", "!!int"),
        ("!!int sk-secret\n", "", "!!int"),
    ],
)
def test_a_value_its_tag_cannot_hold_names_its_key_path_not_the_value(
    tmp_path: Path, text: str, where: str, tag: str
) -> None:
    """`!!int sk-secret` in apiKeys would otherwise show the key in the error (and `!!bool
    maybe` was a traceback)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == (where or str(path))
    assert f"invalid YAML in {path}, line " in caught.value.message
    assert f"not a valid {tag} value" in caught.value.message
    assert (
        "secret" not in str(caught.value)
        and "\u00e9" not in str(caught.value)
        and "999" not in str(caught.value)
    )


def test_validate_reports_a_bad_tag_as_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "globalTTL: !!bool maybe\nmodels: {a: {image: x}}\n")
    with pytest.raises(SystemExit) as done:
        main(["validate", "-c", str(path)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: globalTTL: invalid YAML in ") and "!!bool" in err
    assert "maybe" not in err


def test_files_that_are_not_utf8_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "swapctl.yaml"
    path.write_bytes(b"models: {a: {image: \xff}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == str(path)
    assert "UTF-8" in caught.value.message


def test_anchors_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "models:\n"
        "  a: &base {image: img, port: 9000, environment: {A: '1'}}\n"
        "  b: {<<: *base, port: 9001}\n"
        "  c: {<<: [*base], aliases: [see]}\n"
        "  d: {image: img, environment: *env}\n".replace("*env", "{<<: {X: '2'}, Y: '3'}"),
    )
    config = load_config(path)
    assert [config.models[m].port for m in "abcd"] == [9000, 9001, 9000, 8080]
    assert config.models["b"].environment == {"A": "1"}
    assert config.models["d"].environment == {"X": "2", "Y": "3"}
    duplicate = write(tmp_path, "models:\n  a: &a {image: i}\n  b: {<<: *a, image: j, image: k}\n")
    with pytest.raises(ConfigError, match="duplicate key 'image'"):
        load_config(duplicate)


def chain(levels: int) -> str:
    """`a` inside `levels` alternating & and | levels, each with its own parentheses."""
    source = "a"
    for level in range(levels):
        source = f"b {'&|'[level % 2]} ({source})"
    return source


def test_deep_sets_solve_or_are_refused_by_name() -> None:
    for source in ("(" * 500 + "a" + ")" * 500, "(" * 5000 + "a" + ")" * 5000 + " & b", chain(200)):
        config = parse_config(base(matrix={"sets": {"deep": source, "other": "b"}}))
        assert config.policy.decide("a", [], explain=True).set == "deep"
        assert "matrix with 2 sets" in config.policy.summary()
    with pytest.raises(ConfigError) as caught:
        parse_config(base(matrix={"sets": {"ok": "a", "deep": chain(1000)}}))
    assert caught.value.path == "matrix.sets.deep"
    assert caught.value.message == "nested 1000 levels deep; at most 200"


def test_deep_sets_through_references() -> None:
    sets = {"s0": "a"} | {f"s{i}": f"+s{i - 1}" for i in range(1, 2000)}
    assert parse_config(base(matrix={"sets": sets})).policy.decide("a", []).set == "s0"
    sets = {"s0": "a"} | {f"s{i}": f"b {'&|'[i % 2]} +s{i - 1}" for i in range(1, 400)}
    with pytest.raises(ConfigError) as caught:
        parse_config(base(matrix={"sets": dict(reversed(sets.items()))}))
    assert caught.value.path == "matrix.sets.s201"
    assert caught.value.message == "nested 201 levels deep through its +refs; at most 200"


def test_sets_that_reuse_sets_cannot_blow_up() -> None:
    sets = {"s0": "a | b"} | {f"s{i}": f"(+s{i - 1}) {'&|'[i % 2]} (+s{i - 1})" for i in range(1, 60)}
    with pytest.raises(ConfigError) as caught:
        parse_config(base(matrix={"sets": sets}))
    assert caught.value.path.startswith("matrix.sets.s")
    assert caught.value.message.endswith("models once its +refs are inlined; at most 100000")


def test_huge_combination_counts_are_summarised() -> None:
    source = " & ".join(["(a | b | a)"] * 10000)
    config = parse_config(base(matrix={"sets": {"s": source}}))
    assert config.policy.summary() == "matrix with 1 sets (about 10^4771 combinations)"
