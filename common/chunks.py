"""Chunked tensors on the Train stream: the size rule, and putting a chunked tensor's bytes back together.

A tensor larger than the chunk size travels as a header (the message that holds it, its Tensor with
`chunked` set and no data) followed at once by TensorChunk messages of at most `chunk_bytes` bytes each,
in order (proto/ps/v1/parameter_server.proto). Why: over gRPC a 45-100 MB message crosses loopback at
about 400 MB/s whatever the HTTP/2 options, the same bytes in 1-8 MB messages 3-4x faster, even when the
receiver waits for all of them before answering (bench/results/transport_probe.md); below a few MB one
message is faster. `ormo_ps.common.wire` writes the messages (one copy of the tensor's bytes) and reads a chunk's
bytes as a view of the received buffer; an `Assembly` copies them into place, checking that they come in
order and add up to the header's size exactly; a `Reassembly` is a stream's receiving side (the server's
streams, ps-worker's and the benchmark's clients), with its buffers used again (`BufferPool`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_CHUNK_BYTES", "Assembly", "BufferPool", "ChunkError", "MIB", "Reassembly", "pieces"]

MIB = 1 << 20
DEFAULT_CHUNK_BYTES = 4 * MIB  # ps-server --chunk-mib's default: 1-8 MB measured alike, 4 MiB is gRPC's own size


class ChunkError(ValueError):
    """A chunk that does not continue the tensor being received: out of order, empty or past its end."""


def pieces(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, end) of each chunk of a tensor of `nbytes` bytes; one piece when it is not larger than
    `chunk_bytes` or chunking is off (0)."""
    if chunk_bytes < 0:
        raise ValueError(f"chunk_bytes must be >= 0, got {chunk_bytes}")
    if chunk_bytes == 0 or nbytes <= chunk_bytes:
        return [(0, nbytes)]
    return [(o, min(o + chunk_bytes, nbytes)) for o in range(0, nbytes, chunk_bytes)]


class Assembly:
    """The bytes of one chunked tensor as its chunks arrive, in a writable buffer: `buffer` when given (of
    exactly `nbytes` bytes: one used again, see BufferPool), else a new one. `header` is the message that
    announced the tensor, kept for whoever handles it when complete. With `piece_bytes` (the negotiated chunk
    size), every chunk but the last must be exactly that long and the last the rest (`pieces`): a sender
    cannot make the receiver handle a tensor in a million 1-byte pieces, nor in larger ones than agreed."""

    def __init__(self, header: object, nbytes: int, buffer: np.ndarray | None = None,
                 piece_bytes: int | None = None) -> None:
        if nbytes <= 0:
            raise ChunkError(f"a chunked tensor must have bytes, got {nbytes}")
        if piece_bytes is not None and piece_bytes <= 0:
            raise ValueError(f"piece_bytes must be > 0, got {piece_bytes}")
        self.piece_bytes = piece_bytes
        if buffer is not None and (buffer.dtype != np.uint8 or buffer.shape != (nbytes,)):
            raise ValueError(f"the buffer must be {nbytes} uint8, got {buffer.dtype} {buffer.shape}")
        self.header = header
        self.nbytes = nbytes
        self.buffer = np.empty(nbytes, dtype=np.uint8) if buffer is None else buffer
        self.filled = 0

    @property
    def complete(self) -> bool:
        return self.filled == self.nbytes

    def add(self, offset: int, data: bytes | memoryview) -> bool:
        """Copy the next chunk into place; True once the tensor is complete. ChunkError (nothing copied) for a
        chunk that is empty, does not start where the last one ended, or runs past the tensor's end."""
        n = len(data)
        if offset != self.filled:
            raise ChunkError(f"chunk at byte {offset}, expected the one at byte {self.filled} of {self.nbytes}")
        if n == 0:
            raise ChunkError(f"empty chunk at byte {offset} of {self.nbytes}")
        if offset + n > self.nbytes:
            raise ChunkError(f"chunk of {n} bytes at byte {offset} runs past the tensor's {self.nbytes} bytes")
        if self.piece_bytes is not None and n != min(self.piece_bytes, self.nbytes - offset):
            raise ChunkError(f"chunk of {n} bytes at byte {offset} of {self.nbytes}: the chunk size is "
                             f"{self.piece_bytes} bytes (every chunk but the last is that long, the last the rest)")
        self.buffer[offset:offset + n] = np.frombuffer(data, dtype=np.uint8)
        self.filled += n
        return self.complete

    def data(self) -> memoryview:
        """The tensor's bytes (only once complete)."""
        if not self.complete:
            raise ChunkError(f"only {self.filled} of the tensor's {self.nbytes} bytes arrived")
        return memoryview(self.buffer)

    def progress(self) -> str:
        return f"byte {self.filled} of {self.nbytes}"


class BufferPool:
    """Receive buffers used again: a tensor above glibc's mmap threshold (32 MiB even with
    common/malloc_tuning.py) gets fresh pages from the kernel on every allocation, and faulting in 45 MB costs
    about as much as copying it twice (bench/results/step_cost.md). Keeps at most `max_bytes` of spare
    buffers; a buffer given back must no longer be read by anyone."""

    def __init__(self, max_bytes: int = 256 * MIB) -> None:
        self.max_bytes = max_bytes
        self._spare: list[np.ndarray] = []

    def take(self, nbytes: int) -> np.ndarray:
        for i, b in enumerate(self._spare):
            if b.nbytes == nbytes:
                return self._spare.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buffer: np.ndarray) -> None:
        if buffer.nbytes + sum(b.nbytes for b in self._spare) <= self.max_bytes:
            self._spare.append(buffer)


class Reassembly:
    """The chunked tensor a stream is receiving, if any (one at a time), put together in buffers from `pool`.
    `add` hands the whole tensor's bytes out as a view of a buffer already given back to the pool: read them
    before the pool's next `take` (every receiver here handles a tensor before it reads the next message)."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.assembly: Assembly | None = None  # the tensor being received

    def start(self, header: object, nbytes: int, piece_bytes: int | None = None) -> None:
        """A chunked tensor's header: its `nbytes` bytes follow in chunks (of exactly `piece_bytes`, the last
        the rest, when given)."""
        self.assembly = Assembly(header, nbytes, self.pool.take(nbytes), piece_bytes)

    def drop(self) -> None:
        """Forget the tensor being received (its stream ends)."""
        self.assembly = None

    def add(self, offset: int, data: bytes | memoryview) -> tuple[object, memoryview] | None:
        """The next chunk; once the tensor is complete, (its header, its bytes). ChunkError as `Assembly.add`
        (the tensor is then dropped), or when no tensor is being received."""
        assembly = self.assembly
        if assembly is None:
            raise ChunkError("a chunk with no chunked tensor announced before it")
        try:
            complete = assembly.add(offset, data)
        except ChunkError:
            self.assembly = None
            raise
        if not complete:
            return None
        self.assembly = None
        self.pool.give(assembly.buffer)
        return assembly.header, assembly.data()
