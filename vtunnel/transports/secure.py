"""The security layer on byte-stream transports (tcp://, tls://, plugins).

:func:`secure_client` and :func:`secure_server` run the handshake of :mod:`vtunnel.security.records` over an
anyio :class:`~anyio.abc.ByteStream` and return a :class:`SecureChannel`; its :meth:`~SecureChannel.link` is
the tunnel's link, a :class:`SealedLink` that seals and opens records over the link made from that stream. A server never answers a peer that fails authentication: it reads and discards for a
random time, then closes, so a prober learns nothing from the content or the timing of what it sends. A record
that stays incomplete for ``record_timeout`` seconds while the stream is being read (a length grown by a forger,
then a stalled connection) breaks the stream like a record that fails authentication, instead of a wait without
end.

:func:`cipher_preference` turns a cipher setting (``auto`` or a cipher's name) into the ranking the sans-IO core
takes: ``auto`` puts AES-256-GCM first only when this CPU has AES instructions (``/proc/cpuinfo``, read once).
The datagram transports use it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.abc import ByteStream, Listener, SocketAttribute, TaskGroup

from vtunnel.io.limits import (
    ThrottledWarning,
    pending_limit,
)
from vtunnel.io.tuning import tune_stream
from vtunnel.security.ciphers import CIPHER_CHOICES, Cipher, cipher_name, preference
from vtunnel.security.errors import AuthenticationFailed, HandshakeTimeout, SecurityError
from vtunnel.security.keys import KeySet, UserKey
from vtunnel.security.records import SecureStreamClient, SecureStreamServer
from vtunnel.security.replay import HandshakeLimiter, ReplayCache
from vtunnel.transports.link import ANY_SIZE, Link, LinkConsumer, LinkStats, ListenerAttribute, Refusals

__all__ = [
    "CIPHER_ENV",
    "DEFAULT_SILENCE",
    "RECORD_TIMEOUT",
    "SealedLink",
    "SecureChannel",
    "SecuredListener",
    "cipher_preference",
    "cpu_has_aes_instructions",
    "local_name",
    "secure_client",
    "secure_server",
]

log = structlog.get_logger("vtunnel.security")

#: How long (seconds, chosen uniformly) a server keeps reading from a peer that failed the handshake.
DEFAULT_SILENCE = (5.0, 30.0)
#: How long (seconds) a started record may wait for its remaining bytes while the stream is being read.
RECORD_TIMEOUT = 30.0
_CLOSE_GRACE = 0.5
_MIN_READ = 65536
_random = secrets.SystemRandom()
_Core = SecureStreamClient | SecureStreamServer
#: what a :class:`SecuredListener`'s ``prepare`` makes of a connection
T = TypeVar("T")
#: The process's cipher setting when none is given (``auto``, ``aes-256-gcm`` or ``chacha20-poly1305``).
CIPHER_ENV = "VTUNNEL_CIPHER"


@functools.cache
def cpu_has_aes_instructions(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU advertises AES instructions (x86 ``flags`` or arm64 ``Features`` holding ``aes``).

    Read once per process; a system without ``/proc/cpuinfo`` counts as without them (ChaCha20-Poly1305 is the
    safe guess: fast everywhere, constant time without special instructions).
    """
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return "aes" in value.split()
    return False


@functools.cache
def _warn_unknown_setting(value: str) -> None:
    """Say once per value (not once per connection) that the process's cipher setting is not understood."""
    log.warning("ignoring an unknown cipher setting", variable=CIPHER_ENV, value=value, known=CIPHER_CHOICES)


def cipher_preference(choice: str = "auto") -> tuple[Cipher, ...]:
    """The ciphers to offer (client) or accept (server), best first, for the setting ``choice``.

    ``auto`` takes the process's setting from ``VTUNNEL_CIPHER`` when it is set, and otherwise ranks by
    :func:`cpu_has_aes_instructions`. A cipher's name pins that cipher. Raises :class:`SecurityError` for an
    unknown name given here; an unknown ``VTUNNEL_CIPHER`` is logged and ignored.
    """
    aes = cpu_has_aes_instructions()
    if choice == "auto":
        env = os.environ.get(CIPHER_ENV, "").strip().lower()
        if env:
            try:
                return preference(env, aes_instructions=aes)
            except SecurityError:
                _warn_unknown_setting(env)
    return preference(choice, aes_instructions=aes)


