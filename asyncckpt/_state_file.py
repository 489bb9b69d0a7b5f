"""TensorFlow's ``CheckpointState`` in protobuf text format, byte for byte. Pure: no I/O.

What TensorFlow writes (``text_format.MessageToString``): fields in field-number order,
one line per value, defaults omitted, strings double-quoted with C escapes (bytes outside
printable ASCII as 3-digit octal), doubles as Python's ``str`` (``inf``/``-inf``/``nan``).
The parser accepts that and the rest of the text format TF's reader would (comments, either
quote, list syntax, any field order) and rejects anything else as corrupt.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from ._errors import CorruptCheckpointError

__all__ = ["CheckpointState", "encode_state", "decode_state", "is_safe_relative"]

_LIMIT = 16 << 20
_HINT = "; to recover, remove the state file or rebuild it (CheckpointManager.rebuild_state)"


@dataclass(frozen=True)
class CheckpointState:
    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: tuple[str, ...] = ()
    all_model_checkpoint_timestamps: tuple[float, ...] = ()
    last_preserved_timestamp: float = 0.0


def _escape(text: str) -> str:
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "'": "\\'", "\\": "\\\\"}


def _double(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return str(float(value))


def encode_state(state: CheckpointState) -> bytes:
    lines = []
    if state.model_checkpoint_path:
        lines.append(f'model_checkpoint_path: "{_escape(state.model_checkpoint_path)}"')
    lines += [f'all_model_checkpoint_paths: "{_escape(p)}"'
              for p in state.all_model_checkpoint_paths]
    lines += [f"all_model_checkpoint_timestamps: {_double(t)}"
              for t in state.all_model_checkpoint_timestamps]
    if state.last_preserved_timestamp != 0.0:
        lines.append(f"last_preserved_timestamp: {_double(state.last_preserved_timestamp)}")
    return "".join(line + "\n" for line in lines).encode("ascii")


_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n\f\v]+|\#[^\n]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[-+]?(?:inf(?:inity)?|nan|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)[fF]?)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<punct>[:\[\],;])
""", re.VERBOSE | re.IGNORECASE)

_STRING_FIELDS = {"model_checkpoint_path": False, "all_model_checkpoint_paths": True}
_DOUBLE_FIELDS = {"all_model_checkpoint_timestamps": True, "last_preserved_timestamp": False}


class _Bad(Exception):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _Bad(f"unexpected character {text[pos]!r} at offset {pos}")
        pos = match.end()
        kind = match.lastgroup
        if kind != "ws":
            out.append((kind, match.group()))  # type: ignore[arg-type]
    return out


def _unescape(token: str) -> str:
    body, out, i = token[1:-1], bytearray(), 0
    simple = {"n": 10, "r": 13, "t": 9, '"': 34, "'": 39, "\\": 92, "a": 7, "b": 8,
              "f": 12, "v": 11, "?": 63}
    while i < len(body):
        char = body[i]
        if char != "\\":
            out += char.encode("utf-8")
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in simple:
            out.append(simple[nxt])
            i += 2
        elif nxt in "01234567":
            digits = re.match(r"[0-7]{1,3}", body[i + 1:]).group()  # type: ignore[union-attr]
            if int(digits, 8) > 255:
                raise _Bad(f"octal escape \\{digits} out of range")
            out.append(int(digits, 8))
            i += 1 + len(digits)
        elif nxt in "xX":
            digits = re.match(r"[0-9a-fA-F]{1,2}", body[i + 2:])
            if digits is None:
                raise _Bad("bad \\x escape")
            out.append(int(digits.group(), 16))
            i += 2 + len(digits.group())
        else:
            raise _Bad(f"unknown escape \\{nxt}")
    return out.decode("utf-8")


def _value(kind: str, token: str, field: str) -> str | float:
    if field in _STRING_FIELDS:
        if kind != "string":
            raise _Bad(f"{field} needs a string, got {token!r}")
        return _unescape(token)
    if kind == "number":
        text = token.lower().rstrip("f") if not token.lower().endswith("inf") else token.lower()
        return float(text.replace("infinity", "inf"))
    if kind == "ident" and token.lower() in ("inf", "infinity", "nan"):
        return float(token.lower().replace("infinity", "inf"))
    raise _Bad(f"{field} needs a number, got {token!r}")


def decode_state(data: bytes, *, source: str) -> CheckpointState:
    """Parse a state file; anything malformed raises ``CorruptCheckpointError``."""
    try:
        if len(data) > _LIMIT:
            raise _Bad(f"larger than {_LIMIT} bytes")
        return _parse(_tokens(data.decode("utf-8")))
    except (_Bad, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise CorruptCheckpointError(f"the state file {source} is not a valid CheckpointState "
                                     f"({exc}){_HINT}") from exc


def _parse(tokens: list[tuple[str, str]]) -> CheckpointState:
    fields: dict[str, list[str | float]] = {}
    i = 0
    while i < len(tokens):
        kind, name = tokens[i]
        if kind != "ident" or (name not in _STRING_FIELDS and name not in _DOUBLE_FIELDS):
            raise _Bad(f"unknown field {name!r}")
        i += 1
        if i < len(tokens) and tokens[i][1] == ":":
            i += 1
        repeated = _STRING_FIELDS.get(name, _DOUBLE_FIELDS.get(name))
        values: list[str | float] = []
        if i < len(tokens) and tokens[i][1] == "[":
            if not repeated:
                raise _Bad(f"{name} is not a repeated field")
            i += 1
            while tokens[i][1] != "]":
                values.append(_value(*tokens[i], name))
                i += 1
                if tokens[i][1] == ",":
                    i += 1
            i += 1
        else:
            if i >= len(tokens):
                raise _Bad(f"{name} has no value")
            values.append(_value(*tokens[i], name))
            i += 1
        if i < len(tokens) and tokens[i][1] in (",", ";"):
            i += 1
        if not repeated and name in fields:
            raise _Bad(f"{name} appears more than once")
        fields.setdefault(name, []).extend(values)
    if not fields:
        raise _Bad("the file is empty")
    return CheckpointState(
        model_checkpoint_path=str(fields.get("model_checkpoint_path", [""])[0]),
        all_model_checkpoint_paths=tuple(map(str, fields.get("all_model_checkpoint_paths", []))),
        all_model_checkpoint_timestamps=tuple(
            float(v) for v in fields.get("all_model_checkpoint_timestamps", [])),
        last_preserved_timestamp=float(fields.get("last_preserved_timestamp", [0.0])[0]))


def is_safe_relative(path: str) -> bool:
    """A non-empty relative path that stays inside its directory (no ``..``, NUL, or ``\\``)."""
    if not path or "\0" in path or "\\" in path or os.path.isabs(path):
        return False
    return all(part not in ("..",) for part in path.split("/"))
