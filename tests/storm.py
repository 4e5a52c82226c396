"""The storm: many clients in the first second of a freshly started `swapctl up`, each sending
chat requests for random models among five llama-server models until a deadline, streamed,
plain, or leaving (closing the connection after the response head or after the first
chunk), while a sampler reads from Docker which containers of the instance run. Then the
lifecycle must settle: every model ready or stopped, nothing in flight, Docker and the proxy
agreeing on what runs, and each model answering one more request.

Shared by tests/real/test_storm.py (which asserts) and bench/storm_bench.py (which counts).

The models share one image, and the `up` is fresh: its set of images it has seen is empty,
so the first start of every model looks for its image before its decision, the window in
which a model counts as starting but is not decided yet.

Streams are read here rather than with `support.stream_chat`, with the same parsing, for
one reason: a request for a model that is not ready gets `: loading` comments every second,
so a read timeout never fires on a wedged wait; each request here has a deadline of its own,
checked at every line, comments included.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
from support import MESSAGES, Proxy, Streamed, llama_model, running_models, take_event, write_yaml

from swapctl.config import load_config
from swapctl.matrix.expand import expand_set
from swapctl.matrix.solver import MatrixPolicy

MODELS = ("m-a", "m-b", "m-c", "m-d", "m-e")
SEEDS = (1, 2, 3, 1, 2)  # the GGUF each model serves (models_dir has seeds 1 to 3)
# Three sets: m-a runs with m-b, m-c with m-d, m-e alone; every other pair is forbidden.
MATRIX: dict[str, Any] = {
    "vars": {"a": "m-a", "b": "m-b", "c": "m-c", "d": "m-d", "e": "m-e"},
    "sets": {"ab": "a & b", "cd": "c & d", "e": "e"},
}
SETTLED = frozenset({"ready", "stopped"})  # any other state in /running is on its way somewhere
MAX_TOKENS = (8, 32, 96)
SAMPLE_EVERY = 0.05
SETTLE_WITHIN = 10.0  # seconds after the clients stop for every model to be ready or stopped
ASK_WITHIN = 30.0  # seconds for the one more request to each model, all five
ASK_EACH_WITHIN = 12.0
LOG_TAIL = 60  # lines of the `up` log shown with the problems


@dataclass(frozen=True)
class Storm:
    """One round: its seed decides every client's start time, models, kinds and sizes."""

    seed: int
    clients: int = 16
    burst: int = 8  # of the clients, those whose first request goes at once, at the storm's start
    seconds: float = 22.0  # after this, clients start no new request
    matrix: bool = True  # False: no matrix at all, so one model at a time
    leave_share: float = 0.2  # of requests whose client leaves (half after the head, half after a chunk)
    stream_share: float = 0.5  # of the others, streamed
    request_timeout: float = 30.0  # a request not over by then is lost (10 times the slowest seen)


def storm_config(
    path: Path, instance: str, models_dir: Path, matrix: bool = True, concurrency: int | None = None
) -> Path:
    """Five llama-server models on the one image, a generous health check timeout, MATRIX
    unless `matrix` is False, and each model's concurrencyLimit `concurrency` if given (the
    default, 10, is out of reach of 16 clients spread over five models; more clients get a
    limit no model can reach, so that a 429 is never a fair answer)."""
    limit = {} if concurrency is None else {"concurrencyLimit": concurrency}
    document: dict[str, Any] = {
        "instance": instance,
        "healthCheckTimeout": 90,
        "models": {
            model: {**llama_model(models_dir, seed, ctx=2048), **limit}
            for model, seed in zip(MODELS, SEEDS, strict=True)
        },
    }
    if matrix:
        document["matrix"] = MATRIX
    return write_yaml(path, document)


def allowed_combinations(config: Path) -> list[frozenset[str]] | None:
    """Every combination the config's matrix allows; None without a matrix (one at a time)."""
    policy = load_config(config).policy
    if not isinstance(policy, MatrixPolicy):
        return None
    program = policy.program
    return [combo for index in range(len(program.sets)) for combo in expand_set(program, index)]


def allowed(models: frozenset[str], combinations: list[frozenset[str]] | None) -> bool:
    if len(models) <= 1:
        return True
    return combinations is not None and any(models <= combo for combo in combinations)


