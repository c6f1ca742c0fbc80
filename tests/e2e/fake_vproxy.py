"""A vproxy tunnel server for the tests, written from the wire facts alone (vproxy's framing, WebSocks inside each
stream), independent of vtunnel's own code: the empty SETTINGS and nothing else as the handshake, HEADERS of
length 0 as SYN / SYN-ACK / RST, DATA as PSH / FIN, PING answered with ACK; every stream must start with the
WebSocks upgrade (minute-hashed password), the 10-byte frame header and a SOCKS5 CONNECT, which it dials.

One thread per tunnel and per dialed connection; bounded by the test's lifetime (``stop``).
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EMPTY_SETTINGS = bytes.fromhex("000000040000000000")
FRAME_HEADER = bytes.fromhex("827f7fffffffffffffff")
DATA, HEADERS, SETTINGS, PING, GOAWAY = 0, 1, 4, 6, 7
END_STREAM = ACK = 1

Send = Callable[[bytes], None]


def expected_password(password: str, minute: int) -> str:
    first = base64.b64encode(hashlib.sha256(password.encode()).digest()).decode()
    return base64.b64encode(hashlib.sha256(f"{first}{minute}".encode()).digest()).decode()


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", sid) + payload


class _Stream:
    def __init__(self) -> None:
        self.inbox = b""
        self.stage = "upgrade"
        self.remote: socket.socket | None = None


class FakeVproxyServer:
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.stop = threading.Event()
        #: what went wrong, per tunnel (a test asserts it stays empty)
        self.faults: list[str] = []
        self.refused_logins = 0

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    # ------------------------------------------------------------------ one tunnel
    def _tunnel(self, conn: socket.socket) -> None:
        lock = threading.Lock()

        def send(data: bytes) -> None:
            with lock:
                conn.sendall(data)

        conn.settimeout(0.5)
        buf = b""
        streams: dict[int, _Stream] = {}
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
                    streams[-1] = _Stream()
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
        self, kind: int, flags: int, sid: int, payload: bytes, streams: dict[int, _Stream], send: Send
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
            streams[sid] = _Stream()
            send(frame(HEADERS, 0, sid))  # SYN-ACK
            return
        if kind == DATA:
            s = streams.get(sid)
            if s is None:
                return
            if payload:
                self._data(sid, s, payload, send)
            if flags & END_STREAM and s.remote is not None:
                s.remote.shutdown(socket.SHUT_WR)
            return
        if kind == GOAWAY:
            return
        self.faults.append(f"unexpected frame type {kind}")

    def _data(self, sid: int, s: _Stream, payload: bytes, send: Send) -> None:
        if s.stage == "relay":
            assert s.remote is not None
            s.remote.sendall(payload)
            return
        s.inbox += payload
        if s.stage == "upgrade":
            end = s.inbox.find(b"\r\n\r\n")
            if end < 0:
                return
            head, s.inbox = s.inbox[:end].decode("latin-1"), s.inbox[end + 4 :]
            fields = {
                k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in head.split("\r\n")[1:])
            }
            if (
                fields.get("sec-websocket-protocol") != "socks5"
                or fields.get("upgrade", "").lower() != "websocket"
            ):
                send(frame(DATA, 0, sid, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"))
                return
            user, _, token = base64.b64decode(fields["authorization"].split()[1]).decode().partition(":")
            minute = int(time.time() * 1000) // 60000 * 60000
            ok = user in self.users and token in {
                expected_password(self.users[user], m) for m in (minute - 60000, minute, minute + 60000)
            }
            if not ok:
                self.refused_logins += 1
                send(frame(DATA, 0, sid, b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"))
                return
            send(
                frame(
                    DATA,
                    0,
                    sid,
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + FRAME_HEADER,
                )
            )
            s.stage = "frame"
        if s.stage == "frame" and len(s.inbox) >= 10:
            if s.inbox[:10] != FRAME_HEADER:
                self.faults.append("no frame header")
                return
            s.inbox = s.inbox[10:]
            s.stage = "greeting"
        if s.stage == "greeting" and len(s.inbox) >= 3:
            if s.inbox[:3] != b"\x05\x01\x00":
                self.faults.append(f"greeting {s.inbox[:3].hex()}")
                return
            s.inbox = s.inbox[3:]
            send(frame(DATA, 0, sid, b"\x05\x00"))
            s.stage = "connect"
        if s.stage == "connect" and len(s.inbox) >= 5:
            atyp = s.inbox[3]
            if atyp == 1:
                need, host = 10, socket.inet_ntoa(s.inbox[4:8])
            elif atyp == 3:
                need = 7 + s.inbox[4]
                host = s.inbox[5 : 5 + s.inbox[4]].decode()
            else:
                self.faults.append(f"address type {atyp}")
                return
            if len(s.inbox) < need:
                return
            port = int.from_bytes(s.inbox[need - 2 : need], "big")
            s.inbox = s.inbox[need:]
            try:
                remote = socket.create_connection((host, port), timeout=5)
            except OSError:
                send(frame(DATA, 0, sid, b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"))
                return
            s.remote = remote
            send(frame(DATA, 0, sid, b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00"))
            s.stage = "relay"
            threading.Thread(target=self._pump_back, args=(sid, remote, send), daemon=True).start()
            if s.inbox:
                remote.sendall(s.inbox)
                s.inbox = b""

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


@contextmanager
def fake_vproxy_server(users: dict[str, str]) -> Iterator[FakeVproxyServer]:
    server = FakeVproxyServer(users)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.listener.close()
        thread.join(timeout=2)
