"""TensorFlow's ``CheckpointState`` state file in protobuf text format. Pure: no I/O, no clock.

The state file (``<directory>/checkpoint``) is ``text_format.MessageToString`` of the proto3
message ``tensorflow.CheckpointState``::

    string model_checkpoint_path = 1;               // the latest checkpoint
    repeated string all_model_checkpoint_paths = 2; // the managed ones, oldest first
    repeated double all_model_checkpoint_timestamps = 3;
    double last_preserved_timestamp = 4;

**Writing** (:func:`encode_state`) reproduces what TensorFlow writes, byte for byte: fields in
field-number order, one ``name: value`` line per value (repeated fields one line per element),
fields at their proto3 default omitted (an empty ``model_checkpoint_path``, a
``last_preserved_timestamp`` of +0.0), strings double-quoted with protobuf's C escapes (``\\n``,
``\\r``, ``\\t``, ``\\"``, ``\\'``, ``\\\\``, every other byte outside printable ASCII as a
3-digit octal escape of its UTF-8 encoding), doubles as Python's ``str(float)`` (``17930.0``,
``1e+20``, ``inf``, ``-inf``, ``nan``). Non-ASCII is octal-escaped as protobuf < 5.26 does;
protobuf >= 5.26 writes it as raw UTF-8 instead, which the reader accepts too.

**Reading** (:func:`decode_state`) is strict and safe on hostile input (linear time, bounded
size, no recursion). It accepts the text format TensorFlow's reader (``text_format.Merge``)
accepts for this message: ``#`` comments, any ASCII whitespace, any field order, ``,``/``;``
after a field, ``[a, b]`` lists for repeated fields, single or double quotes, adjacent string
literals (concatenated), C escapes (simple, octal, ``\\x``, ``\\u``, ``\\U``), raw UTF-8, and
numbers as integers, decimals, exponents, ``inf``/``infinity``/``nan`` (any case, optional
``f`` suffix). Everything else raises :class:`CorruptCheckpointError`, naming the source, the
place and the fault. Stricter than ``Merge`` on purpose, for states TensorFlow never writes:
no or empty ``model_checkpoint_path`` (TensorFlow's ``get_checkpoint_state`` raises
``ValueError`` for that too, e.g. on an empty file), a singular field given twice, timestamps
present but not one per path, unknown fields, text that is not UTF-8, more than 16 MiB
or more than 2**21 tokens and escapes.

Paths are returned as written: whether an absolute path or one with ``..`` is acceptable is
the manager's decision (see :func:`is_safe_relative`).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ._errors import CorruptCheckpointError

__all__ = ["CheckpointState", "MAX_STATE_BYTES", "MAX_STATE_TOKENS", "encode_state",
           "decode_state", "is_safe_relative"]

MAX_STATE_BYTES = 16 * 1024 * 1024
"""The largest state file :func:`decode_state` reads."""
MAX_STATE_TOKENS = 1 << 21
"""The most tokens plus string escapes :func:`decode_state` reads, which bounds its time and
memory (a few seconds, a few hundred MB). A TF-written file within ``MAX_STATE_BYTES`` has
that many only if most of it is escaped non-ASCII path text."""

_HINT = "; to recover, remove or rebuild the state file (CheckpointManager.rebuild_state())"


@dataclass(frozen=True)
class CheckpointState:
    """The content of a state file, paths exactly as written (relative or absolute)."""

    model_checkpoint_path: str
    all_model_checkpoint_paths: tuple[str, ...] = ()
    all_model_checkpoint_timestamps: tuple[float, ...] = ()
    last_preserved_timestamp: float = 0.0


# -- writing --------------------------------------------------------------------------------

_BYTE_ESCAPES = [chr(b) if 32 <= b < 127 else f"\\{b:03o}" for b in range(256)]
for _byte, _text in {9: "\\t", 10: "\\n", 13: "\\r", 34: '\\"', 39: "\\'", 92: "\\\\"}.items():
    _BYTE_ESCAPES[_byte] = _text


def _quote(text: str) -> str:
    """``"text"`` as protobuf's ``CEscape`` (``as_utf8=False``) writes it."""
    return '"' + "".join(_BYTE_ESCAPES[b] for b in text.encode("utf-8")) + '"'


def _double(value: float) -> str:
    """A double as Python protobuf's text_format writes it: ``str(float)``."""
    return str(float(value))


def _is_positive_zero(value: float) -> bool:
    return struct.pack("<d", float(value)) == bytes(8)


def encode_state(state: CheckpointState) -> bytes:
    """The state file bytes TensorFlow writes for ``state`` (ASCII, one field per line).

    Raises ``UnicodeEncodeError`` (a ``ValueError``) for a path that is not encodable as
    UTF-8, such as one with lone surrogates (protobuf refuses such strings too).
    """
    lines = []
    if state.model_checkpoint_path:
        lines.append(f"model_checkpoint_path: {_quote(state.model_checkpoint_path)}\n")
    lines += [f"all_model_checkpoint_paths: {_quote(p)}\n"
              for p in state.all_model_checkpoint_paths]
    lines += [f"all_model_checkpoint_timestamps: {_double(t)}\n"
              for t in state.all_model_checkpoint_timestamps]
    if not _is_positive_zero(state.last_preserved_timestamp):  # proto3: -0.0 is written
        lines.append(f"last_preserved_timestamp: {_double(state.last_preserved_timestamp)}\n")
    return "".join(lines).encode("ascii")


