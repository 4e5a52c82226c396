"""`swapctl init` writes a config that `swapctl validate` accepts, for every shipped template,
with this machine's GPUs (a fake inventory here) as `hardware`; and `swapctl --version`,
`--show-completion`, in process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import swapctl
from swapctl.cli import main
from swapctl.config import load_config
from swapctl.gpus import Device, FakeInventory, Inventory
from swapctl.spec import build_spec
from swapctl.starter import ModelChoice, parse_model_option

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted(path.stem for path in (ROOT / "compose-templates").glob("*.yaml"))
NO_GPU = FakeInventory(reason="no NVIDIA driver found")
# what a model path means to each template: a file on this machine, an engine's model ID, or none
PATHS = {"kokoro": None, "speaches": "Systran/faster-whisper-small", "localai": "stablediffusion"}
PATHS |= {"vllm": "Qwen/Qwen2.5-0.5B-Instruct", "tei": "BAAI/bge-small-en-v1.5", "tei-cpu": "BAAI/bge-m3"}


def swapctl_cli(
    capsys: pytest.CaptureFixture[str], *argv: str, inventory: Inventory = NO_GPU
) -> tuple[int, str, str]:
    """`swapctl ARGV` in process with `inventory` as this machine's GPUs: exit code, stdout, stderr."""
    try:
        main(list(argv), inventory_factory=lambda: inventory)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def gpu(index: int, gib: float, name: str = "NVIDIA H100 80GB HBM3") -> Device:
    return Device(index, f"GPU-{index}", name, memory_total=int(gib * 2**30), memory_used=0)


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWAPCTL_API_KEY", raising=False)
    monkeypatch.delenv("RENDER_GID", raising=False)
    monkeypatch.delenv("SWAPCTL_CONFIG", raising=False)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("named", [True, False], ids=["with-model", "template-default"])
