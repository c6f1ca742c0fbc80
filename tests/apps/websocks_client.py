"""A WebSocks client for the tests, written from the protocol description alone (upgrade, frame header,
SOCKS5 CONNECT), independent of the server code under test."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import struct
import time

import anyio
from anyio.abc import ByteStream

FRAME_HEADER = b"\x82\x7f\x7f\xff\xff\xff\xff\xff\xff\xff"


class WebSocksRejected(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"upgrade answered with {status}")
        self.status = status


class SocksRejected(Exception):
    def __init__(self, reply: int) -> None:
        super().__init__(f"SOCKS5 reply {reply:#04x}")
        self.reply = reply


def hashed_password(password: str, now_ms: int) -> str:
    minute = now_ms // 60000 * 60000
    first = base64.b64encode(hashlib.sha256(password.encode()).digest()).decode()
    return base64.b64encode(hashlib.sha256(f"{first}{minute}".encode()).digest()).decode()


def upgrade_request(
    user: str, password: str, *, now_ms: int | None = None, protocol: str = "socks5"
) -> bytes:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    credentials = base64.b64encode(f"{user}:{hashed_password(password, now)}".encode()).decode()
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET / HTTP/1.1\r\n"
        "Host: websocks.test\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Protocol: {protocol}\r\n"
        f"Authorization: Basic {credentials}\r\n"
        "\r\n"
    ).encode()


class _Reader:
    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += await self.stream.receive()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self.buffer += await self.stream.receive()
        data, _, self.buffer = self.buffer.partition(marker)
        return data + marker


def _address(host: str, port: int) -> bytes:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return b"\x03" + bytes([len(host)]) + host.encode() + struct.pack("!H", port)
    return (b"\x01" if addr.version == 4 else b"\x04") + addr.packed + struct.pack("!H", port)


async def websocks_connect(
    stream: ByteStream,
    user: str,
    password: str,
    host: str,
    port: int,
    *,
    now_ms: int | None = None,
    protocol: str = "socks5",
) -> bytes:
    """Run the whole client side; return any bytes that arrived after the SOCKS5 reply."""
    reader = _Reader(stream)
    await stream.send(upgrade_request(user, password, now_ms=now_ms, protocol=protocol))
    head = await reader.until(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 101:
        raise WebSocksRejected(status)
    lines = head.decode().lower().split("\r\n")
    assert "upgrade: websocket" in lines
    await stream.send(FRAME_HEADER)
    assert await reader.exactly(10) == FRAME_HEADER
    await stream.send(b"\x05\x01\x00")
    assert await reader.exactly(2) == b"\x05\x00"
    await stream.send(b"\x05\x01\x00" + _address(host, port))
    version, reply, _, atyp = await reader.exactly(4)
    assert version == 5
    size = {1: 4, 4: 16}.get(atyp)
    if size is None:
        size = (await reader.exactly(1))[0]
    await reader.exactly(size + 2)
    if reply != 0:
        raise SocksRejected(reply)
    rest, reader.buffer = reader.buffer, b""
    return rest


async def read_all(stream: ByteStream, initial: bytes = b"") -> bytes:
    data = initial
    try:
        while True:
            data += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return data
