"""The storm of tests/storm.py, run N times with different seeds, each on a fresh `swapctl up`
and a fresh instance, counted: the figures behind "storm x10: 0 lost of N".

Run: .venv/bin/python bench/storm_bench.py [--repeat 10] [--seed 1] [--clients 16]
     [--burst 8] [--seconds 22] [--no-matrix]
(the test's burst without a matrix: --no-matrix --clients 32 --seconds 6)
Needs the Docker engine and the image swapctl/llama-server:sid (`make docker images`); writes
the tiny models itself. A round takes about 30 s on 2 cores.

Per run: requests sent, completed, lost (neither complete nor abandoned by their own client,
by message), abandoned, Docker samples showing a set the matrix forbids, and whether anything
wedged (a client that never ended, a model not ready or stopped 10 s after the clients
stopped, a model that did not answer one more request, `up` exiting). Then the totals. The
exit status is 1 when any run lost a request, broke the matrix or wedged.

swapctl is imported (here and by `python -m swapctl up`) from sys.path: to run the storm
against another tree, e.g. a commit exported with `git archive`, run from elsewhere with
PYTHONPATH=TREE.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import docker
import docker.errors
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the storm and the Proxy live with the tests

from storm import Report, Storm, run_storm, storm_config  # noqa: E402
from support import Proxy  # noqa: E402

import swapctl  # noqa: E402
from swapctl.spec import INSTANCE  # noqa: E402

IMAGE = "swapctl/llama-server:sid"


def write_models(folder: Path) -> Path:
    """seed-1.gguf to seed-3.gguf in `folder`, as the tests' models_dir has them."""
    spec = importlib.util.spec_from_file_location("swapctl_tiny_gguf", ROOT / "scripts" / "tiny_gguf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder.mkdir()
    for seed in (1, 2, 3):
        module.write_tiny_model(folder / f"seed-{seed}.gguf", seed)
    folder.chmod(0o755)
    return folder


def remove_instance(engine: docker.DockerClient, instance: str) -> None:
    for container in engine.containers.list(all=True, filters={"label": f"{INSTANCE}={instance}"}):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


def one_run(storm: Storm, engine: docker.DockerClient, models: Path, workdir: Path) -> Report:
    # past 16 clients, a concurrencyLimit no model can reach, as the tests give theirs
    concurrency = storm.clients if storm.clients > 16 else None
    instance = f"storm-{uuid.uuid4().hex[:8]}"
    workdir.mkdir()
    proxy = Proxy(
        storm_config(workdir / "swapctl.yaml", instance, models, storm.matrix, concurrency), instance, workdir
    )
    try:
        proxy.start()
        return run_storm(storm, proxy, engine)
    finally:
        proxy.close()
        remove_instance(engine, instance)


def line(number: int, report: Report) -> str:
    settled = "-" if report.settle_seconds is None else f"{report.settle_seconds:.1f}s"
    return (
        f"run {number:2d}  seed {report.storm.seed:4d}: sent {report.sent:4d}  completed {report.completed:4d}  "
        f"lost {report.lost:3d}  abandoned {report.abandoned:3d}  "
        f"forbidden {sum(report.forbidden.values())}/{report.samples}  "
        f"wedge {'yes' if report.wedged else 'no '}  settled {settled}  {report.seconds:.1f}s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=10, help="runs, each with its own seed")
    parser.add_argument("--seed", type=int, default=1, help="the first run's seed; the next ones count up")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--burst", type=int, help="clients whose first request goes at once (default: half)")
    parser.add_argument(
        "--seconds", type=float, default=22.0, help="after this, clients start no new request"
    )
    parser.add_argument("--no-matrix", action="store_true", help="no matrix: one model at a time")
    args = parser.parse_args()

    engine = docker.from_env(version="auto", timeout=60)
    engine.images.get(IMAGE)  # fails here, clearly, without the image
    reports: list[Report] = []
    with tempfile.TemporaryDirectory(prefix="storm-bench-") as folder:
        Path(folder).chmod(0o755)  # the containers read the models as whatever user they run as
        os.environ["SWAPCTL_STATE_DIR"] = str(Path(folder) / "state")  # locks and measures, not the user's
        models = write_models(Path(folder) / "models")
        print(f"swapctl from {Path(swapctl.__file__).parent.parent}; {args.repeat} runs", flush=True)
        for number in range(1, args.repeat + 1):
            storm = Storm(
                seed=args.seed + number - 1,
                clients=args.clients,
                burst=args.clients // 2 if args.burst is None else args.burst,
                seconds=args.seconds,
                matrix=not args.no_matrix,
            )
            try:
                report = one_run(storm, engine, models, Path(folder) / f"run-{number}")
            except (Exception, pytest.fail.Exception) as error:
                print(f"run {number:2d}  seed {storm.seed}: could not run: {error}", flush=True)
                return 2
            reports.append(report)
            print(line(number, report), flush=True)
            if report.failures:
                print(report.failures_by_message(), flush=True)
            for problem in report.problems():
                if not problem.startswith(f"{report.lost} of"):
                    print(f"        {problem}", flush=True)
    engine.close()

    sent = sum(r.sent for r in reports)
    lost = sum(r.lost for r in reports)
    failures: Counter[str] = sum((r.failures for r in reports), Counter())
    forbidden = sum(sum(r.forbidden.values()) for r in reports)
    samples = sum(r.samples for r in reports)
    wedged = sum(r.wedged for r in reports)
    seconds = sorted(r.seconds for r in reports)
    print(
        f"storm x{len(reports)} ({args.clients} clients, {'no matrix' if args.no_matrix else 'matrix'}): "
        f"{lost} lost of {sent} sent ({sum(r.completed for r in reports)} completed, "
        f"{sum(r.abandoned for r in reports)} abandoned); forbidden samples {forbidden} of {samples}; "
        f"wedged {wedged} of {len(reports)}; a round {seconds[0]:.1f}-{seconds[-1]:.1f}s"
    )
    for message, count in failures.most_common():
        print(f"  {count:5d}  {message}")
    return 1 if lost or forbidden or wedged or any(r.problems() for r in reports) else 0


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"{time.monotonic() - started:.0f}s in all")
    sys.exit(status)
