"""`swapctl config from-compose`: a Compose file becomes a config that validates, one model per
service, with what swapctl does not support named in comments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from swapctl.cli import main
from swapctl.config import load_config
from swapctl.config.from_compose import from_compose
from swapctl.config.service import DeviceRequest
from swapctl.errors import ConfigError

COMPOSE = """\
name: demo
x-common: &common
  restart: unless-stopped
services:
  vllm:
    <<: *common
    image: vllm/vllm-openai:${VLLM_TAG:-v0.6}
    command: --model Qwen/Qwen2.5-7B-Instruct --port 8000
    ipc: host
    environment:
      HF_TOKEN: ${HF_TOKEN:-none}
    env_file: [vllm.env]
    volumes:
      - ./hf-cache:/root/.cache/huggingface
      - models:/models:ro
      - {type: tmpfs, target: /scratch}
    ports: ["8000:8000"]
    deploy:
      replicas: 1
      resources:
        reservations:
          devices:
            - driver: nvidia
              count: all
              capabilities: [gpu]
    healthcheck:
      test: ["CMD", "curl", "-f", "http://localhost:8000/health"]
      interval: 30s
    depends_on: [whisper]
  whisper:
    build: .
    gpus: all
    environment:
      - WHISPER_MODEL=small
    expose: ["9000"]
    healthcheck:
      test: ["CMD-SHELL", "pg_isready || exit 1"]
  tts:
    image: kokoro:latest
    healthcheck:
      test: wget -qO- http://127.0.0.1:8880/v1/models || exit 1
    container_name: tts
volumes:
  models: {}
