"""Reading the text files robustft writes and users edit (JSON, YAML, JSON lines) with one-line errors.

Each failure names the file and says what is wrong with it: *torn* (the text stops mid-value, as an
interrupted non-atomic write leaves it), *corrupt* (malformed further in), *unsafe* (a YAML tag that
would construct a Python object; only ``yaml.safe_load`` is used, which refuses them), or not UTF-8.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from robustft.errors import FileContentError, RobustftError

_NUMBER_CHARACTERS = frozenset("0123456789+-.eE")
_LITERALS = ("true", "false", "null")


def read_text(path: str | Path, error: type[RobustftError] = FileContentError) -> str:
    """The file's UTF-8 text; a missing file or other bytes is one ``error`` naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as failure:
        raise error(f"{path}: cannot read it ({failure.strerror or failure})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as failure:
        byte = data[failure.start]
        raise error(
            f"{path}: corrupt or not UTF-8 text (byte 0x{byte:02x} at offset {failure.start}); save it as UTF-8"
        ) from None


def parse_json(text: str, where: str, error: type[RobustftError] = FileContentError) -> Any:
    """``json.loads(text)``; a failure is *torn* when the text ends inside the value (inside a string, a number,
    a literal or between tokens), *corrupt* otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as failure:
        if failure.msg.startswith("Unterminated string") or ends_inside_a_value(text, failure.pos):
            raise error(
                f"{where}: torn JSON: the text ends after {len(text)} characters inside a value (an interrupted write?)"
            ) from None
        raise error(f"{where}: corrupt JSON (line {failure.lineno} column {failure.colno}: {failure.msg})") from None


def ends_inside_a_value(text: str, position: int) -> bool:
    """Whether a JSON error at ``position`` only means the text stops early: nothing but whitespace follows it,
    or only the start of a number or literal does (a write cut after ``1.`` or inside ``tru``, where the decoder
    stops one token before the end)."""
    rest = text.rstrip()[position:]
    return not rest or set(rest) <= _NUMBER_CHARACTERS or any(word.startswith(rest) for word in _LITERALS)


def read_json(path: str | Path, error: type[RobustftError] = FileContentError) -> Any:
    return parse_json(read_text(path, error), str(path), error)


def read_json_object(path: str | Path, error: type[RobustftError] = FileContentError) -> dict[str, Any]:
    """A JSON file whose top level must be an object (results.json, costs.json, manifests)."""
    value = read_json(path, error)
    if not isinstance(value, dict):
        raise error(f"{path}: corrupt: expected a JSON object at the top level, got {type(value).__name__}")
    return value


def parse_yaml(text: str, where: str, error: type[RobustftError] = FileContentError) -> Any:
    """``yaml.safe_load(text)``; a Python tag is *unsafe*, any other YAML error *torn or corrupt*."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as failure:
        tag = _python_tag(failure)
        if tag:
            raise error(
                f"{where}: unsafe YAML: tag {tag} would construct a Python object (and could run code); "
                "refused (only plain YAML values are read)"
            ) from None
        raise error(f"{where}: corrupt YAML ({_first_line(failure)})") from None
    except yaml.YAMLError as failure:
        raise error(f"{where}: not valid YAML, torn or corrupt ({_first_line(failure)})") from None


def read_yaml(path: str | Path, error: type[RobustftError] = FileContentError) -> Any:
    return parse_yaml(read_text(path, error), str(path), error)


def read_yaml_mapping(path: str | Path, error: type[RobustftError] = FileContentError) -> dict[str, Any]:
    """A YAML file whose top level must be a mapping (run configs); an empty file is ``{}``."""
    value = read_yaml(path, error)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error(f"{path}: the top level must be a mapping of keys, got {type(value).__name__} (torn or corrupt?)")
    return value


def read_jsonl(path: str | Path, error: type[RobustftError] = FileContentError) -> tuple[list[dict[str, Any]], bool]:
    """The records of a JSON-lines file and whether its last line was torn (dropped).

    Only the last line may be torn: a writer killed mid-append leaves it so. A bad line before it is
    *corrupt*, an error naming the line.
    """
    text = read_text(path, error)
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    torn = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            last = all(not rest.strip() for rest in lines[number:]) and not text.endswith("\n")
            if last:
                torn = True
                break
            raise error(f"{path}: corrupt JSON lines: line {number} is not a JSON object")
        records.append(record)
    return records, torn


def _python_tag(failure: yaml.constructor.ConstructorError) -> str | None:
    text = f"{failure.problem or ''} {failure.context or ''}"
    marker = "tag:yaml.org,2002:python/"
    if marker not in text:
        return None
    tag = text[text.index(marker) :].split("'")[0].split()[0]
    return "!!" + tag.removeprefix("tag:yaml.org,2002:")


def _first_line(failure: BaseException) -> str:
    text = " ".join(str(failure).split("\n")[:3])
    return " ".join(text.split())
