"""Load through swaps: many concurrent clients against the real `swapctl up`, each sending a
bounded number of plain and streamed requests for random models of a three-model matrix,
while a sampler reads from Docker which containers of the instance run.

Docker is the witness of the matrix: no sample may show a combination the matrix forbids.
Every request must end complete (a stream with its final chunk and [DONE], a plain reply
as whole JSON) or with a clear OpenAI error (429 with Retry-After, from concurrencyLimit).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from support import (
    MESSAGES,
    Proxy,
    containers,
    llama_model,
    running_models,
    stream_chat,
    write_yaml,
)

from swapctl.config import load_config
from swapctl.matrix.expand import expand_set
from swapctl.matrix.solver import MatrixPolicy

pytestmark = pytest.mark.docker

MODELS = ("chat", "code", "big")
CLIENTS = 12
REQUESTS_PER_CLIENT = 24
CLIENT_DEADLINE = 35.0  # seconds after which clients start no new request
REQUEST_TIMEOUT = 60.0
CONCURRENCY_LIMIT = 6
SAMPLE_EVERY = 0.05
SAMPLES_AT_MOST = 3000  # the sampler stops by itself after this many (2.5 min at most)


def load_config_file(path: Path, instance: str, models_dir: Path) -> Path:
    seeds = {"chat": 1, "code": 2, "big": 3}
    return write_yaml(
        path,
        {
            "instance": instance,
            "healthCheckTimeout": 60,
            "models": {
                model: {**llama_model(models_dir, seed, ctx=2048), "concurrencyLimit": CONCURRENCY_LIMIT}
                for model, seed in seeds.items()
            },
            "matrix": {
                "vars": {"c": "chat", "k": "code", "B": "big"},
                "sets": {"pair": "c & k", "alone": "B"},
                "evict_costs": {"B": 10, "c": 2},
            },
        },
    )


def allowed_combinations(config: Path) -> list[frozenset[str]]:
    policy = load_config(config).policy
    assert isinstance(policy, MatrixPolicy)
    program = policy.program
    return [combo for index in range(len(program.sets)) for combo in expand_set(program, index)]


@dataclass(frozen=True)
class Outcome:
    client: int
    model: str
    streamed: bool
    kind: str  # ok | busy (429 + Retry-After) | anything else is a failure
    detail: str
    seconds: float


def plain(http: httpx.Client, url: str, model: str, max_tokens: int) -> tuple[str, str]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    response = http.post(f"{url}/v1/chat/completions", json=body)
    if response.status_code != 200:
        return rejected(response.status_code, response.headers, response.text)
    try:
        reply: Any = json.loads(response.content)
    except json.JSONDecodeError as error:
        return "truncated JSON", f"{error}: {response.content[-200:]!r}"
    choice = reply["choices"][0]
    if not isinstance(choice["message"]["content"], str) or choice["finish_reason"] not in ("length", "stop"):
        return "incomplete reply", json.dumps(choice)[:300]
    return "ok", ""


def streamed(url: str, model: str, max_tokens: int) -> tuple[str, str]:
    result = stream_chat(url, model, max_tokens, timeout=REQUEST_TIMEOUT)
    if result.status != 200:
        return rejected(result.status, result.headers, json.dumps(result.error))
    if result.error is not None:
        return "error event", json.dumps(result.error)
    if result.finish_reason is None or not result.done:
        return "cut stream", f"finish_reason={result.finish_reason} done={result.done} chunks={result.chunks}"
    return "ok", ""


def rejected(status: int, headers: Any, text: str) -> tuple[str, str]:
    if status == 429 and headers.get("retry-after"):
        return "busy", ""
    return f"HTTP {status}", text[:300]


def test_concurrent_clients_through_swaps_keep_to_the_matrix(
    instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient
) -> None:
    config = load_config_file(tmp_path / "swapctl.yaml", instance, models_dir)
    combinations = allowed_combinations(config)
    assert frozenset({"chat", "code"}) in combinations and frozenset({"big"}) in combinations

    def allowed(models: frozenset[str]) -> bool:
        return len(models) <= 1 or any(models <= combo for combo in combinations)

    proxy = Proxy(config, instance, tmp_path)
    outcomes: list[Outcome] = []
    samples: list[frozenset[str]] = []
    sampler_errors: list[str] = []
    stop_sampling = threading.Event()
    lock = threading.Lock()

    def sample() -> None:
        for _ in range(SAMPLES_AT_MOST):
            if stop_sampling.is_set():
                return
            try:
                models = running_models(docker_engine, instance)
            except Exception as error:  # reported below, never silently dropped
                sampler_errors.append(repr(error))
            else:
                samples.append(models)
            time.sleep(SAMPLE_EVERY)

    def client(index: int, deadline: float) -> None:
        rng = random.Random(index)
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            for _ in range(REQUESTS_PER_CLIENT):
                if time.monotonic() > deadline:
                    return
                model, stream = rng.choice(MODELS), rng.random() < 0.5
                max_tokens = rng.choice((8, 32, 96))
                began = time.monotonic()
                try:
                    if stream:
                        kind, detail = streamed(proxy.url, model, max_tokens)
                    else:
                        kind, detail = plain(http, proxy.url, model, max_tokens)
                except Exception as error:
                    kind, detail = type(error).__name__, repr(error)[:300]
                with lock:
                    outcomes.append(Outcome(index, model, stream, kind, detail, time.monotonic() - began))

    proxy.start()
    sampler = threading.Thread(target=sample, daemon=True)
    clients: list[threading.Thread] = []
    began = time.monotonic()
    try:
        sampler.start()
        deadline = time.monotonic() + CLIENT_DEADLINE
        clients = [threading.Thread(target=client, args=(i, deadline), daemon=True) for i in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(CLIENT_DEADLINE + REQUEST_TIMEOUT + 10)
        elapsed = time.monotonic() - began
        stop_sampling.set()
        sampler.join(10)
        after = proxy.running()
        docker_running = containers(docker_engine, instance)
        docker_all = containers(docker_engine, instance, running_only=False)
        log = proxy.log()
    finally:
        stop_sampling.set()
        proxy.close()

    assert not any(thread.is_alive() for thread in clients), "a client did not finish"
    kinds = Counter(o.kind for o in outcomes)
    swaps, stops = log.count("swap: "), log.count("stopped ")
    seen = Counter(",".join(sorted(s)) or "-" for s in samples)
    print(
        f"\nload: {len(outcomes)} requests from {CLIENTS} clients in {elapsed:.1f}s; "
        f"outcomes {dict(kinds)}; {swaps} starts, {stops} stops; "
        f"{len(samples)} Docker samples: {dict(seen)}"
    )
    by_model = Counter((o.model, o.streamed) for o in outcomes)
    print(f"load: by (model, streamed): {dict(by_model)}; slowest {max(o.seconds for o in outcomes):.1f}s")

    assert not sampler_errors, f"reading Docker failed: {sampler_errors[:5]}"
    assert len(samples) >= 20, "too few Docker samples to witness anything"
    forbidden = sorted({",".join(sorted(s)) for s in samples if not allowed(s)})
    assert not forbidden, f"Docker ran combinations the matrix forbids: {forbidden}"

    failures = [o for o in outcomes if o.kind not in ("ok", "busy")]
    assert not failures, "requests neither complete nor clearly refused:\n" + "\n".join(
        f"  client {o.client} {o.model} {'stream' if o.streamed else 'plain'}: {o.kind}: {o.detail}"
        for o in failures[:20]
    )
    assert kinds["ok"] >= len(outcomes) // 2, f"mostly refused: {dict(kinds)}"
    assert swaps >= 3, f"the load never swapped: {swaps} starts"

    # afterwards: nothing in flight, and Docker and the proxy agree on what runs
    assert all(s["in_flight"] == 0 for s in after.values()), after
    ready = {m for m, s in after.items() if s["state"] == "ready"}
    assert set(docker_running) == set(docker_all) == ready, (docker_all, after)
