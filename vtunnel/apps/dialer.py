"""The exit side's outgoing TCP connections: authority parsing, policy-checked resolution, happy eyeballs.

``Dialer.dial("host:port")``:

1. parses the authority (``host:port`` or ``[v6]:port``);
2. checks the host against the exit policy before resolving it;
3. resolves it with ``anyio.getaddrinfo`` and checks *every* resolved address, keeping only the allowed
   ones (so a name resolving to 127.0.0.1 is refused unless private addresses are allowed);
4. races the allowed addresses RFC 8305 style: families interleaved starting with the resolver's first
   answer, a new attempt every 250 ms or as soon as the previous one failed, the first connection wins;
5. returns an anyio socket stream with ``TCP_NODELAY`` set (``dial_socket``: the connected socket itself).

Failures raise ``DialError`` with ``error`` one of ``"refused"``, ``"unreachable"``, ``"forbidden"``,
``"timeout"`` or ``"failed"`` (the reasons a stream's RST carries back to the agent).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections import Counter
from collections.abc import Sequence
from typing import Final, Literal

import anyio
import structlog
from anyio.abc import ByteStream, SocketStream

from vtunnel.apps.policy import ExitPolicy, IPAddress, PolicyDenied, normalize_address
from vtunnel.io.stream_sockets import connect_tcp, finish_tcp_connect, start_tcp_connect

__all__ = [
    "HAPPY_EYEBALLS_DELAY",
    "DialError",
    "DialErrorCode",
    "Dialer",
    "format_authority",
    "interleave_families",
    "parse_authority",
]

log = structlog.get_logger(__name__)

DialErrorCode = Literal["refused", "unreachable", "forbidden", "timeout", "failed"]
DIAL_ERRORS: Final = ("refused", "unreachable", "forbidden", "timeout", "failed")

#: IP-literal authorities a dialer keeps parsed and checked (all forgotten when full)
_LITERALS_KEPT: Final = 4096

#: Delay between the starts of two connection attempts (RFC 8305 "Connection Attempt Delay").
HAPPY_EYEBALLS_DELAY: Final = 0.25

_UNREACHABLE_ERRNOS = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EADDRNOTAVAIL}
)


class DialError(Exception):
    """An outgoing connection could not be made; ``error`` says why (one of ``DIAL_ERRORS``)."""

    def __init__(self, error: DialErrorCode, detail: str = "") -> None:
        super().__init__(f"dial failed: {error}" + (f" ({detail})" if detail else ""))
        self.error: DialErrorCode = error
        self.detail = detail


def parse_authority(authority: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` into ``(host, port)``; an IPv6 host comes back without brackets.

    Raises ``ValueError`` for anything else: a missing or out-of-range port (1-65535), an unbracketed IPv6
    address, an invalid bracketed address, an empty host, or a host containing whitespace, control
    characters, ``/``, ``@``, ``[``, ``]`` or ``%``.
    """
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0 or authority[close + 1 : close + 2] != ":":
            raise ValueError(f"invalid authority {authority!r}: expected [v6]:port")
        host = authority[1:close]
        port_text = authority[close + 2 :]
        try:
            addr = ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"invalid IPv6 address in authority {authority!r}") from exc
        if addr.scope_id is not None:
            raise ValueError(f"scoped IPv6 address in authority {authority!r}")
        host = str(addr)
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            raise ValueError(f"invalid authority {authority!r}: missing port")
        if ":" in host:
            raise ValueError(f"invalid authority {authority!r}: IPv6 addresses need brackets")
        if not host:
            raise ValueError(f"invalid authority {authority!r}: empty host")
        if len(host) > 253 or any(c.isspace() or not c.isprintable() or c in "/@[]%\\" for c in host):
            raise ValueError(f"invalid host in authority {authority!r}")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ValueError(f"invalid port in authority {authority!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in authority {authority!r}")
    return host, port


