"""The top-level `network`: models join it, publish no port, and are reached at their
address there; configs without it keep their containers (same hash, same labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from docker.models.containers import _create_container_args

from swapctl.backend.docker import _from_inspect, _from_summary, create_arguments
from swapctl.config import parse_config
from swapctl.errors import ConfigError
from swapctl.spec import NETWORK, PORT, SPEC_HASH, ContainerSpec, _hashed, build_spec

API = "1.41"


def spec_of(top: dict[str, Any] | None = None, **keys: Any) -> ContainerSpec:
    document = {"models": {"m": {"image": "img", "port": 9000, **keys}}, **(top or {})}
    return build_spec(parse_config(document, base_dir=Path("/srv"), environ={}), "m")


def test_a_model_on_the_network_publishes_no_port_and_joins_it_at_creation() -> None:
    arguments = create_arguments(spec_of({"network": "swapnet"}))
    body = _create_container_args({**arguments, "version": API})
    assert "ports" not in arguments and "PortBindings" not in body["host_config"]
    assert body["host_config"]["NetworkMode"] == "swapnet"
    assert body["networking_config"] == {"swapnet": None}


def test_without_the_network_the_port_is_published_on_the_engine_address() -> None:
    arguments = create_arguments(spec_of(), "10.0.0.2")
    assert arguments["ports"] == {"9000/tcp": ("10.0.0.2", None)}
    assert "network" not in arguments


def test_the_models_own_networks_come_after_with_their_aliases_on_swapctls() -> None:
    spec = spec_of({"network": "swapnet"}, networks={"front": None, "swapnet": {"aliases": ["chat"]}})
    arguments = create_arguments(spec)
    assert arguments["network"] == "swapnet"
    assert arguments["networking_config"] == {"swapnet": {"Aliases": ["chat"]}}


def test_a_config_without_network_hashes_and_labels_as_before() -> None:
    plain, joined = spec_of(), spec_of({"network": "swapnet"})
    assert "network" not in _hashed(plain)
    assert NETWORK not in plain.labels and PORT not in plain.labels
    assert plain.labels[SPEC_HASH] != joined.labels[SPEC_HASH]  # a change of network replaces it
    assert (joined.labels[NETWORK], joined.labels[PORT]) == ("swapnet", "9000")


LABELS = {"swapctl.model": "m", NETWORK: "swapnet", PORT: "9000"}
ON_NET = {"swapnet": {"IPAddress": "172.30.0.5"}, "bridge": {"IPAddress": "172.17.0.9"}}


def inspected(labels: dict[str, str], networks: dict[str, Any], state: str = "running") -> dict[str, Any]:
    return {
        "Id": "c1",
        "Name": "/c1",
        "Config": {"Labels": labels},
        "State": {"Status": state},
        "NetworkSettings": {"Ports": {}, "Networks": networks},
    }


def summary(labels: dict[str, str], networks: dict[str, Any]) -> dict[str, Any]:
    return {"Id": "c1", "Names": ["/c1"], "Labels": labels, "State": "running", "Ports": [],
            "NetworkSettings": {"Networks": networks}}  # fmt: skip


@pytest.mark.parametrize(
    "read", [lambda n: _from_inspect(inspected(LABELS, n)), lambda n: _from_summary(summary(LABELS, n))]
)
def test_a_container_on_the_network_is_reached_at_its_address_there(read: Any) -> None:  # fmt: skip
    assert read(ON_NET).url == "http://172.30.0.5:9000"
    assert read({"swapnet": {"IPAddress": "", "GlobalIPv6Address": "fd00::5"}}).url == "http://[fd00::5]:9000"
    assert read({"swapnet": {"IPAddress": ""}}).host_port is None  # no address there yet: not reachable


def test_a_published_container_is_reached_on_the_engine_address() -> None:
    found = inspected({"swapctl.model": "m"}, ON_NET)
    found["NetworkSettings"]["Ports"] = {"9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "49153"}]}
    assert _from_inspect(found).url == "http://127.0.0.1:49153"


@pytest.mark.parametrize(
    ("document", "path", "words"),
    [
        ({"network": "host"}, "network", "expected a network's name"),
        ({"network": "swapnet", "models": {"m": {"image": "i", "network_mode": "bridge"}}},
         "models.m.network_mode", "top-level network 'swapnet'"),
    ],
)  # fmt: skip
def test_network_errors_name_the_key(document: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"models": {"m": {"image": "i"}}, **document}, environ={})
    assert raised.value.path == path and words in str(raised.value)
