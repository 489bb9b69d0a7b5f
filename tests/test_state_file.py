"""The CheckpointState text format: TensorFlow's bytes exactly, and a strict reader.

The expected bytes below were produced by protobuf's ``text_format.MessageToString`` on
``tensorflow.CheckpointState`` (as TensorFlow writes the state file).
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt import _state_file
from asyncckpt._errors import CorruptCheckpointError
from asyncckpt._state_file import (
    MAX_STATE_BYTES,
    CheckpointState,
    decode_state,
    encode_state,
    is_safe_relative,
)

# What TF writes after CheckpointManagerTest.testSaveRestoreState (see test_retention.py).
MANAGER_EXAMPLE = (
    b'model_checkpoint_path: "ckpt-6"\n'
    b'all_model_checkpoint_paths: "ckpt-5"\n'
    b'all_model_checkpoint_paths: "ckpt-6"\n'
    b"all_model_checkpoint_timestamps: 17930.0\n"
    b"all_model_checkpoint_timestamps: 17940.0\n"
    b"last_preserved_timestamp: 16130.0\n"
)

TF_OUTPUTS = [
    (CheckpointState("ckpt-6", ("ckpt-5", "ckpt-6"), (17930.0, 17940.0), 16130.0),
     MANAGER_EXAMPLE),
    # tf.train.Checkpoint.save: no timestamps, no last preserved time.
    (CheckpointState("unusual_prefix-2", ("unusual_prefix-2",)),
     b'model_checkpoint_path: "unusual_prefix-2"\n'
     b'all_model_checkpoint_paths: "unusual_prefix-2"\n'),
    # TF1 Saver with absolute paths.
    (CheckpointState("/tmp/train/model.ckpt-200",
                     ("/tmp/train/model.ckpt-100", "/tmp/train/model.ckpt-200")),
     b'model_checkpoint_path: "/tmp/train/model.ckpt-200"\n'
     b'all_model_checkpoint_paths: "/tmp/train/model.ckpt-100"\n'
     b'all_model_checkpoint_paths: "/tmp/train/model.ckpt-200"\n'),
    (CheckpointState("ckpt-2", ("ckpt-1", "ckpt-2"), (1700000000.123456, 1700003600.5),
                     1699999999.0),
     b'model_checkpoint_path: "ckpt-2"\n'
     b'all_model_checkpoint_paths: "ckpt-1"\n'
     b'all_model_checkpoint_paths: "ckpt-2"\n'
     b"all_model_checkpoint_timestamps: 1700000000.123456\n"
     b"all_model_checkpoint_timestamps: 1700003600.5\n"
     b"last_preserved_timestamp: 1699999999.0\n"),
    (CheckpointState("we\"ird\\ 'name'\n\r\t\x00\x01\x1b\x7f\u00e9\u20ac\U0001F600"),
     b'model_checkpoint_path: "we\\"ird\\\\ \\\'name\\\'\\n\\r\\t\\000\\001\\033\\177'
     b'\\303\\251\\342\\202\\254\\360\\237\\230\\200"\n'),
    # (13 timestamps without paths: TF writes no such file, but MessageToString would)
    (CheckpointState("x", (), (1e20, 1e16, 1e-7, 0.1, 5e-324, 1.7976931348623157e308,
                               math.inf, -math.inf, math.nan, -0.0, 0.0,
                               123456789012345678.0, 1e15), -0.0),
     b'model_checkpoint_path: "x"\n'
     + b"".join(b"all_model_checkpoint_timestamps: %s\n" % v for v in [
         b"1e+20", b"1e+16", b"1e-07", b"0.1", b"5e-324", b"1.7976931348623157e+308",
         b"inf", b"-inf", b"nan", b"-0.0", b"0.0", b"1.2345678901234568e+17",
         b"1000000000000000.0"])
     + b"last_preserved_timestamp: -0.0\n"),
]


def _bits(value: float) -> object:
    return "nan" if math.isnan(value) else struct.pack("<d", value)


def _same(a: CheckpointState, b: CheckpointState) -> bool:
    """Equality with NaN equal to NaN and -0.0 distinct from 0.0."""
    return (a.model_checkpoint_path == b.model_checkpoint_path
            and a.all_model_checkpoint_paths == b.all_model_checkpoint_paths
            and [_bits(t) for t in a.all_model_checkpoint_timestamps]
            == [_bits(t) for t in b.all_model_checkpoint_timestamps]
            and _bits(a.last_preserved_timestamp) == _bits(b.last_preserved_timestamp))


@pytest.mark.parametrize(("state", "data"), TF_OUTPUTS)
def test_encode_matches_tensorflow_byte_for_byte(state, data):
    assert encode_state(state) == data
    if len(state.all_model_checkpoint_timestamps) in (0, len(state.all_model_checkpoint_paths)):
        assert _same(decode_state(data, source="checkpoint"), state)


def test_defaults_are_omitted_and_negative_zero_is_not():
    assert encode_state(CheckpointState("")) == b""
    assert encode_state(CheckpointState("a", last_preserved_timestamp=0.0)) == (
        b'model_checkpoint_path: "a"\n')
    assert encode_state(CheckpointState("a", last_preserved_timestamp=-0.0)).endswith(
        b"last_preserved_timestamp: -0.0\n")
    assert encode_state(CheckpointState("a", (), (1, 2))) == (  # ints are written as doubles
        b'model_checkpoint_path: "a"\n'
        b"all_model_checkpoint_timestamps: 1.0\nall_model_checkpoint_timestamps: 2.0\n")


def test_unencodable_path_is_a_value_error():
    with pytest.raises(ValueError):
        encode_state(CheckpointState("bad\udcff"))


# -- what the reader accepts ------------------------------------------------------------------

ACCEPTED = [
    # TF's checkpoint_management_test: indentation, "./" paths, no timestamps.
    (b'\n        model_checkpoint_path: "./model.ckpt-687529"\n'
     b'        all_model_checkpoint_paths: "./model.ckpt-687500"\n'
     b'        all_model_checkpoint_paths: "./model.ckpt-687529"\n        ',
     CheckpointState("./model.ckpt-687529", ("./model.ckpt-687500", "./model.ckpt-687529"))),
    # comments, CRLF, tabs, any field order, no space after ':', separators
    (b"# written by hand\r\nlast_preserved_timestamp:5 # trailing comment\r\n"
     b"\tall_model_checkpoint_timestamps: 10;all_model_checkpoint_paths:'b',\n"
     b'model_checkpoint_path:"b"\x0b\x0c',
     CheckpointState("b", ("b",), (10.0,), 5.0)),
    # list syntax (also empty lists), lists and lines mixed in order
    (b'model_checkpoint_path: "c" all_model_checkpoint_paths: ["a", \'b\']\n'
     b"all_model_checkpoint_paths: []\nall_model_checkpoint_paths: \"c\"\n"
     b"all_model_checkpoint_timestamps: [1, 2.5e0, 3.]",
     CheckpointState("c", ("a", "b", "c"), (1.0, 2.5, 3.0))),
    # adjacent literals concatenate; every escape form; raw UTF-8 (protobuf >= 5.26 writes it)
    (b'model_checkpoint_path: "a" \'b\' "\\x41\\x4\\101\\7\\0\\a\\b\\f\\v\\"\\\'\\\\"'
     b' "\\u00e9\\U0001F600\\303\\251\xc3\xa9"',
     CheckpointState('abA\x04A\x07\x00\x07\x08\x0c\x0b"\'\\\u00e9\U0001F600\u00e9\u00e9')),
    # numbers as TF's parser reads them
    (b'model_checkpoint_path: "n"\nall_model_checkpoint_paths: ["1","2","3","4","5","6","7"]\n'
     b"all_model_checkpoint_timestamps: [-inf, Infinity, -INFINITYF, inff, 1.5f, 2F, -.5]\n"
     b"last_preserved_timestamp: 1e400",
     CheckpointState("n", tuple("1234567"), (-math.inf, math.inf, -math.inf, math.inf,
                                             1.5, 2.0, -0.5), math.inf)),
    (b'model_checkpoint_path: "n" last_preserved_timestamp: NaN',
     CheckpointState("n", (), (), math.nan)),
    # paths are not judged here: the manager decides (is_safe_relative)
    (b'model_checkpoint_path: "../x\\000y"\nall_model_checkpoint_paths: "/abs"',
     CheckpointState("../x\x00y", ("/abs",))),
]


@pytest.mark.parametrize(("data", "state"), ACCEPTED)
def test_decode_accepts_the_text_format_tensorflow_reads(data, state):
    assert _same(decode_state(data, source="checkpoint"), state)


REJECTED = [
    (b"", "empty"),
    (b"  \n\t# only a comment\n", "empty"),
    (b'all_model_checkpoint_paths: "a"\n', "model_checkpoint_path is missing"),
    (b'model_checkpoint_path: ""\n', "missing or empty"),
    (b'model_checkpoint_path: "a"\nmodel_checkpoint_path: "b"\n', "more than once"),
    (b'model_checkpoint_path: "a"\nmodel_path: "b"\n', "unknown field 'model_path'"),
    (b'model_checkpoint_path "a"\n', "expected ':'"),
    (b'model_checkpoint_path: ["a"]\n', "not a repeated field"),
    (b"model_checkpoint_path: a\n", "needs a quoted string"),
    (b'model_checkpoint_path: "a\n"\n', "unterminated string"),
    (b'model_checkpoint_path: "a', "unterminated string"),
    (b'model_checkpoint_path: "a\\q"', "invalid escape"),
    (b'model_checkpoint_path: "a\\?"', "invalid escape"),
    (b'model_checkpoint_path: "\\X41"', "invalid escape"),
    (b'model_checkpoint_path: "\\x"', "invalid escape"),
    (b'model_checkpoint_path: "\\u12"', "invalid escape"),
    (b'model_checkpoint_path: "\\\xc3\xa9"', "invalid escape"),
    (b'model_checkpoint_path: "a\\', "unterminated string"),
    (b'model_checkpoint_path: "a\\\n"', "unterminated string"),
    (b"model_checkpoint_path: 'a\"", "unterminated string"),
    (b'model_checkpoint_path: "\\777"', "above"),
    (b'model_checkpoint_path: "\\ud800"', "not a Unicode scalar value"),
    (b'model_checkpoint_path: "\\377"', "not valid UTF-8"),
    (b'model_checkpoint_path: "\xff"', "not UTF-8"),
    (b'\xef\xbb\xbfmodel_checkpoint_path: "a"', "unexpected character"),
    (b'model_checkpoint_path: "a"\xc2\xa0', "unexpected character"),
    (b'model_checkpoint_path: "a" {', "unexpected character"),
    (b'model_checkpoint_path: "a"\nall_model_checkpoint_paths: ["a",]', "needs a quoted"),
    (b'model_checkpoint_path: "a"\nall_model_checkpoint_paths: ["a" "b"', "ends where"),
    (b'model_checkpoint_path: "a"\nall_model_checkpoint_paths: ["a";"b"]', "',' or ']'"),
    (b'model_checkpoint_path: "a"\nlast_preserved_timestamp:', "ends where"),
    (b'model_checkpoint_path: "a"\nlast_preserved_timestamp: "1"', "needs a number"),
    (b'model_checkpoint_path: "a"\nlast_preserved_timestamp: 0x10', "needs a number"),
    (b'model_checkpoint_path: "a"\nlast_preserved_timestamp: 010', "needs a number"),
    (b'model_checkpoint_path: "a"\nlast_preserved_timestamp: 1_0', "needs a number"),
    (b'model_checkpoint_path: "a"\nlast_preserved_timestamp: - 1', "needs a number"),
    (b'model_checkpoint_path: "a"\nlast_preserved_timestamp: true', "needs a number"),
    (b'model_checkpoint_path: "a"\nall_model_checkpoint_timestamps: 1\n', "1 all_model"),
    (b'model_checkpoint_path: "a"\nall_model_checkpoint_paths: ["a", "b"]\n'
     b"all_model_checkpoint_timestamps: 1\n", "1 all_model_checkpoint_timestamps for 2"),
    (b'model_checkpoint_path: "a",, ', "expected a field name"),
    (b'1: "a"', "expected a field name"),
]


@pytest.mark.parametrize(("data", "fault"), REJECTED)
def test_decode_rejects_everything_else_with_a_clear_message(data, fault):
    with pytest.raises(CorruptCheckpointError) as info:
        decode_state(data, source="/ckpts/checkpoint")
    message = str(info.value)
    assert "/ckpts/checkpoint" in message and fault in message
    assert "to recover, remove or rebuild the state file" in message


def test_errors_give_the_line():
    with pytest.raises(CorruptCheckpointError, match="line 3: unknown field 'oops'"):
        decode_state(b'model_checkpoint_path: "a"\n# note\noops: 1\n', source="s")


def test_token_and_escape_budget(monkeypatch):
    monkeypatch.setattr(_state_file, "MAX_STATE_TOKENS", 8)
    assert decode_state(b'model_checkpoint_path: "\\n\\t\\001\\x41\\u00e9"',
                        source="s") == CheckpointState("\n\t\x01A\u00e9")
    for data in (b'model_checkpoint_path: "\\n\\t\\001\\x41\\u00e9\\n"',
                 b'model_checkpoint_path: "a" "b" "c" "d" "e" "f" "g"',
                 b'model_checkpoint_path: "a" all_model_checkpoint_timestamps: [1, 2, 3]'):
        with pytest.raises(CorruptCheckpointError, match="more than 8 tokens and escapes"):
            decode_state(data, source="s")


def test_size_cap():
    head = b'model_checkpoint_path: "a"'
    data = head + b" " * (MAX_STATE_BYTES - len(head))
    assert decode_state(data, source="s") == CheckpointState("a")
    with pytest.raises(CorruptCheckpointError, match="more than the 16777216"):
        decode_state(data + b" ", source="s")


# -- properties ---------------------------------------------------------------------------------

_paths = st.text(max_size=12)
_times = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def _states(draw: st.DrawFn) -> CheckpointState:
    paths = draw(st.lists(_paths, max_size=5))
    stamps = draw(st.one_of(st.just([]), st.lists(_times, min_size=len(paths),
                                                    max_size=len(paths))))
    return CheckpointState(draw(_paths.filter(bool)), tuple(paths), tuple(stamps),
                           draw(_times))


@settings(max_examples=300, deadline=None)
@given(_states())
def test_encode_decode_round_trip(state):
    data = encode_state(state)
    assert data.isascii() and data.endswith(b"\n")
    assert _same(decode_state(data, source="s"), state)


_SYNTAX = st.sampled_from([b" ", b"\n", b":", b'"', b"'", b"[", b"]", b",", b";", b"#", b"\\",
                           b"0", b"1", b".", b"-", b"e", b"inf", b"nan", b"x", b"\xc3", b"\xff",
                           b"model_checkpoint_path", b"all_model_checkpoint_paths",
                           b"all_model_checkpoint_timestamps", b"last_preserved_timestamp",
                           b'"a"', b"\\303", b"\\u00e9"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.lists(_SYNTAX, max_size=24).map(b"".join)))
def test_decode_fails_only_with_corrupt_checkpoint_error(data):
    try:
        state = decode_state(data, source="s")
    except CorruptCheckpointError:
        return
    assert state.model_checkpoint_path
    assert _same(decode_state(encode_state(state), source="s"), state)


# -- is_safe_relative -------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "safe"), [
    ("ckpt-1", True), ("./ckpt-1", True), ("sub/ckpt-1", True), ("a..b", True),
    ("..ckpt", True), ("ckpt-1/", True), ("a//b", True), ("\u00e9 x", True),
    ("", False), (".", False), ("./", False), ("./.", False), ("..", False),
    ("../x", False), ("a/../b", False), ("a/..", False), ("/abs/ckpt", False),
    ("//server/x", False), ("a\\b", False), ("..\\x", False), ("C:ckpt", False),
    ("c:\\x", False), ("a\x00b", False),
])
def test_is_safe_relative(path, safe):
    assert is_safe_relative(path) is safe
