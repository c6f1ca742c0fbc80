"""Two correct peers under random operations (hypothesis state machine): the tunnel never fails, every byte
arrives in order on its own stream, receive buffers stay within the windows, and both ends agree at the end."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vtunnel.protocol import (
    MetadataNotNegotiated,
    Role,
    StreamMetadata,
    StreamState,
    Tunnel,
    TunnelConfig,
    TunnelState,
    events,
)

SENDING = (StreamState.SYN_SENT, StreamState.ESTABLISHED, StreamState.FIN_RECV)
CONFIGS = [
    TunnelConfig(initial_stream_window=2048, initial_tunnel_window=4096, max_frame_size=1024, gzip=True),
    # a small receive budget: first windows and growth run out, streams are left with their floor
    TunnelConfig(
        min_stream_window=1024,
        initial_stream_window=2048,
        max_stream_window=8192,
        initial_tunnel_window=4096,
        receive_budget=3072,
        max_frame_size=1024,
    ),
    TunnelConfig(extensions=False, max_frame_size=1024, initial_stream_window=4096),
]
BODY = bytes(range(256)) * 64


class PairMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.config = CONFIGS[0]
        self.started = False

    @precondition(lambda self: not self.started)
    @rule(which=st.integers(0, len(CONFIGS) - 1))
    def start(self, which: int) -> None:
        self.config = CONFIGS[which]
        self.t = {
            "c": Tunnel(role=Role.CLIENT, config=self.config),
            "s": Tunnel(role=Role.SERVER, config=self.config),
        }
        self.wire: dict[str, bytearray] = {"c": bytearray(), "s": bytearray()}  # bytes in flight *to* a side
        self.sent: dict[tuple[str, int], int] = defaultdict(int)  # bytes sent by side on stream
        self.got: dict[tuple[str, int], bytearray] = defaultdict(bytearray)  # bytes received by side
        self.unacked: dict[tuple[str, int], int] = defaultdict(int)
        self.ended: set[tuple[str, int]] = set()  # side saw the peer's FIN
        self.reset: set[int] = set()
        self.streams: list[int] = []
        self.t["c"].initiate(0)
        self.flush()
        self.started = True
        self.deliver_all()

    def other(self, side: str) -> str:
        return "s" if side == "c" else "c"

    def flush(self) -> None:
        for side, t in self.t.items():
            self.wire[self.other(side)] += t.data_to_send()

    def feed(self, side: str, n: int) -> None:
        chunk = bytes(self.wire[side][:n])
        del self.wire[side][:n]
        for ev in self.t[side].receive_data(chunk, 0):
            self.on_event(side, ev)
        self.flush()

    def deliver_all(self) -> None:
        for _ in range(1000):
            if not self.wire["c"] and not self.wire["s"]:
                return
            for side in ("c", "s"):
                if self.wire[side]:
                    self.feed(side, len(self.wire[side]))
        raise AssertionError("wire did not settle")

    def on_event(self, side: str, ev: events.Event) -> None:
        assert not isinstance(ev, events.TunnelClosed), ev
        if isinstance(ev, events.DataReceived):
            self.got[side, ev.stream_id] += ev.data
            self.unacked[side, ev.stream_id] += len(ev.data)
        elif isinstance(ev, events.StreamEnded):
            self.ended.add((side, ev.stream_id))
        elif isinstance(ev, events.StreamReset):
            assert ev.by_peer, ev  # correct peers never break a stream's rules
            self.reset.add(ev.stream_id)
        elif isinstance(ev, events.StreamOpened):
            assert side == "s"
            assert ev.metadata is None or ev.metadata.authority == "127.0.0.1:7"

    # ------------------------------------------------------------------ rules

    @precondition(lambda self: self.started)
    @rule(meta=st.booleans())
    def open(self, meta: bool) -> None:
        md = StreamMetadata(authority="127.0.0.1:7") if meta else None
        if md is not None and not self.t["c"].extensions.metadata:
            with pytest.raises(MetadataNotNegotiated):  # a vproxy tunnel cannot name it: nothing is sent
                self.t["c"].open_stream(metadata=md)
            return
        self.streams.append(self.t["c"].open_stream(metadata=md))
        self.flush()

    @precondition(lambda self: self.started and self.streams)
    @rule(i=st.integers(0, 50))
    def accept(self, i: int) -> None:
        sid = self.streams[i % len(self.streams)]
        if self.t["s"].stream_state(sid) in (StreamState.ESTABLISHED, StreamState.FIN_RECV):
            self.t["s"].accept_stream(sid)
            self.flush()

    @precondition(lambda self: self.started and self.streams)
    @rule(side=st.sampled_from("cs"), i=st.integers(0, 50), n=st.integers(1, 5000), fin=st.booleans())
    def send(self, side: str, i: int, n: int, fin: bool) -> None:
        sid = self.streams[i % len(self.streams)]
        t = self.t[side]
        if t.stream_state(sid) not in SENDING:
            return
        n = min(n, t.send_window(sid))
        if n == 0 and not fin:
            return
        offset = self.sent[side, sid]
        data = (BODY * 2)[offset % len(BODY) : offset % len(BODY) + n]
        t.send_data(sid, data, end_stream=fin)
        self.sent[side, sid] += n
        self.flush()

    @precondition(lambda self: self.started and self.streams)
    @rule(side=st.sampled_from("cs"), i=st.integers(0, 50), dice=st.integers(0, 5))
    def reset_one(self, side: str, i: int, dice: int) -> None:
        if dice:  # resets are rarer than everything else
            return
        sid = self.streams[i % len(self.streams)]
        self.t[side].reset_stream(sid, error="cancelled")
        self.reset.add(sid)
        self.flush()

    @precondition(lambda self: self.started)
    @rule(side=st.sampled_from("cs"), n=st.integers(1, 3000))
    def deliver(self, side: str, n: int) -> None:
        if self.wire[side]:
            self.feed(side, n)

    @precondition(lambda self: self.started and self.streams)
    @rule(side=st.sampled_from("cs"), i=st.integers(0, 50), n=st.integers(1, 5000))
    def consume(self, side: str, i: int, n: int) -> None:
        sid = self.streams[i % len(self.streams)]
        n = min(n, self.unacked[side, sid])
        if n:
            self.t[side].acknowledge_received_data(sid, n)
            self.unacked[side, sid] -= n
            self.flush()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def bytes_arrive_in_order(self) -> None:
        if not self.started:
            return
        for (side, sid), data in self.got.items():
            assert bytes(data) == (BODY * (len(data) // len(BODY) + 2))[: len(data)], (side, sid)
            assert len(data) <= self.sent[self.other(side), sid]

    @invariant()
    def buffers_within_windows(self) -> None:
        if not self.started or not self.config.extensions:
            return
        for side in ("c", "s"):
            total = records = 0
            for (s, sid), n in self.unacked.items():
                if s == side and self.t[side].stream_state(sid) is not StreamState.REAL_CLOSED:
                    assert n <= self.config.max_stream_window
                    total += n
                    records += 1
            # the stream windows bound what piles up: docs/protocol.md, "Flow control"
            assert total <= self.config.receive_budget + records * self.config.min_stream_window

    @invariant()
    def tunnel_stays_up(self) -> None:
        if self.started:
            assert self.t["c"].state is TunnelState.READY
            assert self.t["s"].state is TunnelState.READY

    def teardown(self) -> None:
        """Finish: accept, consume everything, FIN every open direction; both ends must agree."""
        if not self.started:
            return
        self.deliver_all()
        for sid in self.streams:
            if self.t["s"].stream_state(sid) in SENDING:
                self.t["s"].accept_stream(sid)
        self.flush()
        self.deliver_all()
        for _ in range(100):
            for (side, sid), n in list(self.unacked.items()):
                if n and self.t[side].stream_state(sid) is not StreamState.REAL_CLOSED:
                    self.t[side].acknowledge_received_data(sid, n)
                self.unacked[side, sid] = 0
            for sid in self.streams:
                for side in ("c", "s"):
                    if self.t[side].stream_state(sid) in SENDING:
                        self.t[side].end_stream(sid)
            self.flush()
            self.deliver_all()
            if not any(self.unacked.values()):
                break
        for sid in self.streams:
            if sid in self.reset:
                continue
            for side in ("c", "s"):
                assert self.t[side].stream_state(sid) is StreamState.DEAD, (side, sid)
                assert len(self.got[self.other(side), sid]) == self.sent[side, sid]


PairMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
test_pair_state_machine = PairMachine.TestCase
