"""Network namespaces for tests of several boxes on one machine: each `Namespace` is a box
with its own network stack, joined to this one by a veth pair on a private /30 of
10.213.0.0/16 (outside Docker's 172.16/12 and 192.168/16). Processes run inside it with
`spawn` (nsenter keeps the cgroup mounts that dockerd needs), faults are `link_down` (the
veth: no carrier) and `drop` (an iptables DROP inside it: a hang, not a refusal).

    with Namespace.create() as box:
        server = box.spawn(["python3", "-m", "http.server", "--bind", box.address, "8000"], log)
        ...

Everything a namespace holds lives under STATE/<its name>; `close` stops its processes by
PID, unmounts what they left mounted there, and removes the namespace and the folder, even
after a failure. A namespace is named `swt-<creator's PID>-<token>`: `create` first removes
those whose creator is gone (a run killed before its teardown).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

PREFIX = "swt-"
NETNS = Path("/run/netns")
STATE = Path("/tmp/swapctl-netns")
POOL = ipaddress.IPv4Network("10.213.0.0/16")
CGROUPS = Path("/sys/fs/cgroup")


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """A command of this namespace's; its error output in the failure when `check`."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, grace: float = 5) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; waits for the PID to be gone (or a zombie)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            if not _alive(pid) or _zombie(pid):
                return
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _cgroups(parent: str) -> list[Path]:
    """Cgroup `parent` (a child of the root) in every hierarchy: v2's one, or v1's each."""
    return [folder for folder in [CGROUPS / parent, *CGROUPS.glob(f"*/{parent}")] if folder.is_dir()]


def cgroup_pids(parent: str) -> set[int]:
    """The processes in cgroup `parent` and below it."""
    found: set[int] = set()
    for folder in _cgroups(parent):
        for procs in folder.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                found.update(int(line) for line in procs.read_text().split())
    return found


def remove_cgroups(parent: str) -> None:
    for folder in _cgroups(parent):
        for leaf in sorted([folder, *folder.rglob("*/")], key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                leaf.rmdir()


def unmount_below(root: Path) -> None:
    """Unmount (lazily) every mount at or below `root`, the deepest first: a killed dockerd
    leaves its data root bind-mounted and its containers' layers mounted."""
    prefix = str(root.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        run("umount", "-l", point, check=False)


@dataclass
class Namespace:
    name: str
    outside: str  # the veth's end in this (the machine's) namespace
    inside: str  # its end in the box
    gateway: str  # the outside end's address
    address: str  # the box's address, where its services listen
    state: Path  # its folder: STATE/<name>
    pids: list[int] = field(default_factory=list)  # what `spawn` started, stopped at `close`

    @classmethod
    def create(cls) -> Namespace:
        clean_stale()
        token = secrets.token_hex(3)
        name = f"{PREFIX}{os.getpid()}-{token}"
        state = STATE / name
        state.mkdir(parents=True)
        with _allocation():
            subnet = _free_subnet()
            gateway, address = (str(host) for host in subnet.hosts())
            box = cls(name, f"swt{token}o", f"swt{token}i", gateway, address, state)
            try:
                box._plumb(subnet.prefixlen)
            except BaseException:
                box.close()
                raise
        return box

    def _plumb(self, prefix: int) -> None:
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        run("ip", "link", "set", self.inside, "netns", self.name)
        run("ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.outside)
        run("ip", "link", "set", self.outside, "up")
        self.ip("addr", "add", f"{self.address}/{prefix}", "dev", self.inside)
        self.ip("link", "set", self.inside, "up")
        self.ip("link", "set", "lo", "up")

    def ip(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run("ip", "-n", self.name, *argv)

    def execute(
        self, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """A short command inside the box, its output captured."""
        return run("nsenter", f"--net={NETNS / self.name}", "--", *argv, check=check, timeout=timeout)

    def spawn(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> int:
        """A long-lived process inside the box, its output to `log`; its PID (nsenter execs it:
        the PID is the process's own), stopped at `close`."""
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["nsenter", f"--net={NETNS / self.name}", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=env,
            )
        self.pids.append(process.pid)
        return process.pid

    def link_down(self) -> None:
        """The cable pulled: the box's end of the veth down, this side left without carrier."""
        self.ip("link", "set", self.inside, "down")

    def link_up(self) -> None:
        self.ip("link", "set", self.inside, "up")

    def drop(self) -> None:
        """Every packet reaching the box is dropped: connections hang rather than fail."""
        self.execute("iptables", "-w", "-I", "INPUT", "1", "-i", self.inside, "-j", "DROP")

    def undrop(self) -> None:
        self.execute("iptables", "-w", "-D", "INPUT", "-i", self.inside, "-j", "DROP")

    def close(self) -> None:
        """Stop what runs in it by PID, unmount what is left, remove it and its folder."""
        for pid in reversed(self.pids):
            stop_pid(pid)
        _remove(self.name)

    def __enter__(self) -> Namespace:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _remove(name: str) -> None:
    """Everything of namespace `name`, whoever started its processes: they are the rig's."""
    found = run("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in {int(p) for p in found} | cgroup_pids(name):
        stop_pid(pid, grace=0)
    unmount_below(STATE / name)
    run("ip", "netns", "del", name, check=False)
    remove_cgroups(name)
    shutil.rmtree(STATE / name, ignore_errors=True)


def clean_stale() -> None:
    """Remove the namespaces (and their processes, mounts and folders) of runs that are gone."""
    names = {p.name for p in NETNS.glob(f"{PREFIX}*")} | {p.name for p in STATE.glob(f"{PREFIX}*")}
    for name in names:
        creator = name.removeprefix(PREFIX).partition("-")[0]
        if not creator.isdigit() or not _alive(int(creator)):
            _remove(name)


@contextlib.contextmanager
def _allocation() -> Iterator[None]:
    """One run at a time picks a subnet and puts it on its veth."""
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _free_subnet() -> ipaddress.IPv4Network:
    taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        ipaddress.ip_interface(word).network
        for line in run("ip", "-o", "-4", "addr", "show").stdout.splitlines()
        for word in line.split()[3:4]
    ]
    subnets: list[ipaddress.IPv4Network] = list(POOL.subnets(new_prefix=30))
    for subnet in random.sample(subnets, 64):
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise RuntimeError(f"no free /30 in {POOL}: {len(taken)} addresses taken")
