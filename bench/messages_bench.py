"""Anthropic's Messages API through swapctl against the same container called directly, in
one run.

Run: .venv/bin/python bench/messages_bench.py [--rounds 7] [--requests 200]
(needs the Docker engine and image: `make images`). About a minute on 2 cores.

A real `swapctl up` starts one llama-server container (a tiny model); then each round sends
`--requests` sequential `POST /v1/messages` (max_tokens 1, so the model's own work is small
and the proxy's share shows) from one keep-alive HTTP client to each target, the targets'
order alternating from round to round:

- direct: the container's published port;
- swapctl: the proxy, routing by the body's `model`.

And the same for a streamed message: the time to the first body byte, each on a new
connection (llama-server closes its own after a stream). A figure is the
median over rounds of each round's median; "added" is swapctl's minus direct's in the same
round, "ratio" swapctl's over direct's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import timing  # noqa: E402
from storm_bench import remove_instance, write_models  # noqa: E402
from support import Proxy, llama_model, write_yaml  # noqa: E402
from timing import median_ms, print_comparison  # noqa: E402

import swapctl  # noqa: E402

IMAGE = "swapctl/llama-server:sid"
MESSAGE = {"model": "llm", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "x"}


def plain(client: httpx.Client, base: str) -> float:
    began = time.perf_counter()
    answer = client.post(f"{base}/v1/messages", json=MESSAGE, headers=HEADERS)
    took = time.perf_counter() - began
    assert answer.status_code == 200 and answer.json()["type"] == "message", answer.text
    return took


def first_byte(client: httpx.Client, base: str) -> float:
    return timing.first_byte(client, f"{base}/v1/messages", {**MESSAGE, "stream": True}, HEADERS)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=200, help="per target and workload in a round")
    args = parser.parse_args()
    engine = docker.from_env(version="auto", timeout=60)
    engine.images.get(IMAGE)
    instance = f"messages-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="messages-bench-") as folder:
        Path(folder).chmod(0o755)
        os.environ["SWAPCTL_STATE_DIR"] = str(Path(folder) / "state")
        models = write_models(Path(folder) / "models")
        config = {"instance": instance, "models": {"llm": llama_model(models, 1)}}
        proxy = Proxy(write_yaml(Path(folder) / "swapctl.yaml", config), instance, Path(folder))
        try:
            proxy.start()
            with httpx.Client(timeout=60) as client:
                plain(client, proxy.url)  # starts the model
                port = proxy.running()["llm"]["host_port"]
                targets = {"direct": f"http://127.0.0.1:{port}", "swapctl": proxy.url}
                where = Path(swapctl.__file__).parent.parent
                print(f"swapctl from {where}; {args.rounds} rounds x {args.requests} requests", flush=True)
                for base in targets.values():  # warm both paths' connections
                    median_ms(plain, client, base, 20)
                rows: dict[str, dict[str, list[float]]] = {"plain": {}, "first byte": {}}
                for number in range(args.rounds):
                    order = list(targets) if number % 2 == 0 else list(reversed(targets))
                    for workload, measure in (("plain", plain), ("first byte", first_byte)):
                        for name in order:
                            ms = median_ms(measure, client, targets[name], args.requests)
                            rows[workload].setdefault(name, []).append(ms)
        finally:
            proxy.close()
            remove_instance(engine, instance)
    engine.close()
    print_comparison(rows, "swapctl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
