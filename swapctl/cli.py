"""The `swapctl` command. Builds the real objects and maps errors to exit codes in one place:
2 for a mistake in the input (configuration, a model name), 1 for a failure at run time.

A command imports what it uses inside itself: `plan` and `validate` must not pay for the
Docker SDK, the HTTP stack and the proxy (a second of imports) to read a file. The
container engine comes from `main(backend_factory=...)` through Typer's `ctx.obj`, so
tests run every command on the fake backend. What `up` serves is built in `swapctl.server`;
what runs, when no proxy answers, is read from the engine by `swapctl.lifecycle.observed`.
The program itself is `run`: `main` in a process of its own, its garbage collection tuned
for a start that ends soon.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from swapctl.errors import ConfigError, SwapctlError, UnknownModelError
from swapctl.owner import Ownership, find_owner, state_dir

if TYPE_CHECKING:
    from rich.console import Console

    from swapctl.backend import Backend, Container
    from swapctl.config import Config
    from swapctl.gpus import Inventory
    from swapctl.matrix import Decision
    from swapctl.measures import MeasureStore

BackendFactory = Callable[[], "Backend"]
InventoryFactory = Callable[[], "Inventory"]


def docker_backend() -> Backend:
    """The Docker engine; the SDK loads only for the commands that talk to it."""
    from swapctl.backend.docker import DockerBackend

    return DockerBackend()


def nvml_inventory() -> Inventory:
    """NVIDIA's GPUs through NVML; nvidia-ml-py loads only when the inventory is read."""
    from swapctl.gpus import NvmlInventory

    return NvmlInventory()


@dataclass(frozen=True)
class Runtime:
    """What the commands take from outside the config, set once by `main` and handed to
    each command as Typer's `ctx.obj`."""

    backend: BackendFactory = docker_backend
    inventory: InventoryFactory = nvml_inventory


def _engine(ctx: typer.Context) -> BackendFactory:
    """The backend factory `main` was given (Docker when the app runs without `main`)."""
    runtime = ctx.find_object(Runtime)
    return runtime.backend if runtime else docker_backend


def _gpus_of(ctx: typer.Context) -> InventoryFactory:
    """The GPU inventory factory `main` was given (NVML when the app runs without `main`)."""
    runtime = ctx.find_object(Runtime)
    return runtime.inventory if runtime else nvml_inventory


app = typer.Typer(
    help="Run many models, one container each, behind one OpenAI-compatible endpoint.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion: Typer's, for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    # Click's plain help: it loads no rich (a tenth of a second) and keeps "[default: ...]",
    # which rich's markup took for a style tag and dropped
    rich_markup_mode=None,
)


def _print_version(asked: bool) -> None:
    """--version: eager, so it answers before any command (and loads nothing of theirs)."""
    if asked:
        import swapctl

        print(f"swapctl {swapctl.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print swapctl's version and exit."
        ),
    ] = False,
) -> None:
    """Options before the command."""


config_app = typer.Typer(
    help="Inspect the configuration format, or make one from a Compose file.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(config_app, name="config")
templates_app = typer.Typer(
    help="The Compose templates a model can start from (template: NAME).", rich_markup_mode=None
)
app.add_typer(templates_app, name="templates")

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        envvar="SWAPCTL_CONFIG",
        help="Configuration file [default: $SWAPCTL_CONFIG, then ./swapctl.yaml].",
        show_default=False,
    ),
]
DEFAULT_CONFIG = Path("swapctl.yaml")
UrlOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--url", envvar="SWAPCTL_URL", help="The proxy's URL [default: from the config's listen]."),
]