# -- reading --------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<skip>[ \t\n\r\f\v]+|\#[^\n]*)
  | (?P<string>["'])
  | (?P<word>[A-Za-z0-9_.+-]+)
  | (?P<punct>[:\[\],;])
""", re.VERBOSE)
_STRING_STOP = {'"': re.compile(r'["\\\n]'), "'": re.compile(r"['\\\n]")}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"""
    [-+]?(?: (?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?[fF]?
           | (?i:inf(?:inity)?f?|nanf?) )
""", re.VERBOSE)
_LEADING_ZERO = re.compile(r"[-+]?0[0-9]")
_ESCAPE = re.compile(rb"\\(?:[0-7]{1,3}|x[0-9a-fA-F]{1,2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}"
                     rb"|[\x00-\x7f]|[\xc0-\xff][\x80-\xbf]*)")
# Simple and octal escapes, looked up (\x, \u and \U are decoded by _unescape). No "\?" and
# no "\X": C++ protobuf reads "\?" as "?", Python protobuf (TensorFlow's reader) as "\?".
_ESCAPES = {b"\\" + bytes([c]): bytes([v]) for c, v in zip(b"abfnrtv\\'\"",
                                                            b"\a\b\f\n\r\t\v\\'\"",
                                                            strict=True)}
_ESCAPES.update({b"\\" + b"%0*o" % (width, v): bytes([v])
                 for width in (1, 2, 3) for v in range(min(256, 8 ** width))})
_STRINGS = ("model_checkpoint_path", "all_model_checkpoint_paths")
_REPEATED = ("all_model_checkpoint_paths", "all_model_checkpoint_timestamps")
_FIELDS = (*_STRINGS, "all_model_checkpoint_timestamps", "last_preserved_timestamp")


class _Bad(Exception):
    """A parse failure; ``decode_state`` turns it into ``CorruptCheckpointError``."""


_Token = tuple[str, str, int]  # (kind, text, line)


def _string_end(text: str, start: int, line: int, budget: int) -> tuple[int, int]:
    """The end of the string literal opening at ``start``, and its number of escapes.

    There is no newline inside a literal. More than ``budget`` escapes is an error.
    """
    quote, pos, escapes = text[start], start + 1, 0
    while True:
        stop = _STRING_STOP[quote].search(text, pos)
        if stop is None or stop.group() == "\n":
            raise _Bad(f"line {line}: unterminated string")
        if stop.group() == quote:
            return stop.end(), escapes
        pos = stop.end() + 1  # past the escaped character
        if pos > len(text) or text[pos - 1] == "\n":
            raise _Bad(f"line {line}: unterminated string")
        escapes += 1
        if escapes > budget:
            raise _Bad(f"line {line}: more than {MAX_STATE_TOKENS} tokens and escapes")


def _tokens(text: str) -> Iterator[_Token]:
    """The tokens, lazily (memory stays bounded on hostile input); comments dropped."""
    pos, line, count = 0, 1, 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _Bad(f"line {line}: unexpected character {text[pos]!r}")
        kind, end = match.lastgroup or "", match.end()
        if kind == "skip":
            line += match.group().count("\n")
        else:
            count += 1
            if kind == "string":
                end, escapes = _string_end(text, pos, line, MAX_STATE_TOKENS - count)
                count += escapes
            if count > MAX_STATE_TOKENS:
                raise _Bad(f"line {line}: more than {MAX_STATE_TOKENS} tokens and escapes")
            yield kind, text[pos:end], line
        pos = end


def _unescape(token: str, line: int) -> bytes:
    """The bytes of one quoted string literal (its text is valid UTF-8, with C escapes)."""

    def escaped(match: re.Match[bytes]) -> bytes:
        found = _ESCAPES.get(match.group())
        if found is not None:
            return found
        text = match.group().decode("utf-8")
        if text[1] == "x" and len(text) > 2:
            return bytes([int(text[2:], 16)])
        if text[1] in "uU" and len(text) > 2:
            code = int(text[2:], 16)
            if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF:
                return chr(code).encode("utf-8")
            raise _Bad(f"line {line}: {text} is not a Unicode scalar value")
        if text[1] in "01234567":
            raise _Bad(f"line {line}: octal escape {text} is above \\377")
        raise _Bad(f"line {line}: invalid escape {text!r} in a string")

    return _ESCAPE.sub(escaped, token[1:-1].encode("utf-8"))


def _number(word: str, line: int, field: str) -> float:
    if not _NUMBER.fullmatch(word) or _LEADING_ZERO.match(word):
        raise _Bad(f"line {line}: {field} needs a number, got {word!r}")
    lower = word.lower()  # float() takes "inf", "infinity" and "nan" with a sign, not "f"
    return float(lower[:-1] if lower.endswith("f") and not lower.endswith("inf") else lower)


class _Parser:
    """A parser over the token stream with one token of lookahead (no recursion)."""

    def __init__(self, tokens: Iterator[_Token]) -> None:
        self.tokens = tokens
        self.next: _Token | None = next(tokens, None)
        self.line = 1
        self.values: dict[str, list[str | float]] = {}

    def skip(self) -> None:
        self.next = next(self.tokens, None)

    def take(self, what: str) -> _Token:
        token = self.next
        if token is None:
            raise _Bad(f"line {self.line}: the text ends where {what} was expected")
        self.line = token[2]
        self.skip()
        return token

    def value(self, field: str) -> str | float:
        kind, text, line = self.take(f"a value for {field}")
        if field not in _STRINGS:
            if kind != "word":
                raise _Bad(f"line {line}: {field} needs a number, got {text!r}")
            return _number(text, line, field)
        if kind != "string":
            raise _Bad(f"line {line}: {field} needs a quoted string, got {text!r}")
        parts = [_unescape(text, line)]
        while (nxt := self.next) is not None and nxt[0] == "string":  # "a" "b" == "ab"
            parts.append(_unescape(nxt[1], nxt[2]))
            self.skip()
        try:
            return b"".join(parts).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"line {line}: {field} is not valid UTF-8") from None

    def field(self) -> None:
        kind, name, line = self.take("a field name")
        if kind != "word" or not _NAME.fullmatch(name):
            raise _Bad(f"line {line}: expected a field name, got {name!r}")
        if name not in _FIELDS:
            raise _Bad(f"line {line}: unknown field {name!r}")
        if name not in _REPEATED and name in self.values:
            raise _Bad(f"line {line}: {name} is given more than once")
        if self.take(f"':' after {name}")[1] != ":":
            raise _Bad(f"line {line}: expected ':' after {name}")
        values = self.values.setdefault(name, [])
        if (nxt := self.next) is not None and nxt[1] == "[":
            if name not in _REPEATED:
                raise _Bad(f"line {nxt[2]}: {name} is not a repeated field")
            self.skip()
            if (self.next or ("", "", 0))[1] == "]":
                self.skip()
            else:
                while True:
                    values.append(self.value(name))
                    _, sep, sep_line = self.take("',' or ']'")
                    if sep == "]":
                        break
                    if sep != ",":
                        raise _Bad(f"line {sep_line}: expected ',' or ']', got {sep!r}")
        else:
            values.append(self.value(name))
        if (nxt := self.next) is not None and nxt[1] in (",", ";"):
            self.skip()

    def parse(self) -> CheckpointState:
        if self.next is None:
            raise _Bad("the file is empty (no fields, only whitespace or comments)")
        while self.next is not None:
            self.field()
        latest = self.values.get("model_checkpoint_path", [""])[0]
        if not latest:
            raise _Bad("model_checkpoint_path is missing or empty")
        paths = tuple(str(p) for p in self.values.get("all_model_checkpoint_paths", []))
        stamps = tuple(float(t) for t in self.values.get("all_model_checkpoint_timestamps", []))
        if stamps and len(stamps) != len(paths):
            raise _Bad(f"{len(stamps)} all_model_checkpoint_timestamps for {len(paths)} "
                       "all_model_checkpoint_paths")
        preserved = self.values.get("last_preserved_timestamp", [0.0])[0]
        return CheckpointState(str(latest), paths, stamps, float(preserved))


def decode_state(data: bytes, *, source: str) -> CheckpointState:
    """Parse state file bytes read from ``source`` (a name for messages only).

    Raises :class:`CorruptCheckpointError` naming ``source`` and the fault for anything that
    is not a well-formed ``CheckpointState`` (see the module docstring).
    """
    try:
        if len(data) > MAX_STATE_BYTES:
            raise _Bad(f"it is {len(data)} bytes, more than the {MAX_STATE_BYTES} allowed")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Bad(f"byte {exc.start} is not UTF-8 text") from None
        return _Parser(_tokens(text)).parse()
    except _Bad as exc:
        raise CorruptCheckpointError(
            f"the state file {source} is not a valid CheckpointState: {exc}{_HINT}") from None


def is_safe_relative(path: str) -> bool:
    """Whether ``path`` is a relative path that stays inside its directory, on any OS.

    False for: the empty string, NUL, any backslash (a Windows separator), an absolute path,
    a drive prefix (``C:``), a ``..`` component, or a path naming the directory itself
    (``.``, ``./``). Pure string logic, no file system access.
    """
    if not path or "\0" in path or "\\" in path or path.startswith("/"):
        return False
    if len(path) >= 2 and path[1] == ":" and path[0].isascii() and path[0].isalpha():
        return False
    parts = path.split("/")
    return ".." not in parts and any(part not in ("", ".") for part in parts)
