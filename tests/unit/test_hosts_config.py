"""`hosts:`: other machines' Docker engines, resolved into Engine values (paths relative to
the config file, each checked), every error under its key path; `local` always there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from swapctl.backend.base import Container
from swapctl.backend.docker import DockerBackend, create_arguments
from swapctl.config import parse_config
from swapctl.config.hosts import LOCAL, Engine, Tls
from swapctl.errors import ConfigError, DaemonUnavailable
from swapctl.spec import build_spec


def _config(hosts: dict[str, Any], base_dir: Path) -> Any:
    return parse_config(
        {"models": {"a": {"image": "img"}}, "matrix": {"sets": {"s": "a"}}, "hosts": hosts}, base_dir=base_dir
    )


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / "certs").mkdir(exist_ok=True)
        (tmp_path / "certs" / name).write_text("PEM")
    return tmp_path


def test_without_hosts_there_is_the_local_engine(tmp_path: Path) -> None:
    config = parse_config(
        {"models": {"a": {"image": "img"}}, "matrix": {"sets": {"s": "a"}}}, base_dir=tmp_path
    )
    assert dict(config.hosts) == {"local": LOCAL}
    assert LOCAL.docker is None and LOCAL.address == "127.0.0.1"


def test_a_tls_host_resolves_its_paths_and_address(certs: Path) -> None:
    tls = {"ca": "certs/ca.pem", "cert": "certs/cert.pem", "key": "certs/key.pem"}
    config = _config({"gpu2": {"docker": "tcp://10.0.0.2:2376", "tls": tls, "timeout": 5}}, certs)
    assert config.hosts["gpu2"] == Engine(
        "gpu2",
        "tcp://10.0.0.2:2376",
        Tls(certs / "certs/ca.pem", certs / "certs/cert.pem", certs / "certs/key.pem"),
        "10.0.0.2",  # the URL's IP, absent an address
        5,
    )
    assert config.hosts["local"] == LOCAL


@pytest.mark.parametrize(
    ("host", "docker", "scheme", "context"),
    [
        ({"docker": "ssh://me@gpu3.lan", "address": "10.0.0.3"}, "ssh://me@gpu3.lan", "ssh", None),
        ({"docker": "gpu4", "address": "fd00::4"}, "gpu4", None, "gpu4"),
        (
            {"docker": "unix:///run/other.sock", "address": "127.0.0.1"},
            "unix:///run/other.sock",
            "unix",
            None,
        ),
    ],
)
def test_ssh_context_and_unix_hosts(
    host: dict[str, Any], docker: str, scheme: str | None, context: str | None, tmp_path: Path
) -> None:
    engine = _config({"h": host}, tmp_path).hosts["h"]
    assert (engine.docker, engine.scheme, engine.context, engine.address, engine.tls) == (
        docker,
        scheme,
        context,
        host["address"],
        None,
    )
    assert engine.where == f"host 'h' ({docker})"


@pytest.mark.parametrize(
    ("host", "path", "message"),
    [
        ({"docker": "tcp://10.0.0.2:2376", "tls": {"ca": "nope.pem"}}, "hosts.h.tls.ca", "file not found: "),
        (
            {"docker": "tcp://10.0.0.2:2376", "tls": {"ca": "certs/ca.pem", "cert": "certs/cert.pem"}},
            "hosts.h.tls",
            "needs its key",
        ),
        ({"docker": "tcp://10.0.0.2:2376", "tls": {}}, "hosts.h.tls", "verify needs the CA"),
        (
            {"docker": "ssh://10.0.0.2", "tls": {"verify": False}},
            "hosts.h.tls",
            "tls applies to a tcp:// engine",
        ),
        ({"docker": "http://10.0.0.2"}, "hosts.h.docker", "unknown scheme 'http://'"),
        ({"docker": "unix://run/x.sock", "address": "127.0.0.1"}, "hosts.h.docker", "needs an absolute path"),
        ({"docker": "not a context"}, "hosts.h.docker", "expected unix://PATH"),
        ({"docker": "tcp://gpu2.lan:2376"}, "hosts.h.address", "required key is missing"),
        (
            {"docker": "tcp://10.0.0.2:2376", "address": "gpu2.lan"},
            "hosts.h.address",
            "expected an IP address",
        ),
        ({"docker": "tcp://10.0.0.2:2376", "timeout": 0}, "hosts.h.timeout", "greater than 0"),
        ({"docker": "tcp://10.0.0.2:2376", "matrix": {"sets": 1}}, "hosts.h.matrix.sets", "valid dictionary"),
        ({}, "hosts.h.docker", "required key is missing"),
    ],
)
def test_errors_name_the_key_path(host: dict[str, Any], path: str, message: str, certs: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        _config({"h": host}, certs)
    assert raised.value.path == path
    assert message in raised.value.message


def test_local_is_taken(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        _config({"local": {"docker": "tcp://10.0.0.2:2376", "tls": {"verify": False}}}, tmp_path)
    assert raised.value.path == "hosts.local"
    assert "this machine's engine" in raised.value.message


def test_containers_publish_and_are_reached_on_the_engine_address(tmp_path: Path) -> None:
    spec = build_spec(_config({}, tmp_path), "a")
    assert create_arguments(spec)["ports"] == {f"{spec.port}/tcp": ("127.0.0.1", None)}
    assert create_arguments(spec, "10.0.0.2")["ports"] == {f"{spec.port}/tcp": ("10.0.0.2", None)}
    box = Container("id", "n", "a", "running", 49153, "h")
    assert box.url == "http://127.0.0.1:49153"
    assert Container("id", "n", "a", "running", 49153, "h", address="10.0.0.2").url == "http://10.0.0.2:49153"


def test_an_engine_that_is_not_there_is_named(tmp_path: Path) -> None:
    engine = Engine("gpu9", f"unix://{tmp_path}/docker.sock", address="127.0.0.1", timeout=2)
    backend = DockerBackend(engine)
    assert not backend.ping()
    with pytest.raises(DaemonUnavailable) as raised:
        backend.list("t")
    assert str(raised.value).startswith(
        f"cannot reach the Docker engine of host 'gpu9' (unix://{tmp_path}/docker.sock): "
    )
