"""The page at /ui in a real browser, as a person uses it: headless Chromium (Debian's
`chromium`, from scripts/browser.sh) driven by Playwright, against a real `swapctl up` with
llama-server containers. Every wait is on a condition of the page or of Docker.

Screenshots land in build/artifacts/: ui.png (the page after a morning's work, also the
README's docs/ui.png), playground.png, requests.png and charts.png (the README's
docs/playground.png, docs/requests.png and docs/charts.png) and one per test as it ended."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import httpx
import pytest
from openai import NotFoundError, OpenAI
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
from starlette.types import ASGIApp
from support import (
    MESSAGES,
    Proxy,
    ask,
    containers,
    free_port,
    llama_model,
    long_model,
    poll,
    running_models,
    write_yaml,
)

import swapctl
from swapctl.backend.fake import FakeBackend
from swapctl.config import parse_config
from swapctl.gpus import Device, GpuProcess, Snapshot
from swapctl.lifecycle import Swapper
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream
from swapctl.server import build_server

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 60_000  # for what waits on a container start; the page itself answers in milliseconds
KEY = "sk-ui-test-41c7"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium; the test fails (never skips) when it cannot be had."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "browser.sh")], capture_output=True, text=True, check=False
    )
    if done.returncode != 0 or not CHROMIUM.is_file():
        pytest.fail(
            f"no browser at {CHROMIUM}: scripts/browser.sh (apt-get install chromium) failed:\n"
            f"{done.stdout}{done.stderr}",
            pytrace=False,
        )
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(
    browser: Browser, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> Iterator[Page]:
    """A fresh tab; what the page's script raised or the policy refused fails the test, and
    the tab is kept as a screenshot whatever the outcome."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    tab.on(
        "console",
        lambda message: problems.append(message.text) if "Content Security Policy" in message.text else None,
    )
    yield tab
    shot(tab, f"ui-{request.node.name}", capsys)
    context.close()
    assert problems == []


