"""Proxy overhead and swap overhead, each against a baseline measured in the same run.

Run: .venv/bin/python bench/proxy_bench.py   (needs the Docker engine and image: make images)

- Proxy overhead: the same llama-server container called directly and through
  `swapctl up`, at 1 and 32 concurrent clients, plain (whole response) and streaming
  (time to first chunk), plus a trivial GET through `/upstream/` that isolates the proxy.
- Swap overhead: a request for a stopped model, to its first byte, through swapctl; minus
  the same container started on its own (same spec, health polled every 5 ms) to its
  first byte. llama-swap's polling (wait 250 ms, then once a second) is measured the same
  way for comparison.
- The solver's decision time inside live swaps (from the swap log), and the proxy's RSS
  at rest and under load.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from swapctl.backend.docker import DockerBackend
from swapctl.config import load_template, parse_config, read_yaml
from swapctl.spec import build_spec

ROOT = Path(__file__).resolve().parent.parent
PHASE_S = float(os.environ.get("BENCH_PHASE_S", "6"))  # seconds per measured phase
COLD_RUNS = int(os.environ.get("BENCH_COLD_RUNS", "9"))
BODY = {"model": "m1", "prompt": "hi", "max_tokens": 2, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_models(folder: Path) -> None:
    spec = importlib.util.spec_from_file_location("tiny_gguf", ROOT / "scripts" / "tiny_gguf.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_tiny_model(folder / "m.gguf", seed=1)


def config_text(models: Path, instance: str) -> str:
    command = '["--host", "0.0.0.0", "--port", "8080", "-m", "/models/m.gguf", "-c", "512", "-t", "1"]'
    return f"""
instance: {instance}
models:
  m1: {{template: llama-server, command: {command}, volumes: ["{models}:/models:ro"], concurrencyLimit: 64}}
  m2: {{template: llama-server, command: {command}, volumes: ["{models}:/models:ro"]}}
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(
    concurrency: int, seconds: float, one: Callable[[httpx.AsyncClient], Awaitable[float]]
) -> tuple[list[float], float]:
    """Run `one` from `concurrency` clients for `seconds`: latencies and requests/second."""
    latencies: list[float] = []
    retries = [0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def attempt() -> float | None:
            try:
                return await one(client)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                retries[0] += 1  # llama-server closes kept-alive connections after streams
                return None

        for _ in range(3):
            await attempt()  # warm the connections
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                latency = await attempt()
                if latency is not None:
                    latencies.append(latency)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return latencies, len(latencies) / elapsed


def plain(url: str) -> Callable[[httpx.AsyncClient], Awaitable[float]]:
    async def one(client: httpx.AsyncClient) -> float:
        began = time.perf_counter()
        response = await client.post(url + "/v1/completions", json=BODY)
        response.raise_for_status()
        return time.perf_counter() - began

    return one


def streamed(url: str) -> Callable[[httpx.AsyncClient], Awaitable[float]]:
    async def one(client: httpx.AsyncClient) -> float:
        began = time.perf_counter()
        first = 0.0
        async with client.stream("POST", url + "/v1/completions", json={**BODY, "stream": True}) as response:
            async for _ in response.aiter_raw():
                first = first or time.perf_counter() - began
        return first

    return one


def get(url: str) -> Callable[[httpx.AsyncClient], Awaitable[float]]:
    async def one(client: httpx.AsyncClient) -> float:
        began = time.perf_counter()
        (await client.get(url)).raise_for_status()
        return time.perf_counter() - began

    return one


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def first_byte(url: str, timeout: float = 120) -> float:
    """Seconds until the first byte of a completion from `url`."""
    began = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=BODY, timeout=timeout) as response:
        for _ in response.iter_raw():
            return time.perf_counter() - began
    return time.perf_counter() - began


