"""Fuzz `swapctl validate`: whatever the file holds, the answer is a Config or a ConfigError.

Random text, and random documents of the config's own shape (models, matrix, groups,
templates, DSL strings), must give exit 0 or 2 from the CLI and never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import string
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapctl.cli import main
from swapctl.config import TEMPLATE_DIR, Config, load_config
from swapctl.errors import ConfigError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = st.sampled_from(["a", "b", "c", "x", "q", "bee", "llama-3.1", "t", "s", "../t", "/etc/t", ""])
DSL = st.lists(st.sampled_from([*"&|()+ ", "a", "b", "x", "s", "t", "zz"]), max_size=30).map("".join)
NUMBERS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 65535, 65536, 10**400, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=20) | NAMES | DSL
ANY = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(NAMES | st.text(max_size=8) | st.integers(), children, max_size=4)
    ),
    max_leaves=8,
)
MODEL_KEYS = [
    "image",
    "template",
    "command",
    "environment",
    "labels",
    "volumes",
    "shm_size",
    "gpus",
    "port",
    "health",
    "aliases",
    "ttl",
    "useModelName",
    "healthCheckTimeout",
    "concurrencyLimit",
    "stop_grace_period",
]
MODEL = st.dictionaries(st.sampled_from(MODEL_KEYS), ANY, max_size=6).map(lambda m: {"image": "i", **m}) | ANY
MODELS = st.dictionaries(NAMES | st.integers() | st.none(), MODEL, max_size=4) | ANY
MATRIX = (
    st.fixed_dictionaries(
        {"sets": st.dictionaries(NAMES, DSL | ANY, max_size=4)},
        optional={
            "vars": st.dictionaries(NAMES | st.integers(), NAMES | ANY, max_size=3),
            "evict_costs": st.dictionaries(NAMES, NUMBERS | ANY, max_size=3),
        },
    )
    | ANY
)
GROUPS = st.dictionaries(NAMES, st.fixed_dictionaries({"members": st.lists(NAMES)}) | ANY, max_size=3) | ANY
TOP = st.fixed_dictionaries(
    {"models": MODELS},
    optional={
        "matrix": MATRIX,
        "groups": GROUPS,
        "listen": st.sampled_from(["127.0.0.1:8080", ":80", "[::1]:1", "h:0", "a:99999"]) | ANY,
        "healthCheckTimeout": NUMBERS,
        "globalTTL": NUMBERS,
        "maxRequestBytes": NUMBERS,
        "instance": ANY,
        "hooks": ANY,
    },
)
TEMPLATE = (
    st.fixed_dictionaries({"services": st.dictionaries(NAMES, MODEL | ANY, max_size=2) | ANY}) | ANY
).map(lambda doc: yaml.safe_dump(doc))
YAMLISH = st.lists(
    st.sampled_from([*"abc:-[]{}&*!|>'\"#%@`,?.~0123456789 \n\t", "models:", "<<: *", "&a ", "*a", "!!"])
).map("".join)
TEXT = YAMLISH | st.text(alphabet=string.printable)


def check(text: str, template: str | None = None) -> None:
    """Both entry points answer with a Config or a ConfigError (exit 0 or 2), nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "swapctl.yaml"
        path.write_text(text)
        if template is not None:
            (Path(folder) / TEMPLATE_DIR).mkdir()
            (Path(folder) / TEMPLATE_DIR / "t.yaml").write_text(template)
        with contextlib.suppress(ConfigError):
            assert isinstance(load_config(path), Config)
        code: Any = 0
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(["validate", "-c", str(path)])
            except SystemExit as done:
                code = done.code
        assert code in (0, 2, None)


@FUZZ
@given(TEXT)
def test_random_text(text: str) -> None:
    check(text)


@FUZZ
@given(TOP, st.none() | TEMPLATE)
def test_random_documents(document: dict[str, Any], template: str | None) -> None:
    check(yaml.safe_dump(document), template)
