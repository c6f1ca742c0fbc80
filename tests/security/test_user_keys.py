"""A server's users: the key set (parsing, rules), and both handshakes against several keys, sans-IO."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.security.datagram import DatagramClient, DatagramServer, StatelessReset
from vtunnel.security.errors import AuthenticationFailed, SecurityError
from vtunnel.security.keys import (
    KEY_LEN,
    MAX_USERS,
    KeySet,
    UserKey,
    check_user_name,
    decode_user_keys,
    generate_key,
)
from vtunnel.security.records import MAX_HANDSHAKE_LEN, SecureStreamClient, SecureStreamServer
from vtunnel.security.replay import ReplayCache

NOW = 1_700_000_000.0
SRC = ("192.0.2.1", 4000)


def users(n: int, *, seed: int = 7) -> KeySet:
    rng = random.Random(seed)
    return KeySet(UserKey(f"user{i}", rng.randbytes(KEY_LEN)) for i in range(n))


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", fullmatch=True)


# ------------------------------------------------------------------------------------------------ the key set


@settings(max_examples=100, deadline=None)
@given(
    entries=st.dictionaries(names, st.binary(min_size=KEY_LEN, max_size=KEY_LEN), min_size=1, max_size=20),
    comments=st.booleans(),
)
def test_a_file_of_named_keys_reads_back_as_written(entries: dict[str, bytes], comments: bool) -> None:
    if len(set(entries.values())) != len(entries):
        return  # two users with one key: refused (below)
    import base64

    lines = ["# users", ""] if comments else []
    for name, key in entries.items():
        lines.append(f"  {name}\t{base64.urlsafe_b64encode(key).rstrip(b'=').decode()}  ")
    keys = decode_user_keys("\n".join(lines) + "\n")
    assert keys.users == tuple(entries)
    assert {(e.user, e.key) for e in keys} == set(entries.items())
    assert all(UserKey(name, key) in keys for name, key in entries.items())


def error_of(text: str) -> str | None:
    """The message of the error ``text`` is read with, or None when it reads."""
    try:
        decode_user_keys(text, source="users")
    except SecurityError as exc:
        return str(exc)
    return None


@settings(max_examples=100, deadline=None)
@given(line=st.text(max_size=120))
def test_a_bad_line_is_an_error_naming_the_line_and_never_the_text(line: str) -> None:
    key = generate_key()
    message = error_of(f"alice {key}\n{line}\n")
    if message is None:
        assert "alice" in decode_user_keys(f"alice {key}\n{line}\n").users
        return
    assert message.startswith("users")
    assert key not in message
    fields = line.split()
    if len(fields) == 2 and len(fields[1]) >= 8:  # what stands where a key goes is never repeated
        assert fields[1] not in message


def test_key_set_rules() -> None:
    a, b = os.urandom(KEY_LEN), os.urandom(KEY_LEN)
    with pytest.raises(SecurityError, match="same key"):
        KeySet([UserKey("alice", a), UserKey("bob", a)])
    with pytest.raises(SecurityError, match="named twice"):
        KeySet([UserKey("alice", a), UserKey("alice", b)])
    with pytest.raises(SecurityError, match="at least one"):
        KeySet([])
    with pytest.raises(SecurityError, match="at most"):
        users(MAX_USERS + 1)
    assert len(users(MAX_USERS)) == MAX_USERS
    with pytest.raises(SecurityError, match="32 bytes"):
        KeySet([UserKey("alice", b"short")])
    for bad in ("", ".hidden", "-x", "a b", "a/b", "x" * 65, "é"):
        with pytest.raises(SecurityError, match="user name"):
            check_user_name(bad)
    keys = KeySet([UserKey("alice", a), UserKey("bob", b)])
    assert UserKey("alice", a) in keys
    assert UserKey("alice", b) not in keys  # the user, with that very key
    assert a.hex() not in repr(keys)
    assert "alice" in repr(keys)
    assert a.hex() not in repr(UserKey("alice", a))
    with pytest.raises(SecurityError, match="line 2: expected NAME KEY"):
        decode_user_keys(f"alice {generate_key()}\nbob\n")
    with pytest.raises(SecurityError, match="holds no key"):
        decode_user_keys("# nobody\n")


# ------------------------------------------------------------------------------------------------ stream handshake


def stream_handshake(client_key: bytes, keys: KeySet, *, chunk: int | None = None) -> SecureStreamServer:
    client = SecureStreamClient(client_key, now=NOW)
    server = SecureStreamServer(keys, replay=ReplayCache())
    first = client.data_to_send()
    pieces = [first] if chunk is None else [first[i : i + chunk] for i in range(0, len(first), chunk)]
    for piece in pieces:
        server.receive_data(piece, NOW)
    client.receive_data(server.data_to_send(), NOW)
    assert client.handshake_complete
    server.send(b"to the client")
    assert client.receive_data(server.data_to_send(), NOW) == b"to the client"
    return server


@pytest.mark.parametrize("count", [1, 2, 64, MAX_USERS])
def test_each_users_key_opens_a_stream_and_the_server_knows_whose(count: int) -> None:
    keys = users(count)
    for entry in [*list(keys)[:: max(1, count // 8)], list(keys)[-1]]:
        server = stream_handshake(entry.key, keys)
        assert server.user == entry


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), chunk=st.integers(1, 64))
def test_several_keys_byte_by_byte(seed: int, chunk: int) -> None:
    keys = users(40, seed=seed)
    entry = list(keys)[seed % 40]
    assert stream_handshake(entry.key, keys, chunk=chunk).user == entry


def test_a_key_not_in_the_set_fails_and_nothing_is_sent() -> None:
    keys = users(64)
    client = SecureStreamClient(os.urandom(KEY_LEN), now=NOW)
    server = SecureStreamServer(keys, replay=ReplayCache())

    # some other keys unmask a longer frame (about 1 in 64): the server waits for it, as for any short frame,
    # and fails once every key that could be the one has failed
    def feed() -> None:
        server.receive_data(client.data_to_send(), NOW)
        assert server.data_to_send() == b""
        for _ in range(MAX_HANDSHAKE_LEN // 100 + 1):
            server.receive_data(os.urandom(100), NOW)
            assert server.data_to_send() == b""

    with pytest.raises(AuthenticationFailed):
        feed()
    assert server.data_to_send() == b""
    assert server.user is None


# ------------------------------------------------------------------------------------------------ datagrams


def test_each_users_key_opens_a_datagram_session_and_the_session_knows_whose() -> None:
    keys = users(64)
    server = DatagramServer(keys, replay=ReplayCache())
    for entry in list(keys)[::9]:
        client = DatagramClient(entry.key, now=NOW)
        got = server.accept(client.initial_datagram(), SRC, NOW)
        assert got is not None
        session, reply = got
        assert session.user == entry
        client.receive(reply, NOW)
        assert client.established
        assert session.open(client.seal(b"hello")) == b"hello"
    stranger = DatagramClient(os.urandom(KEY_LEN), now=NOW)
    assert server.accept(stranger.initial_datagram(), SRC, NOW) is None


def test_replacing_the_keys_refuses_a_removed_user_from_then_on() -> None:
    keys = users(3)
    alice, bob, carol = keys
    server = DatagramServer(keys, replay=ReplayCache())
    server.keys = KeySet([alice, carol])
    assert server.accept(DatagramClient(bob.key, now=NOW).initial_datagram(), SRC, NOW) is None
    got = server.accept(DatagramClient(carol.key, now=NOW).initial_datagram(), SRC, NOW)
    assert got is not None
    assert got[0].user == carol


def test_a_reset_is_sealed_under_the_key_that_minted_the_connection_id() -> None:
    keys = users(5)
    server = DatagramServer(keys, replay=ReplayCache())
    resets = StatelessReset(keys)
    for entry in keys:
        client = DatagramClient(entry.key, now=NOW)
        got = server.accept(client.initial_datagram(), SRC, NOW)
        assert got is not None
        client.receive(got[1], NOW)
        lost = client.seal(b"x" * 100)  # the server forgot the session: its next datagram gets a reset
        reset = resets.answer(lost, SRC, NOW)
        assert reset is not None
        client.receive(reset, NOW)
        assert client.reset
    # a revoked user's sessions get silence, not a reset
    first = next(iter(keys))
    client = DatagramClient(first.key, now=NOW)
    got = server.accept(client.initial_datagram(), SRC, NOW)
    assert got is not None
    client.receive(got[1], NOW)
    resets.keys = KeySet(list(keys)[1:])
    assert resets.answer(client.seal(b"x" * 100), SRC, NOW) is None
