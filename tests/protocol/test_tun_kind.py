"""The ``tun`` extension and stream kind (IP mode, docs/tun.md): negotiation, a SYN-ACK's header block, and a ``tun``
stream's packets as datagrams (unreliable where the transport has them, one DATA frame each elsewhere)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.protocol.helpers import EXTENDED, VPROXY, Side, pump
from tests.protocol.test_datagrams import LIMIT, LINK_DATAGRAM, deliver
from tests.protocol.test_datagrams import pair as datagram_pair
from vtunnel.protocol import MetadataNotNegotiated, Role, StreamMetadata, Tunnel, TunnelConfig, TunnelState
from vtunnel.protocol import events as ev
from vtunnel.protocol import frames as fr
from vtunnel.protocol.errors import LocalProtocolError
from vtunnel.protocol.metadata import MetadataCodec

TUN = TunnelConfig(tun=True)
TUN_STREAM = StreamMetadata(kind="tun", headers=(("vt-tun-id", "abc"),))


def pair(
    client_config: TunnelConfig = TUN, server_config: TunnelConfig = TUN, *, datagram: int = LINK_DATAGRAM
) -> tuple[Side, Side]:
    return datagram_pair(client_config, server_config, client_datagram=datagram, server_datagram=datagram)


@pytest.mark.parametrize(
    ("client_config", "server_config", "agreed"),
    [
        pytest.param(TUN, TUN, True, id="both"),
        pytest.param(TUN, EXTENDED, False, id="server-without"),
        pytest.param(EXTENDED, TUN, False, id="client-without"),
        pytest.param(VPROXY, TUN, False, id="vproxy-client"),
    ],
)
def test_negotiation(client_config: TunnelConfig, server_config: TunnelConfig, agreed: bool) -> None:
    client, server = pair(client_config, server_config)
    assert client.tunnel.extensions.tun is server.tunnel.extensions.tun is agreed
    assert ("tun" in client.tunnel.extensions) is agreed


def test_the_offer_is_the_0x40_bit() -> None:
    tunnel = Tunnel(role=Role.CLIENT, config=TUN)
    tunnel.initiate(0.0)
    offer = dict(fr.decode_settings(tunnel.data_to_send()[fr.FRAME_HEADER_SIZE :]))
    assert offer[0xF002] & 0x40
    plain = Tunnel(role=Role.CLIENT, config=EXTENDED)
    plain.initiate(0.0)
    assert not dict(fr.decode_settings(plain.data_to_send()[fr.FRAME_HEADER_SIZE :]))[0xF002] & 0x40


def test_a_tun_stream_needs_the_extension_at_both_ends() -> None:
    client, server = pair(TUN, EXTENDED)
    with pytest.raises(MetadataNotNegotiated):
        client.tunnel.open_stream(metadata=TUN_STREAM)
    # a SYN of kind tun that a client sends anyway is refused, and the tunnel goes on
    client, server = pair(EXTENDED, EXTENDED)
    syn = fr.encode_headers(1, MetadataCodec().encode_metadata(TUN_STREAM))
    assert server.tunnel.receive_data(syn, 0.0) == []
    client.events += client.tunnel.receive_data(server.tunnel.data_to_send(), 0.0)
    assert client.events == []  # (an RST for a stream the client never opened: ignored)
    assert server.tunnel.state is TunnelState.READY
    assert server.tunnel.open_stream_count == 0


def test_the_syn_ack_carries_headers() -> None:
    client, server = pair()
    sid = client.tunnel.open_stream(metadata=TUN_STREAM)
    pump(client, server)
    opened = [e for e in server.events if isinstance(e, ev.StreamOpened)]
    assert opened[0].metadata == TUN_STREAM
    answer = (("vt-tun-address", "10.77.0.2/24"), ("vt-tun-address", "fd77::2/64"), ("vt-tun-mtu", "1325"))
    server.tunnel.accept_stream(sid, headers=answer)
    pump(client, server)
    assert ev.StreamAccepted(stream_id=sid, headers=answer) in client.events
    # a plain SYN-ACK has none
    sid2 = client.tunnel.open_stream(metadata=TUN_STREAM)
    pump(client, server)
    server.tunnel.accept_stream(sid2)
    pump(client, server)
    assert ev.StreamAccepted(stream_id=sid2) in client.events


def test_headers_in_a_syn_ack_need_the_metadata_extension() -> None:
    client = Side(Tunnel(role=Role.CLIENT, config=VPROXY))
    server = Side(Tunnel(role=Role.SERVER, config=TUN))
    client.tunnel.initiate(0.0)
    server.tunnel.initiate(0.0)
    pump(client, server)
    sid = client.tunnel.open_stream()
    pump(client, server)
    with pytest.raises(LocalProtocolError):
        server.tunnel.accept_stream(sid, headers=(("vt-tun-mtu", "1500"),))
    server.tunnel.accept_stream(sid)  # nothing was changed: a plain one still goes


def _open(client: Side, server: Side) -> int:
    sid = client.tunnel.open_stream(metadata=TUN_STREAM)
    pump(client, server)
    server.tunnel.accept_stream(sid, headers=(("vt-tun-address", "10.77.0.2/24"),))
    pump(client, server)
    client.events.clear()
    server.events.clear()
    return sid


@given(packets=st.lists(st.binary(min_size=1, max_size=LIMIT), min_size=1, max_size=8))
def test_packets_ride_unreliable_datagrams_where_the_link_has_them(packets: list[bytes]) -> None:
    client, server = pair()
    sid = _open(client, server)
    assert client.tunnel.max_unreliable_payload == LIMIT
    for packet in packets:
        client.tunnel.send_data(sid, packet)
        assert client.tunnel.data_to_send() == b""
        assert deliver(client, server) == [ev.DataReceived(stream_id=sid, data=packet)]
        server.tunnel.send_data(sid, packet)
        assert deliver(server, client) == [ev.DataReceived(stream_id=sid, data=packet)]


@given(packets=st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=8))
def test_without_datagrams_each_packet_is_one_data_frame(packets: list[bytes]) -> None:
    client, server = pair(datagram=0)
    sid = _open(client, server)
    assert client.tunnel.max_unreliable_payload == 0
    for packet in packets:
        client.tunnel.send_data(sid, packet)
    assert client.tunnel.datagrams_to_send() == []
    pump(client, server)
    got = [e.data for e in server.events if isinstance(e, ev.DataReceived)]
    assert got == packets  # boundaries kept, in order
