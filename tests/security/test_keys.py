"""Pre-shared keys: generation, parsing (only SecurityError escapes), key files."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.config import load_psk_file, write_key_file
from vtunnel.security.errors import SecurityError
from vtunnel.security.keys import decode_key, decode_key_file, generate_key


def test_generated_keys_are_fresh_printable_and_decode_to_32_bytes() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    for k in keys:
        assert k.isascii()
        assert k.isprintable()
        assert " " not in k
        assert len(decode_key(k)) == 32


def test_other_spellings_are_accepted() -> None:
    raw = bytes(range(32))
    assert decode_key(raw.hex()) == raw
    assert decode_key(raw.hex().upper()) == raw
    assert decode_key(base64.b64encode(raw).decode()) == raw
    assert decode_key("  " + base64.urlsafe_b64encode(raw).decode().rstrip("=") + "\n") == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "abc",
        "not a key at all",
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        "g" * 64,
        "YW Jj" * 10,
        "%%%%",
    ],
)
def test_bad_keys_are_a_clear_security_error(text: str) -> None:
    with pytest.raises(SecurityError) as info:
        decode_key(text)
    assert "key" in str(info.value)
    if len(text) > 8:
        assert text.strip() not in str(info.value)  # the text is never echoed


@given(st.text(max_size=100))
def test_decode_key_raises_only_security_error(text: str) -> None:
    with contextlib.suppress(SecurityError):
        assert len(decode_key(text)) == 32


def test_key_files(tmp_path: Path) -> None:
    raw = bytes(range(32))
    good = tmp_path / "good"
    write_key_file(good, "# vtunnel key\n\n" + base64.b64encode(raw).decode() + "\n")
    assert load_psk_file(good) == raw
    assert load_psk_file(str(good)) == raw
    empty = tmp_path / "empty"
    write_key_file(empty, "# nothing\n\n")
    bad = tmp_path / "bad"
    write_key_file(bad, "hunter2\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    binary.chmod(0o600)
    for path in (empty, bad, binary, tmp_path / "missing"):
        with pytest.raises(SecurityError) as info:
            load_psk_file(path)
        assert "hunter2" not in str(info.value)


@given(st.text(max_size=200))
def test_a_key_files_text_gives_its_key_or_a_security_error(text: str) -> None:
    with contextlib.suppress(SecurityError):
        assert len(decode_key_file(text)) == 32


def test_a_key_file_may_hold_comments_and_blank_lines_before_the_key() -> None:
    raw = bytes(range(32))
    assert decode_key_file("# a comment\n\n  " + raw.hex() + "  \n# trailing\n") == raw
    with pytest.raises(SecurityError, match="is empty"):
        decode_key_file("# only a comment\n")
