"""Fuzz: generated and mutated frame sequences. Nothing escapes, and a witness stream is never disturbed.

The tunnel under test keeps one witness stream open; fuzzed frames never name the witness's id. After each
sequence either the tunnel failed as the protocol says (TunnelClosed with a GOAWAY naming the fault) or the
witness is untouched and still carries data both ways.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
import time
from collections.abc import Callable

import hpack

from tests.protocol.helpers import EXTENDED, VPROXY
from vtunnel.protocol import Role, StreamState, Tunnel, TunnelConfig, TunnelState, events
from vtunnel.protocol import frames as fr
from vtunnel.protocol.settings import local_settings
from vtunnel.protocol.stream_machine import LIVE_STATES

SEQUENCES = int(os.environ.get("VTUNNEL_FUZZ_SEQUENCES", "100000"))
TIME_BUDGET = float(os.environ.get("VTUNNEL_FUZZ_SECONDS", "50"))
CONTROL_FRAMES = int(os.environ.get("VTUNNEL_FUZZ_CONTROL_FRAMES", "20000"))
CONTROL_SECONDS = float(os.environ.get("VTUNNEL_FUZZ_CONTROL_SECONDS", "10"))
WITNESS = 1


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">I", sid) + payload


class Generator:
    def __init__(self, rng: random.Random, config: TunnelConfig) -> None:
        self.rng = rng
        enc = hpack.Encoder()
        self.blocks = [
            enc.encode([(":authority", "127.0.0.1:80"), ("vt-kind", "tcp")]),
            enc.encode([("vt-error", "refused")]),
            hpack.Encoder().encode([("vt-kind", "bogus")]),
            b"\xff\xff\xff",
            b"",
        ]
        self.settings = b"".join(struct.pack(">HI", k, v) for k, v in local_settings(EXTENDED))
        self.gz = [gzip.compress(b"z" * 3000), gzip.compress(b"z" * 3000)[:-5], b"\x1f\x8b garbage"]
        self.next_sid = 9

    def sid(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            sid = self.rng.choice((3, 5, 7, 9, 11, self.next_sid, self.next_sid + 2))
            if self.rng.random() < 0.3:
                self.next_sid += 2
        elif r < 0.6:
            sid = 0
        elif r < 0.7:
            sid = self.rng.randrange(2, 40, 2)
        elif r < 0.8:
            sid = 0x80000000 | self.rng.randrange(1, 100)
        else:
            sid = self.rng.randrange(0, 2**32)
        return sid if sid != WITNESS else 3

    def payload(self, ftype: int) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.3:
            return b""
        if ftype == 1 and r < 0.6:
            return rng.choice(self.blocks)
        if ftype == 0 and r < 0.5:
            return rng.choice(self.gz)
        if ftype == 6 and r < 0.7:
            return struct.pack(">Q", rng.randrange(0, 5)) + rng.randbytes(rng.choice((0, 0, 1)))
        if ftype == 8 and r < 0.8:
            return struct.pack(">I", rng.choice((0, 1, 1000, 2**31 - 1, 2**32 - 1)))
        if ftype == 7 and r < 0.8:
            return (
                struct.pack(">II", rng.choice((0, 3, 0xFFFFFFFF)), rng.choice((0, 1, 0xFFFFFFFF))) + b"fuzz"
            )
        if ftype == 4 and r < 0.6:
            return self.settings
        return rng.randbytes(rng.choice((1, 3, 8, 100, 2000)))

    def plausible(self) -> bytes:
        rng = self.rng
        sid = rng.choice((3, 5, 7, 9, self.next_sid))
        ftype = rng.choice((0, 0, 0, 1, 1, 6, 8))
        if ftype == 0:
            flags = rng.choice((0, 0, 1, 4))
            payload = rng.choice(self.gz[:1]) if flags == 4 else rng.randbytes(rng.choice((0, 1, 50, 3000)))
        elif ftype == 1:
            flags = rng.choice((0, 1))
            payload = rng.choice((b"", b"", self.blocks[0], self.blocks[1]))
            if flags == 0 and rng.random() < 0.5:
                self.next_sid += 2
        elif ftype == 6:
            flags, sid = rng.choice((0, 1)), 0
            payload = struct.pack(">Q", rng.randrange(3))
        else:
            flags, payload = 0, struct.pack(">I", rng.choice((1, 1000, 65536)))
        return frame(ftype, flags, sid, payload)

    def one(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.85:
            return self.plausible()
        ftype = rng.choice((0, 0, 0, 1, 1, 1, 4, 6, 6, 7, 8, 8, 2, 3, 9, rng.randrange(256)))
        flags = rng.choice((0, 0, 1, 1, 4, 5, rng.randrange(256)))
        return frame(ftype, flags, self.sid(), self.payload(ftype))

    def sequence(self) -> tuple[bytes, bool]:
        """Returns the bytes and whether they are still whole frames (so framing is intact after them)."""
        data = b"".join(self.one() for _ in range(self.rng.randrange(1, 9)))
        r = self.rng.random()
        if r < 0.1:  # bit flip
            buf = bytearray(data)
            i = self.rng.randrange(len(buf))
            buf[i] ^= 1 << self.rng.randrange(8)
            return bytes(buf), False
        if r < 0.15:  # truncate
            return data[: self.rng.randrange(len(data))], False
        if r < 0.18:  # pure garbage
            return self.rng.randbytes(self.rng.randrange(1, 64)), False
        return data, True


class Subject:
    """A connected pair with the witness (stream 1) and three fuzz targets (3, 5, 7) established.

    The bytes each side receives to get there are recorded once per config and replayed, which keeps the fuzz
    loop fast.
    """

    _recorded: dict[TunnelConfig, tuple[bytes, bytes, bytes]] = {}

    def __init__(self, role: Role, config: TunnelConfig) -> None:
        to_server, settings_answer, synacks = self._record(config)
        client = Tunnel(role=Role.CLIENT, config=config)
        client.initiate(0)
        client.data_to_send()
        client.receive_data(settings_answer, 0)
        assert [client.open_stream() for _ in range(4)] == [WITNESS, 3, 5, 7]
        client.data_to_send()
        client.receive_data(synacks, 0)
        server = Tunnel(role=Role.SERVER, config=config)
        server.receive_data(to_server, 0)
        for sid in (WITNESS, 3, 5, 7):
            server.accept_stream(sid)
        server.data_to_send()
        self.tunnel: Tunnel = client if role is Role.CLIENT else server
        self.peer: Tunnel = server if role is Role.CLIENT else client
        self.role = role

    @classmethod
    def _record(cls, config: TunnelConfig) -> tuple[bytes, bytes, bytes]:
        if config not in cls._recorded:
            client = Tunnel(role=Role.CLIENT, config=config)
            server = Tunnel(role=Role.SERVER, config=config)
            client.initiate(0)
            hello = client.data_to_send()
            server.receive_data(hello, 0)
            answer = server.data_to_send()
            client.receive_data(answer, 0)
            opened = [client.open_stream() for _ in range(4)]
            syns = client.data_to_send()
            server.receive_data(syns, 0)
            for sid in opened:
                server.accept_stream(sid)
            cls._recorded[config] = (hello + syns, answer, server.data_to_send())
        return cls._recorded[config]

    def witness_round_trip(self) -> None:
        t = self.tunnel
        assert t.stream_state(WITNESS) is StreamState.ESTABLISHED
        t.data_to_send()
        t.send_data(WITNESS, b"ping")
        got = self.peer.receive_data(t.data_to_send(), 0)
        assert events.DataReceived(stream_id=WITNESS, data=b"ping") in got
        self.peer.send_data(WITNESS, b"pong")
        back = t.receive_data(self.peer.data_to_send(), 0)
        assert events.DataReceived(stream_id=WITNESS, data=b"pong") in back
        t.acknowledge_received_data(WITNESS, 4)
        self.peer.acknowledge_received_data(WITNESS, 4)
        self.peer.data_to_send()


def run_fuzz(role: Role, config: TunnelConfig, seed: int, count: int, deadline: float) -> int:
    rng = random.Random(seed)
    gen = Generator(rng, config)
    subject = Subject(role, config)
    done = 0
    while done < count and time.monotonic() < deadline:
        data, whole = gen.sequence()
        evs = subject.tunnel.receive_data(data, 1.0)  # must never raise for the peer's bytes
        out = subject.tunnel.data_to_send()
        assert isinstance(out, bytes)
        assert all(isinstance(e, events.Event) for e in evs)
        draining = any(isinstance(e, events.GoAwayReceived) for e in evs)
        for e in evs:
            if (
                whole
                and not draining
                and isinstance(e, events.StreamReset | events.DataReceived | events.StreamEnded)
            ):
                assert e.stream_id != WITNESS, e  # (a graceful GOAWAY may legitimately refuse the witness)
            if isinstance(e, events.DataReceived) and subject.tunnel.stream_state(e.stream_id) is not (
                StreamState.REAL_CLOSED
            ):
                subject.tunnel.acknowledge_received_data(e.stream_id, len(e.data))
            if isinstance(e, events.StreamOpened) and subject.tunnel.stream_state(e.stream_id) in LIVE_STATES:
                subject.tunnel.accept_stream(e.stream_id)
        closed = [e for e in evs if isinstance(e, events.TunnelClosed)]
        if subject.tunnel.state is TunnelState.CLOSED:
            assert closed or subject.tunnel.receive_data(b"", 1.0) == []
            subject = Subject(role, config)
            gen.next_sid = 9
        elif whole and not draining:
            subject.witness_round_trip()
        else:
            subject = Subject(role, config)  # framing may be broken mid-frame: start a fresh tunnel
            gen.next_sid = 9
        done += 1
    return done


def test_fuzz_frame_sequences() -> None:
    deadline = time.monotonic() + TIME_BUDGET
    combos = [(Role.SERVER, EXTENDED), (Role.SERVER, VPROXY), (Role.CLIENT, EXTENDED), (Role.CLIENT, VPROXY)]
    per = SEQUENCES // len(combos)
    total = 0
    for i, (role, config) in enumerate(combos):
        share = deadline - (deadline - time.monotonic()) * (len(combos) - i - 1) / (len(combos) - i)
        total += run_fuzz(role, config, seed=1000 + i, count=per, deadline=share)
    assert total >= min(SEQUENCES, 1000)


CONTROL_DECODERS: dict[int, Callable[[int, int, bytes], object]] = {
    0x1: fr.decode_headers,
    0x4: lambda _sid, _flags, payload: fr.decode_settings(payload),
    0x6: lambda _sid, _flags, payload: fr.decode_ping(payload),
    0x7: lambda _sid, _flags, payload: fr.decode_goaway(payload),
    0x8: lambda _sid, _flags, payload: fr.decode_window_update(payload),
}


def control_frame(rng: random.Random) -> tuple[int, int, int, bytes]:
    """A control frame with any flags and a payload of a length right or wrong for its type."""
    ftype = rng.choice(list(CONTROL_DECODERS))
    flags = rng.choice((0, 1, rng.randrange(256)))
    sid = rng.choice((0, 0, 3, 5, 7, 9, 2, 0x80000003, rng.randrange(2**32)))
    payload = rng.randbytes(rng.choice((0, 0, 1, 3, 4, 5, 6, 7, 8, 9, 12, 13, 40)))
    if ftype == 0x8 and rng.random() < 0.5:
        payload = struct.pack(">I", rng.choice((0, 1, 2**31 - 1, 2**31, 2**32 - 1)))
    return ftype, flags, sid if sid != WITNESS else 3, payload


def test_fuzz_control_frames() -> None:
    """Control frames of every length and flag: the codec gives a value or a FrameError, and the tunnel
    either goes on (the witness still carries data) or fails with a GOAWAY naming the fault."""
    rng = random.Random(2024)
    deadline = time.monotonic() + CONTROL_SECONDS
    combos = [(Role.SERVER, EXTENDED), (Role.SERVER, VPROXY), (Role.CLIENT, EXTENDED), (Role.CLIENT, VPROXY)]
    done = failed = 0
    while done < CONTROL_FRAMES and time.monotonic() < deadline:
        role, config = combos[done % len(combos)]
        subject = Subject(role, config)
        for _ in range(rng.randrange(1, 6)):
            ftype, flags, sid, payload = control_frame(rng)
            try:
                CONTROL_DECODERS[ftype](sid, flags, payload)
            except fr.FrameError as exc:
                reason = exc.reason
            else:
                reason = "decoded"
            assert reason  # nothing but a FrameError leaves the codec
            evs = subject.tunnel.receive_data(frame(ftype, flags, sid, payload), 1.0)
            out = subject.tunnel.data_to_send()
            assert all(isinstance(e, events.Event) for e in evs)
            done += 1
            closed = [e for e in evs if isinstance(e, events.TunnelClosed)]
            if closed and closed[0].error is not None:  # our side failed the tunnel: the GOAWAY says why
                failed += 1
                [goaway] = [f for f in fr.FrameDecoder().feed(out)[0] if f.type == fr.FrameType.GOAWAY]
                assert closed[0].error.reason in fr.decode_goaway(goaway.payload)[2]
            if subject.tunnel.state is not TunnelState.READY or any(
                isinstance(e, events.GoAwayReceived | events.StreamReset) for e in evs
            ):
                break
            for e in evs:
                if isinstance(e, events.StreamOpened):
                    subject.tunnel.accept_stream(e.stream_id)
            subject.witness_round_trip()
    assert done >= min(CONTROL_FRAMES, 500)
    assert failed  # the generator does reach the tunnel's failures
