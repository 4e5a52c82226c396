"""Environment files as Compose reads them: the `.env` beside the config, and `env_file:`.

The format is Compose's (https://docs.docker.com/compose/how-tos/environment-variables/variable-interpolation/#env-file-syntax,
as compose-go parses it in https://github.com/compose-spec/compose-go/blob/main/dotenv/parser.go):

    # a comment line; blank lines are skipped
    KEY=value            unquoted: up to the end of the line; ` #` starts a comment; trimmed
    KEY="value"          escapes \\n \\r \\t \\\\ \\" are read; may span lines; interpolated
    KEY='value'          literal: no escapes but \\', no interpolation
    export KEY=value     `export ` is ignored
    KEY                  no `=`: the value of KEY in the environment, if it has one

Unquoted and double-quoted values are interpolated (`${VAR}`...) from the environment
first, then from the keys the file set above them.
"""

from __future__ import annotations

import re
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path

from swapctl.config.interpolation import InterpolationError, substitute
from swapctl.errors import ConfigError

DOTENV = ".env"
MAX_ENV_FILE_BYTES = 1 << 20  # an env file is a few lines; a huge one is a mistake
_LINE = re.compile(r"[ \t]*(?:export[ \t]+)?([A-Za-z0-9_.]+)[ \t]*(=[ \t]*)?")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "$": "$$"}


def parse_env_file(text: str, environ: Mapping[str, str], where: str) -> dict[str, str]:
    """The KEY=VALUE pairs of an env file's text; errors name `where` and the line."""
    found: dict[str, str] = {}
    lookup = ChainMap(dict(environ), found)  # the environment first, as compose-go looks up
    at = 0
    text = text.removeprefix("\ufeff")
    while at < len(text):
        end = _line_end(text, at)
        if not text[at:end].strip() or text[at:end].lstrip().startswith("#"):
            at = end + 1
            continue
        try:
            at = _statement(text, at, end, lookup, found)
        except (InterpolationError, ValueError) as error:
            raise ConfigError(where, f"line {text.count(chr(10), 0, at) + 1}: {error}") from None
    return found


def _line_end(text: str, at: int) -> int:
    end = text.find("\n", at)
    return len(text) if end < 0 else end


def _statement(text: str, at: int, end: int, lookup: Mapping[str, str], found: dict[str, str]) -> int:
    """Read the KEY=VALUE that starts at `at` into `found`; where the next one may start."""
    match = _LINE.match(text, at, end)
    if match is None:
        raise ValueError("expected KEY=VALUE, KEY of letters, digits, '_' and '.'")
    key, start = match[1], match.end()
    if match[2] is None:  # KEY alone: inherited from the environment
        if text[start:end].strip():
            raise ValueError(f"expected '=' after {key}")
        if key in lookup:
            found[key] = lookup[key]
        return end + 1
    quote = text[start : start + 1]
    if quote not in ("'", '"'):
        raw = re.split(r"[ \t]#", text[start:end], maxsplit=1)[0].strip()
        found[key] = substitute(raw, lookup).text
        return end + 1
    close = _closing_quote(text, start, quote)
    raw = text[start + 1 : close]
    found[key] = raw.replace("\\'", "'") if quote == "'" else substitute(_unescape(raw), lookup).text
    rest_end = _line_end(text, close)
    rest = text[close + 1 : rest_end].strip()
    if rest and not rest.startswith("#"):
        raise ValueError(f"unexpected text after the closing quote of {key}")
    return rest_end + 1


def _closing_quote(text: str, start: int, quote: str) -> int:
    at = start + 1
    while at < len(text):
        if text[at] == "\\":
            at += 2
            continue
        if text[at] == quote:
            return at
        at += 1
    raise ValueError(f"the value opened with {quote} here is never closed")


def _unescape(raw: str) -> str:
    """Double-quoted escapes; `\\$` stays `$$` so interpolation keeps it a literal `$`."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), raw, flags=re.DOTALL)


def load_env_file(path: Path, environ: Mapping[str, str], where: str) -> dict[str, str]:
    """The pairs in the env file at `path` (which must exist), read as `parse_env_file` reads text."""
    return parse_env_file(read_env_text(path, where), environ, where)


def read_env_text(path: Path, where: str) -> str:
    try:
        if path.stat().st_size > MAX_ENV_FILE_BYTES:
            raise ConfigError(where, f"{path}: larger than {MAX_ENV_FILE_BYTES} bytes")
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(where, f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(where, f"{path}: not UTF-8 text") from None


def load_dotenv(folder: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The `.env` beside the config, as Compose reads its project's `.env`; none: empty."""
    path = folder / DOTENV
    return load_env_file(path, environ, str(path)) if path.is_file() else {}