@dataclass(frozen=True)
class Outcome:
    client: int
    model: str
    how: str  # stream | plain | leave-head | leave-chunk
    kind: str  # ok | abandoned (its own client left) | failed
    message: str  # what went wrong, when failed, its numbers blanked (see `normalized`)
    seconds: float
    detail: str = ""  # the message as it came, when failed


@dataclass
class Report:
    """What one storm did; `problems()` lists what breaks a promise."""

    storm: Storm
    outcomes: list[Outcome] = field(default_factory=list)
    samples: int = 0
    forbidden: Counter[str] = field(default_factory=Counter)  # combination -> samples that showed it
    sampler_errors: list[str] = field(default_factory=list)
    hung_clients: int = 0  # client threads still running long after their deadline
    settle_seconds: float | None = None  # None: did not settle within SETTLE_WITHIN
    unsettled: dict[str, str] = field(default_factory=dict)  # model -> state/in flight, if not settled
    disagreement: str = ""  # Docker and /running on what runs, once settled
    after: dict[str, str] = field(default_factory=dict)  # model -> why one more request failed
    proxy_exit: int | None = None  # set when `up` died during the round
    clients_seconds: float = 0.0  # from the first client's start to the last one's end
    seconds: float = 0.0  # the whole round, settling and the requests after included
    log_tail: str = ""

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def completed(self) -> int:
        return sum(o.kind == "ok" for o in self.outcomes)

    @property
    def abandoned(self) -> int:
        return sum(o.kind == "abandoned" for o in self.outcomes)

    @property
    def failures(self) -> Counter[str]:
        """Lost requests, by message."""
        return Counter(o.message for o in self.outcomes if o.kind == "failed")

    @property
    def slowest(self) -> float:
        """The longest a completed request took."""
        return max((o.seconds for o in self.outcomes if o.kind == "ok"), default=0.0)

    @property
    def lost(self) -> int:
        return sum(self.failures.values())

    @property
    def wedged(self) -> bool:
        return bool(
            self.hung_clients or self.settle_seconds is None or self.after or self.proxy_exit is not None
        )

    def problems(self, count_lost: bool = True) -> list[str]:
        """What broke a promise; with `count_lost` False, lost requests are not among them
        (a storm that `swapctl down` cut into may lose those it cut)."""
        found: list[str] = []
        if self.lost and count_lost:
            found.append(f"{self.lost} of {self.sent} requests lost")
        if self.forbidden:
            found.append(f"Docker ran combinations the matrix forbids: {dict(self.forbidden)}")
        if self.sampler_errors:
            found.append(f"reading Docker failed: {self.sampler_errors[:3]}")
        if self.samples < 20:
            found.append(f"only {self.samples} Docker samples: too few to witness anything")
        if self.hung_clients:
            found.append(f"{self.hung_clients} client threads never ended")
        if self.settle_seconds is None:
            found.append(f"not settled {SETTLE_WITHIN:g}s after the clients stopped: {self.unsettled}")
        if self.disagreement:
            found.append(self.disagreement)
        if self.after:
            found.append(f"one more request failed: {self.after}")
        if self.proxy_exit is not None:
            found.append(f"swapctl up exited with {self.proxy_exit}")
        return found

    def summary(self) -> str:
        settled = "no" if self.settle_seconds is None else f"{self.settle_seconds:.1f}s"
        return (
            f"storm seed {self.storm.seed} ({self.storm.clients} clients, "
            f"{'matrix' if self.storm.matrix else 'no matrix'}): {self.sent} sent, {self.completed} completed, "
            f"{self.lost} lost, {self.abandoned} abandoned; {sum(self.forbidden.values())} forbidden of "
            f"{self.samples} Docker samples; settled {settled}; wedge {'yes' if self.wedged else 'no'}; "
            f"slowest completed {self.slowest:.1f}s; "
            f"clients {self.clients_seconds:.1f}s, round {self.seconds:.1f}s"
        )

    def failures_by_message(self) -> str:
        """Each message with its count, and one of its failures as it came when that differs."""
        example = {o.message: o.detail for o in self.outcomes if o.kind == "failed"}
        return "\n".join(
            f"  {count:5d}  {message}"
            + (f"\n         e.g. {example[message]}" if example[message] != message else "")
            for message, count in self.failures.most_common()
        )

    def explain(self) -> str:
        """The problems, the lost requests by message, and the tail of the `up` log."""
        return "\n".join(
            [
                self.summary(),
                *(f"- {problem}" for problem in self.problems()),
                "lost requests by message:",
                self.failures_by_message() or "  none",
                f"last {LOG_TAIL} lines of the swapctl up log:",
                self.log_tail,
            ]
        )


