"""Stream state machine: ONE transition table, and the per-stream record the tunnel keeps.

Every rule about which input a stream accepts in which state lives in ``STREAM_TRANSITIONS``.
A pair that is not in the table is a protocol error: a local input raises (nothing changes), a remote
input makes the tunnel reset the stream (RST on the wire, ``StreamReset`` event).
"""

from __future__ import annotations

from enum import Enum, auto

from vtunnel.protocol.metadata import StreamMetadata

__all__ = [
    "LIVE_STATES",
    "STREAM_TRANSITIONS",
    "Stream",
    "StreamEffect",
    "StreamInput",
    "StreamState",
    "StreamTransitionError",
]


class StreamState(Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is C-fast

    NONE = "none"
    SYN_SENT = "syn_sent"
    ESTABLISHED = "established"
    FIN_SENT = "fin_sent"
    FIN_RECV = "fin_recv"
    DEAD = "dead"
    REAL_CLOSED = "real_closed"


class StreamInput(Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is C-fast

    SEND_SYN = auto()
    RECV_SYN = auto()
    SEND_SYN_ACK = auto()
    RECV_SYN_ACK = auto()
    SEND_DATA = auto()
    RECV_DATA = auto()
    SEND_FIN = auto()
    RECV_FIN = auto()
    SEND_RST = auto()
    RECV_RST = auto()
    USER_CLOSE = auto()

    @property
    def is_local(self) -> bool:
        return self.name.startswith(("SEND_", "USER_"))


class StreamEffect(Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is C-fast

    PERFORM = auto()  # do what the input says (send the frame / deliver the event)
    IGNORE = auto()  # drop it silently (duplicates, late frames for a dead stream)
    ANSWER_RST = auto()  # the peer reset a live stream: report it and answer with an RST
    ENDED = auto()  # the peer's FIN ended a stream that was not established: report it, stream is dead
    RESET = auto()  # the user closed a live stream: send an RST, free it
    FREE = auto()  # the user closed a dead stream: free it


S = StreamState
I = StreamInput  # noqa: E741
E = StreamEffect

STREAM_TRANSITIONS: dict[tuple[StreamState, StreamInput], tuple[StreamEffect, StreamState]] = {
    # a stream we have not yet opened, or a peer's SYN we have not seen
    (S.NONE, I.SEND_SYN): (E.PERFORM, S.SYN_SENT),
    (S.NONE, I.RECV_SYN): (E.PERFORM, S.ESTABLISHED),
    (S.NONE, I.SEND_RST): (E.IGNORE, S.NONE),
    (S.NONE, I.USER_CLOSE): (E.IGNORE, S.NONE),
    # client: SYN sent, no SYN-ACK yet (data goes out at once with 0-RTT, else waits in the core)
    (S.SYN_SENT, I.RECV_SYN_ACK): (E.PERFORM, S.ESTABLISHED),
    (S.SYN_SENT, I.SEND_DATA): (E.PERFORM, S.SYN_SENT),
    (S.SYN_SENT, I.SEND_FIN): (E.PERFORM, S.FIN_SENT),
    (S.SYN_SENT, I.RECV_FIN): (E.ENDED, S.DEAD),
    (S.SYN_SENT, I.SEND_RST): (E.PERFORM, S.DEAD),
    (S.SYN_SENT, I.RECV_RST): (E.ANSWER_RST, S.DEAD),
    (S.SYN_SENT, I.USER_CLOSE): (E.RESET, S.REAL_CLOSED),
    # both directions open
    (S.ESTABLISHED, I.RECV_SYN): (E.IGNORE, S.ESTABLISHED),
    (S.ESTABLISHED, I.SEND_SYN_ACK): (E.PERFORM, S.ESTABLISHED),
    (S.ESTABLISHED, I.RECV_SYN_ACK): (E.IGNORE, S.ESTABLISHED),
    (S.ESTABLISHED, I.SEND_DATA): (E.PERFORM, S.ESTABLISHED),
    (S.ESTABLISHED, I.RECV_DATA): (E.PERFORM, S.ESTABLISHED),
    (S.ESTABLISHED, I.SEND_FIN): (E.PERFORM, S.FIN_SENT),
    (S.ESTABLISHED, I.RECV_FIN): (E.PERFORM, S.FIN_RECV),
    (S.ESTABLISHED, I.SEND_RST): (E.PERFORM, S.DEAD),
    (S.ESTABLISHED, I.RECV_RST): (E.ANSWER_RST, S.DEAD),
    (S.ESTABLISHED, I.USER_CLOSE): (E.RESET, S.REAL_CLOSED),
    # we sent FIN, the peer may still send
    (S.FIN_SENT, I.RECV_SYN): (E.IGNORE, S.FIN_SENT),
    (S.FIN_SENT, I.RECV_SYN_ACK): (E.PERFORM, S.FIN_SENT),
    (S.FIN_SENT, I.RECV_DATA): (E.PERFORM, S.FIN_SENT),
    (S.FIN_SENT, I.RECV_FIN): (E.PERFORM, S.DEAD),
    (S.FIN_SENT, I.SEND_RST): (E.PERFORM, S.DEAD),
    (S.FIN_SENT, I.RECV_RST): (E.ANSWER_RST, S.DEAD),
    (S.FIN_SENT, I.USER_CLOSE): (E.RESET, S.REAL_CLOSED),
    # the peer sent FIN, we may still send
    (S.FIN_RECV, I.RECV_SYN): (E.IGNORE, S.FIN_RECV),
    (S.FIN_RECV, I.SEND_SYN_ACK): (E.PERFORM, S.FIN_RECV),
    (S.FIN_RECV, I.RECV_SYN_ACK): (E.IGNORE, S.FIN_RECV),
    (S.FIN_RECV, I.SEND_DATA): (E.PERFORM, S.FIN_RECV),
    (S.FIN_RECV, I.SEND_FIN): (E.PERFORM, S.DEAD),
    (S.FIN_RECV, I.SEND_RST): (E.PERFORM, S.DEAD),
    (S.FIN_RECV, I.RECV_RST): (E.ANSWER_RST, S.DEAD),
    (S.FIN_RECV, I.USER_CLOSE): (E.RESET, S.REAL_CLOSED),
    # dead: finished or reset, the user has not closed it yet; late frames are dropped
    (S.DEAD, I.RECV_SYN): (E.IGNORE, S.DEAD),
    (S.DEAD, I.RECV_SYN_ACK): (E.IGNORE, S.DEAD),
    (S.DEAD, I.RECV_DATA): (E.IGNORE, S.DEAD),
    (S.DEAD, I.RECV_FIN): (E.IGNORE, S.DEAD),
    (S.DEAD, I.RECV_RST): (E.IGNORE, S.DEAD),
    (S.DEAD, I.SEND_RST): (E.IGNORE, S.DEAD),
    (S.DEAD, I.USER_CLOSE): (E.FREE, S.REAL_CLOSED),
    # real_closed: the record is freed; only a repeated close is harmless
    (S.REAL_CLOSED, I.USER_CLOSE): (E.IGNORE, S.REAL_CLOSED),
    (S.REAL_CLOSED, I.SEND_RST): (E.IGNORE, S.REAL_CLOSED),
}

LIVE_STATES = frozenset({S.SYN_SENT, S.ESTABLISHED, S.FIN_SENT, S.FIN_RECV})


class StreamTransitionError(Exception):
    """(state, input) is not in the table (internal; the tunnel maps it to a local or remote error)."""

    def __init__(self, state: StreamState, event: StreamInput) -> None:
        super().__init__(f"{event.name.lower()} is not allowed in state {state.value}")
        self.state = state
        self.input = event


class Stream:
    """One stream's state and flow-control counters (all sizes in application bytes)."""

    __slots__ = (
        "accepted",
        "datagram",
        "id",
        "metadata",
        "pending",
        "pending_len",
        "recv_granted",
        "recv_remaining",
        "recv_unacked",
        "recv_unannounced",
        "recv_unreliable",
        "recv_window",
        "send_window",
        "state",
    )

    def __init__(self, stream_id: int, *, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.state = StreamState.NONE
        self.metadata: StreamMetadata | None = None
        self.datagram = False  # a ``udp`` stream: one DATA frame per datagram
        self.accepted = False  # client: SYN-ACK received; server: SYN-ACK sent
        self.send_window = send_window  # credit the peer gave us
        # the window we grant now: the floor, plus a first grant, plus growth while the stream is read
        self.recv_window = recv_window
        self.recv_granted = 0  # the first grant (within half the receive budget)
        self.recv_remaining = recv_window  # credit we gave the peer and it has not used
        self.recv_unacked = 0  # delivered to the application, not yet acknowledged
        self.recv_unannounced = 0  # acknowledged, not yet returned with WINDOW_UPDATE
        # of recv_unacked, what came as unreliable datagrams (they used no credit, so acknowledging them returns
        # none; acknowledgements are taken from this first)
        self.recv_unreliable = 0
        self.pending: list[bytes | memoryview] = []  # outgoing frames held until the SYN-ACK (no 0-RTT)
        self.pending_len = 0

    def apply(self, event: StreamInput) -> StreamEffect:
        try:
            effect, new_state = STREAM_TRANSITIONS[self.state, event]
        except KeyError:
            raise StreamTransitionError(self.state, event) from None
        self.state = new_state
        return effect

    def __repr__(self) -> str:
        return f"Stream(id={self.id}, state={self.state.value})"