def _stdout() -> Console:
    """A console for tables and markup; plain lines go through print(), without loading rich."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _load(path: Path) -> Config:
    """The configuration; pydantic, the costliest import of a command, loads here, not for --help."""
    from swapctl.config import load_config

    if not path.exists():
        raise ConfigError(str(path), "no such file (pass -c FILE or set SWAPCTL_CONFIG)")
    return load_config(path)


@app.command()
def init(
    ctx: typer.Context,
    model: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--model",
            "-m",
            help="ID=TEMPLATE[:MODELPATH], once per model: qwen=llama-cpp-cuda:/srv/models/qwen.gguf, "
            "whisper=speaches (swapctl templates lists the templates).",
            show_default=False,
        ),
    ] = None,
    listen: Annotated[str, typer.Option(help="HOST:PORT swapctl up serves on.")] = "127.0.0.1:8080",
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the config.")
    ] = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT when it exists.")] = False,
) -> None:
    """Write a starter config for this machine: its GPUs, one model per --model, a matrix to
    grow, with comments; `swapctl validate` then checks it."""
    from swapctl.gpus import NoGpu
    from swapctl.starter import parse_model_option, starter_config

    if output.exists() and not force:
        raise ConfigError(str(output), "already exists: pass --force to overwrite it, or -o FILE")
    choices = [parse_model_option(text) for text in model or ()]
    found = _gpus_of(ctx)().read()
    starter = starter_config(choices, found, listen, output.resolve().parent)
    try:
        output.write_text(starter.text, encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(output), f"cannot write: {error.strerror or error}") from None
    count = 0 if isinstance(found, NoGpu) else len(found.devices)
    print(f"wrote {output}: {len(choices)} model{'s' * (len(choices) != 1)}, {count} GPU{'s' * (count != 1)}")
    for note in starter.notes:
        print(f"note: {note}", file=sys.stderr)


@app.command()
def validate(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Check the configuration; exit 2 with the key path of the first error."""
    loaded = _load(config)
    models = len(loaded.models)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    from swapctl.config.hardware import fit_problems, footprint_notes
    from swapctl.measures import kept_footprints

    # A set that cannot fit the declared GPUs is an error, not a warning: the matrix promises
    # its models run together, and the broken promise would only show later, as a container
    # dying out of memory mid-request. Hardware declared wrongly is as much a config mistake.
    misfits, notes = fit_problems(loaded)
    notes += footprint_notes(loaded, kept_footprints(loaded, _measures(loaded)))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for misfit in misfits:
        print(f"error: {misfit}", file=sys.stderr)
    if misfits:
        raise typer.Exit(2)
    print(f"ok: {config}: {models} model{'s' * (models != 1)}, {loaded.policy.summary()}")


def _running_names(loaded: Config, running: str) -> list[str]:
    names = [name.strip() for name in running.split(",") if name.strip()]
    return sorted({loaded.resolve_any(name) for name in names})


def _print_decision(decision: Decision, requested: str) -> None:
    from rich.table import Table

    out = _stdout()
    named = requested if requested == decision.model else f"{requested} ({decision.model})"
    if decision.already_running:
        out.print(f"[bold]{named}[/] is running: the request is forwarded at once, nothing stops.")
        return
    if decision.set is None:
        out.print(f"[bold]{named}[/] is in no set: it runs alone.")
    table = Table(title=f"plan for {named}", title_justify="left")
    for column in ("", "set", "combination", "evict", "cost"):
        table.add_column(column, justify="right" if column == "cost" else "left")
    for rank, candidate in enumerate(decision.candidates):
        table.add_row(
            "->" if rank == 0 else "",
            candidate.set,
            ", ".join(candidate.combination),
            ", ".join(candidate.evict) or "-",
            str(candidate.cost),
            style="bold" if rank == 0 else None,
        )
    if decision.candidates:
        out.print(table)
    stops = ", ".join(decision.evict) if decision.evict else "nothing"
    chosen = f" in set '{decision.set}'" if decision.set else ""
    if decision.devices is not None:
        chosen += f" on GPU{'s' * (len(decision.devices) != 1)} {', '.join(map(str, decision.devices))}"
    out.print(f"start {decision.model}{chosen}; stop {stops} (cost {decision.cost})")


