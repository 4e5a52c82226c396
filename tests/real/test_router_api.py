"""llama.cpp's router API, swapctl beside the real thing: a `swapctl up` of llama-server
containers, and one `llama-server --models-dir` container (router mode) serving the same
GGUF files, asked the same questions. Both run one model at a time (no matrix; the router's
`--models-max 1`), so a load evicts alike.

Compared: the list's shape, each entry's `id` and `status.value`, the answers of a load and an
unload, and their errors. Where they differ by design (swapctl answers a load once it is
loaded, llama-server at once; an unknown model's unload is swapctl's 404 and llama-server's
400) the test says so. Then the official `openai` SDK reads both lists.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import openai
import pytest
from conftest import LLAMA_IMAGE, remove_instance_containers
from openai import OpenAI
from support import Proxy, chat, llama_model, poll, write_yaml

from swapctl.spec import INSTANCE

pytestmark = pytest.mark.docker

MODELS = ("seed-1", "seed-2", "seed-3")  # the router names each GGUF by its file's stem


@dataclass(frozen=True)
class Server:
    """One side: its base URL and a client of it."""

    name: str
    url: str
    http: httpx.Client

    def list(self) -> dict[str, Any]:
        response = self.http.get(f"{self.url}/models")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def statuses(self) -> dict[str, str]:
        return {entry["id"]: entry["status"]["value"] for entry in self.list()["data"]}

    def post(self, route: str, model: str) -> httpx.Response:
        return self.http.post(f"{self.url}/models/{route}", json={"model": model})


@dataclass(frozen=True)
class Sides:
    swapctl: Server
    router: Server
    proxy: Proxy

    def both(self, route: str, model: str) -> tuple[httpx.Response, httpx.Response]:
        return self.swapctl.post(route, model), self.router.post(route, model)

    def settled(self, expected: dict[str, str]) -> None:
        """Both lists say `expected`: swapctl's at once (it answers once done), the router's
        once its child process has loaded or stopped (it answers at once)."""
        assert self.swapctl.statuses() == expected, self.proxy.log()
        poll(lambda: self.router.statuses() == expected, 60, f"the router's statuses to be {expected}")


def router_config(instance: str, models_dir: Path) -> dict[str, Any]:
    models: dict[str, Any] = {name: llama_model(models_dir, seed) for seed, name in enumerate(MODELS, 1)}
    models["hidden"] = {**llama_model(models_dir, 3), "unlisted": True}
    return {"instance": instance, "healthCheckTimeout": 30, "models": models}


def start_router(engine: docker.DockerClient, instance: str, models_dir: Path) -> str:
    """A llama-server in router mode over `models_dir`, labelled as one of `instance`'s
    containers (so the instance's clean-up removes it); its URL once it answers."""
    command = ["llama-server", "--models-dir", "/models", "--models-max", "1", "-c", "512"]
    container = engine.containers.run(
        LLAMA_IMAGE,
        [*command, "--host", "0.0.0.0", "--port", "8080"],
        detach=True,
        init=True,
        labels={INSTANCE: f"{instance}-router"},
        environment={"LLAMA_ARG_THREADS": "1"},
        volumes={str(models_dir): {"bind": "/models", "mode": "ro"}},
        ports={"8080/tcp": ("127.0.0.1", None)},
    )
    container.reload()
    port = container.ports["8080/tcp"][0]["HostPort"]
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    poll(answers, 60, "llama-server in router mode to answer /health")
    return url


@pytest.fixture(scope="module")
def sides(
    docker_engine: docker.DockerClient, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sides]:
    """One `swapctl up` and one router for the module (starting them per test costs seconds)."""
    instance = f"t-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("router")
    proxy = Proxy(
        write_yaml(workdir / "swapctl.yaml", router_config(instance, models_dir)), instance, workdir
    )
    http = httpx.Client(timeout=60)
    try:
        router = start_router(docker_engine, instance, models_dir)
        proxy.start()
        yield Sides(Server("swapctl", proxy.url, http), Server("llama-server", router, http), proxy)
    finally:
        http.close()
        proxy.close()
        remove_instance_containers(docker_engine, instance)


def shape(body: dict[str, Any]) -> dict[str, Any]:
    """What clients read of a list, field by field: its keys, and each entry's common keys
    with the type of each value (and `status`'s keys, llama-server's extras aside)."""
    common = ("id", "object", "owned_by", "created", "aliases", "status")
    return {
        "keys": sorted(body),
        "object": body["object"],
        "entries": [
            {key: type(entry[key]).__name__ for key in common} | {"object": entry["object"]}
            for entry in body["data"]
        ],
    }


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" or status == 404
    for word in words:
        assert word in error["message"]


def test_the_router_api_answers_as_llama_server_does(sides: Sides) -> None:
    mine, theirs = sides.swapctl.list(), sides.router.list()
    assert shape(mine) == shape(theirs)
    assert [entry["id"] for entry in mine["data"]] == list(MODELS)  # `hidden` is unlisted
    assert sorted(entry["id"] for entry in theirs["data"]) == list(MODELS)
    sides.settled(dict.fromkeys(MODELS, "unloaded"))
    # /v1/models answers the same list on both
    assert sides.swapctl.http.get(f"{sides.swapctl.url}/v1/models").json() == sides.swapctl.list()

    for answer in sides.both("load", "seed-1"):
        assert (answer.status_code, answer.json()) == (200, {"success": True})
    sides.settled({"seed-1": "loaded", "seed-2": "unloaded", "seed-3": "unloaded"})

    for answer in sides.both("load", "seed-1"):  # loaded already
        assert_error(answer, 400, "already running")

    for answer in sides.both("load", "seed-2"):  # one at a time on both: seed-1 makes room
        assert (answer.status_code, answer.json()) == (200, {"success": True})
    sides.settled({"seed-1": "unloaded", "seed-2": "loaded", "seed-3": "unloaded"})

    for answer in sides.both("unload", "seed-2"):
        assert (answer.status_code, answer.json()) == (200, {"success": True})
    sides.settled(dict.fromkeys(MODELS, "unloaded"))

    for answer in sides.both("unload", "seed-2"):  # stopped already
        assert_error(answer, 400, "not running")

    for answer in sides.both("load", "nope"):
        assert answer.status_code == 404, answer.text
    mine_unload, theirs_unload = sides.both("unload", "nope")
    assert_error(mine_unload, 404, "nope")  # swapctl: unknown is 404 on both routes
    assert_error(theirs_unload, 400, "not found")  # llama-server's own choice for an unload
    sides.settled(dict.fromkeys(MODELS, "unloaded"))


def test_the_openai_sdk_reads_both_lists(sides: Sides) -> None:
    assert sides.swapctl.http.post(f"{sides.swapctl.url}/unload").status_code == 200
    client = sides.proxy.client()
    router = OpenAI(base_url=f"{sides.router.url}/v1", api_key="x", max_retries=0, timeout=60)
    try:
        chat(client, "seed-1")  # a request loads it, as a load does
        assert sides.router.post("load", "seed-1").status_code == 200
        expected = {"seed-1": "loaded", "seed-2": "unloaded", "seed-3": "unloaded"}
        sides.settled(expected)
        for listed in (client.models.list().data, router.models.list().data):
            assert {m.id: (m.model_extra or {})["status"]["value"] for m in listed} == expected
        assert [m.id for m in client.models.list().data] == list(MODELS)  # no `hidden`
        found = client.models.retrieve("hidden")  # unlisted, still found
        assert (found.id, found.object, found.owned_by) == ("hidden", "model", "swapctl")
        assert client.models.retrieve("seed-1").model_extra == {
            "aliases": [],
            "status": {"value": "loaded"},
        }
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nope")
    finally:
        router.close()
        sides.router.post("unload", "seed-1")