@dataclass(frozen=True, slots=True)
class SecureChannel:
    """A byte stream whose key handshake is done: what :func:`secure_client` and :func:`secure_server` return.

    ``core`` holds the keys; ``received`` is the plaintext that came in with the handshake. :meth:`link` puts
    the records on a link made from ``stream`` (that link then owns the stream).
    """

    stream: ByteStream
    core: _Core
    received: bytes = b""
    record_timeout: float = RECORD_TIMEOUT

    @property
    def cipher(self) -> Cipher | None:
        return self.core.cipher

    @property
    def user(self) -> UserKey | None:
        """A server's channel: whose key the client authenticated with (None on a client's)."""
        return self.core.user if isinstance(self.core, SecureStreamServer) else None

    def link(self, inner: Link) -> SealedLink:
        """The tunnel's link: records sealed and opened over ``inner`` (a link over :attr:`stream`)."""
        return SealedLink(inner, self.core, received=self.received, record_timeout=self.record_timeout)


class SealedLink(Link):
    """A link whose bytes travel as authenticated, encrypted records over another link (the one design of the key
    on byte-stream transports: tcp://, tls://, plugins).

    ``send_nowait`` seals ``data`` into records and hands them to the inner link in one write (the pieces,
    passthrough bodies as views, in one ``send_pieces_nowait``: a scatter-gather write); what the inner link refuses
    (``WouldBlock``) is kept, counted as taken, and the next ``send_nowait`` raises ``WouldBlock`` until it is
    out. Input is opened as it arrives. The consumer is told the input ended cleanly (``link_ended(None)``) only
    after the peer's authenticated end of stream; a transport that ends without it (a cut connection), a record
    that fails authentication, or a record still incomplete ``record_timeout`` seconds after its first bytes
    came (while reading was not paused: a length grown by a forger, then a stalled connection) end it with
    :class:`~anyio.BrokenResourceError`, and the inner link is closed. ``send_eof`` sends the authenticated end
    of stream, then half-closes the inner link; ``aclose`` sends it first if that takes under half a second.
    """

    def __init__(
        self, inner: Link, core: _Core, *, received: bytes = b"", record_timeout: float = RECORD_TIMEOUT
    ) -> None:
        self._inner = inner
        self._core = core
        self._received = received
        self._record_timeout = record_timeout
        self._consumer: LinkConsumer | None = None
        self._held: list[bytes | memoryview] = []  # sealed pieces the inner link refused: they go first
        self._blocked = False  # a send_nowait raised WouldBlock: link_writable is owed
        self._drained = anyio.Event()
        self._drained.set()
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._ended = False
        self._broken = False
        self._closed = False
        self._failure = anyio.Event()

    @property
    def cipher(self) -> Cipher | None:
        return self._core.cipher

    def user(self) -> UserKey | None:
        return self._core.user if isinstance(self._core, SecureStreamServer) else None

    def carry_passthrough_records(self) -> bool:
        """What is sent from now on is tunnel frames: PASSTHROUGH DATA frames that hold whole TLS records go as
        passthrough records (lite-tls; :meth:`SecureStreamClient.enable_passthrough`)."""
        self._core.enable_passthrough()
        return True

    def carry_passthrough_runs(self) -> bool:
        """A passthrough record seals the header of every TLS record of its frame's run (docs/security.md)."""
        return True

    # ------------------------------------------------------------------ Link
    async def run(self, consumer: LinkConsumer) -> None:
        self._consumer = consumer
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._close_on_failure)
                received, self._received = self._received, b""
                if received:
                    consumer.link_data(received)
                await self._inner.run(self)
                tg.cancel_scope.cancel()
        finally:
            self._consumer = None
            self._cancel_timer()

    def send_nowait(self, data: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._broken:
            raise anyio.BrokenResourceError("the secure channel failed")
        if self._held:
            self._blocked = True
            raise anyio.WouldBlock
        try:
            self._core.send(data)
        except SecurityError:
            raise anyio.ClosedResourceError from None
        self._put(self._core.pieces_to_send())

    def send_room(self) -> int:
        """0 while sealed records the inner link refused are held; else any write (what the inner link refuses of
        its records is held, counted as taken)."""
        if self._held and not (self._closed or self._broken):
            self._blocked = True
            return 0
        return ANY_SIZE

    def _put(self, pieces: list[bytes | memoryview]) -> None:
        """Hand the inner link the sealed pieces: one scatter-gather write (passthrough bodies are never joined)."""
        if not pieces:
            return
        try:
            if len(pieces) == 1:
                self._inner.send_nowait(bytes(pieces[0]))
            else:
                self._inner.send_pieces_nowait(pieces)
        except anyio.WouldBlock:
            self._held = pieces
            self._drained = anyio.Event()

    def pause_reading(self) -> None:
        self._paused = True
        self._cancel_timer()
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        self._inner.resume_reading()
        self._watch_record()

    async def send_eof(self) -> None:
        if self._closed or self._core.eof_sent:
            return
        await self._send_end()
        if not self._broken:
            with contextlib.suppress(
                NotImplementedError
            ):  # a stream that cannot half-close: the record says it
                await self._inner.send_eof()

    async def _send_end(self) -> None:
        """Send what is held, then the authenticated end of stream, and wait until the inner link took it."""
        await self._drained.wait()
        if self._broken or self._core.eof_sent:
            return
        self._core.send_eof()
        self._put(self._core.pieces_to_send())
        await self._drained.wait()

    async def aclose(self) -> None:
        if self._closed:
            return
        if not self._broken:  # what is held, then the authenticated end of stream, if they go out in time
            with (
                anyio.move_on_after(_CLOSE_GRACE, shield=True),
                contextlib.suppress(
                    SecurityError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                ),
            ):
                await self._send_end()
        self._closed = True
        self._cancel_timer()
        self._drained.set()
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes

    def stats(self) -> LinkStats:
        return self._inner.stats()

    # ------------------------------------------------------------------ LinkConsumer (the inner link calls)
    def link_data(self, data: bytes) -> None:
        if self._broken or self._ended:
            return
        try:
            plain = self._core.receive_data(data, time.time())
        except AuthenticationFailed as exc:
            self._fail(str(exc), "a record failed authentication")
            return
        if plain:
            self._cancel_timer()  # records completed: a record still incomplete is a new one, with its own time
            if self._consumer is not None:
                self._consumer.link_data(plain)
        if self._core.eof_received:
            self._end(None)
        else:
            self._watch_record()

    def link_writable(self) -> None:
        held = self._held
        if held:
            self._held = []
            self._put(held)
            if self._held:
                return
            self._drained.set()
        if self._blocked:
            self._blocked = False
            if self._consumer is not None:
                self._consumer.link_writable()

    def link_datagram(self, data: bytes) -> None:
        """Never called: the links under a sealed one (byte streams) carry no datagrams."""

    def link_ended(self, error: BaseException | None) -> None:
        if self._core.eof_received or self._broken:
            return
        self._broken = True
        self._end(
            error or anyio.BrokenResourceError("connection ended without an authenticated end of stream")
        )
        self._drained.set()

    # ------------------------------------------------------------------ failures
    def _end(self, error: BaseException | None) -> None:
        self._cancel_timer()
        if self._ended:
            return
        self._ended = True
        if self._consumer is not None:
            self._consumer.link_ended(error)

    def _fail(self, reason: str, message: str) -> None:
        log.warning("record refused, closing", reason=reason)
        self._broken = True
        self._held = []
        self._drained.set()
        self._end(anyio.BrokenResourceError(message))
        self._failure.set()

    async def _close_on_failure(self) -> None:
        await self._failure.wait()
        self._closed = True
        await self._inner.aclose()

    def _watch_record(self) -> None:
        """Start the clock of a record that began arriving, unless it runs (stop it once none is incomplete)."""
        if not self._core.incomplete_record or self._paused or self._ended:
            self._cancel_timer()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._record_timeout, self._record_expired)

    def _record_expired(self) -> None:
        self._timer = None
        if self._core.incomplete_record and not self._ended:
            self._fail(
                f"a record stayed incomplete for {self._record_timeout:g} s",
                "a record stayed incomplete too long",
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def secure_client(
    stream: ByteStream,
    psk: bytes,
    *,
    handshake_timeout: float = 10.0,
    cipher: str = "auto",
    record_timeout: float = RECORD_TIMEOUT,
) -> SecureChannel:
    """Run the client handshake over ``stream``: the channel to put on a link (:meth:`SecureChannel.link`).

    Raises :class:`HandshakeTimeout` if no valid reply arrives within ``handshake_timeout`` seconds (a wrong
    key, or a server of another protocol version, looks exactly like this: the server says nothing),
    :class:`AuthenticationFailed` if the server closes the connection, answers with something that does not
    authenticate or chooses a cipher not offered. ``cipher`` is the setting :func:`cipher_preference` reads;
    ``record_timeout`` bounds an incomplete record (see :class:`SealedLink`). ``stream`` is closed on any
    failure.
    """
    try:
        core = SecureStreamClient(psk, now=time.time(), ciphers=cipher_preference(cipher))
        received = bytearray()
        with anyio.fail_after(handshake_timeout):
            await stream.send(core.data_to_send())
            while not core.handshake_complete:
                try:
                    data = await stream.receive()
                except EndOfStream:
                    raise AuthenticationFailed("the server closed during the handshake") from None
                received += core.receive_data(data, time.time())
    except TimeoutError:
        await anyio.aclose_forcefully(stream)
        msg = (
            f"no valid handshake reply within {handshake_timeout:g} s "
            "(wrong key, another vtunnel protocol version, or no cipher in common?)"
        )
        raise HandshakeTimeout(msg) from None
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    log.debug("secure channel up", role="client", cipher=_name(core.cipher))
    return SecureChannel(stream, core, bytes(received), record_timeout)


def _name(cipher: Cipher | None) -> str:
    return cipher_name(cipher) if cipher is not None else "none"


async def _discard_until(stream: ByteStream, deadline: float) -> None:
    """Read and drop everything until ``deadline`` (monotonic) or the peer's end, then close."""
    try:
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            while True:
                await stream.receive()
    except (EndOfStream, BrokenResourceError, ClosedResourceError, OSError):
        pass
    finally:
        await anyio.aclose_forcefully(stream)


async def secure_server(
    stream: ByteStream,
    keys: KeySet | bytes,
    *,
    replay: ReplayCache,
    limiter: HandshakeLimiter | None = None,
    source: str = "",
    silence: tuple[float, float] = DEFAULT_SILENCE,
    cipher: str = "auto",
    record_timeout: float = RECORD_TIMEOUT,
    refusals: Refusals | None = None,
) -> SecureChannel | None:
    """Run the server handshake over an accepted ``stream``: the channel to put on a link, or None.

    ``keys`` are the keys accepted (a key set, or one key); the channel's :attr:`SecureChannel.user` says whose
    key the client used.

    At the start a time ``T`` is drawn uniformly from ``silence``. A peer must complete the handshake within
    ``T`` seconds. A peer that fails (wrong key, garbage, an HTTP request, a replay, a stale timestamp, too
    many authenticated handshakes from ``source`` according to ``limiter``, or just silence) gets not one byte: the server
    keeps reading and discarding until ``T`` seconds after the start (or the peer's own close), closes
    ``stream`` and returns None.

    ``source`` is the peer's address (the limiter's key; also logged). ``replay`` must be shared by every
    connection of the server; separate processes have separate caches, so a first message replayed to another
    process serving the same key is not caught. ``cipher`` is the setting :func:`cipher_preference` reads
    (the ciphers accepted; a client offering none of them fails like any other). ``record_timeout`` bounds an
    incomplete record once the stream is up (see :class:`SealedLink`). A failure is counted in ``refusals``
    (``authentication`` or ``timeout`` as handshake failures, ``closed`` as a probe).
    """
    start = time.monotonic()
    deadline = start + _random.uniform(*silence)
    core = SecureStreamServer(
        keys, replay=replay, ciphers=cipher_preference(cipher), limiter=limiter, source=source
    )
    received = bytearray()
    try:
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            while not core.handshake_complete:
                received += core.receive_data(await stream.receive(), time.time())
    except AuthenticationFailed as exc:
        log.info("handshake refused", source=source, reason=str(exc))
        if refusals is not None:
            refusals.handshake_failures["authentication"] += 1
        await _discard_until(stream, deadline)
        return None
    except (EndOfStream, BrokenResourceError, ClosedResourceError, OSError):
        if refusals is not None:
            refusals.probes["closed"] += 1
        await anyio.aclose_forcefully(stream)
        return None
    except BaseException:  # cancelled: leave nothing open
        await anyio.aclose_forcefully(stream)
        raise
    if not core.handshake_complete:
        log.info("handshake refused", source=source, reason="no complete handshake in time")
        if refusals is not None:
            refusals.handshake_failures["timeout"] += 1
        await anyio.aclose_forcefully(stream)
        return None
    try:
        await stream.send(core.data_to_send())
    except (BrokenResourceError, ClosedResourceError, OSError):
        await anyio.aclose_forcefully(stream)
        return None
    log.debug(
        "secure channel up",
        role="server",
        source=source,
        cipher=_name(core.cipher),
        user=core.user.user if core.user is not None else None,
    )
    return SecureChannel(stream, core, bytes(received), record_timeout)


class SecuredListener(Listener[T]):
    """Wraps a listener: each accepted stream first passes ``prepare`` (TLS, PSK handshake), which makes it what
    the handler takes (a link), else it is dropped.

    Connections still in ``prepare`` are *pending*: unauthenticated, and at most :attr:`max_pending` of them
    (a quarter of the descriptor limit, see :func:`~vtunnel.io.limits.pending_limit`). A new connection
    beyond that closes the oldest pending one, so a flood of idle connections cannot keep a real client out: each
    connection gets at least ``max_pending`` newcomers' worth of time to prove itself. The listener that accepts
    (``inner``: the lean socket listener of :mod:`vtunnel.io.stream_sockets`, or one that makes its own connections,
    such as QUIC's) hands each connection over through its ``serve``; the socket listener, when it runs out of
    descriptors, calls :meth:`shed_oldest` to close the oldest pending connection (see
    ``RelayListener.set_on_exhausted``), and otherwise waits and tries again: it never stops serving for it.

    ``refusals`` (given as ``ListenerAttribute.refusals``) counts connections shed (a probe, ``shed``) and
    ``prepare`` failures (a handshake failure, ``transport``); ``prepare`` counts its own refusals in it too.
    """

    def __init__(
        self,
        inner: Listener[ByteStream],
        prepare: Callable[[ByteStream], Awaitable[T | None]],
        *,
        local: str,
        max_pending: int | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        self._inner = inner
        self.refusals = Refusals() if refusals is None else refusals
        self._prepare = prepare
        self._local = local
        #: connections in their handshake (or held silent after failing it) at most
        self.max_pending = pending_limit() if max_pending is None else max_pending
        #: pending connections, oldest first: cancelling one's scope closes it
        self._pending: dict[anyio.CancelScope, None] = {}
        #: pending connections closed to make room (a count, for logs and tests)
        self.shed = 0
        self._warn_shedding = ThrottledWarning(
            log, "too many connections in their handshake: closing the oldest ones"
        )

    @property
    def local_address(self) -> str:
        return self._local

    @property
    def pending(self) -> int:
        return len(self._pending)

    def shed_oldest(self) -> bool:
        """Close the oldest pending connection (its task closes the descriptor when it runs); whether there was
        one to close."""
        for scope in self._pending:
            if not scope.cancel_called:
                scope.cancel()
                self.shed += 1
                self.refusals.probes["shed"] += 1
                return True
        return False

    async def serve(self, handler: Callable[[T], Any], task_group: TaskGroup | None = None) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            await self._inner.serve(functools.partial(self._take, handler=handler), task_group)

    def _admit(self) -> anyio.CancelScope:
        """A new pending connection's scope, the oldest pending one closed first when the cap is reached."""
        if len(self._pending) >= self.max_pending:
            self.shed_oldest()
            self._warn_shedding(limit=self.max_pending)
        scope = anyio.CancelScope()
        self._pending[scope] = None
        return scope

    async def _take(self, raw: ByteStream, *, handler: Callable[[T], Any]) -> None:
        """One connection the inner listener accepted (in its own task)."""
        await self._serve_one(raw, self._admit(), handler)

    async def _serve_one(
        self, raw: ByteStream, scope: anyio.CancelScope, handler: Callable[[T], Any]
    ) -> None:
        prepared: T | None = None
        try:
            with scope:
                tune_stream(raw)
                try:
                    prepared = await self._prepare(raw)
                except Exception as exc:
                    log.debug("transport handshake failed", error=repr(exc))
                    self.refusals.handshake_failures["transport"] += 1
        finally:
            self._pending.pop(scope, None)
            if prepared is None:
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(raw)
        if prepared is not None:
            await handler(prepared)

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return {**self._inner.extra_attributes, ListenerAttribute.refusals: lambda: self.refusals}


def local_name(listener: Listener[Any]) -> str:
    """A listener's ``host:port`` for logs (brackets around IPv6), ``?`` when it has none."""
    try:
        addr = listener.extra(SocketAttribute.local_address)
    except Exception:
        return "?"
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)
