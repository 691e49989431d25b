#!/usr/bin/env python3
"""A fast fake Poe upstream for the benchmark: raw asyncio, HTTP/1.1 keep-alive, chunked responses.

    python bench/fake_poe.py --port 0      # prints "PORT <n>" on stdout once listening

``POST /bot/<name>`` answers ``200 text/event-stream`` (chunked) with CHUNKS ``text`` events and a
``done`` event. The bot name picks the pacing:

* ``Bench`` (any name not below): the events are written back to back, one write (and one HTTP
  chunk) per event, as fast as the loop goes.
* ``BenchSlow``: the same events spread over ~2 s (one every 2 s / CHUNKS), for the concurrency
  tests. An ``X-Bench-Delay-Ms`` request header overrides the spacing (total ms).
* ``BenchPaced<N>`` (``BenchPaced250``): N small ``text`` events, one every 20 ms (``X-Bench-Gap-Ms``
  overrides), like a real bot answering token batch by token batch; the last one carries "w19.".

``GET /healthz`` answers 200; ``GET /stats`` the connections accepted and bot requests answered so
far (JSON). Anything else is a 404. Only loopback is served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys

CHUNKS = 20
SLOW_TOTAL_S = 2.0
MAX_HEAD = 64 * 1024


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(name: str, data: object) -> bytes:
    return _chunk(f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n".encode())


# Each text chunk is a few words, like a real token batch; the client can check "w19." arrived.
TEXT_EVENTS = [_event("text", {"text": f"Lorem ipsum dolor w{i:02d}. "}) for i in range(CHUNKS)]
SMALL_EVENT = _event("text", {"text": "Lorem ipsum "})   # a paced stream's events but the last
DONE = _event("done", {}) + b"0\r\n\r\n"
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
HEALTH_BODY = b'{"status":"ok"}'
HEALTH = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
          % (len(HEALTH_BODY), HEALTH_BODY))
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


STATS = {"connections": 0, "requests": 0}


class FakePoe(asyncio.Protocol):
    """One connection; requests are handled one at a time (no pipelining needed by the proxy)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.slow: asyncio.Task[None] | None = None
        self.want_body = -1        # body bytes still expected for the current request, -1: reading a head
        self.head: bytes = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS["connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slow is not None:
            self.slow.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._drain()

    def _drain(self) -> None:
        while self.transport is not None and self.slow is None:
            if self.want_body < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        self.transport.write(BAD)
                        self.transport.close()
                    return
                self.head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                self.want_body = 0
                for line in self.head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        self.want_body = int(value.strip())
            if len(self.buf) < self.want_body:
                return
            del self.buf[:self.want_body]
            self.want_body = -1
            self._answer(self.head)

    def _answer(self, head: bytes) -> None:
        transport = self.transport
        assert transport is not None
        request_line, _, header_block = head.partition(b"\r\n")
        parts = request_line.split(b" ")
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
        if method == b"GET" and target == b"/healthz":
            transport.write(HEALTH)
            return
        if method == b"GET" and target == b"/stats":
            body = json.dumps(STATS).encode()
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body))
            return
        if method != b"POST" or not target.startswith(b"/bot/"):
            transport.write(NOT_FOUND)
            return
        STATS["requests"] += 1
        delay_total_s = SLOW_TOTAL_S if target.startswith(b"/bot/BenchSlow") else 0.0
        chunks, gap_ms = 0, 20
        if target.startswith(b"/bot/BenchPaced"):
            chunks = int(target[len(b"/bot/BenchPaced"):] or b"100")
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"x-bench-delay-ms":
                delay_total_s = int(value.strip()) / 1000.0
            elif name == b"x-bench-gap-ms":
                gap_ms = int(value.strip())
        if chunks > 0:
            events = [SMALL_EVENT] * (chunks - 1) + [TEXT_EVENTS[-1]]
            self.slow = asyncio.ensure_future(self._paced(gap_ms / 1000.0, events))
            return
        if delay_total_s <= 0:
            transport.write(HEAD)
            for event in TEXT_EVENTS:      # one send per event, like a real stream
                transport.write(event)
            transport.write(DONE)
            return
        self.slow = asyncio.ensure_future(self._paced(delay_total_s / CHUNKS, TEXT_EVENTS))

    async def _paced(self, gap_s: float, events: list[bytes]) -> None:
        try:
            transport = self.transport
            if transport is None:
                return
            transport.write(HEAD)
            for event in events:
                await asyncio.sleep(gap_s)
                if self.transport is None:
                    return
                transport.write(event)
            transport.write(DONE)
        finally:
            self.slow = None
        if self.buf and self.transport is not None:
            self._drain()


async def main_async(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakePoe, host, port, backlog=4096, reuse_address=True)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("fake_poe: loopback only", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError):
            pass
    try:
        asyncio.run(main_async(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
