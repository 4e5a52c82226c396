"""The wheel works away from the checkout: built from the project's files, installed into a
fresh virtual environment, run from a folder with no compose-templates/ of its own, it
finds `template: llama-server` inside the package, and the web page too. (About 10 s: one
wheel build.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "swapctl", "compose-templates")


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    """stdout of a command that must succeed; its stderr in the failure otherwise."""
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def build_wheel(folder: Path) -> Path:
    """A wheel built from a copy of the build inputs (so no build/ lands in the checkout)."""
    source = folder / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", folder / "dist", source)
    [wheel] = (folder / "dist").glob("swapctl-*.whl")
    return wheel


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed; swapctl's dependencies come from
    this test's environment, appended to sys.path after the venv's own site-packages so
    that the installed swapctl is the one imported."""
    venv = folder / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "--quiet",
        wheel,
    )
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "swapctl_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_installed_wheel_finds_its_templates(tmp_path: Path) -> None:
    venv = fresh_venv(tmp_path, build_wheel(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ROOT / "config.example.yaml", elsewhere / "swapctl.yaml")
    assert "template: llama-server" in (elsewhere / "swapctl.yaml").read_text()

    where = run(
        venv / "bin" / "python",
        "-c",
        "import swapctl; from pathlib import Path; from swapctl.config import template_dirs\n"
        "print(swapctl.__file__)\n"
        "print(next(d for d in template_dirs(Path('.')) if (d / 'llama-server.yaml').is_file()))",
        cwd=elsewhere,
    ).splitlines()
    assert [Path(line).is_relative_to(venv) for line in where] == [True, True], where
    assert not Path(where[0]).is_relative_to(ROOT)

    out = run(venv / "bin" / "swapctl", "validate", "-c", "swapctl.yaml", cwd=elsewhere)
    assert out.startswith("ok: swapctl.yaml: 3 models")

    # every template ships, and `swapctl templates show` finds it inside the package
    listed = run(
        venv / "bin" / "python",
        "-c",
        "from pathlib import Path; from swapctl.config import list_templates\n"
        "print(*(t.name for t in list_templates(Path('.'))))",
        cwd=elsewhere,
    ).split()
    assert listed == sorted(path.stem for path in (ROOT / "compose-templates").glob("*.yaml"))
    shown = run(venv / "bin" / "swapctl", "templates", "show", "vllm", cwd=elsewhere)
    assert shown == (ROOT / "compose-templates" / "vllm.yaml").read_text()

    # the web page ships beside the module that serves it (GET /ui)
    page = run(
        venv / "bin" / "python",
        "-c",
        "import importlib.resources\n"
        "print(importlib.resources.files('swapctl.proxy').joinpath('ui.html').read_text('utf-8'), end='')",
        cwd=elsewhere,
    )
    assert page == (ROOT / "swapctl" / "proxy" / "ui.html").read_text("utf-8")
