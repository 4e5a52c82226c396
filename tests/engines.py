"""A second, real Docker engine for tests of hosts: a dockerd in a network namespace of its
own (tests/netns.py), as another machine's engine is reached: over TCP with mutual TLS, and
over ssh (Debian's sshd inside the namespace, on its address). It never runs in this
machine's own network namespace, and never touches the local engine's containers.

    with SecondEngine.start(image="swapctl/llama-server:sid") as second:
        DockerBackend(second.tls_engine())   # tcp://ADDRESS:2376, the test's CA and client certificate
        DockerBackend(second.ssh_engine())   # ssh://root@ADDRESS, the test's key (see `ssh_home`)

Its state (data root, exec root, pid file, socket, certificates, keys) lives in the
namespace's folder; `close` removes its containers, stops it by PID, unmounts what a killed
dockerd leaves, and removes the namespace. The scripts/hosts.sh packages (sshd, iptables)
must be installed.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import docker
import docker.errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from netns import Namespace, run, stop_pid

from swapctl.config.hosts import Engine, Tls

TLS_PORT = 2376
SSH_PORT = 22
BRIDGE = "10.214.0.1/24"  # its docker0, inside its namespace: not the local engine's 172.17/16
POOLS = "base=10.215.0.0/16,size=24"  # its user-defined networks


@dataclass(frozen=True)
class Certificates:
    """A CA, the engine's certificate (for its address) and a client's, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, folder: Path, address: str) -> Certificates:
        folder.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swapctl test CA")])
        ca = _certificate(
            ca_name, ca_key, ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=0), True)]
        )
        made = cls(
            *(folder / name for name in ("ca.pem", "server.pem", "server-key.pem", "cert.pem", "key.pem"))
        )
        _write(made.ca, ca.public_bytes(serialization.Encoding.PEM))
        names = [x509.IPAddress(ipaddress.ip_address(address)), x509.DNSName("localhost")]
        for cert, key, usage, extra in (
            (
                made.server_cert,
                made.server_key,
                ExtendedKeyUsageOID.SERVER_AUTH,
                [x509.SubjectAlternativeName(names)],
            ),
            (made.client_cert, made.client_key, ExtendedKeyUsageOID.CLIENT_AUTH, []),
        ):
            own_key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cert.stem)])
            extensions = [(x509.ExtendedKeyUsage([usage]), False), *((e, False) for e in extra)]
            signed = _certificate(subject, own_key, ca_name, ca_key, extensions)
            _write(cert, signed.public_bytes(serialization.Encoding.PEM))
            _write(key, _pem_key(own_key))
        return made


def _certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, content: bytes, mode: int = 0o600) -> None:
    path.write_bytes(content)
    path.chmod(mode)


