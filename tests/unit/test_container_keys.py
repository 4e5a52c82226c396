"""Each Compose key a model server needs, from the config to what Docker receives: the
keywords `create_arguments` gives the SDK, and the HostConfig the SDK builds from them
(docker-py's own conversion, run here without a daemon), key by key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from docker.models.containers import _create_container_args

from swapctl.backend.docker import create_arguments
from swapctl.config import DeviceRequest, Network, Ulimit, json_schema, parse_config
from swapctl.errors import ConfigError
from swapctl.spec import ContainerSpec, build_spec

API = "1.41"  # the Docker engine of the machines swapctl is tested on


def spec_of(**keys: Any) -> ContainerSpec:
    config = parse_config({"models": {"m": {"image": "img", **keys}}}, base_dir=Path("/srv"), environ={})
    return build_spec(config, "m")


def sent(spec: ContainerSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the create request's body without HostConfig, its HostConfig), as docker-py sends them."""
    body = _create_container_args({**create_arguments(spec), "version": API})
    return body, dict(body.pop("host_config"))


@pytest.mark.parametrize(
    ("keys", "argument", "host_config"),
    [
        (
            {"ulimits": {"nofile": {"soft": 1024, "hard": "4096"}, "memlock": -1}},
            {
                "ulimits": [
                    {"Name": "nofile", "Soft": 1024, "Hard": 4096},
                    {"Name": "memlock", "Soft": -1, "Hard": -1},
                ]
            },
            {
                "Ulimits": [
                    {"Name": "nofile", "Soft": 1024, "Hard": 4096},
                    {"Name": "memlock", "Soft": -1, "Hard": -1},
                ]
            },
        ),
        ({"runtime": "nvidia"}, {"runtime": "nvidia"}, {"Runtime": "nvidia"}),
        ({"group_add": ["video", 44]}, {"group_add": ["video", "44"]}, {"GroupAdd": ["video", "44"]}),
        (
            {"security_opt": ["seccomp=unconfined", "no-new-privileges"]},
            {"security_opt": ["seccomp=unconfined", "no-new-privileges"]},
            {"SecurityOpt": ["seccomp=unconfined", "no-new-privileges"]},
        ),
        (
            {"cap_add": ["SYS_NICE", "CAP_IPC_LOCK"]},
            {"cap_add": ["SYS_NICE", "CAP_IPC_LOCK"]},
            {"CapAdd": ["SYS_NICE", "CAP_IPC_LOCK"]},
        ),
        ({"cap_drop": ["ALL"]}, {"cap_drop": ["ALL"]}, {"CapDrop": ["ALL"]}),
        ({"tmpfs": "/scratch"}, {"tmpfs": {"/scratch": ""}}, {"Tmpfs": {"/scratch": ""}}),
        (
            {"tmpfs": ["/run:size=64m", "/tmp:mode=1777,size=1g"]},
            {"tmpfs": {"/run": "size=64m", "/tmp": "mode=1777,size=1g"}},
            {"Tmpfs": {"/run": "size=64m", "/tmp": "mode=1777,size=1g"}},
        ),
        ({"ipc": "host"}, {"ipc_mode": "host"}, {"IpcMode": "host"}),
        ({"shm_size": "8g"}, {"shm_size": "8g"}, {"ShmSize": 8 * 2**30}),
        ({"mem_limit": "1.5g"}, {"mem_limit": 1536 * 2**20}, {"Memory": 1536 * 2**20}),
        ({"mem_limit": 2**30}, {"mem_limit": 2**30}, {"Memory": 2**30}),
        ({"cpus": 1.5}, {"nano_cpus": 1_500_000_000}, {"NanoCpus": 1_500_000_000}),
        ({"cpus": "0.25"}, {"nano_cpus": 250_000_000}, {"NanoCpus": 250_000_000}),
        (
            {"deploy": {"resources": {"limits": {"cpus": "2", "memory": "512m"}}}},
            {"nano_cpus": 2_000_000_000, "mem_limit": 512 * 2**20},
            {"NanoCpus": 2_000_000_000, "Memory": 512 * 2**20},
        ),
        (
            {
                "cpus": 2,
                "mem_limit": "512m",
                "deploy": {"resources": {"limits": {"cpus": 2.0, "memory": 512 * 2**20}}},
            },
            {"nano_cpus": 2_000_000_000, "mem_limit": 512 * 2**20},
            {"NanoCpus": 2_000_000_000, "Memory": 512 * 2**20},
        ),
        (
            {"extra_hosts": ["db:10.0.0.5", "gw=host-gateway", "v6:::1"]},
            {"extra_hosts": ["db:10.0.0.5", "gw:host-gateway", "v6:::1"]},
            {"ExtraHosts": ["db:10.0.0.5", "gw:host-gateway", "v6:::1"]},
        ),
        (
            {"extra_hosts": {"db": "10.0.0.5", "multi": ["10.0.0.6", "[fe80::1]"]}},
            {"extra_hosts": ["db:10.0.0.5", "multi:10.0.0.6", "multi:fe80::1"]},
            {"ExtraHosts": ["db:10.0.0.5", "multi:10.0.0.6", "multi:fe80::1"]},
        ),
        ({"network_mode": "bridge"}, {"network_mode": "bridge"}, {"NetworkMode": "bridge"}),
        ({"network_mode": "models-net"}, {"network_mode": "models-net"}, {"NetworkMode": "models-net"}),
        ({"networks": ["models-net"]}, {"network": "models-net"}, {"NetworkMode": "models-net"}),
    ],
)
def test_each_key_reaches_docker(
    keys: dict[str, Any], argument: dict[str, Any], host_config: dict[str, Any]
) -> None:
    spec = spec_of(**keys)
    arguments = create_arguments(spec)
    assert {key: arguments[key] for key in argument} == argument
    _, sent_host_config = sent(spec)
    assert {key: sent_host_config[key] for key in host_config} == host_config


