"""kcp-go's crypt header and ciphers: round trips, tamper detection, and garbage raising only CryptError."""

from __future__ import annotations

import contextlib
import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.kcptun.crypt import (
    CIPHERS,
    HEADER_SIZE,
    UNSUPPORTED,
    PacketCrypt,
    derive_key,
    make_block_crypt,
)
from vtunnel.kcptun.errors import ConfigError, CryptError

CRYPTS = {name: PacketCrypt(make_block_crypt(name, "secret")) for name in CIPHERS}


def test_key_is_pbkdf2_sha1_with_kcptuns_salt() -> None:
    assert derive_key("it's a secrect") == hashlib.pbkdf2_hmac("sha1", b"it's a secrect", b"kcp-go", 4096, 32)
    assert len(derive_key(b"x")) == 32


def test_a_cipher_not_offered_is_a_config_error_naming_it() -> None:
    for name in UNSUPPORTED:  # kcptun's, without a library here
        with pytest.raises(ConfigError, match=f"kcptun's crypt '{name}' is not supported: "):
            make_block_crypt(name, "k")
    with pytest.raises(ConfigError, match=re.escape("crypt 'aes-256' is not supported (supported: aes, ")):
        make_block_crypt("aes-256", "k")  # kcptun would quietly take it for aes


def test_salsa20_leaves_the_first_eight_bytes_in_clear() -> None:
    crypt = PacketCrypt(make_block_crypt("salsa20", "k"), entropy=lambda n: bytes(range(n)))
    sealed = crypt.seal(b"abc" * 50)
    assert sealed[:8] == bytes(range(8))
    assert sealed[8:16] != bytes(range(8, 16))


@pytest.mark.parametrize("name", sorted(CIPHERS))
@given(payload=st.binary(max_size=1500))
def test_seal_open_round_trip(name: str, payload: bytes) -> None:
    crypt = CRYPTS[name]
    sealed = crypt.seal(payload)
    assert len(sealed) == len(payload) + HEADER_SIZE
    assert crypt.open(sealed) == payload


def test_none_keeps_the_header_in_clear() -> None:
    crypt = PacketCrypt(make_block_crypt("none", "k"), entropy=lambda n: b"\x01" * n)
    sealed = crypt.seal(b"abc")
    assert sealed[:16] == b"\x01" * 16
    assert sealed[20:] == b"abc"


@pytest.mark.parametrize("name", sorted(CIPHERS))
@given(payload=st.binary(min_size=1, max_size=300), index=st.integers(min_value=HEADER_SIZE))
def test_a_flipped_payload_byte_fails_the_crc(name: str, payload: bytes, index: int) -> None:
    crypt = CRYPTS[name]
    sealed = bytearray(crypt.seal(payload))
    sealed[index % len(sealed) if index < len(sealed) else -1] ^= 0x40
    with pytest.raises(CryptError):
        crypt.open(bytes(sealed))


def test_wrong_key_fails() -> None:
    sealed = PacketCrypt(make_block_crypt("aes", "one")).seal(b"x" * 100)
    with pytest.raises(CryptError):
        PacketCrypt(make_block_crypt("aes", "two")).open(sealed)


@pytest.mark.parametrize("name", sorted(CIPHERS))
@given(garbage=st.binary(max_size=200))
def test_garbage_raises_only_crypt_error(name: str, garbage: bytes) -> None:
    with contextlib.suppress(CryptError):
        CRYPTS[name].open(garbage)