def alone(backend: DockerBackend, spec: Any, first_wait: float, interval: float) -> float:
    """The container on its own: start, poll health, first byte of a reply."""
    began = time.perf_counter()
    container = backend.start(spec)
    try:
        time.sleep(first_wait)
        while True:
            current = backend.get(container.id)
            if current and current.host_port:
                try:
                    if httpx.get(current.url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(interval)
        assert current is not None
        waited = time.perf_counter() - began
        return waited + first_byte(current.url)
    finally:
        backend.stop(container.id, 5)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="swapctl-bench-"))
    (work / "models").mkdir()
    write_models(work / "models")
    instance = f"bench-{os.getpid()}"
    config_path = work / "swapctl.yaml"
    config_path.write_text(config_text(work / "models", instance))
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    log_path = work / "up.log"
    with log_path.open("w") as log:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swapctl",
                "up",
                "-c",
                str(config_path),
                "--listen",
                f"127.0.0.1:{port}",
                "--stop-on-exit",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    rows: list[str] = []
    cpu_per_request: list[float] = []
    try:
        for _ in range(200):
            try:
                if httpx.get(proxy + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        first_byte(proxy)  # starts m1
        status = httpx.get(proxy + "/running").json()["running"][0]
        direct = f"http://127.0.0.1:{status['host_port']}"
        at_rest = rss_mib(up.pid)

        peak = [at_rest]
        sampling = True

        def sample() -> None:
            while sampling:
                peak[0] = max(peak[0], rss_mib(up.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rows.append(
            "| case | clients | direct p50 ms | swapctl p50 ms | added p50 ms | direct p99 ms | swapctl p99 ms | added p99 ms | throughput swapctl/direct |"
        )
        rows.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        cases: list[
            tuple[str, Callable[[str], Callable[[httpx.AsyncClient], Awaitable[float]]], str, str]
        ] = [
            ("GET /health (passthrough)", get, direct + "/health", proxy + "/upstream/m1/health"),
            ("completion, plain", plain, direct, proxy),
            ("completion, stream (first chunk)", streamed, direct, proxy),
        ]
        for name, make, direct_url, proxy_url in cases:
            for clients in (1, 32):
                d_lat, d_rps = asyncio.run(load(clients, PHASE_S, make(direct_url)))
                cpu_before = cpu_seconds(up.pid)
                p_lat, p_rps = asyncio.run(load(clients, PHASE_S, make(proxy_url)))
                cpu_per_request.append((cpu_seconds(up.pid) - cpu_before) / max(1, len(p_lat)))
                d50, p50 = statistics.median(d_lat) * 1e3, statistics.median(p_lat) * 1e3
                d99, p99 = pct(d_lat, 0.99) * 1e3, pct(p_lat, 0.99) * 1e3
                rows.append(
                    f"| {name} | {clients} | {d50:.2f} | {p50:.2f} | {p50 - d50:+.2f} | {d99:.2f} | {p99:.2f} | {p99 - d99:+.2f} | {p_rps / d_rps:.0%} ({p_rps:.0f}/{d_rps:.0f} req/s) |"
                )
        sampling = False
        sampler.join()

        # swap overhead
        backend = DockerBackend()
        alone_config = parse_config(
            {**_yaml(config_path), "instance": f"{instance}-alone"}, templates=_templates(), base_dir=work
        )
        spec = build_spec(alone_config, "m1")
        cold: list[float] = []
        baseline: list[float] = []
        polled: list[float] = []
        for _ in range(COLD_RUNS):
            httpx.post(proxy + "/unload", timeout=60)
            cold.append(first_byte(proxy))
            httpx.post(proxy + "/unload", timeout=60)
            baseline.append(alone(backend, spec, 0.0, 0.005))
        for _ in range(3):
            polled.append(alone(backend, spec, 0.25, 1.0))
        decided = [float(x) for x in re.findall(r"decided in (\d+)us", log_path.read_text())]
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
    cold_ms, base_ms, polled_ms = (statistics.median(v) * 1e3 for v in (cold, baseline, polled))
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"Each phase {PHASE_S:g} s; medians and 99th percentiles of per-request latency.\n")
    print("\n".join(rows))
    print()
    print("| cold start to first byte (median of runs) | ms |")
    print("|---|---:|")
    print(f"| container alone, health polled every 5 ms (baseline, {len(baseline)} runs) | {base_ms:.0f} |")
    print(f"| through swapctl, request for a stopped model ({len(cold)} runs) | {cold_ms:.0f} |")
    print(f"| **swap overhead** (swapctl - baseline) | **{cold_ms - base_ms:+.0f}** |")
    print(
        f"| container alone, polled as llama-swap does (250 ms, then 1 s; {len(polled)} runs) | {polled_ms:.0f} |"
    )
    print()
    print(
        f"Solver decision inside live swaps: median {statistics.median(decided):.0f} us over {len(decided)} swaps."
    )
    print(f"Proxy RSS: {at_rest:.1f} MiB at rest, {peak[0]:.1f} MiB peak under load.")
    print(
        f"Proxy CPU per request (all phases): median {statistics.median(cpu_per_request) * 1e3:.2f} ms "
        f"(min {min(cpu_per_request) * 1e3:.2f}, max {max(cpu_per_request) * 1e3:.2f})."
    )


def _yaml(path: Path) -> dict[str, Any]:
    loaded = read_yaml(path)
    assert isinstance(loaded, dict)
    return loaded


def _templates() -> dict[str, dict[str, Any]]:
    return {"llama-server": load_template("llama-server", ROOT)}


if __name__ == "__main__":
    main()
