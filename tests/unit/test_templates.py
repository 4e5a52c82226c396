"""The shipped templates: each validates, cites its sources, and builds the Docker create
request its engine needs; `swapctl templates` lists them and `show` prints one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from docker.models.containers import _create_container_args

from swapctl.backend.docker import create_arguments
from swapctl.cli import main
from swapctl.config import TEMPLATE_DIR, list_templates, load_config, read_yaml
from swapctl.errors import ConfigError
from swapctl.spec import build_spec

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(path.stem for path in (ROOT / TEMPLATE_DIR).glob("*.yaml"))
ENVIRON = {"RENDER_GID": "105"}  # the one variable a template requires (llama-cpp-rocm)
GPUS = [{"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
NVIDIA = [{**GPUS[0], "Driver": "nvidia"}]


def device(path: str) -> dict[str, str]:
    return {"PathOnHost": path, "PathInContainer": path, "CgroupPermissions": "rwm"}


# what each engine needs, from the sources its template cites
NEEDS: dict[str, tuple[str, int, str, dict[str, Any]]] = {
    "llama-server": ("swapctl/llama-server:sid", 8080, "/health", {}),
    "llama-cpp": ("ghcr.io/ggml-org/llama.cpp:server", 8080, "/health", {}),
    "llama-cpp-cuda": ("ghcr.io/ggml-org/llama.cpp:server-cuda", 8080, "/health", {"DeviceRequests": GPUS}),
    "llama-cpp-rocm": (
        "ghcr.io/ggml-org/llama.cpp:server-rocm",
        8080,
        "/health",
        {
            "Devices": [device("/dev/kfd"), device("/dev/dri")],
            "GroupAdd": ["44", "105"],
            "SecurityOpt": ["seccomp=unconfined"],
        },
    ),
    "llama-cpp-vulkan": (
        "ghcr.io/ggml-org/llama.cpp:server-vulkan",
        8080,
        "/health",
        {"Devices": [device("/dev/dri")]},
    ),
    "vllm": ("vllm/vllm-openai:latest", 8000, "/health", {"IpcMode": "host", "DeviceRequests": GPUS}),
    "speaches": ("ghcr.io/speaches-ai/speaches:latest-cuda", 8000, "/health", {"DeviceRequests": NVIDIA}),
    "kokoro": ("ghcr.io/remsky/kokoro-fastapi-gpu:latest", 8880, "/health", {"DeviceRequests": GPUS}),
    "tei": (
        "ghcr.io/huggingface/text-embeddings-inference:cuda-1.9",
        80,
        "/health",
        {"DeviceRequests": GPUS},
    ),
    "tei-cpu": ("ghcr.io/huggingface/text-embeddings-inference:cpu-1.9", 80, "/health", {}),
    "localai": ("localai/localai:latest-gpu-nvidia-cuda-12", 8080, "/readyz", {"DeviceRequests": GPUS}),
}


def test_every_engine_asked_for_has_a_template() -> None:
    assert sorted(NEEDS) == SHIPPED


def config_using(tmp_path: Path, name: str, **keys: Any) -> Path:
    path = tmp_path / "swapctl.yaml"
    path.write_text(json.dumps({"models": {"m": {"template": name, **keys}}}))
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_each_template_builds_what_its_engine_needs(tmp_path: Path, name: str) -> None:
    image, port, health, host_config = NEEDS[name]
    config = load_config(config_using(tmp_path, name), environ=ENVIRON)
    model = config.models["m"]
    assert (model.image, model.port, model.health) == (image, port, health)
    assert config.warnings == ()
    body = _create_container_args({**create_arguments(build_spec(config, "m")), "version": "1.41"})
    sent = body.pop("host_config")
    assert {key: sent[key] for key in host_config} == host_config
    assert sent["PortBindings"] == {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    for key in ("DeviceRequests", "Devices", "IpcMode", "GroupAdd", "SecurityOpt"):
        assert key in host_config or not sent.get(key), f"{name} sends {key} it does not need"


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith("llama-cpp")])
def test_llama_cpp_templates_take_a_model_path(tmp_path: Path, name: str) -> None:
    command = ["-m", "/models/qwen.gguf", "-c", "4096"]
    config = load_config(
        config_using(tmp_path, name, command=command), environ={**ENVIRON, "MODELS_DIR": "/srv/gguf"}
    )
    assert config.models["m"].command == tuple(command)
    assert config.models["m"].volumes == ("/srv/gguf:/models:ro",)
    default = load_config(config_using(tmp_path, name), environ=ENVIRON)
    assert default.models["m"].volumes == ("./models:/models:ro",)
    assert build_spec(default, "m").volumes == (f"{tmp_path.resolve() / 'models'}:/models:ro",)


def test_a_template_that_requires_a_variable_says_which(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_using(tmp_path, "llama-cpp-rocm"), environ={})
    assert caught.value.path == "models.m.group_add.1"
    assert caught.value.message.startswith("required variable RENDER_GID is missing a value: set RENDER_GID")


@pytest.mark.parametrize("name", SHIPPED)
def test_each_template_is_one_compose_service_that_cites_its_sources(name: str) -> None:
    path = ROOT / TEMPLATE_DIR / f"{name}.yaml"
    document = read_yaml(path)
    assert set(document) == {"services"}
    [service] = document["services"].values()
    about = service["x-swapctl"]
    assert {"port", "health", "engine", "serves", "description"} <= set(about)
    assert re.search(r"^# .*https://", path.read_text(), re.MULTILINE), f"{name} cites no source"


def test_templates_list_and_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    mine = tmp_path / TEMPLATE_DIR
    mine.mkdir()
    (mine / "vllm.yaml").write_text(
        "services: {m: {image: my/vllm, x-swapctl: {port: 9, engine: mine, serves: [chat]}}}\n"
    )
    config = str(tmp_path / "swapctl.yaml")
    with pytest.raises(SystemExit) as done:
        main(["templates", "-c", config])
    out = capsys.readouterr().out
    assert done.value.code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert set(rows) == set(SHIPPED)
    assert [cell.strip() for cell in rows["vllm"].split("│")[1:-1]] == [
        "vllm",
        "mine",
        "my/vllm",
        "9",
        "/health",
        "chat",
    ]
    for cell in (
        "text-embeddings-inference",
        "ghcr.io/huggingface/text-embeddings-inference:cpu-1.9",
        "80",
        "embeddings, rerank",
    ):
        assert cell in rows["tei-cpu"]
    assert [t.name for t in list_templates(tmp_path)] == SHIPPED

    with pytest.raises(SystemExit) as done:
        main(["templates", "show", "kokoro"])
    assert done.value.code == 0
    assert capsys.readouterr().out == (ROOT / TEMPLATE_DIR / "kokoro.yaml").read_text()
    for name in ("nope", "../config"):
        with pytest.raises(SystemExit) as done:
            main(["templates", "show", name])
        assert done.value.code == 2
        assert capsys.readouterr().err == f"error: no template '{name}' (swapctl templates lists them)\n"


def test_description_keys_never_reach_a_model(tmp_path: Path) -> None:
    """`engine`, `serves` and `description` describe the template; none of them reaches a model."""
    model = load_config(config_using(tmp_path, "kokoro"), environ={}).models["m"]
    assert not {"engine", "serves"} & set(vars(model))
    assert model.description is None  # a model's own key (for GET /v1/models), not the template's
