"""Walk every (state, input) pair of both machines through the real Tunnel, driven with hypothesis.

After every step the stream (or tunnel) is in the state the transition table names, or -- for a pair the table
does not have -- a local input raised LocalProtocolError and changed nothing, and a peer's input reset the
stream (RST on the wire) or failed the tunnel (GOAWAY, closed). A witness stream is never disturbed.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.protocol.helpers import EXTENDED, VPROXY, Side, handshake, pump, state_of
from vtunnel.protocol import LocalProtocolError, Role, StreamState, Tunnel, TunnelConfig, TunnelState, events
from vtunnel.protocol.frames import encode_goaway
from vtunnel.protocol.stream_machine import (
    LIVE_STATES,
    STREAM_TRANSITIONS,
    Stream,
    StreamInput,
    StreamTransitionError,
)
from vtunnel.protocol.tunnel_machine import TUNNEL_TRANSITIONS, TunnelEffect, TunnelInput

SI = StreamInput


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def sid_bytes(sid: int) -> str:
    return f"{sid:08x}"


def frame_heads(data: bytes) -> list[tuple[int, int, int]]:
    out = []
    i = 0
    while i < len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        out.append((data[i + 3], data[i + 4], int.from_bytes(data[i + 5 : i + 9], "big")))
        i += 9 + length
    return out


# ---------------------------------------------------------------- the tables alone


@given(st.lists(st.sampled_from(list(StreamInput)), max_size=30))
def test_stream_table_walk(inputs: list[StreamInput]) -> None:
    stream = Stream(1, send_window=10, recv_window=10)
    for event in inputs:
        before = stream.state
        if (before, event) in STREAM_TRANSITIONS:
            stream.apply(event)
            assert stream.state is STREAM_TRANSITIONS[before, event][1]
        else:
            with pytest.raises(StreamTransitionError):
                stream.apply(event)
            assert stream.state is before


def test_every_live_state_can_be_reset_and_closed() -> None:
    for state in LIVE_STATES:
        assert STREAM_TRANSITIONS[state, SI.SEND_RST][1] is StreamState.DEAD
        assert STREAM_TRANSITIONS[state, SI.RECV_RST][1] is StreamState.DEAD
        assert STREAM_TRANSITIONS[state, SI.USER_CLOSE][1] is StreamState.REAL_CLOSED


def test_docs_tables_match_the_code() -> None:
    from pathlib import Path

    text = Path(__file__).resolve().parents[2].joinpath("docs", "protocol.md").read_text()
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in text.splitlines() if "|" in line}
    for (state, event), (effect, new) in STREAM_TRANSITIONS.items():
        assert (state.value, event.name.lower(), effect.name.lower(), new.value) in rows
    for (tstate, tevent), (teffect, tnew) in TUNNEL_TRANSITIONS.items():
        assert (tstate.value, tevent.name.lower(), teffect.name.lower(), tnew.value) in rows


# ---------------------------------------------------------------- streams through the real tunnel


class StreamWalk:
    """One subject stream (id 1) on a real tunnel; the peer's frames are written by hand."""

    def __init__(self, role: Role, config: TunnelConfig) -> None:
        client, server = handshake(config)
        self.subject = client if role is Role.CLIENT else server
        self.peer = server if role is Role.CLIENT else client
        self.role = role
        self.config = config
        self.expected = StreamState.NONE
        self.accepted = False
        # a witness stream (id 1 belongs to the subject walk, id 3 is the witness)
        if role is Role.CLIENT:
            assert client.tunnel.open_stream() == 1
            self.expected = StreamState.SYN_SENT
            server.tunnel.receive_data(client.tunnel.data_to_send(), 0)
            server.tunnel.data_to_send()
        self.witness = client.tunnel.open_stream() if role is Role.CLIENT else 0
        if role is Role.CLIENT:
            server.tunnel.receive_data(client.tunnel.data_to_send(), 0)
            server.tunnel.accept_stream(self.witness)
            client.tunnel.receive_data(server.tunnel.data_to_send(), 0)

    def actions(self) -> list[StreamInput]:
        common = [
            SI.SEND_DATA,
            SI.RECV_DATA,
            SI.SEND_FIN,
            SI.RECV_FIN,
            SI.SEND_RST,
            SI.RECV_RST,
            SI.USER_CLOSE,
        ]
        if self.role is Role.CLIENT:
            return [SI.RECV_SYN_ACK, *common]
        return [SI.RECV_SYN, SI.SEND_SYN_ACK, *common]

    def feed(self, frame: bytes) -> list[events.Event]:
        evs = self.subject.tunnel.receive_data(frame, 0)
        self.subject.events.extend(evs)
        return evs

    def step(self, event: StreamInput) -> None:
        t = self.subject.tunnel
        before = t.stream_state(1)
        assert before is self.expected
        self.subject.tunnel.data_to_send()
        local = event.is_local
        key = (before, event)
        allowed = key in STREAM_TRANSITIONS
        if event is SI.SEND_DATA and self.role is Role.SERVER and not self.accepted and allowed:
            allowed = (before, SI.SEND_SYN_ACK) in STREAM_TRANSITIONS
        if event is SI.SEND_FIN and self.role is Role.SERVER and not self.accepted and allowed:
            allowed = (before, SI.SEND_SYN_ACK) in STREAM_TRANSITIONS
        if event is SI.RECV_DATA and before is StreamState.FIN_SENT and not self.accepted:
            allowed = self.role is Role.SERVER
        unknown = before in (StreamState.NONE, StreamState.REAL_CLOSED) and not local
        if unknown and (event is not SI.RECV_SYN or before is StreamState.REAL_CLOSED):
            allowed = True  # no record: frames for an unknown stream are ignored, an old id's SYN refused
        idempotent = event is SI.SEND_SYN_ACK and self.accepted and before is not StreamState.REAL_CLOSED
        if idempotent:
            allowed = True  # accept_stream on an accepted stream does nothing
        raised = False
        try:
            self._do(event)
        except LocalProtocolError:
            raised = True
        after = t.stream_state(1)
        if allowed:
            assert not raised, (before, event)
            if (unknown and (event is not SI.RECV_SYN or before is StreamState.REAL_CLOSED)) or idempotent:
                assert after is before
            else:
                assert after is STREAM_TRANSITIONS[key][1], (before, event, after)
            if event in (SI.SEND_SYN_ACK, SI.RECV_SYN_ACK) or (
                self.role is Role.SERVER and event in (SI.SEND_DATA, SI.SEND_FIN)
            ):
                self.accepted = True
        elif local:
            assert raised, (before, event)
            assert after is before
        else:
            assert after is StreamState.DEAD, (before, event, after)
            assert (1, 1, 1) in frame_heads(self.subject.tunnel.data_to_send())  # RST on stream 1
            assert any(isinstance(e, events.StreamReset) and not e.by_peer for e in self.subject.events[-2:])
        self.expected = after
        assert state_of(t) is TunnelState.READY

    def _do(self, event: StreamInput) -> None:
        t = self.subject.tunnel
        sid = sid_bytes(1)
        if event is SI.RECV_SYN or event is SI.RECV_SYN_ACK:
            self.feed(h("000000 01 00" + sid))
        elif event is SI.SEND_SYN_ACK:
            t.accept_stream(1)
        elif event is SI.SEND_DATA:
            t.send_data(1, b"x")
        elif event is SI.RECV_DATA:
            self.feed(h("000001 00 00" + sid + "79"))
        elif event is SI.SEND_FIN:
            t.end_stream(1)
        elif event is SI.RECV_FIN:
            self.feed(h("000000 00 01" + sid))
        elif event is SI.SEND_RST:
            t.reset_stream(1)
        elif event is SI.RECV_RST:
            self.feed(h("000000 01 01" + sid))
        elif event is SI.USER_CLOSE:
            t.close_stream(1)

    def check_witness(self) -> None:
        if self.role is Role.CLIENT:
            self.subject.tunnel.data_to_send()
            self.peer.tunnel.send_data(self.witness, b"witness")
            pump(self.peer, self.subject)
            assert self.subject.data(self.witness) == b"witness"
        else:
            self.peer.tunnel.data_to_send()
            self.subject.tunnel.receive_data(h("000000 01 00 00000005"), 0)
            self.subject.tunnel.accept_stream(5)
            self.subject.tunnel.send_data(5, b"witness")
            assert self.subject.tunnel.data_to_send().endswith(b"witness")


