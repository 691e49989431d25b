#!/usr/bin/env python3
"""Memory and stall figures of poe2openai under cheap hostile requests, on loopback only.

    python bench/memory.py            # ~1-2 min; prints a markdown table
    python bench/memory.py --small    # a tenth of the sizes, for a smoke test

Not a test: it measures, it does not judge. Each case starts a fresh proxy (`python poe2openai.py`
in its own process group, so its peak RSS, /proc/PID/status VmHWM, belongs to that case alone)
against a fake Poe upstream served from this process, runs the case, and reads the peak. Meanwhile
a probe asks GET /healthz every 20 ms: its slowest answer is how long the case stalled the proxy's
event loop for everyone else. Every process it starts is killed on the way out.

Cases (sizes before --small):
  stream-300MiB     a 300 MiB answer streamed to the client
  whole-100MiB      a 100 MiB non-streamed answer (over the 64 MiB MAX_ANSWER_SIZE: a 502)
  sse-line-200MB    200 MB of one SSE line without a line end (refused: a 502)
  refused-5MiB-x100 100 requests naming 5 MiB model names, refused by Poe (404)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY = os.path.join(os.path.dirname(HERE), "poe2openai.py")
HOST = "127.0.0.1"
MiB = 1024 * 1024


# ----------------------------------------------------------------------------- the fake upstream

class Upstream:
    """Answers /bot/<name> by the name: Stream<N> and Whole<N> send N bytes of answer text in
    64 KiB text events; Line<N> sends N bytes of one SSE line and never a line end; anything else
    is a 404 (the model does not exist)."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, 0, limit=8 * MiB)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await self._head(reader)
                if head is None:
                    return
                target, length = head
                await reader.readexactly(length)
                if not await self._answer(target, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                asyncio.CancelledError):
            pass   # the proxy hung up (as it should on a refused answer), or the run is over
        finally:
            writer.close()

    @staticmethod
    async def _head(reader: asyncio.StreamReader) -> tuple[str, int] | None:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) < 2:
            return None
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return parts[1], length

    @staticmethod
    async def _answer(target: str, writer: asyncio.StreamWriter) -> bool:
        bot = target.rsplit("/", 1)[-1]
        kind = next((k for k in ("Stream", "Whole", "Line") if bot.startswith(k) and bot[len(k):].isdigit()), None)
        if kind is None:
            body = b'{"text": "bot not found"}'
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
            return True
        size = int(bot[len(kind):])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        if kind == "Line":
            piece = b"x" * (256 * 1024)
            writer.write(b"%x\r\ndata: \r\n" % 6)
            for _ in range(size // len(piece)):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return False
        text = ("lorem ipsum dolor sit amet " * 2500)[:64 * 1024]
        event = b"event: text\ndata: " + json.dumps({"text": text}).encode() + b"\n\n"
        chunk = b"%x\r\n%s\r\n" % (len(event), event)
        for _ in range(size // len(text)):
            writer.write(chunk)
            await writer.drain()
        done = b"event: done\ndata: {}\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()
        return True


# ----------------------------------------------------------------------------- the proxy process

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_proxy(upstream_port: int, config_dir: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "POE_BASE_URL": f"http://{HOST}:{upstream_port}", "RATE_LIMIT_MS": "0",
           "LOG_LEVEL": "error", "CONFIG_DIR": config_dir, "READ_TIMEOUT_SECONDS": "60"}
    proc = subprocess.Popen([sys.executable, PROXY, "--host", HOST, "--port", str(port)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.05)
    stop_proxy(proc)
    raise RuntimeError("the proxy did not start")


def stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------------- the client side

async def post(port: int, body: dict[str, Any]) -> tuple[int, int, bytes]:
    """POST a chat request; (status, bytes of response read, the first 2000 bytes)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer anything\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                 % len(payload))
    writer.write(payload)
    await writer.drain()
    head = b""
    total = 0
    while True:
        data = await reader.read(1024 * 1024)
        if not data:
            break
        total += len(data)
        if len(head) < 2000:
            head += data[:2000 - len(head)]
    writer.close()
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, total, head


def probe(port: int, stop: threading.Event, worst: list[float]) -> None:
    """The slowest GET /healthz while the case runs (ms): roughly the longest stall of the proxy's
    event loop. A thread of its own, so the fake upstream's work in this process does not count."""
    while not stop.is_set():
        began = time.perf_counter()
        try:
            with socket.create_connection((HOST, port), timeout=10) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while sock.recv(65536):
                    pass
        except OSError:
            pass
        worst[0] = max(worst[0], (time.perf_counter() - began) * 1000)
        time.sleep(0.02)


def chat(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


async def run_case(name: str, upstream: Upstream, config_dir: str, requests: list[dict[str, Any]]) -> dict[str, Any]:
    proc, port = start_proxy(upstream.port, config_dir)
    try:
        idle_kib = status_kib(proc.pid, "VmRSS")
        stop, worst = threading.Event(), [0.0]
        watcher = threading.Thread(target=probe, args=(port, stop, worst), daemon=True)
        watcher.start()
        began = time.perf_counter()
        results = [await post(port, body) for body in requests]
        seconds = time.perf_counter() - began
        stop.set()
        watcher.join(15)
        stall_ms = worst[0]
        statuses = sorted({r[0] for r in results})
        found = re.search(rb'"code":"([a-z_]+)"', results[-1][2]) if results else None
        code = found.group(1).decode() if found else ""
        return {"case": name, "statuses": statuses, "code": code, "response_mib": sum(r[1] for r in results) / MiB,
                "seconds": seconds, "idle_mib": idle_kib / 1024, "peak_mib": status_kib(proc.pid, "VmHWM") / 1024,
                "after_mib": status_kib(proc.pid, "VmRSS") / 1024, "stall_ms": stall_ms}
    finally:
        stop_proxy(proc)


async def main_async(scale: float) -> list[dict[str, Any]]:
    upstream = Upstream()
    await upstream.start()
    rows = []
    with tempfile.TemporaryDirectory() as config_dir:
        n300, n100, n200, name_size = (int(300 * MiB * scale), int(100 * MiB * scale), int(200_000_000 * scale),
                                       int(5 * MiB * scale))
        cases = [
            ("stream-300MiB", [chat(f"Stream{n300}", True)]),
            ("whole-100MiB", [chat(f"Whole{n100}", False)]),
            ("sse-line-200MB", [chat(f"Line{n200}", False)]),
            ("refused-5MiB-x100", [chat("m" * name_size + str(i), False) for i in range(100)]),
        ]
        for name, requests in cases:
            rows.append(await run_case(name, upstream, config_dir, requests))
            print(f"  {name} done", file=sys.stderr)
    assert upstream.server is not None
    upstream.server.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tenth of the sizes")
    args = parser.parse_args()
    rows = asyncio.run(main_async(0.1 if args.small else 1.0))
    print("| case | statuses | error code | response MiB | seconds | idle RSS MiB | peak RSS MiB (VmHWM) "
          "| RSS after MiB | slowest /healthz ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['statuses']} | {r['code']} | {r['response_mib']:.1f} | {r['seconds']:.1f} "
              f"| {r['idle_mib']:.1f} | {r['peak_mib']:.1f} | {r['after_mib']:.1f} | {r['stall_ms']:.0f} |")


if __name__ == "__main__":
    main()
