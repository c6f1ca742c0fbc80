"""The agent's SOCKS5 front (RFC 1928, RFC 1929), and the SOCKS5 codec shared with the exit side.

``serve_socks5(client, opener)`` handles one accepted client connection completely:

* method negotiation: "no authentication", or RFC 1929 username/password when ``users`` is given;
* ``CONNECT`` to an IPv4 address, an IPv6 address or a domain name.  A domain name is never resolved
  here: it goes as it is into the stream's metadata authority and the server resolves it, so no DNS
  query leaks from the agent's network;
* ``UDP ASSOCIATE``: a local UDP socket relays datagrams through one tunnel stream of kind ``"udp"``,
  until the TCP control connection closes;
* ``BIND`` is answered with "command not supported" (0x07).

The success reply is sent once the opener returned, and the opener returns after the server's SYN-ACK, i.e.
after the server connected to the destination.  This costs one tunnel round trip before the reply, and in
exchange every reply code is the true outcome (0x05 for a closed port, 0x02 for a destination the exit policy
forbids, ...).  Clients that send their first bytes right after the request (without waiting for the reply)
lose nothing: those bytes are buffered and forwarded once the stream is open.

Reply codes from the server's refusal (``StreamRefused.error``): refused -> 0x05, unreachable -> 0x04,
forbidden -> 0x02, timeout -> 0x04 (the host did not answer in time; 0x06 "TTL expired" says something else),
anything else -> 0x01.  No tunnel available -> 0x01.

Datagrams on a ``"udp"`` stream carry the SOCKS5 UDP request header without its RSV and FRAG fields:
``ATYP | DST.ADDR | DST.PORT | DATA``, both ways (towards the server: the destination; back: the source of the
reply).  Fragmented client datagrams (FRAG != 0) are dropped, as RFC 1928 allows.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import anyio
import structlog
from anyio.abc import ByteStream, SocketAttribute, UDPSocket

from vtunnel.apps.dialer import format_authority, parse_authority
from vtunnel.apps.pipe import HeaderTooLarge, Leg, Opener, StreamBuffer, join
from vtunnel.protocol import StreamMetadata
from vtunnel.runtime.errors import StreamRefused, TunnelUnavailable

__all__ = [
    "AddressType",
    "Command",
    "Method",
    "Reply",
    "Socks5Error",
    "Socks5Request",
    "encode_address",
    "encode_reply",
    "encode_request",
    "parse_address",
    "parse_greeting",
    "parse_reply",
    "parse_request",
    "parse_userpass",
    "reply_for_refusal",
    "serve_socks5",
]

log = structlog.get_logger(__name__)

SOCKS_VERSION = 5
USERPASS_VERSION = 1
HANDSHAKE_TIMEOUT = 30.0
MAX_DATAGRAM = 16384


class Method(IntEnum):
    NO_AUTH = 0x00
    USERPASS = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5Error(Exception):
    """Malformed or unsupported SOCKS5 input.

    ``reply`` is the code to answer with, or ``None`` when the protocol has no answer (wrong version byte,
    garbage): the connection is then closed without a reply.
    """

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, kw_only=True, slots=True)
class Socks5Request:
    command: int
    address_type: AddressType
    host: str
    port: int

    @property
    def authority(self) -> str:
        return format_authority(self.host, self.port)


_REFUSAL_REPLIES: Mapping[str | None, Reply] = {
    "refused": Reply.CONNECTION_REFUSED,
    "unreachable": Reply.HOST_UNREACHABLE,
    "forbidden": Reply.NOT_ALLOWED,
    "timeout": Reply.HOST_UNREACHABLE,
}


def reply_for_refusal(error: str | None) -> Reply:
    """The SOCKS5 reply code for a server refusal reason (``StreamRefused.error``)."""
    return _REFUSAL_REPLIES.get(error, Reply.GENERAL_FAILURE)


# ---------------------------------------------------------------------------------------------- codec (pure)


def parse_greeting(data: bytes) -> tuple[frozenset[int], int] | None:
    """``VER NMETHODS METHODS...`` -> ``(methods, consumed)``; ``None`` while incomplete."""
    if not data:
        return None
    if data[0] != SOCKS_VERSION:
        raise Socks5Error(f"not a SOCKS5 greeting (version byte {data[0]:#04x})")
    if len(data) < 2:
        return None
    end = 2 + data[1]
    if data[1] == 0:
        raise Socks5Error("SOCKS5 greeting offers no method")
    if len(data) < end:
        return None
    return frozenset(data[2:end]), end


def parse_userpass(data: bytes) -> tuple[tuple[bytes, bytes], int] | None:
    """RFC 1929 ``VER ULEN UNAME PLEN PASSWD`` -> ``((user, password), consumed)``, ``None`` if incomplete."""
    if not data:
        return None
    if data[0] != USERPASS_VERSION:
        raise Socks5Error(f"bad username/password version {data[0]:#04x}")
    if len(data) < 2:
        return None
    ulen = data[1]
    if len(data) < 3 + ulen:
        return None
    plen = data[2 + ulen]
    end = 3 + ulen + plen
    if len(data) < end:
        return None
    return (data[2 : 2 + ulen], data[3 + ulen : end]), end


def parse_address(data: bytes, offset: int = 0) -> tuple[AddressType, str, int, int] | None:
    """``ATYP ADDR PORT`` at ``offset`` -> ``(type, host, port, end)``; ``None`` while incomplete.

    Raises ``Socks5Error`` with reply 0x08 for an unknown address type and 0x01 for an unusable domain name.
    """
    if len(data) <= offset:
        return None
    raw_type = data[offset]
    if raw_type == AddressType.IPV4:
        end = offset + 1 + 4 + 2
        if len(data) < end:
            return None
        host = str(ipaddress.IPv4Address(data[offset + 1 : offset + 5]))
        return AddressType.IPV4, host, struct.unpack_from("!H", data, end - 2)[0], end
    if raw_type == AddressType.IPV6:
        end = offset + 1 + 16 + 2
        if len(data) < end:
            return None
        host = str(ipaddress.IPv6Address(data[offset + 1 : offset + 17]))
        return AddressType.IPV6, host, struct.unpack_from("!H", data, end - 2)[0], end
    if raw_type == AddressType.DOMAIN:
        if len(data) < offset + 2:
            return None
        length = data[offset + 1]
        end = offset + 2 + length + 2
        if len(data) < end:
            return None
        raw = data[offset + 2 : offset + 2 + length]
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise Socks5Error("non-ASCII domain name", Reply.GENERAL_FAILURE) from None
        port = struct.unpack_from("!H", data, end - 2)[0]
        try:
            parse_authority(format_authority(host, port or 1))
        except ValueError:
            raise Socks5Error(f"unusable domain name {host!r}", Reply.GENERAL_FAILURE) from None
        return AddressType.DOMAIN, host, port, end
    raise Socks5Error(f"unknown address type {raw_type:#04x}", Reply.ADDRESS_TYPE_NOT_SUPPORTED)


def parse_request(data: bytes) -> tuple[Socks5Request, int] | None:
    """``VER CMD RSV ATYP DST.ADDR DST.PORT`` -> ``(request, consumed)``; ``None`` while incomplete.

    The command is returned as sent (also unknown ones: the caller answers 0x07).
    """
    if not data:
        return None
    if data[0] != SOCKS_VERSION:
        raise Socks5Error(f"not a SOCKS5 request (version byte {data[0]:#04x})")
    if len(data) < 3:
        return None
    if data[2] != 0:
        raise Socks5Error("reserved byte of a SOCKS5 request is not zero", Reply.GENERAL_FAILURE)
    parsed = parse_address(data, 3)
    if parsed is None:
        return None
    address_type, host, port, end = parsed
    return Socks5Request(command=data[1], address_type=address_type, host=host, port=port), end


def encode_address(host: str, port: int) -> bytes:
    """``ATYP ADDR PORT`` for an IP address or a domain name."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii")
        if not 0 < len(raw) < 256:
            raise ValueError(f"domain name of {len(raw)} bytes cannot be encoded") from None
        return bytes([AddressType.DOMAIN, len(raw)]) + raw + struct.pack("!H", port)
    atyp = AddressType.IPV4 if addr.version == 4 else AddressType.IPV6
    return bytes([atyp]) + addr.packed + struct.pack("!H", port)