def shot(tab: Page, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


def row(tab: Page, model: str) -> Locator:
    return tab.locator(f'#models tr[data-model="{model}"]')


def two_models(instance: str, models_dir: Path, tmp_path: Path, **extra: object) -> Proxy:
    """a and b, one at a time (no matrix): loading one stops the other."""
    config = {
        "instance": instance,
        "models": {"a": llama_model(models_dir, 1), "b": llama_model(models_dir, 2)},
        **extra,
    }
    return Proxy(write_yaml(tmp_path / "swapctl.yaml", config), instance, tmp_path)


@pytest.fixture
def open_page(
    instance: str,
    models_dir: Path,
    tmp_path: Path,
    proxies: list[Proxy],
    docker_engine: docker.DockerClient,
    page: Page,
) -> Callable[..., Proxy]:
    """Starts `two_models` (top-level keys may be added) and opens its page in `page`. A test
    asks for it before `page`, so that the page is shot before the proxy stops."""

    def start(**extra: object) -> Proxy:
        proxy = two_models(instance, models_dir, tmp_path, **extra)
        proxies.append(proxy)
        proxy.start()
        page.goto(f"{proxy.url}/ui")
        return proxy

    return start


def test_the_page_follows_loads_and_unloads_models(
    open_page: Callable[..., Proxy],
    instance: str,
    docker_engine: docker.DockerClient,
    page: Page,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = open_page()
    expect(page.locator("#status")).to_have_text("live")
    expect(page.locator("#version")).to_have_text(f"v{swapctl.__version__}")  # from the snapshot
    expect(row(page, "a").locator("td.state")).to_have_text("stopped")
    expect(row(page, "b").locator("td.state")).to_have_text("stopped")

    # a request through the API: the row turns ready, the swap shows in the history
    ask(proxy, "a")
    expect(row(page, "a").locator("td.state")).to_have_text("ready")
    expect(row(page, "a").locator("td.container")).to_contain_text(instance)
    first_swap = page.locator("#swaps tbody tr").first
    expect(first_swap.locator("td.model")).to_have_text("a")
    expect(first_swap.locator("td.result")).to_have_text("ok")

    # b stops a (one at a time): both rows change, the swap names what it evicted
    ask(proxy, "b")
    expect(row(page, "b").locator("td.state")).to_have_text("ready")
    expect(row(page, "a").locator("td.state")).to_have_text("stopped")
    expect(first_swap.locator("td.model")).to_have_text("b")
    expect(first_swap.locator("td.evicted")).to_have_text("a")
    expect(page.locator("#swaps tbody tr")).to_have_count(2)
    expect(row(page, "b").locator("td.requests")).to_have_text("1")  # from the stats events
    expect(row(page, "b").locator("td.last-start")).to_have_text(re.compile(r"^\d+\.\d+s$"))
    expect(page.locator("#proxy-log")).to_contain_text("swap: b ready")

    # the plan preview: loading a now would stop b
    page.select_option("#plan-model", "a")
    page.click("#plan-form button")
    expect(page.locator("#plan-result")).to_contain_text("stops b")

    # b's container log, streamed
    page.select_option("#logs-model", "b")
    page.click("#logs-form button[type=submit]")
    expect(page.locator("#model-log")).to_contain_text("llama_server")
    page.click("#logs-stop")

    # Unload in the page: the container goes
    row(page, "b").locator("button.unload").click()
    expect(row(page, "b").locator("td.state")).to_have_text("stopped")
    poll(lambda: running_models(docker_engine, instance) == frozenset(), 30, "b's container to go")

    # Load in the page: a starts again
    row(page, "a").locator("button.load").click()
    expect(row(page, "a").locator("td.state")).to_have_text("ready")
    assert running_models(docker_engine, instance) == {"a"}
    expect(page.locator("#swaps tbody tr")).to_have_count(3)
    ask(proxy, "a")
    expect(row(page, "a").locator("td.requests")).to_have_text("1")
    shot(page, "ui", capsys)

    # the proxy restarts: the open page holds nothing up, says so, connects again by itself
    # and shows what the new proxy adopted
    code = proxy.stop(signal.SIGINT)
    assert code in (0, 130), f"swapctl up did not exit by itself on SIGINT (status {code}):\n{proxy.log()}"
    expect(page.locator("#status")).to_contain_text("disconnected")
    proxy.start()
    expect(page.locator("#status")).to_have_text("live")
    expect(row(page, "a").locator("td.state")).to_have_text("ready")


def test_with_api_keys_the_page_asks_for_the_key(
    open_page: Callable[..., Proxy], instance: str, docker_engine: docker.DockerClient, page: Page
) -> None:
    proxy = open_page(apiKeys=[KEY])  # the page itself needs no key
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#status")).not_to_have_text("live")

    page.fill("#key", "not-the-key")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_have_text("That key was refused.")
    page.fill("#key", KEY)
    page.click("#key-form button")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("live")

    with OpenAI(base_url=f"{proxy.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=4)
    expect(row(page, "a").locator("td.state")).to_have_text("ready")

    # the key lasts the tab's session: a reload of the page asks for nothing
    page.reload()
    expect(page.locator("#status")).to_have_text("live")
    expect(page.locator("#key-form")).to_be_hidden()
    row(page, "a").locator("button.unload").click()  # a POST, with the key
    expect(row(page, "a").locator("td.state")).to_have_text("stopped")
    poll(lambda: running_models(docker_engine, instance) == frozenset(), 30, "a's container to go")


def test_the_page_shows_every_request_on_record(open_page: Callable[..., Proxy], page: Page) -> None:
    proxy = open_page()
    expect(page.locator("#status")).to_have_text("live")
    ask(proxy, "a")
    first = page.locator("#requests tbody tr").first
    expect(first.locator("td.model")).to_have_text("a")
    expect(first.locator("td.status")).to_have_text("200")
    expect(first.locator("td.tokens")).to_have_text(re.compile(r"^\d+ / \d+$"))  # from usage
    expect(first.locator("td.speed")).to_have_text(re.compile(r"^\d+\.\d$"))  # from timings
    expect(first.locator("td.swap")).to_contain_text("its start")
    ask(proxy, "b")
    expect(first.locator("td.model")).to_have_text("b")  # newest first, live
    expect(first.locator("td.swap")).to_contain_text("stopping a")
    page.select_option("#requests-model", "a")
    expect(page.locator("#requests tbody tr")).to_have_count(1)
    page.select_option("#requests-model", "")
    # a client's mistake is on record too, with why
    with pytest.raises(NotFoundError):
        proxy.client().chat.completions.create(model="nope", messages=MESSAGES, max_tokens=4)
    expect(first.locator("td.model")).to_have_text("nope")
    expect(first.locator("td.status")).to_have_text("404")
    expect(first.locator("td.swap")).to_contain_text("refused: unknown model 'nope'")
    # a new page lists the record from GET /requests
    page.reload()
    expect(page.locator("#requests tbody tr")).to_have_count(3)


# pixels of the timeline's canvas in the colour of `ready` (--ready: #1a7f37)
READY_PIXELS = """() => {
  const canvas = document.querySelector("#chart-timeline canvas");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let found = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] === 26 && data[i + 1] === 127 && data[i + 2] === 55) found++;
  return found;
}"""


def test_the_charts_draw_the_last_hour(
    open_page: Callable[..., Proxy], page: Page, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = open_page()
    expect(page.locator("#status")).to_have_text("live")
    ask(proxy, "a")
    ask(proxy, "a")
    ask(proxy, "b")  # a swap: a stops, b starts
    requests = page.locator("#chart-requests .u-legend")
    expect(requests).to_contain_text("a (2 requests)")
    expect(requests).to_contain_text("b (1 request)")
    expect(page.locator("#chart-tokens .u-legend")).to_contain_text(re.compile(r"a \(\d+ tokens\)"))
    expect(page.locator("#chart-timeline")).to_have_attribute("data-models", "a,b")
    expect(page.locator("#chart-gpu-none")).to_be_visible()  # no GPU on this machine
    expect(page.locator("#charts-note")).to_contain_text("3 requests")
    poll(lambda: page.evaluate(READY_PIXELS) > 0, 10, "the timeline to draw a ready interval")
    # a new page draws the same hour from GET /history
    page.reload()
    expect(page.locator("#chart-requests .u-legend")).to_contain_text("a (2 requests)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#charts").screenshot(path=str(ARTIFACTS / "charts.png"))
    shot(page, "ui-charts", capsys)


GIB = 2**30


@contextlib.contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """`app` on a free 127.0.0.1 port, by swapctl's own uvicorn server, in a thread."""
    port = free_port()
    server = build_server(app, "127.0.0.1", port, verbose=False)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        poll(lambda: server.started or not thread.is_alive(), 10, "the app to listen")
        assert server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def test_the_gpu_chart_draws_each_device_and_each_model(
    page: Page, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where a GPU is seen, as `up` samples it from NVML every 10 s (here the samples are given:
    no GPU on this machine), the chart draws each device's used memory and each model's."""
    backend = FakeBackend()
    upstream = httpx.AsyncClient(transport=backend.transport)
    models = {"chat": {"image": "img"}, "code": {"image": "img"}}
    swapper = Swapper(parse_config({"instance": "gpu-chart", "models": models}), backend, upstream)
    history = swapper.activity.last_hour
    for chat, code in ((0, 0), (6, 0), (6, 4), (0, 4)):  # chat starts, code beside it, chat stops
        processes = (GpuProcess(1, chat * GIB, "chat"), GpuProcess(2, code * GIB, "code"))
        history.gpu(
            Snapshot((Device(0, "GPU-aaaa", "NVIDIA L4", 24 * GIB, (1 + chat + code) * GIB, processes),))
        )
    app = build_app(swapper.config, swapper, HttpxUpstream(upstream), swapper.metrics, preload=False)
    with serving(app) as url:
        page.goto(f"{url}/ui")
        legend = page.locator("#chart-gpu .u-legend")
        expect(legend).to_contain_text("GPU 0 NVIDIA L4 (of 24 GiB)")
        expect(legend).to_contain_text("chat (0.0 GiB now)")
        expect(legend).to_contain_text("code (4.0 GiB now)")
        expect(page.locator("#chart-gpu-none")).to_be_hidden()
        expect(page.locator("#chart-requests-none")).to_be_visible()  # nothing served yet
        expect(page.locator("#chart-timeline-none")).to_have_text("No model ran in the last hour.")
        page.locator("#charts").screenshot(path=str(ARTIFACTS / "charts-gpu.png"))


def chat_in_page(page: Page, max_tokens: int) -> None:
    """Sends MESSAGES' prompt from the playground to its only model."""
    page.fill("#chat-prompt", MESSAGES[0]["content"])
    page.fill("#chat-max", str(max_tokens))
    page.click("#chat-send")


LONG = 16000  # tokens: the longest the model's context holds, a few seconds of streaming
SPEED = re.compile(r"^first token \d+\.\d\ds · \d+ tokens · \d+\.\d tokens/s$")


def test_the_playground_chats_and_the_record_cancels_and_captures(
    instance: str,
    models_dir: Path,
    tmp_path: Path,
    proxies: list[Proxy],
    docker_engine: docker.DockerClient,
    page: Page,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = {
        "instance": instance,
        "healthCheckTimeout": 30,
        "apiKeys": [KEY],
        "captureBuffer": 4,
        "models": {"llm": long_model(models_dir, 1)},
    }
    proxy = Proxy(write_yaml(tmp_path / "swapctl.yaml", config), instance, tmp_path)
    proxies.append(proxy)
    proxy.start()
    page.goto(f"{proxy.url}/ui")
    page.fill("#key", KEY)
    page.click("#key-form button")
    expect(page.locator("#status")).to_have_text("live")
    expect(page.locator("#chat-model")).to_have_value("llm")

    # a chat while the model is stopped: the loading note, then the answer as it streams,
    # with its time to first token and speed
    chat_in_page(page, 24)
    expect(page.locator("#chat-loading")).to_contain_text("loading llm")
    expect(page.locator("#chat-stats")).to_have_attribute("data-state", "done")
    expect(page.locator("#chat-stats")).to_have_text(SPEED)
    assert page.locator("#chat-answer").text_content()
    shot(page, "playground", capsys)

    # the request on record, with its tokens; its capture, without the key
    first = page.locator("#requests tbody tr").first
    expect(first.locator("td.model")).to_have_text("llm")
    expect(first.locator("td.status")).to_have_text("200")
    expect(first.locator("td.tokens")).to_have_text(re.compile(r"^\d+ / \d+$"))
    first.locator("button.details").click()
    detail = page.locator("#detail-text")
    expect(detail).to_contain_text("capture:")
    expect(detail).to_contain_text(MESSAGES[0]["content"])
    assert KEY not in (detail.text_content() or "")
    with page.expect_download() as download:
        page.click("#detail-export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["id"] == first.get_attribute("data-id") and exported["capture"]["request"]["body"]
    assert KEY not in json.dumps(exported) and "authorization" not in json.dumps(exported).lower()
    shot(page, "requests", capsys)
    page.click("#detail-close")

    # a long stream, cancelled in the record: the playground says so, the container serves on
    before = containers(docker_engine, instance)
    chat_in_page(page, LONG)
    expect(page.locator("#chat-stats")).to_have_attribute("data-state", "streaming")
    page.locator('#requests tbody tr[data-in-flight="true"] button.cancel').click()
    expect(page.locator("#chat-stats")).to_have_attribute("data-state", "failed")
    expect(page.locator("#chat-stats")).to_contain_text("cancelled")
    expect(first.locator("td.status")).to_have_text("499 cancelled")
    expect(page.locator('#requests tbody tr[data-in-flight="true"]')).to_have_count(0)
    chat_in_page(page, 8)
    expect(page.locator("#chat-stats")).to_have_attribute("data-state", "done")
    assert containers(docker_engine, instance) == before

    # Stop in the playground aborts a stream: the proxy sees the client leave
    chat_in_page(page, LONG)
    expect(page.locator("#chat-stats")).to_have_attribute("data-state", "streaming")
    page.click("#chat-stop")
    expect(page.locator("#chat-stats")).to_contain_text("stopped")
    expect(page.locator("#requests tbody tr")).to_have_count(4)
    expect(page.locator('#requests tbody tr[data-in-flight="true"]')).to_have_count(0)
    assert containers(docker_engine, instance) == before


def test_the_playground_tells_the_start_and_embeds(
    instance: str,
    models_dir: Path,
    tmp_path: Path,
    proxies: list[Proxy],
    docker_engine: docker.DockerClient,
    page: Page,
) -> None:
    model = {**llama_model(models_dir, 1, "--embeddings", "--pooling", "mean"), "sendLoadingState": True}
    config = {"instance": instance, "healthCheckTimeout": 30, "models": {"a": model}}
    proxy = Proxy(write_yaml(tmp_path / "swapctl.yaml", config), instance, tmp_path)
    proxies.append(proxy)
    proxy.start()
    page.goto(f"{proxy.url}/ui")
    expect(page.locator("#chat-model")).to_have_value("a")

    # with sendLoadingState the start comes as swapctl's own reasoning chunks: shown as the
    # loading note, apart from the model's thinking and its answer
    chat_in_page(page, 8)
    expect(page.locator("#chat-stats")).to_have_attribute("data-state", "done")
    expect(page.locator("#chat-loading")).to_contain_text("Loading a")
    expect(page.locator("#chat-loading")).to_contain_text("a is ready after")
    expect(page.locator("#chat-thinking-box")).to_be_hidden()
    expect(page.locator("#chat-answer")).not_to_contain_text("Loading a")

    # embeddings: a row a text, its dimensions, and the cosine of the first to itself
    page.click("#tab-embed")
    expect(page.locator("#play-chat")).to_be_hidden()
    page.fill("#embed-input", "a cat\na dog\n")
    page.click("#embed-form button[type=submit]")
    expect(page.locator("#embed-stats")).to_have_attribute("data-state", "done")
    rows = page.locator("#embed-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first.locator("td.text")).to_have_text("a cat")
    expect(rows.first.locator("td.cosine")).to_have_text("1.000")
    expect(rows.nth(1).locator("td.dims")).to_have_text(re.compile(r"^[1-9]\d*$"))
    expect(row(page, "a").locator("td.in-flight")).to_have_text("0")  # settled: nothing asked now


def test_the_playground_reranks_draws_speaks_and_transcribes(
    instance: str, tmp_path: Path, proxies: list[Proxy], page: Page
) -> None:
    """Against scripts/echo_server.py in a container: it answers each route as its API does
    (a real 1x1 PNG, audio bytes, the upload's size and SHA-256)."""
    echo = {
        "template": "llama-server",
        "entrypoint": ["python3"],
        "command": ["/srv/echo_server.py", "--port", "8080"],
        "volumes": [f"{ROOT / 'scripts'}:/srv:ro"],
        "stop_grace_period": "1s",
    }
    config = {"instance": instance, "healthCheckTimeout": 30, "models": {"echo": echo}}
    proxy = Proxy(write_yaml(tmp_path / "swapctl.yaml", config), instance, tmp_path)
    proxies.append(proxy)
    proxy.start()
    page.goto(f"{proxy.url}/ui")
    expect(page.locator("#status")).to_have_text("live")

    page.click("#tab-rerank")
    expect(page.locator("#rerank-model")).to_have_value("echo")
    page.fill("#rerank-query", "a cat")
    page.fill("#rerank-documents", "a dog barks\na cat sleeps\n")
    page.click("#rerank-form button[type=submit]")
    expect(page.locator("#rerank-stats")).to_have_attribute("data-state", "done")
    ranked = page.locator("#rerank-table tbody tr")
    expect(ranked).to_have_count(2)
    expect(ranked.first.locator("td.rank")).to_have_text("1")
    expect(ranked.first.locator("td.document")).to_have_text("a cat sleeps")  # both words found
    scores = [float(text) for text in ranked.locator("td.score").all_text_contents()]
    assert scores == sorted(scores, reverse=True)

    page.click("#tab-image")
    page.fill("#image-prompt", "a red dot")
    page.click("#image-form button[type=submit]")
    expect(page.locator("#image-stats")).to_have_attribute("data-state", "done")
    expect(page.locator("#image-out img")).to_have_attribute("alt", "echo: a red dot")
    page.wait_for_function("() => document.querySelector('#image-out img').naturalWidth === 1")  # decoded

    page.click("#tab-speech")
    page.fill("#speech-input", "hello there")
    page.click("#speech-form button[type=submit]")
    expect(page.locator("#speech-stats")).to_have_attribute("data-state", "done")
    expect(page.locator("#speech-stats")).to_contain_text("audio/mpeg")
    expect(page.locator("#speech-audio")).to_have_attribute("src", re.compile(r"^blob:"))
    # the audio element has read its blob (the policy refusing it would fail the test); a
    # function, not an expression, which Playwright would eval() under the page's policy
    page.wait_for_function(
        "() => ((a) => a.error !== null || a.readyState > 0)(document.getElementById('speech-audio'))"
    )

    page.click("#tab-listen")
    recording = b"RIFF" + bytes(range(256)) * 8
    page.set_input_files("#listen-file", {"name": "note.wav", "mimeType": "audio/wav", "buffer": recording})
    page.click("#listen-form button[type=submit]")
    expect(page.locator("#listen-stats")).to_have_attribute("data-state", "done")
    expect(page.locator("#listen-text")).to_have_text(
        f"echo {len(recording)} {hashlib.sha256(recording).hexdigest()}"
    )
