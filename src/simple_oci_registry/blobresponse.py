"""Sending blob bytes: zero-copy windows of archives, or verified streams.

aiohttp's FileResponse sends whole files only; a blob is a *window* of a tar, so this response
sends ``[offset + start, offset + end]`` with ``loop.sendfile`` (the standard asyncio loop's
``os.sendfile``; for TLS asyncio falls back to reads on its own). The window goes out in chunks
with a fingerprint check on the open descriptor between them: if the archive is rewritten or
truncated in place while it is being sent, the connection is aborted so that the client sees a
short body and a reset, never a complete response holding other bytes (containerd#9552 shows a
short 200 is not retried, but a reset is at least never mistaken for success).

Members of compressed archives cannot be sent by window; they are decompressed in a worker
thread, hashed as they go, and the last piece is held back until the digest matches.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Final

from aiohttp import web

from simple_oci_registry.archive import MemberReader
from simple_oci_registry.ranges import ByteRange

__all__ = ["send_member"]

# Smaller chunks mean more fingerprint checks (one fstat each, in a thread): at 8 MiB a
# 200 MiB layer costs 25 of them, and a change is caught within 8 MiB of sending.
SENDFILE_CHUNK: Final = 8 << 20
STREAM_CHUNK: Final = 1 << 20


class _Aborted(ConnectionResetError):
    """Raised after aborting a transfer whose source changed; aiohttp treats it as a reset."""


def _abort(request: web.BaseRequest) -> _Aborted:
    transport = request.transport
    if transport is not None:
        transport.abort()
    return _Aborted("blob source changed during the transfer; connection aborted")


async def send_member(
    request: web.BaseRequest,
    response: web.StreamResponse,
    reader: MemberReader,
    byte_range: ByteRange | None,
    digest: str,
) -> web.StreamResponse:
    """Prepare ``response`` (headers already set) and send the member's bytes: a window of a
    file with sendfile (verified before, by the store or the blob cache), or else a stream
    hashed as it goes."""
    start, length = (0, reader.size) if byte_range is None else (byte_range.start,
                                                                byte_range.length)
    await response.prepare(request)
    region = reader.region()
    if region is not None:
        await _send_window(request, reader, region.file, region.offset + start, length)
    else:
        await _send_stream(request, response, reader, start, length, digest)
    try:
        await response.write_eof()
    except ConnectionError:
        # Every byte went out (and was checked); the client simply closed first, as clients
        # sending "Connection: close" do. The transfer is complete, not cut short.
        pass
    return response


async def _send_window(request: web.BaseRequest, reader: MemberReader, file: object,
                       offset: int, length: int) -> None:
    loop = asyncio.get_running_loop()
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    remaining = length
    while remaining > 0:
        # The reader was checked against the indexed fingerprint when it was opened; each
        # piece is checked after it went out.
        count = min(remaining, SENDFILE_CHUNK)
        sent = await loop.sendfile(transport, file, offset, count)  # type: ignore[arg-type]
        if sent != count:  # the file got shorter under us
            raise _abort(request)
        offset += count
        remaining -= count
        if not await asyncio.to_thread(reader.unchanged):
            # After the final piece too: sendfile returns once the bytes are in the socket
            # buffer, and aborting now (a reset) discards what the client has not read yet.
            raise _abort(request)


async def _send_stream(request: web.BaseRequest, response: web.StreamResponse,
                       reader: MemberReader, start: int, length: int, digest: str) -> None:
    algorithm, _, encoded = digest.partition(":")
    hasher = hashlib.new(algorithm)
    end = start + length
    position = 0
    held: bytes = b""
    while position < reader.size:
        chunk = await asyncio.to_thread(reader.read, STREAM_CHUNK)
        if not chunk:
            raise _abort(request)
        hasher.update(chunk)
        lo, hi = max(start - position, 0), min(end - position, len(chunk))
        position += len(chunk)
        if lo < hi:
            if held:
                await response.write(held)
            held = chunk[lo:hi]
    # Hold the last piece back until the whole blob is known to match its digest.
    if hasher.hexdigest() != encoded or not await asyncio.to_thread(reader.unchanged):
        raise _abort(request)
    if held:
        await response.write(held)
