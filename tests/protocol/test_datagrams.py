"""Unreliable datagrams of ``udp`` streams (the ``datagrams`` extension): negotiation, the codec, which path a
datagram takes, and that nothing the peer sends as a datagram can hurt the tunnel."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.protocol.helpers import EXTENDED, VPROXY, Side, pump
from vtunnel.protocol import ConfigError, Role, StreamMetadata, StreamState, Tunnel, TunnelConfig, TunnelState
from vtunnel.protocol import events as ev
from vtunnel.protocol import frames as fr

#: what a keyless rudp client's link carries (1350-byte packets, the server's 8-byte connection ID)
LINK_DATAGRAM = 1330
UDP = StreamMetadata(authority="127.0.0.1:53", kind="udp")
LIMIT = LINK_DATAGRAM - fr.DATAGRAM_HEADER_SIZE
NO_DATAGRAMS = TunnelConfig(datagrams=False)


def pair(
    client_config: TunnelConfig = EXTENDED,
    server_config: TunnelConfig = EXTENDED,
    *,
    client_datagram: int = LINK_DATAGRAM,
    server_datagram: int = LINK_DATAGRAM,
) -> tuple[Side, Side]:
    client = Side(Tunnel(role=Role.CLIENT, config=client_config, max_datagram=client_datagram))
    server = Side(Tunnel(role=Role.SERVER, config=server_config, max_datagram=server_datagram))
    client.tunnel.initiate(0.0)
    server.tunnel.initiate(0.0)
    pump(client, server)
    assert client.tunnel.state is TunnelState.READY
    client.events.clear()
    server.events.clear()
    return client, server


def udp_stream(client: Side, server: Side) -> int:
    """A ``udp`` stream both ends know is open (the server accepted it, the client has its SYN-ACK)."""
    sid = client.tunnel.open_stream(metadata=UDP)
    pump(client, server)
    server.tunnel.accept_stream(sid)
    pump(client, server)
    client.events.clear()
    server.events.clear()
    return sid


def deliver(src: Side, dst: Side) -> list[ev.Event]:
    """Move the queued unreliable datagrams from ``src`` to ``dst``, as a lossless network would."""
    out: list[ev.Event] = []
    for datagram in src.tunnel.datagrams_to_send():
        out += dst.tunnel.receive_datagram(datagram, 0.0)
    dst.events += out
    return out


# --- negotiation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_config", "server_config", "client_datagram", "server_datagram", "agreed"),
    [
        pytest.param(EXTENDED, EXTENDED, LINK_DATAGRAM, LINK_DATAGRAM, True, id="vtunnel-vtunnel"),
        pytest.param(EXTENDED, EXTENDED, LINK_DATAGRAM, 1200, True, id="different-sizes"),
        pytest.param(EXTENDED, EXTENDED, 0, LINK_DATAGRAM, False, id="client-link-without"),
        pytest.param(EXTENDED, EXTENDED, LINK_DATAGRAM, 0, False, id="server-link-without"),
        pytest.param(EXTENDED, EXTENDED, 0, 0, False, id="kcp-or-tcp"),
        pytest.param(NO_DATAGRAMS, EXTENDED, LINK_DATAGRAM, LINK_DATAGRAM, False, id="client-turned-off"),
        pytest.param(EXTENDED, NO_DATAGRAMS, LINK_DATAGRAM, LINK_DATAGRAM, False, id="server-turned-off"),
        pytest.param(
            EXTENDED, EXTENDED, fr.DATAGRAM_HEADER_SIZE, LINK_DATAGRAM, False, id="room-for-no-byte"
        ),
        pytest.param(VPROXY, EXTENDED, LINK_DATAGRAM, LINK_DATAGRAM, False, id="vproxy-client"),
        pytest.param(EXTENDED, VPROXY, LINK_DATAGRAM, LINK_DATAGRAM, False, id="vproxy-server"),
        pytest.param(VPROXY, VPROXY, LINK_DATAGRAM, LINK_DATAGRAM, False, id="vproxy-both"),
    ],
)
def test_negotiation_matrix(
    client_config: TunnelConfig,
    server_config: TunnelConfig,
    client_datagram: int,
    server_datagram: int,
    agreed: bool,
) -> None:
    client, server = pair(
        client_config, server_config, client_datagram=client_datagram, server_datagram=server_datagram
    )
    assert client.tunnel.extensions.datagrams is agreed
    assert server.tunnel.extensions.datagrams is agreed
    assert ("datagrams" in client.tunnel.extensions) is agreed


def test_the_offer_is_the_0x20_bit_of_extensions() -> None:
    tunnel = Tunnel(role=Role.CLIENT, config=EXTENDED, max_datagram=LINK_DATAGRAM)
    tunnel.initiate(0.0)
    offer = fr.decode_settings(tunnel.data_to_send()[fr.FRAME_HEADER_SIZE :])
    # flow-control, metadata, graceful-shutdown, lite-tls and lite-tls-runs (the core offers them unless told
    # not to), datagrams
    assert dict(offer)[0xF002] == 0xBB
    plain = Tunnel(role=Role.CLIENT, config=EXTENDED)
    plain.initiate(0.0)
    assert dict(fr.decode_settings(plain.data_to_send()[fr.FRAME_HEADER_SIZE :]))[0xF002] == 0x9B


@pytest.mark.parametrize("bad", [-1, 1.5, "1"])
def test_a_bad_max_datagram_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError):
        Tunnel(role=Role.CLIENT, max_datagram=bad)  # type: ignore[arg-type]


# --- the codec -------------------------------------------------------------------------------------------


@given(sid=st.integers(1, 2**31 - 1), payload=st.binary(max_size=2000))
def test_codec_round_trip(sid: int, payload: bytes) -> None:
    datagram = fr.encode_stream_datagram(sid, payload)
    assert datagram[:5] == bytes([0]) + sid.to_bytes(4, "big")
    decoded_sid, decoded = fr.decode_stream_datagram(datagram)
    assert (decoded_sid, bytes(decoded)) == (sid, payload)


@pytest.mark.parametrize(
    "datagram",
    [b"", b"\x00\x00\x00\x01", b"\x01\x00\x00\x00\x01x", b"\x00\x00\x00\x00\x00x", b"\x00\x80\x00\x00\x01x"],
    ids=["empty", "short", "unknown-kind", "stream-0", "top-bit"],
)
def test_codec_refuses_what_is_not_a_stream_datagram(datagram: bytes) -> None:
    with pytest.raises(fr.FrameError):
        fr.decode_stream_datagram(datagram)


# --- which path a datagram takes -------------------------------------------------------------------------


def test_datagrams_of_an_open_udp_stream_go_unreliable_both_ways() -> None:
    client, server = pair()
    sid = udp_stream(client, server)
    window = client.tunnel.send_window(sid)
    for payload in (b"", b"q", b"x" * LIMIT):
        client.tunnel.send_data(sid, payload)
        assert client.tunnel.data_to_send() == b""  # nothing in the ordered frame stream
        assert deliver(client, server) == [ev.DataReceived(stream_id=sid, data=payload)]
        server.tunnel.send_data(sid, payload[::-1])
        assert server.tunnel.data_to_send() == b""
        assert deliver(server, client) == [ev.DataReceived(stream_id=sid, data=payload[::-1])]
    assert client.tunnel.send_window(sid) == window  # no credit used
    assert (client.tunnel.datagrams_sent, server.tunnel.datagrams_received) == (3, 3)
    assert client.tunnel.datagrams_dropped == server.tunnel.datagrams_dropped == 0


def test_what_does_not_qualify_keeps_the_reliable_path() -> None:
    client, server = pair()
    sid = client.tunnel.open_stream(metadata=UDP)
    client.tunnel.send_data(sid, b"before the SYN-ACK")  # 0-RTT: ordered after the SYN
    assert not client.tunnel.has_datagrams_to_send
    pump(client, server)
    assert server.of(ev.DataReceived) == [ev.DataReceived(stream_id=sid, data=b"before the SYN-ACK")]
    server.tunnel.accept_stream(sid)
    pump(client, server)
    big = b"b" * (LIMIT + 1)  # larger than the link carries: a DATA frame (UDP may reorder the two paths)
    client.tunnel.send_data(sid, big)
    client.tunnel.send_data(sid, b"last", end_stream=True)  # with the FIN: ordered before it
    assert not client.tunnel.has_datagrams_to_send
    server.events.clear()
    pump(client, server)
    assert server.of(ev.DataReceived) == [
        ev.DataReceived(stream_id=sid, data=big),
        ev.DataReceived(stream_id=sid, data=b"last"),
    ]
    assert server.of(ev.StreamEnded) == [ev.StreamEnded(stream_id=sid)]
    tcp = client.tunnel.open_stream(metadata=StreamMetadata(authority="127.0.0.1:80"))
    pump(client, server)
    server.tunnel.accept_stream(tcp)
    pump(client, server)
    client.tunnel.send_data(tcp, b"bytes")
    assert not client.tunnel.has_datagrams_to_send


def test_without_the_extension_udp_streams_stay_reliable() -> None:
    client, server = pair(client_datagram=0)
    sid = udp_stream(client, server)
    client.tunnel.send_data(sid, b"d")
    assert not client.tunnel.has_datagrams_to_send
    pump(client, server)
    assert server.data(sid) == b"d"
    assert server.tunnel.receive_datagram(fr.encode_stream_datagram(sid, b"forged"), 0.0) == []
    assert server.tunnel.datagrams_dropped == 1


def test_unreliable_datagrams_return_no_credit_and_reliable_ones_still_do() -> None:
    client, server = pair()
    sid = udp_stream(client, server)
    window = client.tunnel.send_window(sid)
    big = b"r" * (LIMIT + 100)
    sent_reliable = 0
    for i in range(5000):  # far more than a window of each kind, read as it arrives
        client.tunnel.send_data(sid, b"u" * 1000)
        if i % 10 == 0:
            client.tunnel.send_data(sid, big)
            sent_reliable += len(big)
        evs = deliver(client, server) + server.tunnel.receive_data(client.tunnel.data_to_send(), 0.0)
        for event in evs:
            if isinstance(event, ev.DataReceived):
                server.tunnel.acknowledge_received_data(sid, len(event.data))
        client.events += client.tunnel.receive_data(server.tunnel.data_to_send(), 0.0)
    assert sent_reliable > 4 * window
    # every reliable byte's credit came back, and none for the 5 MB of unreliable ones (the window would be past
    # its largest size, and growing)
    assert window <= client.tunnel.send_window(sid) <= EXTENDED.max_stream_window
    assert client.tunnel.state is TunnelState.READY
    assert client.tunnel.stream_state(sid) is StreamState.ESTABLISHED
    assert server.tunnel.unacknowledged(sid) == 0
    assert server.tunnel.received_unread == 0


# --- what the peer sends cannot hurt ----------------------------------------------------------------------


def test_datagrams_that_cannot_be_delivered_are_dropped_and_counted() -> None:
    client, server = pair()
    sid = udp_stream(client, server)
    tcp = client.tunnel.open_stream(metadata=StreamMetadata(authority="127.0.0.1:80"))
    pump(client, server)
    window = server.tunnel.config.initial_stream_window
    dropped = [
        fr.encode_stream_datagram(sid + 100, b"unknown stream"),
        fr.encode_stream_datagram(tcp, b"not a udp stream"),
        fr.encode_stream_datagram(sid, b"x" * (server.tunnel.config.max_frame_size + 1)),
        b"\x07garbage",
    ]
    for datagram in dropped:
        assert server.tunnel.receive_datagram(datagram, 0.0) == []
    assert server.tunnel.datagrams_dropped == len(dropped)
    # an unread stream takes datagrams up to its window, then drops them, as a full socket buffer would
    taken = 0
    for _ in range(window // 1000 + 10):
        taken += len(server.tunnel.receive_datagram(fr.encode_stream_datagram(sid, b"y" * 1000), 0.0))
    assert taken == window // 1000
    assert server.tunnel.unacknowledged(sid) <= window
    # after the peer's FIN, and once the stream is closed, its datagrams are dropped
    client.tunnel.end_stream(sid)
    pump(client, server)
    before = server.tunnel.datagrams_dropped
    assert server.tunnel.receive_datagram(fr.encode_stream_datagram(sid, b"late"), 0.0) == []
    server.tunnel.close_stream(sid)
    assert server.tunnel.receive_datagram(fr.encode_stream_datagram(sid, b"later"), 0.0) == []
    assert server.tunnel.datagrams_dropped == before + 2
    assert server.tunnel.state is TunnelState.READY


def test_a_client_drops_datagrams_for_a_stream_not_yet_accepted() -> None:
    client, server = pair()
    sid = client.tunnel.open_stream(metadata=UDP)
    pump(client, server)
    # the server's answer overtook its SYN-ACK: dropped (the SYN-ACK opens the stream for datagrams)
    assert client.tunnel.receive_datagram(fr.encode_stream_datagram(sid, b"early"), 0.0) == []
    assert client.tunnel.datagrams_dropped == 1


def test_datagrams_before_the_handshake_are_dropped() -> None:
    server = Tunnel(role=Role.SERVER, config=EXTENDED, max_datagram=LINK_DATAGRAM)
    server.initiate(0.0)
    assert server.receive_datagram(fr.encode_stream_datagram(1, b"x"), 0.0) == []
    assert server.datagrams_dropped == 1
    assert server.state is TunnelState.INIT


@settings(max_examples=300, deadline=None)
@given(
    garbage=st.lists(
        st.binary(max_size=64)
        | st.builds(fr.encode_stream_datagram, st.integers(1, 9), st.binary(max_size=32)),
        max_size=20,
    )
)
def test_garbage_datagrams_are_dropped_and_counted_never_fatal(garbage: list[bytes]) -> None:
    client, server = pair()
    sid = udp_stream(client, server)
    for side in (server, client):
        delivered = 0
        for datagram in garbage:
            for event in side.tunnel.receive_datagram(datagram, 0.0):
                assert event == ev.DataReceived(stream_id=sid, data=bytes(datagram[5:]))
                delivered += 1
        assert delivered + side.tunnel.datagrams_dropped == len(garbage)
        assert side.tunnel.state is TunnelState.READY
        assert side.tunnel.data_to_send() == b""  # nothing answered, nothing reset
    # the tunnel still works both ways, reliable and not
    client.tunnel.send_data(sid, b"still here")
    assert deliver(client, server)[-1] == ev.DataReceived(stream_id=sid, data=b"still here")
    other_sid = udp_stream(client, server)
    assert other_sid > sid


def test_datagrams_queued_when_the_tunnel_closes_are_not_sent() -> None:
    client, server = pair()
    sid = udp_stream(client, server)
    client.tunnel.send_data(sid, b"behind the GOAWAY")
    client.tunnel.shutdown("bye", graceful=False)
    assert client.tunnel.datagrams_to_send() == []
    assert client.tunnel.data_to_send()  # the GOAWAY


@settings(max_examples=100, deadline=None)
@given(
    sends=st.lists(
        st.tuples(st.booleans(), st.integers(0, LIMIT + 200), st.booleans()), min_size=1, max_size=200
    ),
)
def test_over_a_lossy_path_each_datagram_arrives_at_most_once_on_its_own_stream(
    sends: list[tuple[bool, int, bool]],
) -> None:
    """Two ``udp`` streams; unreliable datagrams lost at random (``lose``), frames delivered: every datagram that
    arrives was sent on that stream and arrives once; the ones too large for the transport always arrive."""
    client, server = pair()
    streams = (udp_stream(client, server), udp_stream(client, server))
    sent: dict[int, list[bytes]] = {sid: [] for sid in streams}
    received: dict[int, list[bytes]] = {sid: [] for sid in streams}
    for i, (second, size, lose) in enumerate(sends):
        sid = streams[second]
        payload = (i.to_bytes(2, "big") + bytes([sid]) * size)[:size] if size >= 2 else bytes(size)
        client.tunnel.send_data(sid, payload)  # (the reader keeps up: the window always has room)
        sent[sid].append(payload)
        for datagram in client.tunnel.datagrams_to_send():
            if not lose:
                server.events += server.tunnel.receive_datagram(datagram, 0.0)
        pump(client, server)
        arrived = server.of(ev.DataReceived)
        server.events.clear()
        for event in arrived:
            received[event.stream_id].append(event.data)
            server.tunnel.acknowledge_received_data(event.stream_id, len(event.data))
        pump(client, server)
    for sid in streams:
        for payload in received[sid]:
            assert payload in sent[sid]
        tagged = [p for p in received[sid] if len(p) >= 2]
        assert len(tagged) == len(set(tagged))  # nothing twice (each tagged payload is unique)
        assert [p for p in sent[sid] if len(p) > LIMIT] == [p for p in received[sid] if len(p) > LIMIT]
    expected_lost = sum(1 for _, size, lose in sends if lose and size <= LIMIT)
    assert server.tunnel.datagrams_received == client.tunnel.datagrams_sent - expected_lost
    assert server.tunnel.datagrams_dropped == 0
