"""The ``lite-tls`` stream's TLS record tracker: when a user's own TLS is up, its stream may leave the tunnel's
encryption (seed 000; design and state machine in ``docs/lite-tls.md``).

One :class:`LiteTlsTracker` per lite-tls stream at each end (the agent's with ``Role.CLIENT``, the server's with
``Role.SERVER``). It is sans-IO: the runtime hands it the bytes of both directions and acts on the events it
returns, in order::

    tracker.from_local(data)  # first-hand bytes: read from the local TLS endpoint (agent: the user; server: the target)
    tracker.from_peer(data)   # second-hand bytes: the stream's DATA from the other end of the tunnel
        -> list of SendToPeer(data) / DeliverToLocal(data) / LeftTunnel(role) / FellBack(reason, by_peer) /
           PeerViolation(reason)

``SendToPeer`` bytes reported before ``LeftTunnel`` travel as ordinary (protected) stream DATA, those after it in
passthrough; from ``LeftTunnel`` on, whatever the peer sends on the stream comes in passthrough. A
``PeerViolation`` means the peer broke the lite-tls rules: reset the stream; the tracker takes no more input.

Each direction carries records (5-byte headers, types 0x14..0x17) up to at most one *control record* of its own,
at a record boundary, after which that direction is never parsed again:

* the marker ``ff 03 03 00 01 01`` ("I leave the tunnel"): the active side appends it to its pending records
  and holds its first application-data record (0x17) and everything after it until the peer's marker comes back;
  the passive side answers it with its own marker and hands the records that came with it to its user together
  with the first 0x17 record that follows;
* the notice ``ff 03 03 00 01 00`` ("this stream stays in the tunnel"): sent before the first bytes that are not
  TLS records (a record type outside the four, a bad version byte, a length over 2^14 + 2048, or, from the agent's
  user, a first record that is not a ClientHello), so that such bytes can never be mistaken for a marker. An end
  that receives it falls back too and sends its own;
* the muxed marker ``ff 03 03 00 01 02``: the marker of an end whose dedicated connection (splice mode) was
  pending and that leaves muxed; an end that bound the connection leaves muxed too (:class:`LiteTlsSession`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from vtunnel.protocol.errors import LocalProtocolError
from vtunnel.protocol.events import Event
from vtunnel.protocol.tunnel import Role

__all__ = [
    "HEADER_LEN",
    "HOLD_LIMIT",
    "MARKER",
    "MAX_RECORD_LENGTH",
    "MUXED_MARKER",
    "NOTICE",
    "RECORD_TYPES",
    "DeliverToLocal",
    "FellBack",
    "LeftTunnel",
    "LiteTlsEvent",
    "LiteTlsRole",
    "LiteTlsSession",
    "LiteTlsState",
    "LiteTlsStep",
    "LiteTlsTracker",
    "PeerViolation",
    "SendToPeer",
    "TrackerBrokenError",
    "header_problem",
    "whole_records",
]

HEADER_LEN = 5
#: change_cipher_spec, alert, handshake, application_data
RECORD_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})
APPLICATION_DATA = 0x17
HANDSHAKE = 0x16
#: TLS 1.2's largest TLSCiphertext (2^14 + 2048); TLS 1.3 allows 2^14 + 256
MAX_RECORD_LENGTH = 2**14 + 2048
CONTROL_TYPE = 0xFF
#: "I leave the tunnel" (type 0xff, version 0x0303, length 1, payload 0x01), as the origin implementation sends it
MARKER = b"\xff\x03\x03\x00\x01\x01"
#: "this stream stays in the tunnel": precedes the first bytes that are not TLS records
NOTICE = b"\xff\x03\x03\x00\x01\x00"
#: the marker of an end whose dedicated connection was pending and that leaves muxed (splice mode): "I leave the
#: tunnel, and the dedicated connection is not used", whatever became of it
MUXED_MARKER = b"\xff\x03\x03\x00\x01\x02"
CONTROL_LEN = len(MARKER)
#: bytes a passive end holds at most (what came with the peer's marker and the start of the first
#: application-data record after it); more is a violation: the stream is reset
HOLD_LIMIT = 1 << 18
CLIENT_HELLO_HEADER = b"\x16\x03\x01"
CLIENT_HELLO = 0x01


class LiteTlsState(Enum):
    """Where one end of a lite-tls stream is (docs/lite-tls.md has the transitions)."""

    #: both directions are parsed record by record; everything passes through the tunnel
    TRACKING = "tracking"
    #: active: the marker is sent; first-hand bytes from the held 0x17 on wait for the peer's marker
    AWAITING_ANSWER = "awaiting_answer"
    #: passive: the peer's marker arrived while a first-hand record was half sent; the answer goes at its end
    ANSWERING = "answering"
    #: both markers passed: the stream's DATA is passthrough both ways
    LEFT = "left"
    #: an ordinary protected stream for the rest of its life
    FALLBACK = "fallback"
    #: the peer broke the rules (PeerViolation); reset the stream
    BROKEN = "broken"


class LiteTlsRole(Enum):
    ACTIVE = "active"
    PASSIVE = "passive"


@dataclass(frozen=True, kw_only=True, slots=True)
class LiteTlsEvent(Event):
    """Base class of the tracker's events."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SendToPeer(LiteTlsEvent):
    """Bytes for the other end: protected stream DATA before ``LeftTunnel``, passthrough after it. ``marker``:
    they end with this end's marker (splice mode: :class:`LiteTlsSession` may hold them and change the marker
    to :data:`MUXED_MARKER`)."""

    data: bytes
    marker: bool = field(default=False, compare=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliverToLocal(LiteTlsEvent):
    """Bytes for the local TLS endpoint (the user at the agent, the target at the server)."""

    data: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class LeftTunnel(LiteTlsEvent):
    """Both markers have passed at this end: switch the stream to passthrough (log ``lite_tls.left_tunnel``)."""

    role: LiteTlsRole


@dataclass(frozen=True, kw_only=True, slots=True)
class FellBack(LiteTlsEvent):
    """The stream stays an ordinary protected stream for good; ``reason`` says why."""

    reason: str
    by_peer: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerViolation(LiteTlsEvent):
    """The peer sent what no lite-tls end sends (a bad control record, a record that is not TLS without the
    notice, something other than application data after the marker). Reset the stream."""

    reason: str


class TrackerBrokenError(LocalProtocolError):
    """Input given to a tracker after it reported a PeerViolation."""


def header_problem(header: bytes | bytearray | memoryview) -> str | None:
    """Why a record header, or the first bytes of one, cannot be a TLS record's; None if it (still) can."""
    kind = header[0]
    if kind not in RECORD_TYPES:
        return f"record type 0x{kind:02x} is not a TLS record type"
    if (len(header) >= 2 and header[1] != 3) or (len(header) >= 3 and not 1 <= header[2] <= 3):
        return f"record version {header[1:3].hex(' ')} is not TLS 1.0-1.3's"
    if len(header) >= HEADER_LEN:
        length = (header[3] << 8) | header[4]
        if length > MAX_RECORD_LENGTH:
            return f"record length {length} exceeds {MAX_RECORD_LENGTH}"
    return None


def whole_records(data: bytes | memoryview, limit: int) -> int:
    """How many bytes of ``data`` (whole TLS records) are the whole records that fit in ``limit`` bytes."""
    pos = 0
    end = min(len(data), limit)
    while pos + HEADER_LEN <= end:
        stop = pos + HEADER_LEN + ((data[pos + 3] << 8) | data[pos + 4])
        if stop > end:
            break
        pos = stop
    return pos


def _hello_problem(head: bytearray) -> str | None:
    """Why the first bytes of the agent's user (up to a header and one payload byte) are not the start of a
    ClientHello record; None if they (still) can be."""
    if head[:3] != CLIENT_HELLO_HEADER[: len(head)]:
        return f"the first record {head[:3].hex(' ')} is not a ClientHello record (16 03 01)"
    if len(head) >= HEADER_LEN and not (head[3] or head[4]):
        return "the first record is empty"
    if len(head) > HEADER_LEN and head[HEADER_LEN] != CLIENT_HELLO:
        return f"the first record's handshake type {head[HEADER_LEN]} is not a ClientHello"
    return None


class _Direction:
    """Record parsing state of one direction: ``need`` payload bytes of the current record still to come, or a
    header being gathered in ``head``. ``tracked`` turns False after the direction's control record."""

    __slots__ = ("app_data", "head", "need", "records", "tracked")

    def __init__(self) -> None:
        self.need = 0
        self.head = bytearray()
        self.tracked = True
        self.app_data = False
        self.records = 0

    def take_payload(self, view: memoryview, pos: int, pieces: list[bytes | memoryview]) -> int:
        """Pass on what ``view[pos:]`` holds of the current record's payload; returns the new position."""
        take = min(self.need, len(view) - pos)
        pieces.append(view[pos : pos + take])
        self.need -= take
        return pos + take


class LiteTlsTracker:
    """One end of one lite-tls stream. ``role``: ``Role.CLIENT`` at the agent (whose first-hand bytes must start
    with a ClientHello record), ``Role.SERVER`` at the server."""

    __slots__ = (
        "_held_local",
        "_held_peer",
        "_in",
        "_marker",
        "_out",
        "_peer_marker_muxed",
        "_peer_marker_seen",
        "_pending_control",
        "_post",
        "_post_need",
        "_role",
        "_state",
        "reason",
        "side",
    )

    def __init__(self, side: Role) -> None:
        self.side = side
        self._state = LiteTlsState.TRACKING
        self._role: LiteTlsRole | None = None
        self._out = _Direction()  # first-hand: local -> peer
        self._in = _Direction()  # second-hand: peer -> local
        #: the control record to send at the out direction's next record boundary (MARKER: the passive answer)
        self._pending_control: bytes | None = None
        self._held_local: list[bytes] = []  # active: from the first 0x17 on, until the answer
        self._held_peer: list[bytes] = []  # passive: what came with the marker, until the first 0x17 is whole
        self._post = bytearray()  # passive: bytes after the marker while holding
        self._post_need: int | None = None  # passive: bytes after the marker up to the end of the first 0x17
        #: why the stream fell back, or what the peer violated
        self.reason: str | None = None
        self._peer_marker_seen = False
        self._peer_marker_muxed = False
        #: the marker this end sends (:data:`MUXED_MARKER` once a pending dedicated connection settled muxed)
        self._marker = MARKER

    # -- what the runtime reads ------------------------------------------------------------------------------------

    @property
    def state(self) -> LiteTlsState:
        return self._state

    @property
    def role(self) -> LiteTlsRole | None:
        """ACTIVE or PASSIVE once this end took part in a marker exchange."""
        return self._role

    @property
    def left(self) -> bool:
        return self._state is LiteTlsState.LEFT

    @property
    def awaiting_answer(self) -> bool:
        """Active and holding: first-hand bytes are kept until the answer; stop reading the local side."""
        return self._state is LiteTlsState.AWAITING_ANSWER

    @property
    def held(self) -> int:
        """Bytes held at this end (first-hand while awaiting the answer, second-hand while passive)."""
        return sum(map(len, self._held_local)) + self.held_from_peer

    @property
    def held_from_peer(self) -> int:
        """Second-hand bytes held (passive, until the first application-data record after the marker)."""
        return sum(map(len, self._held_peer)) + len(self._post)

    @property
    def holding(self) -> bool:
        """Passive, left: the peer's bytes are held until the first application-data record after its marker is
        whole (the runtime bounds how long: ``HOLD_TIMEOUT``)."""
        return self._state is not LiteTlsState.BROKEN and (
            self._post_need is not None or bool(self._held_peer)
        )

    @property
    def transparent(self) -> bool:
        """Nothing is parsed or held any more: both calls would hand their input straight on, so the runtime may
        relay the stream without the tracker."""
        if self._state is LiteTlsState.LEFT:
            return self._post_need is None and not self._held_peer
        return (
            self._state is LiteTlsState.FALLBACK
            and not self._out.tracked
            and not self._in.tracked
            and self._pending_control is None
        )

    # -- first-hand bytes ------------------------------------------------------------------------------------------

    def from_local(self, data: bytes) -> list[LiteTlsEvent]:
        """Bytes the local TLS endpoint wrote. Returns what to send to the peer (and when the stream leaves)."""
        self._usable()
        if not data:
            return []
        data = bytes(data)
        if self._state is LiteTlsState.AWAITING_ANSWER:
            self._held_local.append(data)
            return []
        if not self._out.tracked:
            return [SendToPeer(data=data)]
        events: list[LiteTlsEvent] = []
        self._scan_local(data, events)
        return events

    def _scan_local(self, data: bytes, events: list[LiteTlsEvent]) -> None:
        out = self._out
        view = memoryview(data)
        pieces: list[bytes | memoryview] = []
        pos, end = 0, len(data)
        while pos < end:
            if out.need:
                pos = out.take_payload(view, pos, pieces)
                if not out.need and self._pending_control is not None:
                    self._fire_control(pieces, events, view[pos:])
                    return
                continue
            first = out.records == 0
            if first and self.side is Role.SERVER and not out.head and not self._in.records:
                # the client has not sent a record header yet: a protocol where the server speaks first
                self._fall_back(pieces, events, "the server spoke first", view[pos:])
                return
            # the agent's first record: its header and the handshake type after it (a ClientHello's)
            hello = first and self.side is Role.CLIENT
            want = HEADER_LEN + 1 if hello else HEADER_LEN
            take = min(want - len(out.head), end - pos)
            out.head += view[pos : pos + take]
            pos += take
            # decide as soon as the bytes gathered cannot begin a TLS record: nothing waits for a whole header
            problem = header_problem(out.head[:HEADER_LEN])
            if problem is None and hello:
                problem = _hello_problem(out.head)
            if problem is not None:
                self._fall_back(pieces, events, problem, view[pos:])
                return
            if len(out.head) < want:
                break
            header = bytes(out.head[:HEADER_LEN])
            extra = len(out.head) - HEADER_LEN  # the handshake type, part of the payload
            if extra:
                pieces.append(bytes(out.head))
            out.head.clear()
            if header[0] == APPLICATION_DATA:
                if self._in.app_data and self._state is LiteTlsState.TRACKING:
                    # active: the pending records and the marker go now; this 0x17 waits for the answer
                    pieces.append(self._marker)
                    out.tracked = False
                    self._state = LiteTlsState.AWAITING_ANSWER
                    self._role = LiteTlsRole.ACTIVE
                    self._held_local = [header, bytes(view[pos:])]
                    _send(events, pieces, marker=True)
                    return
                out.app_data = True
            out.records += 1
            out.need = ((header[3] << 8) | header[4]) - extra
            if not extra:
                pieces.append(header)
            if not out.need and self._pending_control is not None:
                self._fire_control(pieces, events, view[pos:])
                return
        _send(events, pieces)

    def _fall_back(
        self, pieces: list[bytes | memoryview], events: list[LiteTlsEvent], problem: str, rest: memoryview
    ) -> None:
        """First-hand bytes that are not TLS: the notice goes before them, and the stream stays in the tunnel."""
        out = self._out
        pieces += (NOTICE, bytes(out.head), rest)
        out.head.clear()
        out.tracked = False
        self._state = LiteTlsState.FALLBACK
        self.reason = problem
        _send(events, pieces)
        events.append(FellBack(reason=problem, by_peer=False))

    @property
    def peer_marker_seen(self) -> bool:
        """The peer's marker came (the peer has left, or will once it gets the answer)."""
        return self._peer_marker_seen

    @property
    def peer_marker_muxed(self) -> bool:
        """The peer's marker was :data:`MUXED_MARKER`: its dedicated connection was pending and it left muxed."""
        return self._peer_marker_muxed

    @property
    def hello_seen(self) -> bool:
        """The client's first record passed (at the agent: first-hand, as a ClientHello record; at the server:
        the first record from the agent, which passed that check there) and no marker or notice has gone either
        way: the stream may still leave (in splice mode the agent dials its dedicated connection now)."""
        seen = self._out.records if self.side is Role.CLIENT else self._in.records
        return seen > 0 and self._state is LiteTlsState.TRACKING

    @property
    def header_begun(self) -> bool:
        """The first bytes of a first-hand record header are held, waiting for its rest: if none come soon, the
        runtime calls :meth:`local_stalled`."""
        return self._out.tracked and bool(self._out.head)

    def local_stalled(self, *, ended: bool = False) -> list[LiteTlsEvent]:
        """The local side has sent nothing for a while (or, ``ended``, ended its side): if the tracker is still
        gathering the first bytes of a record header (a TLS endpoint writes whole records, so these are not TLS),
        fall back and send them. The runtime calls this after a short quiet period and at the local end of
        stream, so that nothing ever waits for a header's end nor stays behind the FIN."""
        self._usable()
        out = self._out
        if not out.tracked or not out.head:  # (a control record due would have gone at this boundary already)
            return []
        events: list[LiteTlsEvent] = []
        then = "the end of the stream" if ended else "nothing"
        self._fall_back([], events, f"{len(out.head)} bytes of a record header, then {then}", memoryview(b""))
        return events

    def _fire_control(
        self, pieces: list[bytes | memoryview], events: list[LiteTlsEvent], rest: bytes | memoryview
    ) -> None:
        """The out direction is at a record boundary: send the pending control record, then ``rest`` (and any
        header bytes gathered but not yet sent) untracked."""
        control = self._pending_control
        assert control is not None
        self._pending_control = None
        out = self._out
        out.tracked = False
        tail = bytes(out.head) + bytes(rest)
        out.head.clear()
        pieces.append(control)
        if control is not NOTICE:  # the passive answer: from here on the stream has left
            _send(events, pieces, marker=True)
            self._state = LiteTlsState.LEFT
            events.append(LeftTunnel(role=LiteTlsRole.PASSIVE))
            if tail:
                events.append(SendToPeer(data=tail))
        else:
            pieces.append(tail)
            _send(events, pieces)

    # -- second-hand bytes -----------------------------------------------------------------------------------------

    def from_peer(self, data: bytes) -> list[LiteTlsEvent]:
        """Bytes of the stream from the other end. Returns what to deliver locally (and any answer to send)."""
        self._usable()
        if not data:
            return []
        data = bytes(data)
        events: list[LiteTlsEvent] = []
        if self._in.tracked:
            self._scan_peer(data, events)
        elif self._post_need is not None or self._held_peer:
            self._hold_until_app_data(data, events)
        else:
            events.append(DeliverToLocal(data=data))
        return events

    def _scan_peer(self, data: bytes, events: list[LiteTlsEvent]) -> None:
        inp = self._in
        view = memoryview(data)
        pieces: list[bytes | memoryview] = []
        pos, end = 0, len(data)
        while pos < end:
            if inp.need:
                pos = inp.take_payload(view, pos, pieces)
                continue
            first = inp.head[0] if inp.head else view[pos]
            want = (CONTROL_LEN if first == CONTROL_TYPE else HEADER_LEN) - len(inp.head)
            take = min(want, end - pos)
            inp.head += view[pos : pos + take]
            pos += take
            if take < want:
                break
            header = bytes(inp.head)
            inp.head.clear()
            if first == CONTROL_TYPE:
                if header in (MARKER, MUXED_MARKER):
                    self._peer_marker_muxed = header == MUXED_MARKER
                    self._peer_marker(pieces, events, view[pos:])
                    return
                if header == NOTICE:
                    self._peer_notice(pieces, events, view[pos:])
                    return
                self._violation(
                    events, f"a control record {header.hex(' ')} that is neither a marker nor the notice"
                )
                return
            problem = header_problem(header)
            if problem is not None:
                self._violation(events, f"the peer passed on what is not TLS without the notice: {problem}")
                return
            if header[0] == APPLICATION_DATA:
                inp.app_data = True
            inp.records += 1
            inp.need = (header[3] << 8) | header[4]
            pieces.append(header)
        _deliver(events, pieces)

    def _peer_marker(
        self, pieces: list[bytes | memoryview], events: list[LiteTlsEvent], rest: memoryview
    ) -> None:
        self._in.tracked = False
        self._peer_marker_seen = True
        state = self._state
        if state is LiteTlsState.AWAITING_ANSWER:  # the answer (or both ends went active at once)
            _deliver(events, pieces)
            self._state = LiteTlsState.LEFT
            events.append(LeftTunnel(role=LiteTlsRole.ACTIVE))
            held = b"".join(self._held_local)
            self._held_local = []
            if held:
                events.append(SendToPeer(data=held))
            if rest:
                events.append(DeliverToLocal(data=bytes(rest)))
        elif state is LiteTlsState.TRACKING:  # passive: hold what came with it, answer, leave
            self._role = LiteTlsRole.PASSIVE
            self._held_peer = [bytes(p) for p in pieces if p]
            self._post_need = 0
            if self._over_hold_limit(events):
                return
            self._pending_control = self._marker
            if self._out.need:
                self._state = LiteTlsState.ANSWERING
            else:
                self._fire_control([], events, b"")
            if rest:
                self._hold_until_app_data(bytes(rest), events)
        else:  # FALLBACK: the peer went active before it saw our notice; drop the marker, never answer it
            _deliver(events, pieces)
            if rest:
                events.append(DeliverToLocal(data=bytes(rest)))

    def _peer_notice(
        self, pieces: list[bytes | memoryview], events: list[LiteTlsEvent], rest: memoryview
    ) -> None:
        self._in.tracked = False
        _deliver(events, pieces)
        state = self._state
        if state is LiteTlsState.TRACKING or state is LiteTlsState.AWAITING_ANSWER:
            self._state = LiteTlsState.FALLBACK
            self.reason = "the peer fell back"
            events.append(FellBack(reason=self.reason, by_peer=True))
            if state is LiteTlsState.AWAITING_ANSWER:  # our marker is out: release the held bytes, protected
                held = b"".join(self._held_local)
                self._held_local = []
                if held:
                    events.append(SendToPeer(data=held))
            elif self._out.tracked:
                self._pending_control = NOTICE
                if not self._out.need:
                    self._fire_control([], events, b"")
        if rest:
            events.append(DeliverToLocal(data=bytes(rest)))

    def _hold_until_app_data(self, data: bytes, events: list[LiteTlsEvent]) -> None:
        """Passive: keep what came with the marker until the first application-data record after it is whole,
        then hand all of it over at once."""
        self._post += data
        if self._post_need == 0 and len(self._post) >= HEADER_LEN:
            header = bytes(self._post[:HEADER_LEN])
            problem = header_problem(header)
            if problem is None and header[0] != APPLICATION_DATA:
                problem = f"record type 0x{header[0]:02x}"
            if problem is not None:
                self._violation(events, f"after the marker, expected application data: {problem}")
                return
            self._post_need = HEADER_LEN + ((header[3] << 8) | header[4])
        if self._post_need and len(self._post) >= self._post_need:
            self._held_peer.append(bytes(self._post))
            self._post.clear()
            self._post_need = None
            held = b"".join(self._held_peer)
            self._held_peer = []
            events.append(DeliverToLocal(data=held))
        else:
            self._over_hold_limit(events)

    def _over_hold_limit(self, events: list[LiteTlsEvent]) -> bool:
        """Passive: more than :data:`HOLD_LIMIT` bytes held is a violation (a peer running this protocol sends
        its first application-data record right after the marker; what came before it is handshake records)."""
        held = self.held_from_peer
        if held <= HOLD_LIMIT:
            return False
        self._violation(
            events,
            f"{held} bytes held before the first application data after the marker (over {HOLD_LIMIT})",
        )
        return True

    def stop_holding(self) -> bytes:
        """Passive, spliced: hand over now what :meth:`_hold_until_app_data` keeps (the peer's bytes after its
        marker come on the dedicated connection, which the tracker never sees)."""
        held = b"".join(self._held_peer) + bytes(self._post)
        self._held_peer = []
        self._post = bytearray()
        self._post_need = None
        return held

    def _violation(self, events: list[LiteTlsEvent], reason: str) -> None:
        self._state = LiteTlsState.BROKEN
        self.reason = reason
        self._held_local, self._held_peer, self._post = [], [], bytearray()
        self._post_need = None
        events.append(PeerViolation(reason=reason))

    def _usable(self) -> None:
        if self._state is LiteTlsState.BROKEN:
            raise TrackerBrokenError(f"the lite-tls tracker is broken ({self.reason}); reset the stream")

    def __repr__(self) -> str:
        return (
            f"LiteTlsTracker({self.side.value}, {self._state.value}, role={self._role and self._role.value})"
        )


def _send(events: list[LiteTlsEvent], pieces: list[bytes | memoryview], *, marker: bool = False) -> None:
    data = b"".join(pieces)
    if data:
        events.append(SendToPeer(data=data, marker=marker))


def _deliver(events: list[LiteTlsEvent], pieces: list[bytes | memoryview]) -> None:
    data = b"".join(pieces)
    if data:
        events.append(DeliverToLocal(data=data))


@dataclass(slots=True)
class LiteTlsStep:
    """What a :class:`LiteTlsSession` call asks of the runtime, to do in this order: send ``send`` on the stream
    (each piece ``(data, passthrough)``: ``passthrough`` pieces are one whole TLS application-data record each,
    for one PASSTHROUGH frame), deliver ``deliver`` to the local endpoint, return the flow-control credit of
    ``consumed`` peer bytes that will never be delivered (control records), and reset the stream if
    ``violation`` is set. ``left`` and ``fell_back`` are for logs and counters. ``hello``: the client began with
    a ClientHello record (once per stream; :attr:`LiteTlsTracker.hello_seen`): in splice mode the agent dials
    its dedicated connection now, and both ends call :meth:`LiteTlsSession.splice_pending`. ``unbound``: the
    dedicated connection bound to this end is not used (the peer's marker said it left muxed): close it."""

    send: list[tuple[bytes | memoryview, bool]] = field(default_factory=list)
    deliver: list[bytes] = field(default_factory=list)
    consumed: int = 0
    violation: str | None = None
    left: LiteTlsRole | None = None
    fell_back: FellBack | None = None
    hello: bool = False
    unbound: bool = False


class LiteTlsSession:
    """A lite-tls stream's tracker with what the muxed runtime needs around it (docs/lite-tls.md, "Runtime").

    * It acts on the tracker's events and tells the runtime what to send and deliver (:class:`LiteTlsStep`).
    * After this end left the tunnel, what it sends is cut at the user's TLS record boundaries: each whole
      application-data record is a passthrough piece; other records go protected; a partial record waits for
      its rest (a TLS endpoint writes whole records), until :meth:`local_ended`. Bytes that are not TLS records
      turn the cutting off: they and everything after them go protected.
    * The peer's DATA must be protected until this end has left: a PASSTHROUGH frame before is a violation.
      After it, both kinds are accepted (the peer sends protected what is not a whole record).
    * It counts the peer bytes the tracker strips (``consumed``), so that the runtime returns their credit.
    * Spliced (:meth:`splice`, before the stream leaves): after leaving, everything this end sends is one
      passthrough piece per call (no cutting: it goes to the dedicated connection, not into frames), and a
      passive end hands over what it held at once (the peer's bytes after its marker come on the dedicated
      connection).
    * Splice pending (:meth:`splice_pending`, the agent dialing its dedicated connection once the ClientHello
      came): the marker exchange goes on in the tunnel as ever, but this end's marker (active, or the passive
      answer) waits for the mode, and an end that leaves before :meth:`splice_settled` keeps what it would send
      after leaving (and the runtime stops reading its local endpoint, :attr:`holds_local`) until the mode is
      known; ``step.left`` comes with the settling step. Settled muxed, the marker goes as :data:`MUXED_MARKER`:
      an end that bound the connection meanwhile (its ACK not seen in time) then leaves muxed too
      (``step.unbound``), so both ends always leave the same way.
    """

    __slots__ = (
        "_cut",
        "_cutting",
        "_deferred",
        "_held_send",
        "_hello",
        "_left",
        "_left_role",
        "_pending",
        "_spliced",
        "tracker",
    )

    def __init__(self, side: Role) -> None:
        self.tracker = LiteTlsTracker(side)
        self._left = False
        self._cutting = True
        self._spliced = False
        self._cut = bytearray()  # after leaving: the start of a record whose rest has not come yet
        self._hello = False  # step.hello was given
        #: splice pending: the mode of leaving is not known yet; what this end sends after leaving waits here
        self._pending = False
        self._deferred: list[bytes] = []
        self._left_role: LiteTlsRole | None = None  # left while pending: step.left of the settling step
        #: pending: this end's marker (the records before it first, what it sends after it before leaving
        #: last) waits for the mode
        self._held_send: list[bytes] | None = None

    def splice(self) -> None:
        """Leave to a dedicated connection rather than into PASSTHROUGH frames (docs/lite-tls.md, splice mode):
        the server, as it binds the connection, while :attr:`may_splice`."""
        if self._left:
            raise TrackerBrokenError("splice() after the stream left the tunnel")
        self._spliced = True

    @property
    def may_splice(self) -> bool:
        """No marker or notice has gone either way yet, or only this end's marker, held while pending, and a
        pending connection never settled muxed: binding a dedicated connection now changes how both ends leave,
        never what already happened (and never what a muxed marker said)."""
        if self._spliced or self._left or self.tracker._marker is MUXED_MARKER:  # (settled muxed: for good)
            return False
        return self.tracker.state is LiteTlsState.TRACKING or self._held_send is not None

    def splice_pending(self) -> None:
        """A dedicated connection is on its way (after ``step.hello``: the agent dials it, the server expects
        it): until :meth:`splice_settled`, this end's marker and what it would send after leaving wait for the
        mode."""
        if self._left or self._spliced:
            raise TrackerBrokenError("splice_pending() after the stream left or was spliced")
        self._pending = True

    @property
    def splice_is_pending(self) -> bool:
        return self._pending

    def splice_settled(self, spliced: bool) -> LiteTlsStep:
        """The dedicated connection is bound at both ends (``spliced``), or at neither (muxed). If this end left
        meanwhile, the step carries ``left`` and what it kept, sent as the mode wants."""
        step = LiteTlsStep()
        if not self._pending:
            return step
        self._pending = False
        self._spliced = spliced
        deferred, self._deferred = self._deferred, []
        marker, self._held_send = self._held_send or [], None
        if self.broken:
            return step
        if not spliced:  # a marker still to come says so too
            self.tracker._marker = MUXED_MARKER
            if marker:  # (its first piece ends with the marker)
                marker[0] = marker[0][:-CONTROL_LEN] + MUXED_MARKER
        step.send += [(data, False) for data in marker]  # the marker, before anything sent after leaving
        if not self._left:
            return step
        step.left, self._left_role = self._left_role, None
        if spliced:
            held = self.tracker.stop_holding()
            if held:
                step.deliver.append(held)
        for data in deferred:
            self._cut_records(data, step.send)
        return step

    @property
    def spliced(self) -> bool:
        return self._spliced

    @property
    def left(self) -> bool:
        """This end has left the tunnel (its DATA goes in passthrough)."""
        return self._left

    @property
    def awaiting_answer(self) -> bool:
        """The tracker holds the local endpoint's bytes until the peer's answer."""
        return self.tracker.awaiting_answer

    @property
    def holds_local(self) -> bool:
        """Stop reading the local endpoint: awaiting the answer, or left while the splice is pending."""
        return self.tracker.awaiting_answer or (self._pending and (self._left or self._held_send is not None))

    @property
    def broken(self) -> bool:
        return self.tracker.state is LiteTlsState.BROKEN

    def from_local(self, data: bytes) -> LiteTlsStep:
        """Bytes read from the local TLS endpoint."""
        step = LiteTlsStep()
        if self.broken or not data:
            return step
        if self._left and self.tracker.transparent:
            self._cut_records(bytes(data), step.send)
        else:
            self._act(self.tracker.from_local(data), step)
            if not self._hello and self.tracker.hello_seen:
                self._hello = step.hello = True
        return step

    def local_stalled(self) -> LiteTlsStep:
        """The local endpoint went quiet with a record header begun (see :meth:`LiteTlsTracker.local_stalled`)."""
        step = LiteTlsStep()
        if not self.broken:
            self._act(self.tracker.local_stalled(), step)
        return step

    def local_ended(self) -> LiteTlsStep:
        """The local endpoint ended its side: a record header begun goes now (the stream falls back), and so does
        a partial record kept for cutting (protected)."""
        step = LiteTlsStep()
        if not self.broken and self.tracker.header_begun:
            self._act(self.tracker.local_stalled(ended=True), step)
        if self._cut:
            step.send.append((bytes(self._cut), False))
            self._cut = bytearray()
        return step

    def from_peer(self, data: bytes, passthrough: bool) -> LiteTlsStep:
        """The stream's DATA from the other end; ``passthrough``: it came in a PASSTHROUGH frame."""
        step = LiteTlsStep()
        if self.broken or not data:
            step.consumed = len(data)
            return step
        if passthrough and not self._left:
            self.tracker._violation([], "PASSTHROUGH DATA before the stream left the tunnel")
            step.violation = self.tracker.reason
            step.consumed = len(data)
            return step
        tracker = self.tracker
        if tracker.transparent:
            step.deliver.append(bytes(data))
            return step
        held = tracker.held_from_peer
        events = tracker.from_peer(data)
        if self._spliced and not self._left and tracker.peer_marker_muxed:
            # bound here, but the peer left muxed (it did not see the ACK in time): so does this end
            self._spliced = False
            step.unbound = True
        self._act(events, step)
        if step.violation is not None:
            step.deliver.clear()
            step.consumed = len(data) + held
            return step
        if not self._hello and tracker.hello_seen:
            self._hello = step.hello = True
        if (
            self._pending
            and tracker.peer_marker_seen
            and (tracker.side is Role.SERVER or tracker.peer_marker_muxed)
        ):
            # the agent sends its marker only once it knows: had the server bound its connection, this end would
            # not be pending; so it went muxed. The server's muxed marker: it bound nothing, and binds nothing now
            settled = self.splice_settled(False)
            step.send += settled.send
            step.deliver += settled.deliver
            step.left = settled.left
        step.consumed = len(data) - sum(map(len, step.deliver)) - (tracker.held_from_peer - held)
        return step

    def _act(self, events: list[LiteTlsEvent], step: LiteTlsStep) -> None:
        for ev in events:
            if isinstance(ev, SendToPeer):
                if ev.marker and self._pending:  # the mode of leaving decides which marker goes
                    self._held_send = [ev.data]
                elif self._held_send is not None and not self._left:
                    self._held_send.append(ev.data)
                elif self._left:
                    self._cut_records(ev.data, step.send)
                else:
                    step.send.append((ev.data, False))
            elif isinstance(ev, DeliverToLocal):
                step.deliver.append(ev.data)
            elif isinstance(ev, LeftTunnel):
                self._left = True
                if self._pending:
                    self._left_role = ev.role
                else:
                    step.left = ev.role
            elif isinstance(ev, FellBack):
                step.fell_back = ev
            elif isinstance(ev, PeerViolation):
                step.violation = ev.reason
        if step.left is not None and self._spliced and step.violation is None:
            held = self.tracker.stop_holding()
            if held:
                step.deliver.append(held)

    def cut(self, data: bytes) -> list[tuple[bytes | memoryview, bool]]:
        """After leaving, once the tracker is ``transparent`` (nothing parsed or held): what :meth:`from_local`
        would send for ``data``, without a step (the runtime's path for every read after leaving)."""
        send: list[tuple[bytes | memoryview, bool]] = []
        self._cut_records(data, send)
        return send

    def _cut_records(self, data: bytes, send: list[tuple[bytes | memoryview, bool]]) -> None:
        """After leaving: cut ``data`` at record boundaries; runs of whole application-data records go in
        passthrough (a piece each), other records protected, a partial record waits for its rest."""
        if self._pending:  # the mode of leaving is not known yet
            self._deferred.append(bytes(data))
            return
        if self._spliced:
            send.append((data, True))
            return
        if not self._cutting:
            send.append((data, False))
            return
        buf: bytes | memoryview = data
        if self._cut:  # complete the record begun in an earlier read, then go on with this one as a view
            cut = self._cut
            if len(cut) + len(data) < HEADER_LEN:
                cut += data
                return
            header = bytes(cut[:HEADER_LEN]) + data[: max(0, HEADER_LEN - len(cut))]
            need = HEADER_LEN + ((header[3] << 8) | header[4]) - len(cut)
            if header_problem(header) is None and need > len(data):
                cut += data
                return
            self._cut = bytearray()
            if header_problem(header) is not None:  # not TLS: all of it protected, for good
                self._cutting = False
                send.append((bytes(cut) + data, False))
                return
            self._cut_records(bytes(cut) + data[:need], send)
            if len(data) == need:
                return
            if not self._cutting:
                send.append((data[need:], False))
                return
            buf = memoryview(data)[need:]
        end = len(buf)
        pos = 0
        run = 0  # where the bytes not yet queued begin
        passthrough = True  # what kind they are
        while end - pos >= HEADER_LEN:
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if (
                buf[pos] == APPLICATION_DATA
                and buf[pos + 1] == 3
                and buf[pos + 2] == 3
                and length <= MAX_RECORD_LENGTH
            ):
                app = True
            elif header_problem(buf[pos : pos + HEADER_LEN]) is None:
                app = False
            else:  # not TLS: protected from here on, for good
                self._cutting = False
                pos = end
                break
            stop = pos + HEADER_LEN + length
            if stop > end:
                break
            if app is not passthrough and pos > run:
                send.append((buf[run:pos], passthrough))
                run = pos
            passthrough = app
            pos = stop
        if pos > run:
            send.append((buf[run:pos], passthrough if self._cutting else False))
        if pos < end:
            self._cut = bytearray(buf[pos:])
