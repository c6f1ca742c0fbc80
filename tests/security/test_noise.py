"""The Noise NNpsk0 handshake: interoperability with the independent ``noiseprotocol`` package, fixed vectors,
and robustness (a forged message changes nothing)."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from vtunnel.security.errors import AuthenticationFailed, SecurityError
from vtunnel.security.noise import PROTOCOL_NAME, CipherState, Initiator, Responder

PSK = bytes(range(32))
E_INIT = bytes.fromhex("01" * 32)
E_RESP = bytes.fromhex("02" * 32)


def _their(initiator: bool, prologue: bytes, ephemeral: bytes | None) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    conn.set_psks(PSK)
    conn.set_prologue(prologue)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    if ephemeral is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conn.start_handshake()
    return conn


@pytest.mark.parametrize("prologue", [b"", b"vtunnel stream v1"])
def test_our_initiator_with_their_responder(prologue: bytes) -> None:
    ours = Initiator(PSK, prologue=prologue)
    theirs = _their(False, prologue, None)
    assert bytes(theirs.read_message(ours.write_message1(b"hello"))) == b"hello"
    assert ours.read_message2(bytes(theirs.write_message(b"world"))) == b"world"
    assert ours.keys is not None
    assert ours.keys.handshake_hash == theirs.get_handshake_hash()
    assert CipherState(ours.keys.receive).decrypt(theirs.encrypt(b"down")) == b"down"
    assert bytes(theirs.decrypt(CipherState(ours.keys.send).encrypt(b"up"))) == b"up"


@pytest.mark.parametrize("prologue", [b"", b"vtunnel datagram v1"])
def test_their_initiator_with_our_responder(prologue: bytes) -> None:
    theirs = _their(True, prologue, None)
    ours = Responder(PSK, prologue=prologue)
    assert ours.read_message1(bytes(theirs.write_message(b"x" * 100))) == b"x" * 100
    assert bytes(theirs.read_message(ours.write_message2(b""))) == b""
    assert ours.keys is not None
    assert ours.keys.handshake_hash == theirs.get_handshake_hash()
    assert bytes(theirs.decrypt(CipherState(ours.keys.send).encrypt(b"down"))) == b"down"


def test_fixed_ephemeral_keys_give_the_same_bytes_as_the_reference() -> None:
    ours_i = Initiator(PSK, prologue=b"p", ephemeral=E_INIT)
    ours_r = Responder(PSK, prologue=b"p", ephemeral=E_RESP)
    their_i = _their(True, b"p", E_INIT)
    their_r = _their(False, b"p", E_RESP)
    m1 = ours_i.write_message1(b"payload-1")
    assert m1 == bytes(their_i.write_message(b"payload-1"))
    assert ours_r.read_message1(m1) == b"payload-1"
    their_r.read_message(m1)
    m2 = ours_r.write_message2(b"payload-2")
    assert m2 == bytes(their_r.write_message(b"payload-2"))
    assert ours_i.read_message2(m2) == b"payload-2"


# Pinned vector: fixed PSK, prologue, ephemeral keys and payloads -> these exact bytes (checked against the
# reference implementation above; pinned so that any change to the wire is seen).
VECTOR_M1 = (
    "a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209"
    "91c4b05dc6eebe19e07befcdbdd5864b2a2f718a8b30"
)
VECTOR_M2 = "ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d5927a73e18389e3ceb197c2c88dc8404d0"


def test_pinned_vector() -> None:
    i = Initiator(PSK, prologue=b"vtunnel", ephemeral=E_INIT)
    r = Responder(PSK, prologue=b"vtunnel", ephemeral=E_RESP)
    m1 = i.write_message1(b"abcdef")
    assert m1.hex() == VECTOR_M1
    r.read_message1(m1)
    m2 = r.write_message2(b"")
    assert m2.hex() == VECTOR_M2
    i.read_message2(m2)
    assert i.keys is not None
    assert r.keys is not None
    assert (i.keys.send, i.keys.receive) == (r.keys.receive, r.keys.send)


def test_wrong_psk_fails_on_the_first_message() -> None:
    i = Initiator(PSK)
    r = Responder(bytes(32))
    with pytest.raises(AuthenticationFailed):
        r.read_message1(i.write_message1(b""))


def test_prologue_mismatch_fails() -> None:
    i = Initiator(PSK, prologue=b"a")
    with pytest.raises(AuthenticationFailed):
        Responder(PSK, prologue=b"b").read_message1(i.write_message1(b""))


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_forged_reply_changes_nothing(position: int, flip: int) -> None:
    i = Initiator(PSK)
    r = Responder(PSK)
    r.read_message1(i.write_message1(b"hi"))
    m2 = bytearray(r.write_message2(b"reply"))
    good = bytes(m2)
    m2[position % len(m2)] ^= flip
    with pytest.raises(AuthenticationFailed):
        i.read_message2(bytes(m2))
    assert i.keys is None
    assert i.read_message2(good) == b"reply"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_first_messages_only_fail_authentication(data: bytes) -> None:
    r = Responder(PSK)
    with pytest.raises(AuthenticationFailed):
        r.read_message1(data)
    assert r.remote_ephemeral is None


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little")])
def test_low_order_ephemeral_is_refused(point: bytes) -> None:
    # Small-order points give an all-zero shared secret: refused as an authentication failure, not a crash.
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from vtunnel.security import noise

    with pytest.raises(AuthenticationFailed):
        noise._dh(X25519PrivateKey.generate(), point)


def test_misuse_is_a_security_error() -> None:
    with pytest.raises(SecurityError):
        Initiator(b"short")
    i = Initiator(PSK)
    with pytest.raises(SecurityError):
        i.read_message2(bytes(48))
    i.write_message1(b"")
    with pytest.raises(SecurityError):
        i.write_message1(b"")
    r = Responder(PSK)
    with pytest.raises(SecurityError):
        r.write_message2(b"")


def test_cipher_state_refuses_reordered_records() -> None:
    key = bytes(range(32))
    out = CipherState(key)
    a, b = out.encrypt(b"a"), out.encrypt(b"b")
    inn = CipherState(key)
    with pytest.raises(AuthenticationFailed):
        inn.decrypt(b)
    assert inn.decrypt(a) == b"a"
    assert inn.decrypt(b) == b"b"
    assert "key" not in repr(inn)
    assert key.hex() not in repr(inn)