"""


@pytest.fixture
def compose(tmp_path: Path) -> Path:
    path = tmp_path / "docker-compose.yml"
    path.write_text(COMPOSE, encoding="utf-8")
    (tmp_path / "vllm.env").write_text("MAX_MODEL_LEN=8192\n", encoding="utf-8")
    return path


def test_a_multi_service_compose_file_becomes_a_config_that_validates(compose: Path) -> None:
    out = compose.parent / "swapctl.yaml"
    text = from_compose(compose)
    out.write_text(text, encoding="utf-8")
    config = load_config(out, environ={})

    assert list(config.models) == ["vllm", "whisper", "tts"]
    vllm, whisper, tts = (config.models[name] for name in ("vllm", "whisper", "tts"))
    assert (vllm.image, vllm.port, vllm.health, vllm.ipc) == (
        "vllm/vllm-openai:v0.6",
        8000,
        "/health",
        "host",
    )
    assert vllm.command == ("--model", "Qwen/Qwen2.5-7B-Instruct", "--port", "8000")
    assert vllm.environment == {"MAX_MODEL_LEN": "8192", "HF_TOKEN": "none"}
    assert vllm.volumes == ("./hf-cache:/root/.cache/huggingface", "demo_models:/models:ro")
    assert vllm.device_requests == (DeviceRequest("nvidia", -1, (), ("gpu",)),)
    assert vllm.gpus is None
    assert (whisper.image, whisper.gpus, whisper.port, whisper.health) == (
        "demo-whisper",
        "all",
        9000,
        "/health",
    )
    assert whisper.environment == {"WHISPER_MODEL": "small"}
    assert (tts.port, tts.health) == (8880, "/v1/models")  # the port from the healthcheck's URL

    raw = yaml.safe_load(text)["models"]
    assert raw["vllm"]["image"] == "vllm/vllm-openai:${VLLM_TAG:-v0.6}"  # kept for swapctl to interpolate
    assert raw["vllm"]["deploy"] == {
        "resources": {
            "reservations": {"devices": [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}
        }
    }
    assert (
        "    # dropped (swapctl does not support them): restart, volumes.2, deploy.replicas, depends_on\n"
        in text
    )
    assert "    # dropped (swapctl does not support them): build\n" in text
    assert "    # dropped (swapctl does not support them): container_name\n" in text
    assert "its healthcheck was not an HTTP check: health stays /health" in text
    assert text.endswith('# matrix: {sets: {all: "vllm & whisper & tts"}}\n')


def test_relative_paths_are_rewritten_for_the_output_folder(compose: Path) -> None:
    out = compose.parent / "sub" / "swapctl.yaml"
    out.parent.mkdir()
    with pytest.raises(SystemExit) as done:
        main(["config", "from-compose", str(compose), "-o", str(out)])
    assert done.value.code == 0
    raw = yaml.safe_load(out.read_text(encoding="utf-8"))["models"]["vllm"]
    assert raw["volumes"][0] == "../hf-cache:/root/.cache/huggingface"
    assert raw["env_file"] == ["../vllm.env"]
    assert load_config(out, environ={}).models["vllm"].environment["MAX_MODEL_LEN"] == "8192"


@pytest.mark.parametrize(
    ("ports", "expose", "port"),
    [
        (["127.0.0.1:8001:8000/tcp"], None, 8000),
        (["8000"], ["9000"], 8000),
        ([8000], None, 8000),
        (["${HOST_PORT:-80}:${PORT:-9000}"], None, "${PORT:-9000}"),
        ([{"target": 7000, "published": 7001}], None, 7000),
        (["5000-5001:5000-5001"], None, 5000),
        (None, ["9000/tcp"], 9000),
    ],
)
def test_the_port_is_the_container_side_of_the_first_mapping(
    tmp_path: Path, ports: object, expose: object, port: object
) -> None:
    service: dict[str, object] = {"image": "img"}
    if ports is not None:
        service["ports"] = ports
    if expose is not None:
        service["expose"] = expose
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump({"services": {"a": service}}), encoding="utf-8")
    text = from_compose(path)
    assert yaml.safe_load(text)["models"]["a"]["port"] == port
    (tmp_path / "swapctl.yaml").write_text(text, encoding="utf-8")
    assert load_config(tmp_path / "swapctl.yaml", environ={}).models["a"].port == (
        9000 if isinstance(port, str) else port
    )


def test_without_a_port_the_default_stays_with_a_comment(tmp_path: Path) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text("services: {a: {image: img, network_mode: host}}\n", encoding="utf-8")
    text = from_compose(path)
    assert "no port in ports, expose or healthcheck: port stays 8080" in text
    assert "dropped (swapctl does not support them): network_mode: host" in text
    assert yaml.safe_load(text)["models"]["a"] == {"image": "img"}


def test_pull_policy_is_kept_but_build(tmp_path: Path) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text(
        "services: {a: {image: img, pull_policy: always}, b: {image: img, pull_policy: build}}\n",
        encoding="utf-8",
    )
    text = from_compose(path)
    models = yaml.safe_load(text)["models"]
    assert models["a"] == {"image": "img", "pull_policy": "always"}
    assert models["b"] == {"image": "img"}
    assert "dropped (swapctl does not support them): pull_policy: build" in text
    (tmp_path / "swapctl.yaml").write_text(text, encoding="utf-8")
    assert load_config(tmp_path / "swapctl.yaml", environ={}).models["a"].pull_policy == "always"


@pytest.mark.parametrize(
    "text",
    ["just a string\n", "version: '3'\n", "services: {}\n", "services: [a, b]\n", ""],
)
def test_not_a_compose_file_is_an_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        from_compose(path)
    assert caught.value.path == str(path)
    assert "not a Compose file" in caught.value.message


def test_the_cli_exits_2_on_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text("version: '3'\n", encoding="utf-8")
    for argv in (
        ["config", "from-compose", str(path)],
        ["config", "from-compose", str(tmp_path / "none.yml")],
    ):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {path}: not a Compose file" in err
    assert f"error: {tmp_path / 'none.yml'}: no such file" in err


def test_the_cli_prints_the_config(compose: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["config", "from-compose", str(compose)])
    assert done.value.code == 0
    assert capsys.readouterr().out == from_compose(compose)
