"""vproxy servers for the tests, written from the wire facts alone, independent of vtunnel's own code.

* :class:`FakeVproxyServer`, the tunnel server (vproxy's framing, WebSocks inside each stream): the empty SETTINGS
  and nothing else as the handshake, HEADERS of length 0 as SYN / SYN-ACK / RST, DATA as PSH / FIN, PING answered
  with ACK; every stream must start with the WebSocks exchange, which it serves.
* :class:`FakeWebSocksServer`, the WebSocks server: one TCP (or TLS) connection per destination, carrying the
  WebSocks exchange and then the destination's bytes.

The WebSocks exchange (:class:`_WebSocks`): the upgrade with the minute-hashed password (400 for another protocol,
401 for a wrong login), the 10-byte frame header each way, a SOCKS5 CONNECT, which it dials.

One thread per tunnel or connection, and per dialed connection in a tunnel; bounded by the test's lifetime
(``stop``).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EMPTY_SETTINGS = bytes.fromhex("000000040000000000")
FRAME_HEADER = bytes.fromhex("827f7fffffffffffffff")
DATA, HEADERS, SETTINGS, PING, GOAWAY = 0, 1, 4, 6, 7
END_STREAM = ACK = 1
GZIP = 0x4  # vproxy's own DATA flag: the payload is a gzip member

Send = Callable[[bytes], None]


def expected_password(password: str, minute: int) -> str:
    first = base64.b64encode(hashlib.sha256(password.encode()).digest()).decode()
    return base64.b64encode(hashlib.sha256(f"{first}{minute}".encode()).digest()).decode()


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", sid) + payload


class _WebSocks:
    """vproxy's server side of one WebSocks exchange: fed the client's bytes, it answers through ``reply`` and,
    once it dialed the destination, sends what follows there (``remote``)."""

    def __init__(self, owner: _Counters, reply: Send) -> None:
        self.owner = owner
        self.reply = reply
        self.inbox = b""
        self.stage = "upgrade"
        self.remote: socket.socket | None = None
        #: the destination the client named (``host:port``), once it named one
        self.destination: str | None = None

    def feed(self, payload: bytes) -> None:
        if self.stage == "relay":
            assert self.remote is not None
            self.remote.sendall(payload)
            return
        if self.stage == "closed":
            return
        self.inbox += payload
        if self.stage == "upgrade":
            end = self.inbox.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.inbox = self.inbox[:end].decode("latin-1"), self.inbox[end + 4 :]
            fields = {
                k.strip().lower(): v.strip()
                for k, v in (x.split(":", 1) for x in head.split("\r\n")[1:] if ":" in x)
            }
            if (
                fields.get("sec-websocket-protocol") != "socks5"
                or fields.get("upgrade", "").lower() != "websocket"
            ):
                self.stage = "closed"
                self.reply(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            user, _, token = (
                base64.b64decode(fields.get("authorization", "Basic ").split()[-1]).decode().partition(":")
            )
            minute = int(time.time() * 1000) // 60000 * 60000
            ok = user in self.owner.users and token in {
                expected_password(self.owner.users[user], m) for m in (minute - 60000, minute, minute + 60000)
            }
            if not ok:
                self.stage = "closed"
                self.owner.refused_logins += 1
                self.reply(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                return
            self.reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + FRAME_HEADER)
            self.stage = "frame"
        if self.stage == "frame" and len(self.inbox) >= 10:
            if self.inbox[:10] != FRAME_HEADER:
                self.owner.faults.append("no frame header")
                return
            self.inbox = self.inbox[10:]
            self.stage = "greeting"
        if self.stage == "greeting" and len(self.inbox) >= 3:
            if self.inbox[:3] != b"\x05\x01\x00":
                self.owner.faults.append(f"greeting {self.inbox[:3].hex()}")
                return
            self.inbox = self.inbox[3:]
            self.reply(b"\x05\x00")
            self.stage = "connect"
        if self.stage == "connect" and len(self.inbox) >= 5:
            atyp = self.inbox[3]
            if atyp == 1:
                need, host = 10, socket.inet_ntoa(self.inbox[4:8])
            elif atyp == 3:
                need = 7 + self.inbox[4]
                host = self.inbox[5 : 5 + self.inbox[4]].decode()
            else:
                self.owner.faults.append(f"address type {atyp}")
                return
            if len(self.inbox) < need:
                return
            port = int.from_bytes(self.inbox[need - 2 : need], "big")
            self.inbox = self.inbox[need:]
            self.destination = f"{host}:{port}"
            try:
                remote = socket.create_connection((host, port), timeout=5)
            except OSError:
                self.stage = "closed"
                self.reply(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
                return
            self.remote = remote
            self.reply(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00")
            self.stage = "relay"
            if self.inbox:
                remote.sendall(self.inbox)
                self.inbox = b""


class _Counters:
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        #: what went wrong (a test asserts it stays empty)
        self.faults: list[str] = []
        self.refused_logins = 0
        #: DATA frames that came gzipped (vproxy's flag 0x4), inflated before use
        self.gzipped_frames = 0


class _Listening(_Counters):
    def __init__(self, users: dict[str, str]) -> None:
        super().__init__(users)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.stop = threading.Event()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        raise NotImplementedError


class FakeVproxyServer(_Listening):
    """vproxy's tunnel server (KcpTun's framing over TCP), WebSocks inside every stream."""

    # ------------------------------------------------------------------ one tunnel
    def _connection(self, conn: socket.socket) -> None:
        lock = threading.Lock()

        def send(data: bytes) -> None:
            with lock:
                conn.sendall(data)

        conn.settimeout(0.5)
        buf = b""
        streams: dict[int, _WebSocks] = {}
        try:
            while not self.stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buf += chunk
                if streams.get(-1) is None:  # the handshake
                    if len(buf) < 9:
                        continue
                    if buf[:9] != EMPTY_SETTINGS:
                        self.faults.append(f"handshake {buf[:9].hex()}")
                        return
                    send(EMPTY_SETTINGS)
                    buf = buf[9:]
                    streams[-1] = _WebSocks(self, send)
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    kind, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big")
                    payload, buf = buf[9 : 9 + length], buf[9 + length :]
                    self._frame(kind, flags, sid, payload, streams, send)
        except OSError:
            return
        finally:
            for s in streams.values():
                if s.remote is not None:
                    s.remote.close()
            conn.close()

    def _frame(
        self, kind: int, flags: int, sid: int, payload: bytes, streams: dict[int, _WebSocks], send: Send
    ) -> None:
        if kind == PING:
            if not flags & ACK:
                send(frame(PING, ACK, 0, payload))
            return
        if kind == HEADERS:
            if payload:
                self.faults.append("HEADERS with a payload: vproxy never sends metadata")
                return
            if flags & END_STREAM:
                s = streams.pop(sid, None)
                if s is not None and s.remote is not None:
                    s.remote.close()
                return
            streams[sid] = _WebSocks(self, lambda data: send(frame(DATA, 0, sid, data)))
            send(frame(HEADERS, 0, sid))  # SYN-ACK
            return
        if kind == DATA:
            s = streams.get(sid)
            if s is None:
                return
            if flags & GZIP and payload:
                payload = gzip.decompress(payload)
                self.gzipped_frames += 1
            if payload:
                dialed = s.remote is not None
                s.feed(payload)
                if not dialed and s.remote is not None:
                    threading.Thread(target=self._pump_back, args=(sid, s.remote, send), daemon=True).start()
            if flags & END_STREAM and s.remote is not None:
                s.remote.shutdown(socket.SHUT_WR)
            return
        if kind == GOAWAY:
            return
        self.faults.append(f"unexpected frame type {kind}")

    def _pump_back(self, sid: int, remote: socket.socket, send: Send) -> None:
        remote.settimeout(0.5)
        try:
            while not self.stop.is_set():
                try:
                    data = remote.recv(16384)
                except TimeoutError:
                    continue
                if not data:
                    send(frame(DATA, END_STREAM, sid))
                    return
                send(frame(DATA, 0, sid, data))
        except OSError:
            return


class FakeWebSocksServer(_Listening):
    """vproxy's WebSocks server: each connection (inside TLS with ``tls``) is one WebSocks client."""

    def __init__(self, users: dict[str, str], tls: ssl.SSLContext | None = None) -> None:
        super().__init__(users)
        self.tls = tls
        #: the destinations clients named, in order
        self.destinations: list[str] = []

    def _connection(self, raw: socket.socket) -> None:
        try:
            conn = raw if self.tls is None else self.tls.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        exchange = _WebSocks(self, conn.sendall)
        try:
            self._relay(conn, exchange)
        except OSError:
            return
        finally:
            if exchange.destination is not None:
                self.destinations.append(exchange.destination)
            if exchange.remote is not None:
                exchange.remote.close()
            conn.close()

    def _relay(self, conn: socket.socket, exchange: _WebSocks) -> None:
        """One thread, both directions (a TLS socket is not read and written from two threads)."""
        client_open = True
        while not self.stop.is_set():
            remote = exchange.remote
            watched = [s for s in (conn if client_open else None, remote) if s is not None]
            pending = isinstance(conn, ssl.SSLSocket) and client_open and conn.pending() > 0
            readable = [conn] if pending else select.select(watched, [], [], 0.2)[0]
            for sock in readable:
                data = sock.recv(65536)
                if sock is conn:
                    if data:
                        exchange.feed(data)
                    else:
                        client_open = False
                        if exchange.remote is None:
                            return
                        exchange.remote.shutdown(socket.SHUT_WR)
                elif data:
                    conn.sendall(data)
                else:
                    return  # the destination is done: closing the connection ends the client's stream
            if exchange.stage == "closed":
                return


@contextmanager
def _serving(server: _Listening) -> Iterator[None]:
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.stop.set()
        server.listener.close()
        thread.join(timeout=2)


@contextmanager
def fake_vproxy_server(users: dict[str, str]) -> Iterator[FakeVproxyServer]:
    server = FakeVproxyServer(users)
    with _serving(server):
        yield server


@contextmanager
def fake_websocks_server(
    users: dict[str, str], tls: ssl.SSLContext | None = None
) -> Iterator[FakeWebSocksServer]:
    server = FakeWebSocksServer(users, tls)
    with _serving(server):
        yield server
