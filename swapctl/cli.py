"""The `swapctl` command. Builds the real objects and maps errors to exit codes in one place:
2 for a mistake in the input (configuration, a model name), 1 for a failure at run time."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from swapctl.config import Config, json_schema, load_config
from swapctl.errors import ConfigError, SwapctlError, UnknownModelError
from swapctl.matrix import Decision

app = typer.Typer(
    help="Run many models, one container each, behind one OpenAI-compatible endpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration format.", no_args_is_help=True)
app.add_typer(config_app, name="config")

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


def _stdout() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _load(path: Path) -> Config:
    if not path.exists():
        raise ConfigError(str(path), "no such file (pass -c FILE or set SWAPCTL_CONFIG)")
    return load_config(path)


@app.command()
def validate(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Check the configuration; exit 2 with the key path of the first error."""
    loaded = _load(config)
    models = len(loaded.models)
    _stdout().print(f"ok: {config}: {models} model{'s' * (models != 1)}, {loaded.policy.summary()}")


def _running_names(loaded: Config, running: str) -> list[str]:
    names = [name.strip() for name in running.split(",") if name.strip()]
    return sorted({loaded.resolve_any(name) for name in names})


def _print_decision(decision: Decision, requested: str) -> None:
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
    out.print(f"start {decision.model}{chosen}; stop {stops} (cost {decision.cost})")


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="Model ID, alias or matrix var.")],
    config: ConfigOption = DEFAULT_CONFIG,
    running: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at run time
        typer.Option(help="Comma-separated models taken as running ('' for none) instead of asking Docker."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Preview what a request for MODEL would start and stop, changing nothing."""
    loaded = _load(config)
    target = loaded.resolve_any(model)
    if running is None:
        raise SwapctlError("reading what runs from Docker is not available yet: pass --running")
    decision = loaded.policy.decide(target, _running_names(loaded, running), explain=True)
    if as_json:
        print(json.dumps(decision.to_json()))
    else:
        _print_decision(decision, model)


@config_app.command("schema")
def schema() -> None:
    """Print the JSON Schema of the configuration file, for editors."""
    print(json.dumps(json_schema(), indent=2))


def exit_code(error: SwapctlError) -> int:
    return 2 if isinstance(error, (ConfigError, UnknownModelError)) else 1


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="swapctl")
    except SwapctlError as error:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {error}", markup=False)
        sys.exit(exit_code(error))