def encode_request(command: int, host: str, port: int) -> bytes:
    return bytes([SOCKS_VERSION, command, 0]) + encode_address(host, port)


def encode_reply(reply: Reply, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return bytes([SOCKS_VERSION, reply, 0]) + encode_address(host, port)


def parse_reply(data: bytes) -> tuple[tuple[int, str, int], int] | None:
    """``VER REP RSV ATYP BND.ADDR BND.PORT`` -> ``((reply, host, port), consumed)``."""
    if not data:
        return None
    if data[0] != SOCKS_VERSION:
        raise Socks5Error(f"not a SOCKS5 reply (version byte {data[0]:#04x})")
    if len(data) < 3:
        return None
    parsed = parse_address(data, 3)
    if parsed is None:
        return None
    _, host, port, end = parsed
    return (data[1], host, port), end


# ---------------------------------------------------------------------------------------------- the front


async def serve_socks5(
    leg: Leg,
    opener: Opener,
    *,
    users: Mapping[str, str] | None = None,
    udp_bind_host: str = "127.0.0.1",
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> None:
    """Serve one accepted SOCKS5 client until it is done; its connection is closed on return, or relayed."""
    client = leg.stream
    try:
        buffer = StreamBuffer(client, limit=1024)
        with anyio.fail_after(handshake_timeout):
            request = await _handshake(client, buffer, users)
        if request is None:
            return
        if request.command == Command.CONNECT:
            await _connect(leg, buffer, opener, request)
        elif request.command == Command.UDP_ASSOCIATE:
            await _udp_associate(client, opener, request, udp_bind_host)
        else:
            log.info("socks5.unsupported_command", command=request.command)
            await client.send(encode_reply(Reply.COMMAND_NOT_SUPPORTED))
    except Socks5Error as exc:
        log.info("socks5.bad_request", error=str(exc))
        if exc.reply is not None:
            await _send_quietly(client, encode_reply(exc.reply))
    except TimeoutError:
        log.info("socks5.handshake_timeout")
    except HeaderTooLarge as exc:
        log.info("socks5.bad_request", error=str(exc))
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        log.debug("socks5.client_gone", error=type(exc).__name__)
    except Exception as exc:  # never take the listener down with one client
        log.exception("socks5.internal_error", error=repr(exc))
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(client)


async def _send_quietly(stream: ByteStream, data: bytes) -> None:
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await stream.send(data)


async def _handshake(
    client: ByteStream, buffer: StreamBuffer, users: Mapping[str, str] | None
) -> Socks5Request | None:
    methods = await buffer.parse(parse_greeting)
    wanted = Method.NO_AUTH if users is None else Method.USERPASS
    if wanted not in methods:
        await client.send(bytes([SOCKS_VERSION, Method.NO_ACCEPTABLE]))
        log.info("socks5.no_acceptable_method", offered=sorted(methods))
        return None
    await client.send(bytes([SOCKS_VERSION, wanted]))
    if users is not None:
        user, password = await buffer.parse(parse_userpass)
        if not _check_user(users, user, password):
            await client.send(bytes([USERPASS_VERSION, 0x01]))
            log.info("socks5.auth_failed")
            return None
        await client.send(bytes([USERPASS_VERSION, 0x00]))
    return await buffer.parse(parse_request)


def _check_user(users: Mapping[str, str], user: bytes, password: bytes) -> bool:
    try:
        expected = users.get(user.decode("utf-8"))
    except UnicodeDecodeError:
        expected = None
    if expected is None:
        hmac.compare_digest(password, password)  # same work for unknown users
        return False
    return hmac.compare_digest(expected.encode("utf-8"), password)


async def _open(client: ByteStream, opener: Opener, metadata: StreamMetadata) -> Leg | None:
    """Open a tunnel stream; on failure answer the client with the mapped reply code and return ``None``."""
    try:
        return await opener(metadata)
    except StreamRefused as exc:
        reply = reply_for_refusal(exc.error)
        log.info("socks5.refused", authority=metadata.authority, error=exc.error, reply=int(reply))
    except TunnelUnavailable as exc:
        reply = Reply.GENERAL_FAILURE
        log.warning("socks5.no_tunnel", error=str(exc))
    except TimeoutError:
        reply = Reply.HOST_UNREACHABLE
        log.info("socks5.open_timeout", authority=metadata.authority)
    except Exception as exc:  # an opener failing in its own way is still answered
        reply = Reply.GENERAL_FAILURE
        log.exception("socks5.open_failed", authority=metadata.authority, error=repr(exc))
    await client.send(encode_reply(reply))
    return None


async def _connect(leg: Leg, buffer: StreamBuffer, opener: Opener, request: Socks5Request) -> None:
    client = leg.stream
    try:
        authority = format_authority(request.host, request.port)
        parse_authority(authority)
    except ValueError as exc:
        raise Socks5Error(f"bad destination: {exc}", Reply.GENERAL_FAILURE) from None
    remote = await _open(client, opener, StreamMetadata(authority=authority, kind="tcp"))
    if remote is None:
        return
    try:
        await client.send(encode_reply(Reply.SUCCEEDED))
        early = buffer.take_pending()
        if early:
            await remote.stream.send(early)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(remote.stream)
        raise
    await join(leg, remote).run()


# ---------------------------------------------------------------------------------------------- UDP ASSOCIATE


def _client_udp_source(client: ByteStream, request: Socks5Request) -> tuple[str, int | None]:
    """The address the client's datagrams must come from: its declared one, else the control peer's IP."""
    declared_ip: str | None = None
    if request.address_type != AddressType.DOMAIN and not ipaddress.ip_address(request.host).is_unspecified:
        declared_ip = request.host
    if declared_ip is None:
        declared_ip = str(client.extra(SocketAttribute.remote_address, ("0.0.0.0", 0))[0])
    return declared_ip, request.port or None


def _reply_address(client: ByteStream, udp: UDPSocket) -> tuple[str, int]:
    local = udp.extra(SocketAttribute.local_address)
    assert isinstance(local, tuple)
    host, port = str(local[0]), int(local[1])
    if ipaddress.ip_address(host).is_unspecified:
        host = client.extra(SocketAttribute.local_address, (host, 0))[0]
    return str(host), int(port)


async def _udp_associate(client: ByteStream, opener: Opener, request: Socks5Request, bind_host: str) -> None:
    if ":" in bind_host:
        udp = await anyio.create_udp_socket(family=socket.AF_INET6, local_host=bind_host)
    else:
        udp = await anyio.create_udp_socket(family=socket.AF_INET, local_host=bind_host)
    async with udp:
        source_ip, source_port = _client_udp_source(client, request)
        authority = format_authority(source_ip, request.port or 1)
        opened = await _open(client, opener, StreamMetadata(authority=authority, kind="udp"))
        if opened is None:
            return
        async with opened.stream as stream:
            host, port = _reply_address(client, udp)
            await client.send(encode_reply(Reply.SUCCEEDED, host, port))
            relay = _UdpAssociation(udp, stream, source_ip, source_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(relay.client_to_tunnel, tg.cancel_scope)
                tg.start_soon(relay.tunnel_to_client, tg.cancel_scope)
                await _wait_closed(client)
                tg.cancel_scope.cancel()
            log.debug("socks5.udp_done", sent=relay.sent, received=relay.received)


async def _wait_closed(client: ByteStream) -> None:
    """Read and discard the control connection until the client closes it."""
    try:
        while await client.receive():
            pass
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return


class _UdpAssociation:
    """Relays one client's datagrams between its UDP socket and a ``"udp"`` tunnel stream."""

    def __init__(self, udp: UDPSocket, stream: ByteStream, source_ip: str, source_port: int | None) -> None:
        self.udp = udp
        self.stream = stream
        self.source_ip = ipaddress.ip_address(source_ip)
        self.source_port = source_port
        self.sent = 0
        self.received = 0

    def _from_client(self, addr: tuple[str, int]) -> bool:
        try:
            ip = ipaddress.ip_address(addr[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip != self.source_ip:
            return False
        if self.source_port is None:
            self.source_port = addr[1]  # the first datagram fixes the client's port
        return addr[1] == self.source_port

    async def client_to_tunnel(self, scope: anyio.CancelScope) -> None:
        try:
            async for data, addr in self.udp:
                if not self._from_client((str(addr[0]), int(addr[1]))):
                    continue
                if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0:
                    continue  # bad RSV or a fragment: dropped
                try:
                    if parse_address(data, 3) is None:
                        continue
                except Socks5Error:
                    continue
                payload = data[3:]
                if len(payload) > MAX_DATAGRAM:
                    continue
                await self.stream.send(payload)
                self.sent += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, StreamRefused) as exc:
            log.debug("socks5.udp_tunnel_gone", error=type(exc).__name__)
        scope.cancel()

    async def tunnel_to_client(self, scope: anyio.CancelScope) -> None:
        try:
            while True:
                data = await self.stream.receive()
                try:
                    if parse_address(data) is None:
                        continue
                except Socks5Error:
                    continue
                if self.source_port is None:
                    continue  # the client never sent anything: nowhere to deliver
                await self.udp.sendto(b"\x00\x00\x00" + data, str(self.source_ip), self.source_port)
                self.received += 1
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("socks5.udp_tunnel_gone", error=type(exc).__name__)
        except StreamRefused as exc:
            log.debug("socks5.udp_tunnel_gone", error=type(exc).__name__)
        scope.cancel()