def normalized(message: str) -> str:
    """A message with its durations, ports and container IDs blanked, so like failures count
    together (small whole numbers, HTTP statuses among them, stay)."""
    message = re.sub(r"\b[0-9a-f]{12,64}\b", "ID", message)
    return re.sub(r"\d+\.\d+|\d{4,}", "N", message)[:240]


def error_message(status: int, headers: httpx.Headers, content: bytes) -> str:
    try:
        error = json.loads(content)["error"]
        text = f"{error.get('code')}: {error.get('message')}"
    except (ValueError, KeyError, TypeError):
        text = content[:200].decode(errors="replace")
    retry = f" (Retry-After {headers['retry-after']})" if "retry-after" in headers else ""
    return f"HTTP {status}{retry}: {text}"


def read_stream(
    http: httpx.Client, url: str, model: str, max_tokens: int, leave: str | None, timeout: float
) -> tuple[str, str]:
    """A streamed chat, read to its end (or left as `leave` says: after the response head, or
    after the first event, closing its connection); (kind, message)."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    deadline = time.monotonic() + timeout
    # a response closed before its end closes its connection: httpx reuses only finished ones
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return "failed", error_message(response.status_code, response.headers, response.content)
        if leave == "head":
            return "abandoned", ""
        result = Streamed(status=response.status_code)
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                return "failed", f"stream not over within {timeout:g}s"
            if not take_event(result, line):
                continue
            if result.error is not None:
                return "failed", f"error event: {result.error.get('code')}: {result.error.get('message')}"
            if leave == "chunk":
                return "abandoned", ""
    if result.finish_reason is None or not result.done:
        return "failed", f"stream cut: finish_reason {result.finish_reason}, [DONE] {result.done}"
    return "ok", ""


def send_plain(
    http: httpx.Client, url: str, model: str, max_tokens: int, timeout: float | None = None
) -> tuple[str, str]:
    """A plain chat; ok when its reply is whole JSON with a finished choice."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    response = http.post(f"{url}/v1/chat/completions", json=body, **extra)
    if response.status_code != 200:
        return "failed", error_message(response.status_code, response.headers, response.content)
    try:
        choice = json.loads(response.content)["choices"][0]
    except (ValueError, KeyError, IndexError) as error:
        return "failed", f"not a whole reply: {type(error).__name__}"
    if not isinstance(choice["message"]["content"], str) or choice["finish_reason"] not in ("length", "stop"):
        return "failed", f"unfinished reply: finish_reason {choice.get('finish_reason')}"
    return "ok", ""


