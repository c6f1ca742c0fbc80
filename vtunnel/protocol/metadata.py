"""Header blocks of the metadata extension: HPACK-coded stream metadata in a SYN, a reason in an RST."""

from __future__ import annotations

import hpack

from vtunnel.protocol.settings import StreamMetadata

__all__ = ["AUTHORITY", "ERROR_HEADER", "KIND_HEADER", "HeaderBlockError", "MetadataCodec"]

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
