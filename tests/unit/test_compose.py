"""Compose as users write it: interpolation, .env, env_file, x- blocks, merge keys, and the
Compose keys swapctl does not support. The environment is passed in, never patched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from swapctl.cli import main
from swapctl.config import InterpolationError, load_config, parse_config, parse_env_file, substitute
from swapctl.config.compose import COMPOSE_SERVICE_KEYS
from swapctl.config.file import ModelConfig
from swapctl.errors import ConfigError

ENV = {"SET": "value", "EMPTY": "", "PORT": "9000", "TAG": "v2"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("$SET", "value"),
        ("${SET}", "value"),
        ("a${SET}b$SET.c", "avaluebvalue.c"),
        ("${UNSET}", ""),
        ("${UNSET:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),
        ("${EMPTY-fallback}", ""),
        ("${UNSET-fallback}", "fallback"),
        ("${SET:-fallback}", "value"),
        ("${SET:?never shown}", "value"),
        ("${EMPTY?set, even empty}", ""),
        ("${SET:+other}", "other"),
        ("${EMPTY:+other}", ""),
        ("${EMPTY+other}", "other"),
        ("${UNSET+other}", ""),
        ("${UNSET:-${SET}}", "value"),
        ("${UNSET:-${ALSO_UNSET:-deep}}", "deep"),
        ("${UNSET:-a b:c}", "a b:c"),
        ("$$SET", "$SET"),
        ("cost: $$5", "cost: $5"),
        ("$$", "$"),
        ("${SET}}", "value}"),
        ("${SET:-${UNSET:?not evaluated: SET has a value}}", "value"),
    ],
)
def test_interpolation_follows_compose(text: str, expected: str) -> None:
    assert substitute(text, ENV).text == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("$", "'$' at position 1 starts no variable: write '$$' for a literal '$'"),
        ("price $5", "'$' at position 7 starts no variable"),
        ("${}", "'${' at position 1 is not ${NAME}"),
        ("${1A}", "'${' at position 1 is not ${NAME}"),
        ("${SET:=x}", "'${' at position 1 is not ${NAME}"),
        ("${SET", "'${' at position 1 is never closed"),
        (
            "${UNSET:?set UNSET to the model's path}",
            "required variable UNSET is missing a value: set UNSET to",
        ),
        ("${EMPTY:?}", "required variable EMPTY is missing a value"),
        ("${UNSET?}", "required variable UNSET is missing a value"),
    ],
)
def test_interpolation_errors(text: str, message: str) -> None:
    with pytest.raises(InterpolationError) as caught:
        substitute(text, ENV)
    assert str(caught.value).startswith(message)


def model(**keys: Any) -> dict[str, Any]:
    return {"models": {"a": {"image": "img", **keys}}}


def test_every_string_of_a_model_is_interpolated_and_numbers_from_variables_are_numbers() -> None:
    config = parse_config(
        model(
            image="repo/img:${TAG}",
            command=["--port", "${PORT}", "--name", "$${literal}"],
            environment={"A": "${SET}", "B": "${UNSET:-b}"},
            port="${PORT}",
            ttl="${TTL:-60}",
            volumes=["${MODELS:-/srv/models}:/models:ro"],
        ),
        environ=ENV,
    )
    a = config.models["a"]
    assert a.image == "repo/img:v2"
    assert a.command == ("--port", "9000", "--name", "${literal}")
    assert a.environment == {"A": "value", "B": "b"}
    assert (a.port, a.ttl) == (9000, 60)
    assert a.volumes == ("/srv/models:/models:ro",)
    assert config.warnings == ()


def test_a_literal_number_in_quotes_is_still_refused() -> None:
    """Only a value that came from a variable is cast, as compose-go casts it."""
    with pytest.raises(ConfigError) as caught:
        parse_config(model(port="9000"), environ=ENV)
    assert caught.value.path == "models.a.port"


def test_an_unset_variable_is_empty_with_a_warning() -> None:
    config = parse_config(model(command=["-m", "/models/${MODEL_FILE}"]), environ={})
    assert config.models["a"].command == ("-m", "/models/")
    assert config.warnings == ("models.a.command.1: variable MODEL_FILE is not set; using an empty string",)


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (
            model(image="${IMAGE:?name the image in IMAGE}"),
            "models.a.image",
            "required variable IMAGE is missing a value: name the image in IMAGE",
        ),
        (model(environment={"K": "${EMPTY:?}"}), "models.a.environment.K", "required variable EMPTY"),
        (model(command="echo $1"), "models.a.command", "'$' at position 6 starts no variable"),
        ({**model(), "listen": "${HOST:?}:8080"}, "listen", "required variable HOST"),
        (
            {**model(), "apiKeys": ["${UNSET_KEY}"]},
            "apiKeys.0",
            "environment variable UNSET_KEY is not set or empty",
        ),
        (
            {**model(), "apiKeys": ["k-${EMPTY}"]},
            "apiKeys.0",
            "environment variable EMPTY is not set or empty",
        ),
    ],
)
def test_interpolation_errors_name_the_key_path(raw: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, environ=ENV)
    assert caught.value.path == path
    assert caught.value.message.startswith(message)


def test_api_keys_go_through_the_same_interpolation() -> None:
    keys = parse_config(
        {**model(), "apiKeys": ["${SET}", "sk-$${not-a-variable}", "${UNSET:-dflt}"]}, environ=ENV
    )
    assert [k.get_secret_value() for k in keys.api_keys] == ["value", "sk-${not-a-variable}", "dflt"]
    with pytest.raises(ConfigError) as caught:
        parse_config({**model(), "apiKeys": ["sk-$ecret-with-dollar $"]}, environ=ENV)
    assert "sk-" not in str(caught.value)  # the error names a position, never the key


def test_environment_entries_without_a_value_come_from_the_environment() -> None:
    config = parse_config(model(environment=["SET", "UNSET", "EMPTY", "X=1"]), environ=ENV)
    assert config.models["a"].environment == {"SET": "value", "EMPTY": "", "X": "1"}
    config = parse_config(model(environment={"SET": None, "UNSET": None}), environ=ENV)
    assert config.models["a"].environment == {"SET": "value"}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_dotenv_beside_the_config_and_the_environment_wins(tmp_path: Path) -> None:
    write(tmp_path, ".env", "TAG=from-dotenv\nPORT=7000\nDERIVED=${TAG}-x\n")
    path = write(
        tmp_path,
        "swapctl.yaml",
        "models:\n  a: {image: 'img:${TAG}', port: '${PORT}', command: ['${DERIVED}']}\n",
    )
    a = load_config(path, environ={}).models["a"]
    assert (a.image, a.port, a.command) == ("img:from-dotenv", 7000, ("from-dotenv-x",))
    a = load_config(path, environ={"TAG": "from-env"}).models["a"]
    assert (a.image, a.port, a.command) == ("img:from-env", 7000, ("from-env-x",))


def test_env_file_syntax() -> None:
    text = (
        "\ufeff# a comment\n"
        "\n"
        "PLAIN=value\n"
        "SPACED = two words   # a comment\n"
        "HASH=value#not-a-comment\n"
        'DOUBLE="line\\nbreak \\"quoted\\" $SET # kept"   # a comment\n'
        "SINGLE='$SET stays \\' literal'\n"
        "export EXPORTED=yes\n"
        "INHERITED\n"
        "MISSING_INHERITED\n"
        'MULTI="first\nsecond"\n'
        "EMPTY_VALUE=\n"
        "REF=${PLAIN}-${SET}-${NOPE:-dflt}\n"
    )
    assert parse_env_file(text, {"SET": "s", "INHERITED": "from-env"}, "here") == {
        "PLAIN": "value",
        "SPACED": "two words",
        "HASH": "value#not-a-comment",
        "DOUBLE": 'line\nbreak "quoted" s # kept',
        "SINGLE": "$SET stays ' literal",
        "EXPORTED": "yes",
        "INHERITED": "from-env",
        "MULTI": "first\nsecond",
        "EMPTY_VALUE": "",
        "REF": "value-s-dflt",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A=1\nB C=2\n", "line 2: expected '=' after B"),
        ("A=1\n-A=2\n", "line 2: expected KEY=VALUE"),
        ('A="open\n', 'line 1: the value opened with " here is never closed'),
        ("A='x' trailing\n", "line 1: unexpected text after the closing quote of A"),
        ("A=${NEEDED:?say why}\n", "line 1: required variable NEEDED is missing a value: say why"),
    ],
)
def test_env_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_env_file(text, {}, "models.a.env_file")
    assert caught.value.path == "models.a.env_file"
    assert caught.value.message.startswith(message)


def test_env_file_is_merged_under_environment(tmp_path: Path) -> None:
    write(tmp_path, "common.env", "A=common\nB=common\nC=${SET}\n")
    write(tmp_path, "env/model.env", "B=model\n")
    path = write(
        tmp_path,
        "swapctl.yaml",
        "models:\n"
        "  a:\n"
        "    image: img\n"
        "    env_file: [common.env, ./env/model.env, {path: absent.env, required: false}]\n"
        "    environment: {A: own}\n"
        "  b: {image: img, env_file: common.env}\n",
    )
    config = load_config(path, environ={"SET": "s"})
    assert config.models["a"].environment == {"A": "own", "B": "model", "C": "s"}
    assert config.models["b"].environment == {"A": "common", "B": "common", "C": "s"}


@pytest.mark.parametrize(
    ("env_file", "path", "message"),
    [
        ("absent.env", "models.a.env_file", "no such file: "),
        (["ok.env", "absent.env"], "models.a.env_file.1", "no such file: "),
        (
            [{"path": "ok.env", "format": "raw"}],
            "models.a.env_file",
            "'format' is a Compose key swapctl does not support",
        ),
        ([{"path": "ok.env", "required": "maybe"}], "models.a.env_file", "required: expected true or false"),
        (5, "models.a.env_file", "expected a path or a list of paths"),
    ],
)
def test_env_file_errors(tmp_path: Path, env_file: object, path: str, message: str) -> None:
    write(tmp_path, "ok.env", "A=1\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(
            model(env_file=env_file),
            base_dir=tmp_path,
            environ={},
            env_file_texts={tmp_path / "ok.env": "A=1\n"},
        )
    assert caught.value.path == path
    assert caught.value.message.startswith(message)


def test_anchors_in_x_blocks_and_merge_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "swapctl.yaml",
        "x-common: &common\n"
        "  image: ${IMAGE:-img}\n"
        "  environment: {SHARED: '1'}\n"
        "  ulimits: {memlock: -1}\n"
        "x-gpu: &gpu\n"
        "  gpus: all\n"
        "models:\n"
        "  a: {<<: *common, port: 9000}\n"
        "  b:\n"
        "    <<: [*common, *gpu]\n"
        "    x-note: models may hold x- keys too\n"
        "    environment: {OWN: '2'}\n",
    )
    config = load_config(path, environ={"IMAGE": "from-env"})
    a, b = config.models["a"], config.models["b"]
    assert (a.image, a.port, a.environment, a.gpus) == ("from-env", 9000, {"SHARED": "1"}, None)
    assert (b.image, b.gpus, b.environment) == ("from-env", "all", {"OWN": "2"})
    assert [u.name for u in b.ulimits] == ["memlock"]


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("build", ".", "'build' is a Compose key swapctl does not support: build the image first"),
        ("depends_on", ["b"], "'depends_on' is a Compose key swapctl does not support"),
        (
            "links",
            ["b"],
            "'links' is a Compose key swapctl does not support: put the containers on one network",
        ),
        ("secrets", ["token"], "'secrets' is a Compose key swapctl does not support: mount the file"),
        ("ports", ["8080:8080"], "swapctl publishes `port` itself"),
        ("healthcheck", {"test": ["CMD", "true"]}, "set `health`"),
        ("restart", "always", "'restart' is a Compose key swapctl does not support"),
        ("sysctls", {"a": "1"}, "'sysctls' is a Compose key swapctl does not support"),
    ],
)
def test_compose_keys_swapctl_does_not_support_say_so(key: str, value: object, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(model(**{key: value}), environ={})
    assert caught.value.path == f"models.a.{key}"
    assert caught.value.message.startswith(f"'{key}' is a Compose key swapctl does not support")
    assert says in caught.value.message


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (
            model(deploy={"replicas": 2}),
            "models.a.deploy.replicas",
            "'replicas' is a Compose key swapctl does not support",
        ),
        (
            model(deploy={"resources": {"limits": {"pids": 10}}}),
            "models.a.deploy.resources.limits.pids",
            "'pids' is a Compose key",
        ),
        (
            model(
                deploy={
                    "resources": {"reservations": {"devices": [{"capabilities": ["gpu"], "driver_opts": 1}]}}
                }
            ),
            "models.a.deploy.resources.reservations.devices.0.driver_opts",
            "unknown key 'driver_opts'",
        ),
        (model(imagee="x"), "models.a.imagee", "unknown key 'imagee'"),
    ],
)
def test_nested_compose_keys_and_typos(raw: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, environ={})
    assert caught.value.path == path
    assert caught.value.message.startswith(message)


def test_every_compose_key_swapctl_reads_is_a_compose_key() -> None:
    own = {"template", "port", "health", "aliases", "ttl", "use_model_name", "health_check_timeout"}
    own |= {"concurrency_limit", "send_loading_state", "vram", "sleep", "filters", "timeouts"}
    own |= {"name", "description", "metadata", "unlisted", "hosts"}
    assert set(ModelConfig.model_fields) - own <= COMPOSE_SERVICE_KEYS


def test_validate_prints_warnings_and_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SWAPCTL_TEST_UNSET", raising=False)
    path = write(tmp_path, "swapctl.yaml", "models:\n  a: {image: 'img:${SWAPCTL_TEST_UNSET}'}\n")
    with pytest.raises(SystemExit) as done:
        main(["validate", "-c", str(path)])
    assert done.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ok: ")
    assert (
        captured.err
        == "warning: models.a.image: variable SWAPCTL_TEST_UNSET is not set; using an empty string\n"
    )
    path.write_text("models:\n  a: {image: 'img:${SWAPCTL_TEST_UNSET:?say which tag}'}\n")
    with pytest.raises(SystemExit) as done:
        main(["validate", "-c", str(path)])
    assert done.value.code == 2
    assert capsys.readouterr().err == (
        "error: models.a.image: required variable SWAPCTL_TEST_UNSET is missing a value: say which tag\n"
    )