ROLES_AND_CONFIGS = list(itertools.product([Role.CLIENT, Role.SERVER], [VPROXY, EXTENDED]))


@pytest.mark.parametrize(("role", "config"), ROLES_AND_CONFIGS, ids=lambda v: getattr(v, "name", "cfg"))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_walk_through_the_tunnel(role: Role, config: TunnelConfig, data: st.DataObject) -> None:
    walk = StreamWalk(role, config)
    steps = data.draw(st.lists(st.sampled_from(walk.actions()), max_size=12))
    for event in steps:
        walk.step(event)
    walk.check_witness()


@pytest.mark.parametrize(("role", "config"), ROLES_AND_CONFIGS, ids=lambda v: getattr(v, "name", "cfg"))
def test_every_stream_pair_is_reached(role: Role, config: TunnelConfig) -> None:
    """Deterministic cover: reach each state by a shortest path, then try every input from it."""
    reached: set[tuple[StreamState, StreamInput]] = set()
    paths: list[list[StreamInput]] = [[]]
    seen_states: set[StreamState] = set()
    probe = StreamWalk(role, config)
    actions = probe.actions()
    while paths:
        path = paths.pop(0)
        walk = StreamWalk(role, config)
        for event in path:
            walk.step(event)
        state = walk.expected
        if state in seen_states:
            continue
        seen_states.add(state)
        for event in actions:
            trial = StreamWalk(role, config)
            for prior in path:
                trial.step(prior)
            trial.step(event)
            reached.add((state, event))
            paths.append([*path, event])
    expected_states = {
        StreamState.DEAD,
        StreamState.REAL_CLOSED,
        StreamState.ESTABLISHED,
        StreamState.FIN_SENT,
        StreamState.FIN_RECV,
        StreamState.SYN_SENT if role is Role.CLIENT else StreamState.NONE,
    }
    assert expected_states <= seen_states
    assert len(reached) == len(seen_states) * len(actions)


