"""Stream metadata (what a SYN names: destination, kind, extra headers) and the header blocks of the metadata
extension that carry it: HPACK-coded metadata in a SYN, a reason in an RST."""

from __future__ import annotations

from dataclasses import dataclass

import hpack

from vtunnel.protocol.errors import ConfigError

__all__ = [
    "AUTHORITY",
    "DATAGRAM_KINDS",
    "ERROR_HEADER",
    "KIND_HEADER",
    "STREAM_KINDS",
    "HeaderBlockError",
    "MetadataCodec",
    "StreamMetadata",
]

STREAM_KINDS = frozenset({"tcp", "udp", "lite-tls", "tun"})
#: the kinds whose DATA frames each carry one datagram (and that may use the transport's unreliable datagrams)
DATAGRAM_KINDS = frozenset({"udp", "tun"})


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamMetadata:
    """What a SYN carries with the metadata extension: target ``host:port``, stream kind, extra headers."""

    authority: str | None = None
    kind: str = "tcp"
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.authority is not None and not isinstance(self.authority, str):
            raise ConfigError(f"authority must be a str 'host:port', not {self.authority!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.headers):
            raise ConfigError("headers must be (str, str) pairs")
        if self.kind not in STREAM_KINDS:
            raise ConfigError(f"stream kind must be one of {sorted(STREAM_KINDS)}, not {self.kind!r}")


AUTHORITY = ":authority"
KIND_HEADER = "vt-kind"
ERROR_HEADER = "vt-error"
MAX_HEADER_LIST_SIZE = 16 * 1024

Headers = list[tuple[str, str]]


class HeaderBlockError(Exception):
    """A header block that cannot be decoded (internal; the tunnel fails with COMPRESSION_ERROR)."""


class MetadataCodec:
    """One HPACK context per direction, for the whole tunnel: blocks are coded in frame order."""

    __slots__ = ("_decoder", "_encoder")

    def __init__(self) -> None:
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)

    def encode(self, headers: Headers) -> bytes:
        block: bytes = self._encoder.encode(headers)
        return block

    def encode_metadata(self, metadata: StreamMetadata) -> bytes:
        headers: Headers = []
        if metadata.authority is not None:
            headers.append((AUTHORITY, metadata.authority))
        headers.append((KIND_HEADER, metadata.kind))
        headers.extend(metadata.headers)
        return self.encode(headers)

    def encode_error(self, error: str) -> bytes:
        return self.encode([(ERROR_HEADER, error)])

    def decode(self, block: bytes) -> Headers:
        try:
            headers = self._decoder.decode(block)
        except Exception as exc:  # hpack raises several types, and UnicodeDecodeError on bad text
            raise HeaderBlockError(f"hpack: {type(exc).__name__}") from None
        return [(str(k), str(v)) for k, v in headers]


def parse_metadata(headers: Headers) -> StreamMetadata:
    """Raises ValueError for an unknown stream kind."""
    authority: str | None = None
    kind = "tcp"
    extra: Headers = []
    for name, value in headers:
        if name == AUTHORITY:
            authority = value
        elif name == KIND_HEADER:
            kind = value
        else:
            extra.append((name, value))
    return StreamMetadata(authority=authority, kind=kind, headers=tuple(extra))


def error_of(headers: Headers) -> str | None:
    return dict(headers).get(ERROR_HEADER)