@app.command()
def plan(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model ID, alias or matrix var.")],
    config: ConfigOption = DEFAULT_CONFIG,
    running: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at run time
        typer.Option(help="Comma-separated models taken as running ('' for none) instead of asking Docker."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    url: UrlOption = None,
) -> None:
    """Preview what a request for MODEL would start and stop, changing nothing."""
    loaded = _load(config)
    target = loaded.resolve_any(model)
    placed: dict[str, tuple[int, ...]] = {}  # the GPUs containers were given: they stay there
    if running is None:
        from swapctl.lifecycle.observed import counted_running

        _, statuses = _live_statuses(loaded, url, _engine(ctx))
        names = counted_running(statuses)  # a model asleep counts as stopped
        placed = {s["model"]: tuple(s["gpus"]) for s in statuses if s.get("gpus")}
    else:
        names = _running_names(loaded, running)
    from swapctl.config import hardware
    from swapctl.matrix.fit import held_devices
    from swapctl.measures import costed_policy, effective_costs

    measures = _measures(loaded)
    every_cost = effective_costs(loaded, measures)
    policy = costed_policy(loaded, measures, every_cost).with_placement(placed)
    decision = policy.decide(target, names, explain=True)
    costs = {} if decision.already_running else {m: every_cost[m] for m in names if m != target}

    after = sorted({*names, target} - set(decision.evict))
    before_use = hardware.memory_use(loaded, names, placed)
    # the kept models stay where they are; the model goes where the decision placed it
    staying = {**held_devices(before_use), **({target: decision.devices} if decision.devices else {})}
    after_use = hardware.memory_use(loaded, after, staying)
    shown = hardware.shows_memory(loaded)
    if as_json:
        memory = {"before": hardware.use_json(before_use), "after": hardware.use_json(after_use)}
        costs_json = {"costs": {m: cost.to_json() for m, cost in costs.items()}}
        print(json.dumps({**decision.to_json(), **costs_json, **({"gpu_memory": memory} if shown else {})}))
        return
    _print_decision(decision, model)
    if costs:
        print("costs of the running models, and where each comes from:")
        width = max(len(m) for m in costs)
        for m, cost in costs.items():
            print(f"  {m:<{width}}  {cost.cost:>4}  {cost.source}")
    if shown:
        print("GPU memory, before -> after (a placement that fits, models without vram not counted):")
        for index in range(len(loaded.gpu_memory or ())):
            was, will = hardware.use_text(before_use, index), hardware.use_text(after_use, index)
            print(f"  GPU {index}: {was} -> {will}")


def _measures(loaded: Config) -> MeasureStore:
    """The measurements kept for the config's instance (in the user's state directory)."""
    from swapctl.measures import MeasureStore, measures_path

    return MeasureStore.load(measures_path(state_dir(), loaded.instance))


def _split_listen(listen: str) -> tuple[str, int]:
    """(host, port) by the config's own rule (`parse_listen`); IPv6 comes without brackets."""
    from swapctl.config import parse_listen

    try:
        return parse_listen(listen)
    except ValueError as error:
        raise ConfigError("--listen", str(error)) from None


@app.command()
def up(
    ctx: typer.Context,
    config: ConfigOption = DEFAULT_CONFIG,
    listen: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="HOST:PORT to serve on [default: the config's listen, 127.0.0.1:8080]."),
    ] = None,
    stop_on_exit: Annotated[
        bool,
        typer.Option(
            "--stop-on-exit/--keep-running",
            help="On Ctrl-C, stop the model containers, or leave them for the next `up` to adopt.",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every HTTP request.")] = False,
    watch_config: Annotated[
        bool,
        typer.Option(
            "--watch-config",
            help="Reload the config when its file (or the .env or a template beside it) changes; SIGHUP and "
            "POST /reload always reload it.",
        ),
    ] = False,
) -> None:
    """Run the proxy in the foreground: requests start and stop model containers."""
    loaded = _load(config)
    host, port = _split_listen(listen or loaded.listen)
    from swapctl import server  # uvicorn, Starlette and the proxy: only `up` loads them

    server.start_logging(loaded, host)
    backend = _engine(ctx)()
    ownership = Ownership(loaded.instance, _url_of(host, port), state_dir())
    serving = server.serve(
        loaded,
        backend,
        host,
        port,
        config,
        stop_on_exit=stop_on_exit,
        verbose=verbose,
        watch=watch_config,
        inventory=_gpus_of(ctx)(),
        measures=_measures(loaded),
    )
    try:
        server.run(serving)
    finally:
        ownership.release()


def _url_of(host: str, port: int) -> str:
    """Where a client on this machine reaches a proxy listening on host:port."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _proxy_url(loaded: Config, url: str | None) -> str:
    """--url, else the address of the `up` serving this instance, else the config's listen."""
    if url:
        return url.rstrip("/")
    owner = find_owner(loaded.instance, state_dir())
    return owner.url if owner else _url_of(*_split_listen(loaded.listen))


def _ask_proxy(loaded: Config, url: str | None, method: str, path: str, timeout: float = 30.0) -> Any | None:
    """The proxy's JSON answer, or None when no proxy answers there. One request through
    urllib: httpx's import alone (with the rich it loads) took a sixth of `status`."""
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    target = _proxy_url(loaded, url) + path
    if not target.lower().startswith(("http://", "https://")):
        return None  # no proxy answers a file: or ftp: URL (and urllib would open it)
    asked = urllib.request.Request(target, headers=_key(loaded), method=method)  # noqa: S310 - http(s) only
    try:
        with urllib.request.urlopen(asked, timeout=timeout) as response:  # noqa: S310 - http(s) only
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # an answer >= 400: the proxy's own message
        with error:
            text = error.read().decode(errors="replace")
        try:
            message = json.loads(text).get("error", {}).get("message", text)
        except (ValueError, AttributeError):
            message = text
        raise SwapctlError(message) from None
    except (OSError, HTTPException, ValueError):  # refused, reset, timed out, not a URL
        return None


def _key(loaded: Config) -> dict[str, str]:
    """The header that lets this command in: $SWAPCTL_API_KEY, else the config's first key."""
    key = os.environ.get("SWAPCTL_API_KEY") or next((k.get_secret_value() for k in loaded.api_keys), "")
    return {"authorization": f"Bearer {key}"} if key else {}


def _live_statuses(
    loaded: Config, url: str | None, backend: BackendFactory
) -> tuple[str, list[dict[str, Any]]]:
    """What runs: from the proxy when one is up, else from the containers' labels."""
    answer = _ask_proxy(loaded, url, "GET", "/running")
    if answer is not None:
        return "proxy", list(answer["models"])
    from swapctl.lifecycle import observed

    here = loaded.on("local")
    found = observed.read_statuses(here, backend().list(loaded.instance), observed.asleep, time.time())
    rows = [observed.to_json(status) for status in found]
    return "docker", rows + _statuses_on_hosts(loaded)


def _statuses_on_hosts(loaded: Config) -> list[dict[str, Any]]:
    """Each other host's models, from its engine's containers, `place` naming the host; a host
    whose engine does not answer is named and passed over."""
    from swapctl.backend.docker import DockerBackend
    from swapctl.lifecycle import observed

    rows: list[dict[str, Any]] = []
    for name in loaded.host_names[1:]:
        try:
            containers = DockerBackend(loaded.hosts[name]).list(loaded.instance)
        except SwapctlError as error:
            print(f"warning: host '{name}': {error}", file=sys.stderr)
            continue
        found = observed.read_statuses(loaded.on(name), containers, observed.asleep, time.time())
        rows += [{**observed.to_json(status), "place": name} for status in found]
    return rows


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    return (
        f"{value // 3600}h{value % 3600 // 60:02d}m" if value >= 3600 else f"{value // 60}m{value % 60:02d}s"
    )


@app.command()
def status(
    ctx: typer.Context,
    config: ConfigOption = DEFAULT_CONFIG,
    url: UrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="Keep the table up to date from the running proxy's events, with rates and the "
            "last swap, until Ctrl-C.",
        ),
    ] = False,
) -> None:
    """Show every configured model: state, container, port, uptime, idle time, requests."""
    loaded = _load(config)
    if watch:
        _watch(loaded, url)
        return
    source, statuses = _live_statuses(loaded, url, _engine(ctx))
    if as_json:
        print(json.dumps({"source": source, "models": statuses}))
        return
    from rich.table import Table

    title = "from the proxy" if source == "proxy" else "from Docker (no proxy answers)"
    table = Table(title=f"swapctl {loaded.instance}: models {title}", title_justify="left")
    on_gpus = any(s.get("gpus") or s.get("gpu_memory") for s in statuses)  # a column only then
    for column in ("model", "state", "container", "port", "up", "idle", "in flight", *("GPU",) * on_gpus):
        table.add_column(column, overflow="fold")
    for s in statuses:
        state = s["state"]
        colour = STATE_COLOURS.get(state)
        table.add_row(
            s["model"],
            f"[{colour}]{state}[/]" if colour else state,
            s["container"] or (f"@{s['place']}" if s.get("place") else "-"),
            str(s["host_port"] or "-"),
            _seconds(s["ready_seconds"]),
            _seconds(s["idle_seconds"]),
            "-" if s["in_flight"] is None else str(s["in_flight"]),
            *(_gpu_cell(s),) * on_gpus,
        )
    _stdout().print(table)