def run_storm(storm: Storm, proxy: Proxy, engine: docker.DockerClient) -> Report:
    """Blow `storm` through `proxy` (started just before, so its first second is the storm's),
    then wait for the lifecycle to settle and ask each model once more. The proxy keeps running."""
    combinations = allowed_combinations(proxy.config)
    report = Report(storm)
    lock = threading.Lock()
    stop_sampling = threading.Event()
    rng = random.Random(storm.seed)
    # built before the storm begins, sharing one SSL context (loading the certificates takes
    # 30 ms a client), so that the first requests leave together
    context = httpx.create_ssl_context()
    https = [httpx.Client(timeout=storm.request_timeout, verify=context) for _ in range(storm.clients)]
    began = time.monotonic()
    deadline = began + storm.seconds
    # the first `burst` clients start at once, the others at random within the first second
    plans = [
        (index, rng.randrange(2**32), began + (0.0 if index < storm.burst else rng.random()), https[index])
        for index in range(storm.clients)
    ]

    def sample() -> None:
        while not stop_sampling.is_set():
            try:
                models = running_models(engine, proxy.instance)
            except Exception as error:  # reported, never silently dropped
                report.sampler_errors.append(repr(error))
            else:
                report.samples += 1
                if not allowed(models, combinations):
                    report.forbidden[",".join(sorted(models))] += 1
            stop_sampling.wait(SAMPLE_EVERY)

    def client(index: int, seed: int, start_at: float, http: httpx.Client) -> None:
        own = random.Random(seed)
        time.sleep(max(0.0, start_at - time.monotonic()))
        with http:
            while time.monotonic() < deadline:
                model, max_tokens = own.choice(MODELS), own.choice(MAX_TOKENS)
                roll = own.random()
                if roll < storm.leave_share:
                    how = "leave-head" if roll < storm.leave_share / 2 else "leave-chunk"
                else:
                    how = "stream" if own.random() < storm.stream_share else "plain"
                sent = time.monotonic()
                try:
                    if how == "plain":
                        kind, message = send_plain(http, proxy.url, model, max_tokens)
                    else:
                        leave = how.removeprefix("leave-") if how.startswith("leave-") else None
                        kind, message = read_stream(
                            http, proxy.url, model, max_tokens, leave, storm.request_timeout
                        )
                except Exception as error:
                    kind, message = "failed", f"{type(error).__name__}: {error}"
                took = time.monotonic() - sent
                outcome = Outcome(index, model, how, kind, normalized(message), took, message[:400])
                with lock:
                    report.outcomes.append(outcome)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=plan, daemon=True) for plan in plans]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.1, deadline + storm.request_timeout + 10 - time.monotonic()))
        report.hung_clients = sum(thread.is_alive() for thread in threads)
        report.clients_seconds = time.monotonic() - began
        settle(report, proxy, engine)
        ask_each(report, proxy)
    finally:
        stop_sampling.set()
        sampler.join(10)
        if not proxy.alive() and proxy.process is not None:
            report.proxy_exit = proxy.process.returncode
        report.seconds = time.monotonic() - began
        report.log_tail = "\n".join(proxy.log().splitlines()[-LOG_TAIL:])
    return report


def settle(report: Report, proxy: Proxy, engine: docker.DockerClient) -> None:
    """Wait up to SETTLE_WITHIN for every model to be ready or stopped with nothing in flight;
    then Docker must run exactly the ready ones (given a moment to remove what stopped)."""
    began = time.monotonic()
    while True:
        try:
            running = proxy.running()
            report.unsettled = {
                model: f"{entry['state']}, {entry['in_flight']} in flight"
                for model, entry in running.items()
                if entry["state"] not in SETTLED or entry["in_flight"]
            }
        except httpx.HTTPError as error:
            report.unsettled = {"GET /running": f"{type(error).__name__}: {error}"}
        if not report.unsettled:
            report.settle_seconds = time.monotonic() - began
            break
        if time.monotonic() - began > SETTLE_WITHIN:
            return
        time.sleep(0.1)
    for _ in range(30):
        try:
            ready = frozenset(m for m, entry in proxy.running().items() if entry["state"] == "ready")
        except httpx.HTTPError as error:
            report.disagreement = f"GET /running failed: {type(error).__name__}: {error}"
            return
        in_docker = running_models(engine, proxy.instance)
        if ready == in_docker:
            report.disagreement = ""
            return
        report.disagreement = f"/running has ready {sorted(ready)}, Docker runs {sorted(in_docker)}"
        time.sleep(0.1)


def ask_each(report: Report, proxy: Proxy, budget: float = ASK_WITHIN) -> None:
    """One more plain request to each model, one after the other, within `budget` seconds
    in all (each given at most ASK_EACH_WITHIN): each must answer."""
    ends = time.monotonic() + budget
    with httpx.Client() as http:
        for model in MODELS:
            left = min(ASK_EACH_WITHIN, ends - time.monotonic())
            if left <= 0:
                report.after[model] = "not asked: no time left"
                continue
            try:
                kind, message = send_plain(http, proxy.url, model, 8, left)
            except Exception as error:
                kind, message = "failed", f"{type(error).__name__}: {error}"
            if kind != "ok":
                report.after[model] = message