# ---------------------------------------------------------------- the tunnel machine through the real tunnel

TI = TunnelInput
GRACEFUL_GOAWAY = encode_goaway("drain", last_stream_id=0, code=0)
VPROXY_GOAWAY = encode_goaway("gone")


def tunnel_in(state: TunnelState) -> Tunnel:
    client = Tunnel(role=Role.CLIENT, config=EXTENDED)
    if state is TunnelState.INIT:
        return client
    client.initiate(0)
    server = Tunnel(role=Role.SERVER, config=EXTENDED)
    server.receive_data(client.data_to_send(), 0)
    if state is TunnelState.HANDSHAKE_SENT:
        return client
    client.receive_data(server.data_to_send(), 0)
    if state is TunnelState.DRAINING:
        client.open_stream()
        client.shutdown("drain")
    elif state is TunnelState.CLOSED:
        client.shutdown("x", graceful=False)
    client.data_to_send()
    return client


def apply_tunnel_input(t: Tunnel, event: TunnelInput) -> list[events.Event]:
    if event is TI.INITIATE:
        t.initiate(0)
    elif event is TI.RECV_HANDSHAKE:
        return t.receive_data(h("000000 04 00 00000000"), 0)
    elif event is TI.RECV_FRAME:
        return t.receive_data(h("000008 06 00 00000000 0000000000000007"), 0)
    elif event is TI.RECV_GOAWAY:
        return t.receive_data(VPROXY_GOAWAY, 0)
    elif event is TI.RECV_GOAWAY_GRACEFUL:
        return t.receive_data(GRACEFUL_GOAWAY, 0)
    elif event is TI.SEND_GOAWAY:
        t.shutdown("bye", graceful=False)
    elif event is TI.SEND_GOAWAY_GRACEFUL:
        t.shutdown("bye")
    elif event is TI.OPEN_STREAM:
        t.open_stream()
    return []


FRAME_AND_API_INPUTS = [e for e in TunnelInput if not e.name.endswith(("_TIMEOUT", "_DONE"))]


@pytest.mark.parametrize("state", list(TunnelState), ids=lambda s: s.value)
@pytest.mark.parametrize("event", FRAME_AND_API_INPUTS, ids=lambda e: e.name.lower())
def test_tunnel_pair(state: TunnelState, event: TunnelInput) -> None:
    t = tunnel_in(state)
    assert t.state is state
    if state is TunnelState.INIT and not event.is_local and not event.name.startswith("SEND"):
        with pytest.raises(LocalProtocolError):  # a client must initiate before it receives
            apply_tunnel_input(t, event)
        return
    key = (state, event)
    if key in TUNNEL_TRANSITIONS:
        effect, new_state = TUNNEL_TRANSITIONS[key]
        apply_tunnel_input(t, event)
        if effect is TunnelEffect.START_DRAIN or effect is TunnelEffect.PEER_DRAIN:
            assert state_of(t) in (
                TunnelState.DRAINING,
                TunnelState.CLOSED,
            )  # closes at once if nothing is open
        else:
            assert state_of(t) is new_state
    elif event.is_local:
        with pytest.raises(LocalProtocolError):
            apply_tunnel_input(t, event)
        assert state_of(t) is state
    else:
        evs = apply_tunnel_input(t, event)
        assert state_of(t) is TunnelState.CLOSED
        assert isinstance(evs[-1], events.TunnelClosed)
        assert t.data_to_send()[3] == 0x7  # GOAWAY naming the fault


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([*FRAME_AND_API_INPUTS, TI.HANDSHAKE_TIMEOUT]), max_size=15))
def test_tunnel_random_walk(inputs: list[TunnelInput]) -> None:
    """Random sequences: always a valid state; errors are only ours, and closed is final."""
    t = Tunnel(role=Role.CLIENT, config=EXTENDED)
    now = 0.0
    for event in inputs:
        before = t.state
        try:
            if event is TI.HANDSHAKE_TIMEOUT:
                now += 100.0
                t.handle_timer(now)
            else:
                apply_tunnel_input(t, event)
        except LocalProtocolError:
            assert t.state is before
        assert t.state in TunnelState
        if before is TunnelState.CLOSED:
            assert t.state is TunnelState.CLOSED
        t.data_to_send()


def test_side_is_importable() -> None:
    assert Side is not None
