"""A client and a server driven in memory: many streams, random chunking of the byte stream, both modes."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.protocol.helpers import EXTENDED, VPROXY, Side, handshake, pump
from vtunnel.protocol import (
    LocalProtocolError,
    StreamMetadata,
    StreamState,
    TunnelConfig,
    TunnelState,
    events,
)

CONFIGS = {
    "vproxy": VPROXY,
    "extended": EXTENDED,
    "gzip-small-windows": TunnelConfig(gzip=True, initial_stream_window=4096, initial_tunnel_window=16384),
    "small-frames": TunnelConfig(max_frame_size=1024, initial_stream_window=2048, initial_tunnel_window=8192),
}


class App:
    """Both applications: the client uploads a payload per stream, the server answers with it reversed."""

    def __init__(self, client: Side, server: Side, rng: random.Random, n_streams: int) -> None:
        self.client, self.server, self.rng = client, server, rng
        self.upload: dict[int, bytes] = {}
        self.download: dict[int, bytes] = {}
        self.to_send: dict[tuple[str, int], memoryview] = {}
        self.got: dict[tuple[str, int], bytearray] = {}
        self.ended: set[tuple[str, int]] = set()
        for _ in range(n_streams):
            size = rng.choice((0, 1, 100, 5000, 70_000))
            body = rng.randbytes(size) if rng.random() < 0.5 else bytes(size)
            kind = rng.choice(("tcp", "lite-tls"))  # udp streams are datagrams: tested on their own
            # a vproxy tunnel cannot name a destination: its streams carry none
            named = (
                StreamMetadata(authority="127.0.0.1:9", kind=kind)
                if client.tunnel.extensions.metadata
                else None
            )
            sid = client.tunnel.open_stream(metadata=named)
            self.upload[sid] = body
            self.to_send["c", sid] = memoryview(body)

    def side(self, name: str) -> Side:
        return self.client if name == "c" else self.server

    def push(self) -> None:
        for (name, sid), rest in list(self.to_send.items()):
            t = self.side(name).tunnel
            if t.stream_state(sid) not in (
                StreamState.SYN_SENT,
                StreamState.ESTABLISHED,
                StreamState.FIN_RECV,
            ):
                continue
            n = min(len(rest), t.send_window(sid), self.rng.choice((1, 1000, 50_000)))
            if n or not rest:
                t.send_data(sid, rest[:n], end_stream=n == len(rest))
                self.to_send[name, sid] = rest[n:]
                if n == len(rest):
                    del self.to_send[name, sid]

    def collect(self) -> None:
        for name in ("c", "s"):
            side = self.side(name)
            for ev in side.events:
                if isinstance(ev, events.StreamOpened):
                    assert ev.metadata is None or ev.metadata.authority == "127.0.0.1:9"
                    side.tunnel.accept_stream(ev.stream_id)
                elif isinstance(ev, events.DataReceived):
                    self.got.setdefault((name, ev.stream_id), bytearray()).extend(ev.data)
                    side.tunnel.acknowledge_received_data(ev.stream_id, len(ev.data))
                elif isinstance(ev, events.StreamEnded):
                    self.ended.add((name, ev.stream_id))
                    if name == "s":
                        body = bytes(self.got.get(("s", ev.stream_id), b""))[::-1]
                        self.download[ev.stream_id] = body
                        self.to_send["s", ev.stream_id] = memoryview(body)
                elif isinstance(ev, events.StreamReset | events.TunnelClosed):
                    raise AssertionError(ev)
            side.events.clear()


def run(config: TunnelConfig, seed: int, n_streams: int = 12) -> None:
    rng = random.Random(seed)
    client, server = handshake(config)
    app = App(client, server, rng, n_streams)
    give_up = time.monotonic() + 60  # bounded in count and in time
    for _ in range(5000):
        assert time.monotonic() < give_up
        app.push()
        pump(client, server, rng=rng)
        app.collect()
        if len(app.ended) == 2 * n_streams and not app.to_send:
            break
    else:
        raise AssertionError("transfer did not finish")
    for sid, body in app.upload.items():
        assert bytes(app.got.get(("s", sid), b"")) == body
        assert bytes(app.got.get(("c", sid), b"")) == body[::-1]
        assert client.tunnel.stream_state(sid) is StreamState.DEAD
        assert server.tunnel.stream_state(sid) is StreamState.DEAD
        client.tunnel.close_stream(sid)
        server.tunnel.close_stream(sid)
        assert client.tunnel.stream_state(sid) is StreamState.REAL_CLOSED
    assert client.tunnel.open_stream_count == 0
    assert server.tunnel.open_stream_count == 0
    assert client.tunnel.state is TunnelState.READY


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", range(4))
def test_streams_survive_random_chunking(name: str, seed: int) -> None:
    run(CONFIGS[name], seed)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), name=st.sampled_from(list(CONFIGS)), n=st.integers(1, 6))
def test_streams_survive_random_chunking_hypothesis(seed: int, name: str, n: int) -> None:
    run(CONFIGS[name], seed, n)


def test_zero_rtt_data_follows_the_syn_before_the_synack() -> None:
    client, server = handshake(EXTENDED)
    sid = client.tunnel.open_stream(metadata=StreamMetadata(authority="[::1]:443", kind="lite-tls"))
    client.tunnel.send_data(sid, b"early", end_stream=True)
    server.events.extend(server.tunnel.receive_data(client.tunnel.data_to_send(), 0))
    assert server.events == [
        events.StreamOpened(stream_id=sid, metadata=StreamMetadata(authority="[::1]:443", kind="lite-tls")),
        events.WindowUpdated(stream_id=sid),  # the client's first grant follows its SYN
        events.DataReceived(stream_id=sid, data=b"early"),
        events.StreamEnded(stream_id=sid),
    ]
    server.tunnel.reset_stream(sid, error="unreachable")
    client.events.extend(client.tunnel.receive_data(server.tunnel.data_to_send(), 0))
    assert client.events == [events.StreamReset(stream_id=sid, error="unreachable")]


def test_without_metadata_data_waits_in_the_core_until_the_synack() -> None:
    client, server = handshake(VPROXY)
    sid = client.tunnel.open_stream()
    window = client.tunnel.send_window(sid)
    assert window == VPROXY.initial_stream_window
    client.tunnel.send_data(sid, b"a" * 1000, end_stream=True)
    assert client.tunnel.send_window(sid) == 0  # after FIN nothing more may be sent
    syn = client.tunnel.data_to_send()
    assert syn == bytes.fromhex("000000010000000001")
    server.events.extend(server.tunnel.receive_data(syn, 0))
    assert server.events == [events.StreamOpened(stream_id=sid, metadata=None)]
    server.tunnel.accept_stream(sid)
    pump(client, server)
    assert server.data(sid) == b"a" * 1000
    assert server.of(events.StreamEnded) == [events.StreamEnded(stream_id=sid)]


def test_half_close_both_ways() -> None:
    for config in (VPROXY, EXTENDED):
        client, server = handshake(config)
        sid = client.tunnel.open_stream()
        pump(client, server)
        server.tunnel.accept_stream(sid)
        client.tunnel.end_stream(sid)
        pump(client, server)
        assert server.tunnel.stream_state(sid) is StreamState.FIN_RECV
        assert client.tunnel.stream_state(sid) is StreamState.FIN_SENT
        server.tunnel.send_data(sid, b"after your FIN")
        server.tunnel.send_data(sid, b"; still going", end_stream=True)
        pump(client, server)
        assert client.data(sid) == b"after your FIN; still going"
        assert client.tunnel.stream_state(sid) is StreamState.DEAD
        assert server.tunnel.stream_state(sid) is StreamState.DEAD
        assert client.tunnel.open_stream_count == 0


def test_server_refuses_streams_over_the_limit() -> None:
    config = TunnelConfig(max_concurrent_streams=2)
    client, server = handshake(config, TunnelConfig(max_concurrent_streams=1))
    first = client.tunnel.open_stream()
    second = client.tunnel.open_stream()
    pump(client, server)
    assert client.of(events.StreamReset) == [events.StreamReset(stream_id=second, error="refused")]
    assert server.tunnel.stream_state(first) is StreamState.ESTABLISHED
    client.tunnel.open_stream()
    with pytest.raises(LocalProtocolError, match="max_concurrent_streams"):
        client.tunnel.open_stream()


def test_udp_stream_keeps_datagram_boundaries() -> None:
    client, server = handshake(TunnelConfig(max_frame_size=1024))
    sid = client.tunnel.open_stream(metadata=StreamMetadata(authority="127.0.0.1:53", kind="udp"))
    datagrams = [b"a" * 1024, b"", b"bc", b"d" * 700]
    for d in datagrams:
        client.tunnel.send_data(sid, d)
    with pytest.raises(LocalProtocolError, match="datagram"):
        client.tunnel.send_data(sid, b"e" * 1025)
    pump(client, server)
    got = [e.data for e in server.of(events.DataReceived)]
    assert got == datagrams
    assert client.tunnel.max_frame_payload == 1024
    server.tunnel.send_data(sid, b"reply")
    server.tunnel.send_data(sid, b"")
    pump(client, server)
    assert [e.data for e in client.of(events.DataReceived)] == [b"reply", b""]