# A state's colour in the table, by its name in /running (the lifecycle's State values; a
# unit test holds them to it): named here, since importing the lifecycle's slot module (and
# asyncio with it) would take a tenth of `status` against a proxy.
STATE_COLOURS = {
    "ready": "green",
    "running": "green",  # a container's state as the engine words it (from Docker)
    "pulling": "yellow",
    "starting": "yellow",
    "stopping": "yellow",
    "sleeping": "blue",
}


def _gpu_cell(status: dict[str, Any]) -> str:
    """`1, 3` (the GPUs swapctl placed it on) and `18.2 GiB` (what it held once measured)."""
    placed = ", ".join(map(str, status.get("gpus") or ()))
    measured = status.get("gpu_memory")
    held = _gib(sum(measured.values())) if measured else ""
    return " ".join(part for part in (placed, held) if part) or "-"


def _gib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**30:.1f} GiB"


@app.command()
def gpus(
    ctx: typer.Context,
    config: ConfigOption = DEFAULT_CONFIG,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show each NVIDIA GPU: its memory, and the processes on it with the model each belongs
    to (found without a config too, then with no model names); no GPU is not an error."""
    from swapctl.gpus import NoGpu, mismatches, read_attributed

    loaded = _load(config) if config.exists() else None
    found = read_attributed(_gpus_of(ctx)(), lambda: _containers(ctx, loaded))
    declared = loaded.gpu_memory if loaded is not None else None
    mismatch = mismatches(declared, found) if declared is not None and not isinstance(found, NoGpu) else []
    if as_json:
        print(json.dumps({**found.to_json(), "mismatch": [m.to_json() for m in mismatch]}))
        return
    if isinstance(found, NoGpu):
        print(f"no GPU: {found.reason}")
        return
    from rich.table import Table

    table = Table(title="GPUs", title_justify="left")
    for column in ("gpu", "name", "memory used / total", "processes (pid, model, memory)"):
        table.add_column(column, overflow="fold")
    for device in found.devices:
        processes = [f"{p.pid}  {p.model or '-'}  {_gib(p.memory_used)}" for p in device.processes]
        table.add_row(
            f"{device.index}\n{device.uuid}",
            device.name,
            f"{_gib(device.memory_used)} / {_gib(device.memory_total)}",
            "\n".join(processes) or "-",
        )
    _stdout().print(table)
    for found_mismatch in mismatch:
        print(f"{'note' if found_mismatch.note else 'warning'}: {found_mismatch.line}")


def _containers(ctx: typer.Context, loaded: Config | None) -> list[Container]:
    """This instance's containers, to name the models of GPU processes; none without a
    config, or (with a warning) when the engine does not answer."""
    if loaded is None:
        return []
    try:
        return _engine(ctx)().list(loaded.instance)
    except SwapctlError as error:
        print(f"warning: cannot name the models of GPU processes: {error}", file=sys.stderr)
        return []


def _watch(loaded: Config, url: str | None) -> None:
    """The live table, from the proxy serving this instance; Ctrl-C ends it (exit 0)."""
    from swapctl.watch import watch

    title = f"swapctl {loaded.instance}: models, live from the proxy (Ctrl-C to quit)"
    try:
        watch(_proxy_url(loaded, url), _key(loaded), title, _stdout())
    except KeyboardInterrupt:
        return


@app.command()
def unload(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="Model ID or alias; all when absent.")] = None,  # noqa: UP045
    config: ConfigOption = DEFAULT_CONFIG,
    url: UrlOption = None,
) -> None:
    """Stop one model (or all), after the requests in flight finish."""
    loaded = _load(config)
    target = loaded.resolve_any(model) if model else None
    answer = _ask_proxy(loaded, url, "POST", f"/unload/{target}" if target else "/unload")
    if answer is not None:
        unloaded = list(answer["unloaded"])
    else:
        backend = _engine(ctx)()
        found = [c for c in backend.list(loaded.instance) if target in (None, c.model)]
        for container in found:
            backend.stop(container.id, loaded.stop_grace(container.model))
        unloaded = sorted({c.model for c in found})
    print(f"unloaded: {', '.join(unloaded) or 'nothing was running'}")


@app.command()
def reload(config: ConfigOption = DEFAULT_CONFIG, url: UrlOption = None) -> None:
    """Have the running `swapctl up` read its config file again (as SIGHUP does)."""
    loaded = _load(config)  # a file that does not parse is refused here, before asking
    answer = _ask_proxy(loaded, url, "POST", "/reload")
    if answer is None:
        raise SwapctlError(
            f"no swapctl up answers for instance '{loaded.instance}' at {_proxy_url(loaded, url)}"
        )
    parts = [
        f"{what}: {', '.join(answer.get(what) or []) or '-'}" for what in ("added", "removed", "replaced")
    ]
    parts.append(f"unchanged: {len(answer.get('unchanged') or [])}")
    if answer.get("needs_restart"):
        parts.append(f"not applied until swapctl up restarts: {', '.join(answer['needs_restart'])}")
    print("reloaded: " + "; ".join(parts))


@app.command()
def down(
    ctx: typer.Context,
    config: ConfigOption = DEFAULT_CONFIG,
    url: UrlOption = None,
    timeout: Annotated[
        float, typer.Option(min=0, max=3600, help="Seconds requests in flight get to finish.")
    ] = 10.0,
) -> None:
    """Stop and remove every container of this instance."""
    loaded = _load(config)
    answer = _ask_proxy(loaded, url, "POST", f"/unload?timeout={timeout:g}", timeout=timeout + 60)
    removed = set(answer["unloaded"]) if answer else set()
    backend = _engine(ctx)()
    for container in backend.list(loaded.instance):  # what no proxy stopped
        backend.stop(container.id, loaded.stop_grace(container.model))
        removed.add(container.model)
    removed |= _down_on_hosts(loaded)
    count = len(removed)
    print(f"removed {count} container{'s' * (count != 1)} of instance {loaded.instance}")


def _down_on_hosts(loaded: Config) -> set[str]:
    """Every container of the instance on each other host some model runs on, stopped (as
    `model@host`); a host whose engine does not answer is named and passed over."""
    from swapctl.backend.docker import DockerBackend

    removed: set[str] = set()
    for name in loaded.host_names[1:]:
        try:
            there = DockerBackend(loaded.hosts[name])
            for container in there.list(loaded.instance):
                there.stop(container.id, loaded.stop_grace(container.model))
                removed.add(f"{container.model}@{name}")
        except SwapctlError as error:
            print(f"warning: host '{name}': {error}", file=sys.stderr)
    return removed


@app.command()
def logs(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model ID, alias or matrix var.")],
    config: ConfigOption = DEFAULT_CONFIG,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    tail: Annotated[int, typer.Option(help="Lines from the end.")] = 100,
) -> None:
    """Print the logs of a model's container (on this machine, or on a host it runs on)."""
    loaded = _load(config)
    target = loaded.resolve_any(model)
    backend, container = _container_of(ctx, loaded, target)
    if not follow:
        sys.stdout.write(backend.logs(container.id, tail))
        return
    try:
        for line in backend.follow(container.id):
            print(line, flush=True)
    except KeyboardInterrupt:
        pass


def _container_of(ctx: typer.Context, loaded: Config, model: str) -> tuple[Backend, Container]:
    """The model's container and its engine: looked for on each host the model may run on,
    in the order its `hosts` names them."""
    hosts = loaded.models[model].hosts
    for host in hosts:
        backend = _backend_on(ctx, loaded, host)
        found = [c for c in backend.list(loaded.instance) if c.model == model]
        if found:
            return backend, found[0]
    where = f" on {', '.join(hosts)}" if len(loaded.host_names) > 1 else ""
    raise SwapctlError(f"model '{model}' has no container{where} (it is not running)")


def _backend_on(ctx: typer.Context, loaded: Config, host: str) -> Backend:
    """The engine of `host`: this machine's (`local`: the one `main` was given) or one under `hosts:`."""
    from swapctl.config.hosts import LOCAL_NAME

    if host == LOCAL_NAME:
        return _engine(ctx)()
    from swapctl.backend.docker import DockerBackend

    return DockerBackend(loaded.hosts[host])


@app.command()
def pull(
    ctx: typer.Context,
    models: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(
            help="Model IDs, aliases or matrix vars [default: every model whose pull_policy is not never].",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Pull the images of MODELs ahead of time, on each host they run on, with a progress bar
    per layer, using the credentials of your Docker config; exit 1 naming each model whose
    image failed."""
    from swapctl.pulls import pull_images

    loaded = _load(config)
    named = list(dict.fromkeys(loaded.resolve_any(model) for model in models or ()))
    targets = named or [m for m, found in loaded.models.items() if found.pull_policy != "never"]
    by_host: dict[str, dict[str, list[str]]] = {}  # host -> image -> the models that use it there
    for model in targets:
        for host in loaded.models[model].hosts:
            by_host.setdefault(host, {}).setdefault(loaded.models[model].image, []).append(model)
    console, failed = _stdout(), False
    for host, images in by_host.items():
        there = f" on host '{host}'" if len(loaded.host_names) > 1 else ""
        if there:
            console.print(f"host [bold]{host}[/]:")
        for model, error in pull_images(_backend_on(ctx, loaded, host), images, console):
            print(f"error: model '{model}'{there}: {error}", file=sys.stderr)
            failed = True
    if failed:
        raise typer.Exit(1)


@templates_app.callback(invoke_without_command=True)
def templates(ctx: typer.Context, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """List the templates: those in compose-templates/ beside the config, then swapctl's own."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from swapctl.config import list_templates

    table = Table(title="templates (template: NAME)", title_justify="left")
    for column in ("name", "engine", "image", "port", "health", "serves"):
        table.add_column(column, overflow="fold", no_wrap=column == "name")
    for found in list_templates(config.resolve().parent):
        port = "-" if found.port is None else str(found.port)
        table.add_row(found.name, found.engine, found.image, port, found.health, ", ".join(found.serves))
    _stdout().print(table)


@templates_app.command("show")
def show_template(
    name: Annotated[str, typer.Argument(help="The template's name, as `swapctl templates` lists it.")],
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Print a template's Compose file."""
    from swapctl.config import template_file
    from swapctl.config.templates import TEMPLATE_NAME

    path = template_file(name, config.resolve().parent) if TEMPLATE_NAME.fullmatch(name) else None
    if path is None:
        raise ConfigError("", f"no template '{name}' (swapctl templates lists them)")
    sys.stdout.write(path.read_text(encoding="utf-8"))


@config_app.command("schema")
def schema() -> None:
    """Print the JSON Schema of the configuration file, for editors."""
    from swapctl.config import json_schema

    print(json.dumps(json_schema(), indent=2))


@config_app.command("from-compose")
def from_compose(
    compose_file: Annotated[Path, typer.Argument(help="The Compose file (docker-compose.yml).")],
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output", "-o", help="Write the config here [default: print it]."),
    ] = None,
) -> None:
    """Print a swapctl config with one model per Compose service, ready to add a matrix to.
    Relative paths are rewritten to hold from the output file's folder (the Compose file's
    when printed)."""
    from swapctl.config.from_compose import from_compose as convert

    if not compose_file.is_file():
        raise ConfigError(str(compose_file), "no such file")
    text = convert(compose_file, output.resolve().parent if output else None)
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(output), f"cannot write: {error.strerror or error}") from None
    print(f"wrote {output}", file=sys.stderr)


def exit_code(error: SwapctlError) -> int:
    return 2 if isinstance(error, (ConfigError, UnknownModelError)) else 1


def main(
    argv: list[str] | None = None,
    backend_factory: BackendFactory = docker_backend,
    inventory_factory: InventoryFactory = nvml_inventory,
) -> None:
    """The entry point: runs a command with the engine `backend_factory` builds (and the GPU
    inventory `inventory_factory` builds), and turns swapctl's errors into one `error:` line
    and an exit code (never a traceback)."""
    try:
        app(args=argv, prog_name="swapctl", obj=Runtime(backend_factory, inventory_factory))
    except SwapctlError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(exit_code(error))
    except KeyboardInterrupt:
        sys.exit(130)


def run() -> None:
    """The `swapctl` program (the installed script, `python -m swapctl`): `main`, in a
    process that ends with it. A command's imports (pydantic's models, the Docker SDK)
    build tens of thousands of objects that live until exit: Python's cycle collector
    would walk them again and again while they load, freeing next to nothing, and take
    them apart one by one at exit: a fifth of `status`'s time, from Docker. So it starts
    after a second (a command that runs longer, `up` or `logs -f`, collects as usual), and
    what is left at exit is frozen out of the last collection: the operating system takes
    the memory back at once."""
    gc.disable()
    collecting = threading.Timer(1.0, gc.enable)
    collecting.daemon = True
    collecting.start()
    try:
        main()
    finally:
        gc.freeze()