def test_init_then_validate_for_every_template(
    template: str,
    named: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = PATHS.get(template, str(tmp_path / "models" / "m.gguf")) if named else None
    option = f"m={template}" + (f":{path}" if path else "")
    config = tmp_path / "swapctl.yaml"
    code, out, err = swapctl_cli(capsys, "init", "--model", option, "-o", str(config))
    assert (code, out) == (0, f"wrote {config}: 1 model, 0 GPUs\n"), err
    if template == "llama-cpp-rocm":  # its template requires the render group's ID: init says so
        assert err == "note: model 'm': template llama-cpp-rocm needs the variable RENDER_GID\n"
        assert "requires the environment variable RENDER_GID" in config.read_text()
        monkeypatch.setenv("RENDER_GID", "109")
    code, out, err = swapctl_cli(capsys, "validate", "-c", str(config))
    assert (code, err) == (0, ""), config.read_text()
    assert out.startswith(f"ok: {config}: 1 model,")
    loaded = load_config(config)
    spec = build_spec(loaded, "m")
    if named and path and path.startswith("/"):  # the file's folder mounted, the engine told its name
        assert f"{tmp_path / 'models'}:/models:ro" in spec.volumes
        assert spec.command is not None and "/models/m.gguf" in spec.command
    elif named and template == "speaches":
        assert loaded.models["m"].use_model_name == path
    elif named and path:
        assert spec.command is not None and path in spec.command


def test_hardware_is_this_machines_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpus = FakeInventory(devices=(gpu(0, 79.19), gpu(1, 23.99, "NVIDIA GeForce RTX 4090")))
    config = tmp_path / "swapctl.yaml"
    code, out, _ = swapctl_cli(
        capsys, "init", "-m", "qwen=llama-cpp-cuda:/srv/q.gguf", "-o", str(config), inventory=gpus
    )
    assert (code, out) == (0, f"wrote {config}: 1 model, 2 GPUs\n")
    written = yaml.safe_load(config.read_text())
    assert written["hardware"] == {"gpus": [{"memory": "81090MiB"}, {"memory": "24565MiB"}]}
    assert "# GPU 1: NVIDIA GeForce RTX 4090" in config.read_text()
    assert load_config(config).gpu_memory == (81090 * 2**20, 24565 * 2**20)
    # what was declared is what the driver reports (to the MiB): `swapctl gpus` finds no mismatch
    code, out, _ = swapctl_cli(capsys, "gpus", "-c", str(config), inventory=gpus)
    assert code == 0
    assert "warning" not in out


def test_without_a_gpu_hardware_is_left_out_and_the_comment_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "swapctl.yaml"
    assert swapctl_cli(capsys, "init", "-m", "a=llama-cpp", "-o", str(config))[0] == 0
    text = config.read_text()
    assert "hardware" not in yaml.safe_load(text)
    assert (
        "# hardware: none declared, as no GPU was found on this machine:\n# no NVIDIA driver found." in text
    )
    assert swapctl_cli(capsys, "validate", "-c", str(config))[0] == 0


def test_beyond_loopback_a_key_from_the_environment_is_required(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    local, wide = tmp_path / "local.yaml", tmp_path / "wide.yaml"
    assert (
        swapctl_cli(capsys, "init", "-m", "a=llama-server", "--listen", "127.0.0.1:9000", "-o", str(local))[0]
        == 0
    )
    assert "apiKeys" not in yaml.safe_load(local.read_text())
    code, _, err = swapctl_cli(
        capsys, "init", "-m", "a=llama-server", "--listen", "0.0.0.0:8080", "-o", str(wide)
    )
    assert code == 0
    assert "note: set SWAPCTL_API_KEY" in err
    written = yaml.safe_load(wide.read_text())
    assert (written["listen"], written["apiKeys"]) == ("0.0.0.0:8080", ["${SWAPCTL_API_KEY}"])
    code, _, err = swapctl_cli(capsys, "validate", "-c", str(wide))
    assert (code, err) == (2, "error: apiKeys.0: environment variable SWAPCTL_API_KEY is not set or empty\n")
    monkeypatch.setenv("SWAPCTL_API_KEY", "secret")
    assert swapctl_cli(capsys, "validate", "-c", str(wide))[0] == 0
    assert load_config(wide).api_keys[0].get_secret_value() == "secret"


def test_an_existing_file_is_kept_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "swapctl.yaml"
    config.write_text("mine\n")
    code, _, err = swapctl_cli(capsys, "init", "-m", "a=llama-server", "-o", str(config))
    assert (code, err) == (2, f"error: {config}: already exists: pass --force to overwrite it, or -o FILE\n")
    assert config.read_text() == "mine\n"
    assert swapctl_cli(capsys, "init", "-m", "a=llama-server", "-o", str(config), "--force")[0] == 0
    assert "a" in yaml.safe_load(config.read_text())["models"]


def test_the_default_output_is_swapctl_yaml_in_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert swapctl_cli(capsys, "init", "-m", "a=llama-server", "-m", "b=speaches")[0] == 0
    assert (
        swapctl_cli(capsys, "validate")[1]
        == "ok: swapctl.yaml: 2 models, matrix with 1 sets (2 combinations)\n"
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("a=nope", "error: --model a: no template 'nope'; the templates are: " + ", ".join(TEMPLATES)),
        ("a=kokoro:/x.onnx", "error: --model a: template 'kokoro' serves the one model its image holds"),
        ("a", "error: --model: expected ID=TEMPLATE[:MODELPATH], got 'a'"),
        (None, "error: --model: name at least one: ID=TEMPLATE[:MODELPATH], TEMPLATE one of kokoro,"),
        ("a=llama-server:", "error: --model: expected ID=TEMPLATE[:MODELPATH], got 'a=llama-server:'"),
    ],
)
def test_a_wrong_model_option_is_refused_and_nothing_written(
    option: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "swapctl.yaml"
    code, _, err = swapctl_cli(capsys, "init", *(["-m", option] if option else []), "-o", str(config))
    assert code == 2
    assert err.startswith(message)
    assert not config.exists()


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ("qwen=llama-server:/models/qwen.gguf", ModelChoice("qwen", "llama-server", "/models/qwen.gguf")),
        ("whisper=speaches", ModelChoice("whisper", "speaches")),
        ("q:7b=vllm:Qwen/Qwen2.5-7B", ModelChoice("q:7b", "vllm", "Qwen/Qwen2.5-7B")),
    ],
)
def test_model_option(text: str, choice: ModelChoice) -> None:
    assert parse_model_option(text) == choice


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert swapctl_cli(capsys, "--version") == (0, f"swapctl {swapctl.__version__}\n", "")
    # it loads no pydantic (a command's costliest import) and no config
    probe = (
        "import sys\nfrom swapctl.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('pydantic', 'swapctl.config', 'docker') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [f"swapctl {swapctl.__version__}", "[]"]


def test_shell_completion_script(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = swapctl_cli(capsys, "--show-completion", "bash")
    assert code == 0
    assert "_swapctl_completion()" in out
    assert "complete -o default -F _swapctl_completion swapctl" in out
