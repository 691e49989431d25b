#!/usr/bin/env python3
"""The least an asyncio proxy can do per streamed event: the benchmark's floor for paced streams.

    python bench/forwarder.py --upstream-port N --port 0   # prints "PORT <n>" on stdout once listening

For each client connection it opens one connection to the fake Poe (bench/fake_poe.py). For each
request it reads the client's head and body, sends the fake the query the proxy would send (the bot
named in the body's "model"), and then copies what the fake answers to the client, one read and one
write at a time, until the chunked body ends. No HTTP parsing beyond finding those ends, no JSON, no
translation: asyncio streams and two sockets, as in the proxy. Whatever CPU it spends per event, the
proxy cannot spend less on the same machine. ``GET /healthz`` answers 200, so bench.py can wait for it.
Only loopback is served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import poe_request  # noqa: E402  # the very query the proxy sends, as bench.py describes it

READ_BYTES = 64 * 1024
HEALTH = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s'
END_OF_CHUNKED = b"0\r\n\r\n"


async def serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream_port: int) -> None:
    up_reader: asyncio.StreamReader | None = None
    up_writer: asyncio.StreamWriter | None = None
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length) if length else b""
            if head.startswith(b"GET /healthz "):
                payload = json.dumps({"status": "ok", "pid": os.getpid()}).encode()
                writer.write(HEALTH % (len(payload), payload))
                await writer.drain()
                continue
            if up_writer is None:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
            assert up_reader is not None
            up_writer.write(poe_request(json.loads(body)["model"]))
            await up_writer.drain()
            while True:   # the event-by-event copy: what is measured
                data = await up_reader.read(READ_BYTES)
                if not data:
                    return
                writer.write(data)
                await writer.drain()
                if data.endswith(END_OF_CHUNKED):
                    break
    finally:
        for w in (writer, up_writer):
            if w is not None:
                w.close()


async def main_async(host: str, port: int, upstream_port: int) -> None:
    server = await asyncio.start_server(lambda r, w: serve_client(r, w, upstream_port), host, port, backlog=4096)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("forwarder: loopback only", file=sys.stderr)
        return 2
    try:
        asyncio.run(main_async(args.host, args.port, args.upstream_port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