@dataclass
class SecondEngine:
    box: Namespace
    pid: int  # dockerd's
    socket: Path  # its unix socket, for the rig's own calls
    certificates: Certificates
    ssh_home: Path  # a HOME whose ~/.ssh has the key, its config and the engine's host key
    control: docker.DockerClient  # over `socket`: setup, cleanup and faults

    @classmethod
    def start(cls, image: str | None = None, ssh: bool = True) -> SecondEngine:
        """A dockerd in a new namespace, answering; `image` copied from the local engine."""
        box = Namespace.create()
        try:
            return cls._start(box, image, ssh)
        except BaseException:
            box.close()
            raise

    @classmethod
    def _start(cls, box: Namespace, image: str | None, ssh: bool) -> SecondEngine:
        root = box.state
        certificates = Certificates.make(root / "tls", box.address)
        socket = root / "docker.sock"
        (root / "daemon.json").write_text("{}")  # not the machine's /etc/docker/daemon.json
        pid = box.spawn(
            [
                "dockerd",
                f"--config-file={root / 'daemon.json'}",
                f"--data-root={root / 'data'}",
                f"--exec-root={root / 'exec'}",
                f"--pidfile={root / 'docker.pid'}",
                f"--host=unix://{socket}",
                f"--host=tcp://{box.address}:{TLS_PORT}",
                "--tlsverify",
                f"--tlscacert={certificates.ca}",
                f"--tlscert={certificates.server_cert}",
                f"--tlskey={certificates.server_key}",
                f"--bip={BRIDGE}",
                f"--default-address-pool={POOLS}",
                "--exec-opt=native.cgroupdriver=cgroupfs",
                f"--cgroup-parent={box.name}",  # its containers' processes, found by cgroup at teardown
            ],
            root / "dockerd.log",
        )
        control = _wait_for(socket, pid, root / "dockerd.log")
        home = root / "home"
        engine = cls(box, pid, socket, certificates, home, control)
        if ssh:
            engine._serve_ssh()
        if image is not None:
            engine.load(image)
        return engine

    def _serve_ssh(self) -> None:
        """sshd inside the box on its address, letting in the test's key only; its sessions'
        `docker` (the SDK runs `docker system dial-stdio`) talk to this engine's socket."""
        folder = self.box.state / "ssh"
        folder.mkdir()
        (self.ssh_home / ".ssh").mkdir(parents=True, mode=0o700)
        key, host_key = self.ssh_home / ".ssh" / "id_ed25519", folder / "host_ed25519"
        for path in (key, host_key):
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path))
        (folder / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        (folder / "sshd_config").write_text(
            f"ListenAddress {self.box.address}:{SSH_PORT}\n"
            f"HostKey {host_key}\n"
            f"PidFile {folder / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
            f"SetEnv DOCKER_HOST=unix://{self.socket}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "MaxSessions 64\n"  # the SDK opens a session per connection of its pool
        )
        host_public = Path(f"{host_key}.pub").read_text().split()
        (self.ssh_home / ".ssh" / "known_hosts").write_text(
            f"{self.box.address} {' '.join(host_public[:2])}\n"
        )
        (self.ssh_home / ".ssh" / "config").write_text(f"Host {self.box.address}\n  IdentityFile {key}\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        log = folder / "sshd.log"
        pid = self.box.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")], log)
        deadline = time.monotonic() + 20
        while self.box.execute(
            "bash", "-c", f"echo > /dev/tcp/{self.box.address}/{SSH_PORT}", check=False
        ).returncode:
            if time.monotonic() > deadline or not _running(pid):
                raise RuntimeError(f"sshd did not listen on {self.box.address}:{SSH_PORT}: {log.read_text()}")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return self.box.address

    def tls_engine(self, name: str = "gpu2", timeout: float = 10, client: bool = True) -> Engine:
        """This engine as a host's config names it: tcp://, the test's CA and (unless not
        `client`) its client certificate."""
        made = self.certificates
        tls = Tls(
            ca=made.ca, cert=made.client_cert if client else None, key=made.client_key if client else None
        )
        return Engine(name, f"tcp://{self.address}:{TLS_PORT}", tls, self.address, timeout)

    def ssh_engine(self, name: str = "gpu2-ssh", timeout: float = 10) -> Engine:
        return Engine(name, f"ssh://root@{self.address}:{SSH_PORT}", None, self.address, timeout)

    @contextlib.contextmanager
    def ssh_user(self) -> Iterator[None]:
        """HOME is the test user's, whose ~/.ssh the SDK reads as it connects over ssh."""
        before = os.environ.get("HOME")
        os.environ["HOME"] = str(self.ssh_home)
        try:
            yield
        finally:
            if before is None:
                del os.environ["HOME"]
            else:
                os.environ["HOME"] = before

    def load(self, image: str) -> None:
        """Copy `image` from the local engine (docker save | docker load)."""
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        try:
            loaded = subprocess.run(
                ["docker", "-H", f"unix://{self.socket}", "load", "-q"],
                stdin=save.stdout,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        finally:
            if save.stdout is not None:
                save.stdout.close()
            saved = save.wait(120)
        if saved or loaded.returncode:
            raise RuntimeError(f"cannot copy {image} to the second engine: {loaded.stderr.strip()}")

    def remove_containers(self) -> None:
        """Every container of this engine (they are all the tests')."""
        for container in self.control.containers.list(all=True):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)

    def kill(self) -> None:
        """SIGKILL the dockerd (its containers keep running, as on a machine whose engine crashed)."""
        stop_pid(self.pid, grace=0)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a killed engine answers nothing
            if _running(self.pid):
                self.remove_containers()
        self.control.close()
        self.box.close()

    def __enter__(self) -> SecondEngine:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(socket: Path, pid: int, log: Path, timeout: float = 60) -> docker.DockerClient:
    deadline = time.monotonic() + timeout
    while True:
        if socket.exists():
            client = docker.DockerClient(base_url=f"unix://{socket}", timeout=30)
            try:
                if client.ping():
                    return client
            except (docker.errors.DockerException, OSError):
                pass
            client.close()
        if not _running(pid) or time.monotonic() > deadline:
            lines = log.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError("the second dockerd did not answer:\n" + "\n".join(lines))
        time.sleep(0.1)


def engine_id(client: docker.DockerClient) -> str:
    """The engine's own ID (`docker info`): which engine a client reached."""
    return str(client.info()["ID"])
