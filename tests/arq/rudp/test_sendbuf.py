"""The sender's chunked stream buffer against a plain bytearray of the same stream."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vtunnel.arq.rudp.sendbuf import SendBuffer

_steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.binary(max_size=40), st.sampled_from(["bytes", "bytearray", "view"])),
        st.tuples(st.just("release"), st.integers(min_value=0, max_value=60), st.just("")),
        st.tuples(
            st.just("slice"), st.integers(min_value=0, max_value=1000), st.integers(min_value=0, max_value=90)
        ),
    ),
    max_size=80,
)


@given(_steps)
def test_slices_match_the_stream(steps: list[tuple[str, object, object]]) -> None:
    buffer = SendBuffer()
    stream = bytearray()
    released = 0
    for kind, a, b in steps:
        if kind == "write":
            assert isinstance(a, bytes)
            data = a if b == "bytes" else bytearray(a) if b == "bytearray" else memoryview(a)
            buffer.append(data)
            stream += a
            if isinstance(data, bytearray):
                data[:] = b"x" * len(data)  # a writer reusing its buffer changes nothing taken
        elif kind == "release":
            assert isinstance(a, int)
            released = min(len(stream), released + a)
            buffer.release(released)
        else:
            assert isinstance(a, int)
            assert isinstance(b, int)
            held = len(stream) - released
            if not held:
                continue
            start = released + a % held
            end = min(len(stream), start + b)
            assert buffer.slice(start, end) == bytes(stream[start:end])
            chunk, base = buffer.chunk_at(start)  # the chunk holding start, from its first byte
            assert base <= start < base + len(chunk)
            assert chunk == bytes(stream[base : base + len(chunk)])
        assert (buffer.start, buffer.end, len(buffer)) == (released, len(stream), len(stream) - released)


def test_many_chunks_released_and_written_again() -> None:
    buffer = SendBuffer()
    for i in range(2000):
        buffer.append(bytes([i % 256]) * 7)
        buffer.release(max(0, buffer.end - 20))
        assert (
            buffer.slice(buffer.start, buffer.end)
            == b"".join(bytes([j % 256]) * 7 for j in range(max(0, i - 3), i + 1))[
                -(buffer.end - buffer.start) :
            ]
        )