def test_without_new_keys_the_request_is_what_it_was() -> None:
    """Nothing new is sent for a model that uses none of the new keys."""
    arguments = create_arguments(spec_of(command=["-m", "x"], gpus=1))
    assert set(arguments) == {
        "image", "name", "command", "environment", "volumes", "labels", "ports", "init", "detach", "device_requests",
    }  # fmt: skip
    assert arguments["ports"] == {"8080/tcp": ("127.0.0.1", None)}


# docker-py's DeviceRequest sends Count 0 with device IDs, and no IDs as []
GPU_ALL = {"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}


@pytest.mark.parametrize(
    ("keys", "requests"),
    [
        ({"gpus": "all"}, [GPU_ALL]),
        ({"gpus": 2}, [{**GPU_ALL, "Count": 2}]),
        ({"gpus": ["0", 3]}, [{**GPU_ALL, "Count": 0, "DeviceIDs": ["0", "3"]}]),
        # Compose's form: the same request as gpus (the driver as written)
        ({"deploy": {"resources": {"reservations": {"devices": [{"capabilities": ["gpu"]}]}}}}, [GPU_ALL]),
        (
            {
                "deploy": {
                    "resources": {
                        "reservations": {
                            "devices": [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
                        }
                    }
                }
            },
            [{**GPU_ALL, "Driver": "nvidia"}],
        ),
        (
            {
                "deploy": {
                    "resources": {
                        "reservations": {
                            "devices": [{"driver": "nvidia", "count": 1, "capabilities": ["gpu", "utility"]}]
                        }
                    }
                }
            },
            [{**GPU_ALL, "Driver": "nvidia", "Count": 1, "Capabilities": [["gpu", "utility"]]}],
        ),
        (
            {
                "deploy": {
                    "resources": {
                        "reservations": {
                            "devices": [
                                {"device_ids": ["0", 1], "capabilities": ["gpu"], "options": {"a": "b"}}
                            ]
                        }
                    }
                }
            },
            [{**GPU_ALL, "Count": 0, "DeviceIDs": ["0", "1"], "Options": {"a": "b"}}],
        ),
    ],
)
def test_gpu_device_requests(keys: dict[str, Any], requests: list[dict[str, Any]]) -> None:
    _, host_config = sent(spec_of(**keys))
    assert host_config["DeviceRequests"] == requests


def test_networks_beyond_the_first_are_joined_after_creation() -> None:
    spec = spec_of(networks={"front": {"aliases": ["chat"]}, "back": None})
    assert spec.networks == (Network("front", ("chat",)), Network("back"))
    arguments = create_arguments(spec)
    assert (arguments["network"], arguments["networking_config"]) == (
        "front",
        {"front": {"Aliases": ["chat"]}},
    )
    body, host_config = sent(spec)
    assert body["networking_config"] == {"EndpointsConfig": {"front": {"Aliases": ["chat"]}}}
    assert host_config["NetworkMode"] == "front"
    assert host_config["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}


@pytest.mark.parametrize(
    ("keys", "path", "message"),
    [
        ({"ulimits": {"nofiles": 5}}, "models.m.ulimits", "unknown ulimit 'nofiles'"),
        (
            {"ulimits": {"nofile": {"soft": 10, "hard": 5}}},
            "models.m.ulimits",
            "nofile: the soft limit 10 is above the hard limit 5",
        ),
        ({"ulimits": {"nofile": {"soft": 10}}}, "models.m.ulimits", "nofile: expected {soft: N, hard: N}"),
        ({"ulimits": {"nproc": "lots"}}, "models.m.ulimits", "nproc: expected a limit from -1"),
        ({"ulimits": [1]}, "models.m.ulimits", "expected a mapping"),
        ({"runtime": "no spaces"}, "models.m.runtime", "string should match pattern"),
        ({"group_add": "video"}, "models.m.group_add", "expected a list of group names or IDs"),
        ({"cap_add": ["sys nice"]}, "models.m.cap_add", "expected a list of Linux capabilities"),
        ({"security_opt": ["Seccomp unconfined"]}, "models.m.security_opt", "expected a list of options"),
        ({"tmpfs": "relative"}, "models.m.tmpfs", "expected an absolute path"),
        ({"tmpfs": ["/a", "/a:size=1m"]}, "models.m.tmpfs", "a path is mounted twice"),
        ({"mem_limit": "1m"}, "models.m.mem_limit", "expected a size of at least 6291456 bytes"),
        ({"mem_limit": "lots"}, "models.m.mem_limit", "expected a size in bytes"),
        ({"cpus": 0}, "models.m.cpus", "expected a number of CPUs above 0"),
        ({"cpus": float("nan")}, "models.m.cpus", "expected a number of CPUs above 0"),
        ({"cpus": True}, "models.m.cpus", "expected a number of CPUs above 0"),
        ({"extra_hosts": ["db"]}, "models.m.extra_hosts", "expected 'name:IP' or 'name=IP'"),
        (
            {"extra_hosts": ["db:not-an-ip"]},
            "models.m.extra_hosts",
            "db: expected an IP address or host-gateway",
        ),
        (
            {"network_mode": "host"},
            "models.m.network_mode",
            "'host' is not supported: swapctl reaches a model",
        ),
        ({"network_mode": "none"}, "models.m.network_mode", "'none' is not supported"),
        ({"network_mode": "container:db"}, "models.m.network_mode", "'container:db' is not supported"),
        ({"networks": ["default"]}, "models.m.networks", "expected the name of a network created with"),
        (
            {"networks": {"n": {"ipv4_address": "10.0.0.2"}}},
            "models.m.networks",
            "n.ipv4_address: only 'aliases'",
        ),
        (
            {"network_mode": "bridge", "networks": ["n"]},
            "models.m",
            "'network_mode' and 'networks' cannot be used together",
        ),
        ({"pull_policy": "build"}, "models.m.pull_policy", "'build' is not supported"),
        (
            {"pull_policy": "daily"},
            "models.m.pull_policy",
            "expected missing, if_not_present, always or never",
        ),
        (
            {"cpus": 1, "deploy": {"resources": {"limits": {"cpus": 2}}}},
            "models.m",
            "'cpus' and 'deploy.resources.limits.cpus' differ",
        ),
        (
            {"mem_limit": "1g", "deploy": {"resources": {"limits": {"memory": "2g"}}}},
            "models.m",
            "'mem_limit' and",
        ),
        (
            {
                "gpus": "all",
                "deploy": {"resources": {"reservations": {"devices": [{"capabilities": ["gpu"]}]}}},
            },
            "models.m",
            "'gpus' and 'deploy.resources.reservations.devices' both ask for GPUs",
        ),
        (
            {
                "deploy": {
                    "resources": {
                        "reservations": {
                            "devices": [{"capabilities": ["gpu"], "count": 1, "device_ids": ["0"]}]
                        }
                    }
                }
            },
            "models.m.deploy.resources.reservations.devices.0",
            "'count' and 'device_ids' cannot be used together",
        ),
        (
            {"deploy": {"resources": {"reservations": {"devices": [{"driver": "nvidia"}]}}}},
            "models.m.deploy.resources.reservations.devices.0.capabilities",
            "required key is missing",
        ),
        (
            {"deploy": {"resources": {"reservations": {"devices": [{"capabilities": ["gpu"], "count": 0}]}}}},
            "models.m.deploy.resources.reservations.devices.0.count",
            "expected `all` or a count from 1",
        ),
    ],
)
def test_bad_values_name_their_key(keys: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        spec_of(**keys)
    assert caught.value.path == path
    assert caught.value.message.startswith(message), caught.value.message


def test_pull_policy_is_kept_but_changes_no_container() -> None:
    assert spec_of().pull_policy == "missing"
    assert spec_of(pull_policy="if_not_present").pull_policy == "missing"
    never, always = spec_of(pull_policy="never"), spec_of(pull_policy="always")
    assert (never.pull_policy, always.pull_policy) == ("never", "always")
    assert never.spec_hash == always.spec_hash == spec_of().spec_hash


def test_the_hash_of_a_model_without_new_keys_did_not_change() -> None:
    """Pinned: computed by the spec code before these keys existed, so containers started
    before an upgrade are adopted after it."""
    config = parse_config(
        {
            "models": {
                "a": {
                    "image": "i",
                    "gpus": "all",
                    "shm_size": "1g",
                    "environment": {"A": "1"},
                    "command": "x y",
                }
            }
        },
        environ={},
    )
    assert build_spec(config, "a").spec_hash == "54ebf7650f04f230"


@pytest.mark.parametrize(
    "keys",
    [
        {"ulimits": {"nofile": 1024}},
        {"runtime": "runc"},
        {"group_add": ["video"]},
        {"security_opt": ["no-new-privileges"]},
        {"cap_add": ["SYS_NICE"]},
        {"cap_drop": ["NET_RAW"]},
        {"tmpfs": "/scratch"},
        {"mem_limit": "1g"},
        {"cpus": 1},
        {"deploy": {"resources": {"limits": {"cpus": 1}}}},
        {"deploy": {"resources": {"reservations": {"devices": [{"capabilities": ["gpu"]}]}}}},
        {"extra_hosts": ["db:10.0.0.5"]},
        {"network_mode": "bridge"},
        {"networks": ["n"]},
    ],
)
def test_each_new_key_is_in_the_hash(keys: dict[str, Any]) -> None:
    assert spec_of(**keys).spec_hash != spec_of().spec_hash


def test_the_values_are_frozen() -> None:
    spec = spec_of(
        ulimits={"nofile": 8},
        deploy={"resources": {"reservations": {"devices": [{"capabilities": ["gpu"]}]}}},
    )
    assert spec.ulimits == (Ulimit("nofile", 8, 8),)
    assert spec.device_requests == (DeviceRequest("", -1, (), ("gpu",), {}),)
    with pytest.raises(AttributeError):
        spec.ulimits[0].soft = 1  # type: ignore[misc]


def test_the_schema_knows_every_key() -> None:
    model = {
        "image": "img",
        "x-note": "extension fields are allowed",
        "env_file": [".env", {"path": "extra.env", "required": False}],
        "ulimits": {"nofile": {"soft": 1, "hard": "2"}, "memlock": -1},
        "runtime": "nvidia",
        "group_add": ["video", 44],
        "security_opt": ["seccomp=unconfined"],
        "cap_add": ["SYS_NICE"],
        "cap_drop": ["ALL"],
        "tmpfs": "/scratch",
        "mem_limit": "1g",
        "cpus": 1.5,
        "deploy": {
            "resources": {
                "limits": {"cpus": "1.5", "memory": "1g"},
                "reservations": {"devices": [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]},
            }
        },
        "extra_hosts": {"db": "10.0.0.5"},
        "networks": {"n": {"aliases": ["a"]}},
        "pull_policy": "never",
    }
    document = {"x-anchors": {"any": "thing"}, "models": {"m": model}}
    jsonschema.validate(document, json_schema())
    parse_config(document, base_dir=Path("/srv"), environ={}, env_file_texts={Path("/srv/.env"): "A=1\n"})
    for bad in (
        {"network_mode": "host"},
        {"pull_policy": "build"},
        {"ulimits": {"nofiles": 1}},
        {"cpus": 0},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"models": {"m": {"image": "img", **bad}}}, json_schema())
