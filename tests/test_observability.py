"""/logs and /metrics of a real `swapctl up` after real swaps."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from support import Proxy, llama_model, write_yaml

pytestmark = pytest.mark.docker


def test_logs_and_metrics_tell_what_happened(instance: str, models_dir: Path, tmp_path: Path) -> None:
    config = {
        "instance": instance,
        "models": {"a": llama_model(models_dir, 1), "b": llama_model(models_dir, 2)},
    }
    proxy = Proxy(write_yaml(tmp_path / "swapctl.yaml", config), instance, tmp_path)
    proxy.start()
    try:
        client = proxy.client()
        for model in ("a", "b"):  # one at a time: b evicts a
            client.chat.completions.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
        logs = httpx.get(f"{proxy.url}/logs", timeout=10).text
        assert "swap: a ready" in logs
        assert "swap: b ready" in logs
        assert "evicted a" in logs
        assert "llama_server: initializing" in httpx.get(f"{proxy.url}/logs/b", timeout=10).text
        metrics = httpx.get(f"{proxy.url}/metrics", timeout=10).text
        assert 'swapctl_requests_total{code="200",model="a"} 1.0' in metrics
        assert 'swapctl_model_evictions_total{model="a"} 1.0' in metrics
        assert 'swapctl_model_state{model="b",state="ready"} 1.0' in metrics
    finally:
        proxy.close()