def format_authority(host: str, port: int) -> str:
    """The inverse of ``parse_authority``: brackets an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _error_of(exc: BaseException) -> DialErrorCode:
    """Map a connect failure (an ``OSError``, possibly wrapping the real one) to a dial error code."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "refused"
        if isinstance(seen, TimeoutError):
            return "timeout"
        if isinstance(seen, OSError) and seen.errno in _UNREACHABLE_ERRNOS:
            return "unreachable"
        if isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            return _error_of(seen.exceptions[0])
        seen = seen.__cause__
    return "failed"


def _literal_of(host: str) -> IPAddress | None:
    """``host`` as an IP address, or None for a name."""
    try:
        return normalize_address(host)
    except ValueError:
        return None


def interleave_families(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    """Order addresses RFC 8305 style: alternate families, starting with the family of the first one."""
    if not addresses:
        return []
    first = addresses[0].version
    same = [a for a in addresses if a.version == first]
    other = [a for a in addresses if a.version != first]
    ordered: list[IPAddress] = []
    for i in range(max(len(same), len(other))):
        ordered.extend(group[i] for group in (same, other) if i < len(group))
    return ordered


def _address(addr: IPAddress, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    return (socket.AF_INET6 if addr.version == 6 else socket.AF_INET), (str(addr), port)


async def connect_socket(addr: IPAddress, port: int) -> socket.socket:
    """Connect a TCP socket to one resolved address (no name lookup, no thread hop), TCP_NODELAY set."""
    return await connect_tcp(*_address(addr, port))


async def _wrap(sock: socket.socket) -> SocketStream:
    try:
        return await SocketStream.from_socket(sock)
    except BaseException:
        sock.close()
        raise


class Dialer:
    """Connects to ``host:port`` for the exit side, honouring ``policy``."""

    def __init__(self, policy: ExitPolicy, *, connect_timeout: float = 10.0) -> None:
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive")
        self.policy = policy
        self.connect_timeout = connect_timeout
        #: connections not made by :meth:`dial_socket` (and :meth:`dial`), by ``DialError.error``: statistics
        self.failures: Counter[DialErrorCode] = Counter()
        #: IP-literal authorities already parsed and allowed by the policy (which never changes): the socket
        #: family and address to connect to, so a thousand streams to one ``--target`` parse, check and format
        #: it once
        self._literals: dict[str, tuple[socket.AddressFamily, tuple[str, int]]] = {}

    async def resolve(self, host: str, port: int, *, udp: bool = False) -> list[IPAddress]:
        """Resolve ``host`` and return its policy-allowed addresses in connection-attempt order.

        Raises ``DialError("forbidden")`` when the host or every address is refused by the policy and
        ``DialError("unreachable")`` when the name does not resolve.
        """
        try:
            self.policy.check_host(host)
        except PolicyDenied as exc:
            raise DialError("forbidden", exc.reason) from None
        literal = _literal_of(host)
        if literal is not None:
            return [literal]
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        try:
            infos = await anyio.getaddrinfo(host, port, type=kind)
        except (OSError, UnicodeError) as exc:
            raise DialError("unreachable", f"cannot resolve {host!r}") from exc
        allowed: list[IPAddress] = []
        denied = 0
        for family, *_, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                addr = normalize_address(str(sockaddr[0]))
                self.policy.check_address(addr, host=host)
            except (PolicyDenied, ValueError):
                denied += 1
                continue
            if addr not in allowed:
                allowed.append(addr)
        if not allowed:
            if denied:
                raise DialError("forbidden", f"{host!r} resolves only to refused addresses")
            raise DialError("unreachable", f"no address for {host!r}")
        return interleave_families(allowed)

    async def dial(self, authority: str) -> ByteStream:
        """Connect to ``authority`` (``host:port`` or ``[v6]:port``); raise ``DialError`` on failure."""
        return await _wrap(await self.dial_socket(authority))

    async def dial_socket(self, authority: str) -> socket.socket:
        """:meth:`dial`, returning the connected non-blocking socket itself (for a protocol-driven relay)."""
        started = self.start_dial(authority)
        if started is not None:
            sock, made = started
            return sock if made else await self.finish_dial(sock, authority)
        try:
            return await self._dial_name(authority)
        except DialError as exc:
            self.failures[exc.error] += 1
            raise

    def start_dial(self, authority: str) -> tuple[socket.socket, bool] | None:
        """:meth:`dial_socket` begun without waiting, for an authority whose host is an IP address the policy
        allows: the socket and whether it is connected already (:meth:`finish_dial` waits for the rest). None
        for a name to resolve (:meth:`dial_socket` does it all); ``DialError`` when refused at once."""
        literal = self._literals.get(authority)
        try:
            if literal is None:
                literal = self._literal(authority)
                if literal is None:
                    return None
            try:
                return start_tcp_connect(*literal)
            except OSError as exc:
                raise DialError(_error_of(exc)) from None
        except DialError as exc:
            self.failures[exc.error] += 1
            raise

    def _literal(self, authority: str) -> tuple[socket.AddressFamily, tuple[str, int]] | None:
        """Parse ``authority``; when its host is an IP address, check it against the policy and keep it."""
        try:
            host, port = parse_authority(authority)
        except ValueError as exc:
            raise DialError("failed", str(exc)) from None
        address = _literal_of(host)
        if address is None:
            return None
        try:
            self.policy.check_host(host)
        except PolicyDenied as exc:
            raise DialError("forbidden", exc.reason) from None
        if len(self._literals) >= _LITERALS_KEPT:
            self._literals.clear()
        literal = self._literals[authority] = _address(address, port)
        return literal

    async def finish_dial(self, sock: socket.socket, authority: str) -> socket.socket:
        """Wait (at most ``connect_timeout``) for the connection :meth:`start_dial` began; ``DialError``, the
        socket closed, when it is not made."""
        error: DialErrorCode = "timeout"
        with anyio.move_on_after(self.connect_timeout):
            try:
                return await finish_tcp_connect(sock, parse_authority(authority))
            except OSError as exc:
                error = _error_of(exc)
        sock.close()
        self.failures[error] += 1
        if error == "timeout":
            raise DialError(error, f"no connection to {authority!r} within {self.connect_timeout} s")
        raise DialError(error)

    async def _dial_name(self, authority: str) -> socket.socket:
        host, port = parse_authority(authority)  # start_dial parsed it already
        with anyio.move_on_after(self.connect_timeout):
            addresses = await self.resolve(host, port)
            sock = await self._race_sockets(addresses, port)
            log.debug("dial.connected", authority=authority)
            return sock
        raise DialError("timeout", f"no connection to {authority!r} within {self.connect_timeout} s")

    async def _race_sockets(self, addresses: Sequence[IPAddress], port: int) -> socket.socket:
        if len(addresses) == 1:  # nothing to race: no task group, no timers
            try:
                return await connect_socket(addresses[0], port)
            except OSError as exc:
                raise DialError(_error_of(exc)) from None
        winner: socket.socket | None = None
        errors: list[OSError] = []

        async def attempt(addr: IPAddress, failed: anyio.Event) -> None:
            nonlocal winner
            try:
                sock = await connect_socket(addr, port)
            except OSError as exc:
                errors.append(exc)
                failed.set()
                return
            if winner is None:
                winner = sock
                tg.cancel_scope.cancel()
            else:
                sock.close()

        try:
            async with anyio.create_task_group() as tg:
                for addr in addresses:
                    failed = anyio.Event()
                    tg.start_soon(attempt, addr, failed)
                    with anyio.move_on_after(HAPPY_EYEBALLS_DELAY):
                        await failed.wait()
        except BaseException:
            if winner is not None:
                winner.close()
            raise
        if winner is None:
            codes = {_error_of(e) for e in errors}
            preferred: tuple[DialErrorCode, ...] = ("refused", "unreachable", "timeout")
            for code in preferred:
                if code in codes:
                    raise DialError(code)
            raise DialError("failed")
        return winner
