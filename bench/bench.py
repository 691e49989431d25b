#!/usr/bin/env python3
"""Benchmark of poe2openai against a fake Poe upstream, on loopback only.

    python bench/bench.py            # ~1.5 min; prints markdown tables
    python bench/bench.py --quick    # shorter phases, for a smoke test
    python bench/bench.py --paced    # only the paced-stream CPU per event (~40 s)

Needs nothing beyond the project's runtime requirements (h11, pyyaml). It starts, in their own
process groups, a fake Poe upstream (bench/fake_poe.py) and the proxy (`python poe2openai.py`), drives
them with a raw-asyncio keep-alive load generator running in this process, reads the proxy's CPU time
and RSS from /proc, and kills every process it started on the way out, errors included.

Measured: direct-to-upstream versus through-the-proxy throughput and latency (c=1 and c=32,
non-streaming and 20-chunk streaming), time to first byte, CPU per request, RSS idle and under 500
held streams, the 1000-idle + 200-streams figure, start-up time, and --workers 1 vs 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROXY = os.path.join(ROOT, "poe2openai.py")
FAKE = os.path.join(HERE, "fake_poe.py")
FORWARDER = os.path.join(HERE, "forwarder.py")
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# LiteLLM measured on this same machine (given in the brief), for comparison.
LITELLM = {"cpu_whole": 8.7, "cpu_stream": 27.0, "added_p50": 9.5, "idle_rss": 336.0, "startup": 5000.0}

# ----------------------------------------------------------------------------- processes

_children: list[subprocess.Popen[bytes]] = []


def spawn(cmd: list[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL,
          stderr: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start cmd in a new session (its own process group), remembered for cleanup."""
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            start_new_session=True, cwd=ROOT)
    _children.append(proc)
    return proc


def kill(proc: subprocess.Popen[bytes], grace_s: float = 2.0) -> None:
    """SIGTERM the process group, then SIGKILL it if anything is left after grace_s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # also reaps forked workers left in the group
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    if proc in _children:
        _children.remove(proc)


def kill_all() -> None:
    for proc in list(_children):
        kill(proc, grace_s=1.0)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and k.upper() not in ("POE_BASE_URL", "PORT", "HOST", "WORKERS")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # fields 14 and 15 of the whole line


def run_cpu_s(pid: int) -> float:
    """CPU time of all of a process's threads from /proc/PID/task/*/schedstat (nanoseconds, so
    short phases are measured exactly); falls back to the tick-counted utime+stime."""
    total_ns = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total_ns += int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return cpu_s(pid)
    return total_ns / 1e9 if total_ns else cpu_s(pid)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * PAGE_KB / 1024


def healthz_blocking(port: int, deadline: float) -> dict[str, Any] | None:
    """Poll GET /healthz until a 200 (returns its JSON) or the deadline (returns None)."""
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    piece = s.recv(65536)
                    if not piece:
                        break
                    data += piece
            if data.startswith(b"HTTP/1.1 200"):
                return json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")
        except (ConnectionRefusedError, ConnectionResetError, socket.timeout, ValueError):
            pass
        time.sleep(0.002)
    return None


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    port: int
    pid: int            # the serving process (a worker's pid with --workers > 1)
    command: str
    log_path: str
    started_ms: float


def start_proxy(upstream_port: int, config_dir: str, workers: int | None = None, tag: str = "proxy",
                cached: bool = False) -> Proxy:
    """`python poe2openai.py --host 127.0.0.1 --port P` against the fake; returns once /healthz says 200.
    cached=True imports it as a module instead, bytecode cached under config_dir (never in the repo)."""
    port = free_port()
    env_extra = {"POE_BASE_URL": f"http://{HOST}:{upstream_port}", "RATE_LIMIT_MS": "0",
                 "LOG_LEVEL": "warning", "CONFIG_DIR": config_dir}
    args = [sys.executable, PROXY, "--host", HOST, "--port", str(port)]
    if workers is not None:
        args += ["--workers", str(workers)]
    env = clean_env(**env_extra)
    if cached:
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(PROXY)!r}); import poe2openai; "
                "sys.exit(poe2openai.main())")
        args[1:2] = ["-c", code]
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(config_dir, "pycache")
    log_path = os.path.join(config_dir, f"{tag}-{port}.log")
    with open(log_path, "wb") as log_fh:
        t0 = time.perf_counter()
        proc = spawn(args, env, stderr=log_fh, stdout=log_fh)
    health = healthz_blocking(port, time.perf_counter() + 20)
    started_ms = (time.perf_counter() - t0) * 1000
    if health is None:
        kill(proc)
        with open(log_path, "rb") as fh:
            tail = fh.read()[-2000:].decode("utf-8", "replace")
        raise RuntimeError(f"the proxy did not answer /healthz within 20 s; its log:\n{tail}")
    command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_extra.items()) + " " + \
        " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + [os.path.relpath(PROXY, os.getcwd())] + args[2:])
    return Proxy(proc, port, int(health.get("pid", proc.pid)), command, log_path, started_ms)


def start_forwarder(upstream_port: int) -> Proxy:
    """bench/forwarder.py in front of the fake: the floor of what an asyncio proxy spends per event."""
    proc = spawn([sys.executable, FORWARDER, "--host", HOST, "--port", "0", "--upstream-port", str(upstream_port)],
                 clean_env(), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        kill(proc)
        raise RuntimeError(f"the forwarder did not start: {line!r}")
    return Proxy(proc, int(line.split()[1]), proc.pid, "python bench/forwarder.py", "", 0.0)


def start_fake() -> tuple[subprocess.Popen[bytes], int]:
    proc = spawn([sys.executable, FAKE, "--host", HOST, "--port", "0"], clean_env(), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()   # "PORT n"; the fake prints it once listening
    if not line.startswith("PORT "):
        kill(proc)
        raise RuntimeError(f"fake Poe did not start: {line!r}")
    return proc, int(line.split()[1])


# ----------------------------------------------------------------------------- load generator

def chat_request(model: str, stream: bool) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "stream": stream}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer k\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def poe_request(bot: str) -> bytes:
    """What the proxy itself sends upstream for the chat above (same shape and headers)."""
    body = json.dumps({"version": "1.1", "type": "query",
                       "query": [{"role": "user", "content": "hi", "content_type": "text/markdown",
                                  "attachments": []}],
                       "user_id": "", "conversation_id": "", "message_id": ""}).encode()
    return (b"POST /bot/%s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer k\r\n"
            b"Content-Type: application/json\r\nAccept: text/event-stream\r\nAccept-Encoding: identity\r\n"
            b"Cache-Control: no-store\r\nUser-Agent: bench\r\nContent-Length: %d\r\n\r\n%s"
            % (bot.encode(), len(body), body))


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"


class Failed(Exception):
    pass


class Client(asyncio.Protocol):
    """One keep-alive connection; one request at a time; parses Content-Length and chunked bodies
    incrementally in data_received (no per-chunk coroutine: the client should cost little CPU)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pos = 0
        self.fut: asyncio.Future[tuple[int, float, bool]] | None = None
        self.closed = False
        self.chat = True
        self._reset()

    def _reset(self) -> None:
        self.state = 0           # 0 head, 1 content-length body, 2 chunked body
        self.status = 0
        self.length = 0
        self.first_at = 0.0
        self.saw_last_text = False
        self.saw_end = False
        self.must_close = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(Failed(f"connection lost ({exc})"))

    def request(self, data: bytes, chat: bool = True) -> asyncio.Future[tuple[int, float, bool]]:
        """Future of (status, time of first body byte, body complete and as expected). A chat answer
        must carry the last text chunk and its end marker; anything else only needs a 200."""
        self.chat = chat
        self.fut = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            self.fut.set_exception(Failed("connection closed"))
        else:
            self._reset()
            self.transport.write(data)
        return self.fut

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        if self.state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            self.pos = end + 4
            self.must_close = b"\r\nconnection: close" in head
            if b"\r\ntransfer-encoding: chunked" in head:
                self.state = 2
            else:
                self.length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.startswith(b"content-length:"):
                        self.length = int(line[15:])
                self.state = 1
        if self.state == 1:
            if len(buf) > self.pos and not self.first_at:
                self.first_at = time.perf_counter()
            if len(buf) - self.pos >= self.length:
                body = bytes(buf[self.pos:self.pos + self.length])
                ok = not self.chat or (b"w19." in body and b'"finish_reason":"stop"' in body.replace(b" ", b""))
                self._complete(ok)
            return
        while self.state == 2:
            nl = buf.find(b"\r\n", self.pos)
            if nl < 0:
                return
            size = int(bytes(buf[self.pos:nl]).split(b";")[0], 16)
            end = nl + 2 + size + 2
            if len(buf) < end:
                return
            if size == 0:
                self._complete(not self.chat or (self.saw_last_text and self.saw_end))
                return
            chunk = buf[nl + 2:nl + 2 + size]
            if not self.first_at:
                self.first_at = time.perf_counter()
            if b"w19." in chunk:
                self.saw_last_text = True
            if b"[DONE]" in chunk or b"event: done" in chunk:
                self.saw_end = True
            self.pos = end

    def _complete(self, ok: bool) -> None:
        del self.buf[:]
        self.pos = 0
        self.state = 0
        if self.must_close and self.transport is not None:
            self.transport.close()
            self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_result((self.status, self.first_at, ok and self.status == 200))


async def connect(port: int) -> Client:
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(loop.create_connection(Client, HOST, port), 10)
    return proto


@dataclass
class LoadResult:
    count: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    cpu_ms_per_req: float | None = None
    client_cpu_ms_per_req: float | None = None
    foreign_pct: float = 0.0       # CPU used by processes not ours during the phase, % of one core
    upstream_conns_per_req: float = 0.0   # new connections the fake upstream accepted, per request

    @property
    def rps(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def pct(self, q: float, ttfb: bool = False) -> float:
        data = sorted(self.ttfb_ms if ttfb else self.latencies_ms)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]


async def closed_loop(port: int, request: bytes, concurrency: int, duration_s: float) -> LoadResult:
    """`concurrency` keep-alive connections, each sending its next request when the last one ends,
    for duration_s. Bounded by the deadline, and by a watchdog for a hung request."""
    result = LoadResult()
    deadline = time.perf_counter() + duration_s

    async def one_connection() -> None:
        client: Client | None = None
        reconnects = 0
        while time.perf_counter() < deadline:
            if client is None or client.closed:
                if reconnects > 1000:
                    return
                reconnects += 1
                try:
                    client = await connect(port)
                except (OSError, asyncio.TimeoutError):
                    result.errors += 1
                    await asyncio.sleep(0.01)
                    continue
            t0 = time.perf_counter()
            try:
                _status, first_at, ok = await client.request(request)
            except Failed:
                result.errors += 1
                continue
            t1 = time.perf_counter()
            if not ok:
                result.errors += 1
                continue
            result.count += 1
            result.latencies_ms.append((t1 - t0) * 1000)
            result.ttfb_ms.append((first_at - t0) * 1000)
        if client is not None and client.transport is not None:
            client.transport.close()

    started = time.perf_counter()
    tasks = [asyncio.ensure_future(one_connection()) for _ in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=duration_s + 30)
    for task in pending:
        task.cancel()
        result.errors += 1
    for task in done:
        if task.exception() is not None:
            result.errors += 1
    result.seconds = time.perf_counter() - started
    return result


def speed_check_ms() -> float:
    """A fixed pure-Python loop, best of 3: how fast this (virtual) machine runs right now. Shared hosts
    vary, invisibly from inside; a spread of this figure over a run shows by how much."""
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        x = 0
        for i in range(200_000):
            x += i * i % 7
        best = min(best, time.perf_counter() - t0)
    return best * 1000


_speed: list[float] = []
_fake_port = 0   # the fake upstream's port, once started: its /stats count upstream connections


def fake_stats() -> dict[str, int]:
    with socket.create_connection((HOST, _fake_port), timeout=5) as s:
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: bench\r\n\r\n")
        data = b""
        for _ in range(100):
            data += s.recv(65536)
            _head, sep, body = data.partition(b"\r\n\r\n")
            if sep and body.endswith(b"}"):
                return json.loads(body)
    raise RuntimeError("fake Poe /stats did not answer")


def foreign_cpu() -> dict[int, float]:
    """CPU seconds of every process on the machine that this benchmark did not start (nor is)."""
    ours = {os.getpid()}
    for proc in _children:
        ours.update(family(proc.pid))
    seen: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in ours:
            try:
                seen[int(name)] = cpu_s(int(name))
            except (OSError, IndexError, ValueError):
                pass   # gone meanwhile
    return seen


def family(pid: int) -> list[int]:
    """pid and its children (the workers of --workers N)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [pid] + [int(x) for x in fh.read().split()]
    except OSError:
        return [pid]


async def measure(port: int, request: bytes, concurrency: int, duration_s: float, warm_s: float,
                  pid: int | None, others: list[int]) -> LoadResult:
    """Warm up, then one closed-loop phase. CPU per request of `pid` (the server measured, workers
    included), and the CPU other processes on the machine used meanwhile ('foreign' load: short-lived
    ones that came and went inside the phase are missed)."""
    _speed.append(speed_check_ms())
    await closed_loop(port, request, concurrency, warm_s)
    watched = family(pid) + others if pid else others
    cpu0 = {p: cpu_s(p) for p in watched}
    stats0 = fake_stats()
    own0, foreign0, t0 = time.process_time(), foreign_cpu(), time.perf_counter()
    result = await closed_loop(port, request, concurrency, duration_s)
    stats1 = fake_stats()
    result.upstream_conns_per_req = (stats1["connections"] - stats0["connections"]) / max(1, result.count)
    cpu1 = {p: cpu_s(p) for p in watched}
    own, foreign1, elapsed = time.process_time() - own0, foreign_cpu(), time.perf_counter() - t0
    result.foreign_pct = sum(v - foreign0.get(p, 0.0) for p, v in foreign1.items()) * 100 / elapsed
    if result.count:
        result.client_cpu_ms_per_req = own * 1000 / result.count
        if pid:
            result.cpu_ms_per_req = sum(cpu1[p] - cpu0[p] for p in family(pid) if p in cpu0) * 1000 / result.count
    return result


class RssSampler:
    """Highest RSS of a process, sampled every 20 ms while running."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        for _ in range(100_000):   # bounded; cancelled long before
            self.peak = max(self.peak, rss_mb(self.pid))
            await asyncio.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.peak = rss_mb(self.pid)
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.peak = max(self.peak, rss_mb(self.pid))


async def open_many(port: int, n: int, parallel: int = 100) -> tuple[list[Client], int]:
    sem = asyncio.Semaphore(parallel)
    errors = 0

    async def one() -> Client | None:
        nonlocal errors
        async with sem:
            try:
                return await connect(port)
            except (OSError, asyncio.TimeoutError):
                errors += 1
                return None

    clients = await asyncio.gather(*(one() for _ in range(n)))
    return [c for c in clients if c is not None], errors


async def all_at_once(clients: list[Client], request: bytes, timeout_s: float) -> tuple[int, float]:
    """Send `request` on every client at the same moment; (errors, wall seconds until the last ended)."""
    t0 = time.perf_counter()
    chat = b"/chat/completions" in request.split(b"\r\n", 1)[0]
    futures = [c.request(request, chat) for c in clients]
    done, pending = await asyncio.wait(futures, timeout=timeout_s)
    errors = len(pending)
    for fut in pending:
        fut.cancel()
    for fut in done:
        if fut.exception() is not None or not fut.result()[2]:
            errors += 1
    return errors, time.perf_counter() - t0


def close_all(clients: list[Client]) -> None:
    for c in clients:
        if c.transport is not None:
            c.transport.close()


async def held_streams(proxy: Proxy, n: int) -> dict[str, Any]:
    """n concurrent 2-second streams (20 paced chunks each): peak RSS, errors, CPU per stream."""
    clients, connect_errors = await open_many(proxy.port, n)
    try:
        cpu0, conns0 = cpu_s(proxy.pid), fake_stats()["connections"]
        with RssSampler(proxy.pid) as rss:
            errors, wall = await all_at_once(clients, chat_request("BenchSlow", True), 60)
        cpu, conns = cpu_s(proxy.pid) - cpu0, fake_stats()["connections"] - conns0
    finally:
        close_all(clients)
    return {"peak_mb": rss.peak, "errors": errors + connect_errors + (n - len(clients)) * 0, "wall_s": wall,
            "cpu_ms": cpu * 1000 / n, "n": n, "upstream_conns": conns}


PACED_GAP_MS = 20   # the fake's spacing of a paced stream's events (bench/fake_poe.py)


async def paced_streams(proxy: Proxy, n: int, events: int) -> dict[str, Any]:
    """n concurrent streams of `events` small text events each, 20 ms apart, as a real bot answers:
    the proxy's CPU time (all threads, ns precision) per event delivered, connections opened before."""
    clients, connect_errors = await open_many(proxy.port, n)
    try:
        foreign0, t0 = foreign_cpu(), time.perf_counter()
        cpu0 = run_cpu_s(proxy.pid)
        errors, wall = await all_at_once(clients, chat_request(f"BenchPaced{events}", True),
                                         events * PACED_GAP_MS / 1000 * 3 + 30)
        cpu = run_cpu_s(proxy.pid) - cpu0
        foreign1, elapsed = foreign_cpu(), time.perf_counter() - t0
    finally:
        close_all(clients)
    ok = len(clients) - errors
    foreign = sum(v - foreign0.get(p, 0.0) for p, v in foreign1.items()) * 100 / elapsed
    return {"n": n, "events": events, "errors": errors + connect_errors, "wall_s": wall,
            "ms_per_event": cpu * 1000 / (ok * events) if ok > 0 else float("nan"), "foreign_pct": foreign}


async def paced_best(proxy: Proxy, n: int, events: int, rounds: int, label: str = "through the proxy") -> dict[str, Any]:
    """The lowest CPU per event of `rounds` runs (the least disturbed by the rest of the machine)."""
    runs = [await paced_streams(proxy, n, events) for _ in range(rounds)]
    best = min(runs, key=lambda r: r["ms_per_event"] if r["ms_per_event"] == r["ms_per_event"] else math.inf)
    return dict(best, errors=sum(r["errors"] for r in runs), tries=[r["ms_per_event"] for r in runs], label=label)


async def paced_floor(fake_port: int, events: int, rounds: int) -> list[dict[str, Any]]:
    """The same paced streams through bench/forwarder.py: what any asyncio proxy spends here at least."""
    forwarder = start_forwarder(fake_port)
    try:
        await paced_streams(forwarder, 4, 20)
        return [await paced_best(forwarder, n, events, rounds, "floor: bare asyncio forwarder (bench/forwarder.py)")
                for n in (1, 32)]
    finally:
        kill(forwarder.proc)


def paced_rows(paced: list[dict[str, Any]]) -> list[str]:
    out = ["| paced stream (one small text event every 20 ms) | clients | events each | CPU ms/event "
           "(best) | all tries | wall s | other load % | errors |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in paced:
        out.append(f"| {r['label']} | {r['n']} | {r['events']} | {fmt(r['ms_per_event'], 3)} | "
                   f"{', '.join(fmt(t, 3) for t in r['tries'])} | {r['wall_s']:.1f} | {r['foreign_pct']:.0f} | "
                   f"{r['errors']} |")
    return out


async def run_paced(args: argparse.Namespace, tmp: str) -> str:
    """Only the paced-stream phase: CPU per event at 1 and 32 clients, best of 3."""
    global _fake_port
    fake, _fake_port = start_fake()
    proxy = start_proxy(_fake_port, tmp)
    try:
        events = 100 if args.quick else 250
        rounds = 1 if args.quick else 3
        await paced_streams(proxy, 4, 20)   # warm: pooled upstream connections, code paths
        paced = [await paced_best(proxy, n, events, rounds) for n in (1, 32)]
        kill(proxy.proc)
        paced += await paced_floor(_fake_port, events, rounds)
    finally:
        kill(proxy.proc)
        kill(fake)
    return "\n".join([f"Python {platform.python_version()}; proxy command: `{proxy.command}`", ""]
                     + paced_rows(paced))


async def idle_plus_streams(proxy: Proxy, idle_n: int, stream_n: int) -> dict[str, Any]:
    """The issue's figure: idle_n keep-alive connections (each served one /healthz, then idle) plus
    stream_n concurrent slow streams, all held at once. Afterwards every idle connection must still
    answer a second /healthz."""
    idle: list[Client] = []
    streams: list[Client] = []
    try:
        idle, e1 = await open_many(proxy.port, idle_n)
        e2, _ = await all_at_once(idle, HEALTHZ, 30)
        streams, e3 = await open_many(proxy.port, stream_n)
        idle_ok = sum(1 for c in idle if not c.closed)
        with RssSampler(proxy.pid) as rss:
            e4, wall = await all_at_once(streams, chat_request("BenchSlow", True), 60)
            open_at_peak = sum(1 for c in idle if not c.closed) + len(streams)
        e5, _ = await all_at_once(idle, HEALTHZ, 30)   # the idle ones still work
    finally:
        close_all(idle)
        close_all(streams)
    attempts = idle_n * 2 + stream_n
    errors = e1 + e2 + e3 + e4 + e5 + (idle_n - len(idle)) * 0
    return {"peak_mb": rss.peak, "errors": errors, "attempts": attempts, "wall_s": wall,
            "open": open_at_peak, "idle_ok": idle_ok}


async def distinct_workers(port: int, want: int, tries: int = 200) -> int:
    pids: set[int] = set()
    for _ in range(tries):
        if len(pids) >= want:
            break
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        try:
            pids.add(json.loads(data.split(b"\r\n\r\n", 1)[1])["pid"])
        except (ValueError, KeyError, IndexError):
            pass
    return len(pids)


# ----------------------------------------------------------------------------- the run

def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def verdict(value: float | None, target: float, strict: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    ok = value < target if strict else value <= target
    return "pass" if ok else "**MISS**"


def startup_runs(fake_port: int, tmp: str, n: int, cached: bool = False) -> tuple[list[float], list[float]]:
    """n start-ups: ms from spawn to the first 200 of /healthz, and RSS (MB) 0.3 s later, idle."""
    starts: list[float] = []
    rss: list[float] = []
    for _ in range(n):
        p = start_proxy(fake_port, tmp, tag="startup", cached=cached)
        starts.append(p.started_ms)
        time.sleep(0.3)
        rss.append(rss_mb(p.pid))
        kill(p.proc)
    return starts, rss


def estimator_mb_per_s() -> float:
    """Throughput of the built-in token estimator on the committed corpus (mixed languages, code, JSON),
    in the benchmark process itself: best of 3 passes over ~1 MB."""
    import json as _json
    import importlib.util
    spec = importlib.util.spec_from_file_location("poe2openai_bench_copy", PROXY)
    module = importlib.util.module_from_spec(spec)   # type: ignore[arg-type]
    sys.modules[spec.name] = module                   # type: ignore[union-attr]  # dataclasses look it up
    spec.loader.exec_module(module)                   # type: ignore[union-attr]
    corpus_path = os.path.join(os.path.dirname(PROXY), "tokens", "corpus.jsonl")
    with open(corpus_path, encoding="utf-8") as fh:
        texts = [_json.loads(line)["text"] for line in fh if line.strip()]
    size = sum(len(t.encode()) for t in texts)
    rounds = max(1, (1 << 20) // size)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(rounds):
            for text in texts:
                module.estimate_tokens(text)
        best = min(best, time.perf_counter() - t0)
    return size * rounds / best / 1e6


def floor_rss_mb() -> float:
    """RSS of a bare asyncio server on this Python (asyncio imports ssl): the floor for any asyncio proxy."""
    code = ("import asyncio\nasync def m():\n    s = await asyncio.start_server(lambda r, w: None, '127.0.0.1', 0)\n"
            "    await asyncio.sleep(0.3)\n    print(open('/proc/self/statm').read().split()[1])\nasyncio.run(m())")
    proc = spawn([sys.executable, "-c", code], clean_env(), stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        kill(proc)
    return int(out.split()[0]) * PAGE_KB / 1024


QUIET_PCT = 10.0        # foreign CPU (% of one core) under which a phase counts as undisturbed
RETRY_BUDGET_S = 110.0  # no more re-runs of disturbed phases once the run is this old


def better(a: LoadResult | None, b: LoadResult) -> LoadResult:
    """Of two runs of the same phase: the undisturbed one with the higher req/s, else the less disturbed."""
    if a is None:
        return b
    def key(r: LoadResult) -> tuple[float, float]:
        return (max(r.foreign_pct, QUIET_PCT), -r.rps)
    return a if key(a) <= key(b) else b


async def run(args: argparse.Namespace, tmp: str) -> str:
    t_start = time.perf_counter()
    c1_s, c32_s, warm_s, rounds = (1.0, 1.0, 0.2, 1) if args.quick else (2.5, 3.0, 0.3, 3)
    out: list[str] = []
    global _fake_port
    fake, fake_port = start_fake()
    _fake_port = fake_port
    proxy = start_proxy(fake_port, tmp)
    idle_main_mb = rss_mb(proxy.pid)

    # 1-5: direct versus proxy, c=1 and c=32, in `rounds` interleaved rounds; the best round is kept
    # (the highest req/s: the least disturbed by anything else running on the machine).
    direct = poe_request("Bench")
    whole = chat_request("Bench", False)
    streamed = chat_request("Bench", True)
    plan = []
    for conc, dur in ((1, c1_s), (32, c32_s)):
        plan += [("direct (Poe SSE, 20 chunks)", "stream", conc, dur, fake_port, direct, fake.pid, [proxy.pid]),
                 ("proxy", "non-stream", conc, dur, proxy.port, whole, proxy.pid, [fake.pid]),
                 ("proxy", "stream", conc, dur, proxy.port, streamed, proxy.pid, [fake.pid])]
    best: dict[int, LoadResult] = {}
    for _ in range(rounds):
        for i, (_p, _m, conc, dur, port, req, pid, others) in enumerate(plan):
            best[i] = better(best.get(i), await measure(port, req, conc, dur, warm_s, pid, others))
    for i, (_p, _m, conc, dur, port, req, pid, others) in enumerate(plan):   # disturbed: try again, bounded
        for _ in range(2):
            if best[i].foreign_pct <= QUIET_PCT or time.perf_counter() - t_start > RETRY_BUDGET_S:
                break
            best[i] = better(best[i], await measure(port, req, conc, dur, warm_s, pid, others))
    loads = [(p, m, c, best[i]) for i, (p, m, c, *_rest) in enumerate(plan)]

    def find(path: str, mode: str, conc: int) -> LoadResult:
        return next(r for p, m, c, r in loads if p.startswith(path) and m == mode and c == conc)

    d1, w1, s1 = find("direct", "stream", 1), find("proxy", "non-stream", 1), find("proxy", "stream", 1)
    w32, s32 = find("proxy", "non-stream", 32), find("proxy", "stream", 32)

    # 6: RSS while holding 500 slow streams; CPU per paced stream (each chunk arrives on its own).
    first = await held_streams(proxy, 500)
    again = await held_streams(proxy, 500)    # CPU: the lower of two tries (one is a single shot)
    held = dict(min(first, again, key=lambda h: h["cpu_ms"]), peak_mb=max(first["peak_mb"], again["peak_mb"]),
                errors=first["errors"] + again["errors"], wall_s=max(first["wall_s"], again["wall_s"]))
    # 6b: CPU per event of paced streams (one small event every 20 ms), at 1 and 32 clients.
    await paced_streams(proxy, 4, 20)
    paced = [await paced_best(proxy, n, 60 if args.quick else 150, rounds) for n in (1, 32)]
    kill(proxy.proc)
    paced += await paced_floor(fake_port, 60 if args.quick else 150, rounds)

    # 6, the issue's figure, on a fresh proxy: 1000 idle keep-alive connections + 200 streams at once.
    fresh = start_proxy(fake_port, tmp, tag="issue")
    issue = await idle_plus_streams(fresh, 1000, 200)
    kill(fresh.proc)

    # 7: start-up to the first 200 from /healthz, and idle RSS right after; median of 5. For reference
    # the same with poe2openai imported from cached bytecode instead of compiled as a script.
    starts, idle_rss = startup_runs(fake_port, tmp, 5)
    startup_runs(fake_port, tmp, 1, cached=True)         # writes the .pyc (into tmp, not the repo)
    starts_pyc, idle_rss_pyc = startup_runs(fake_port, tmp, 5, cached=True)
    floor_mb = floor_rss_mb()
    estimator_speed = estimator_mb_per_s()

    # 8: --workers 1 versus 2, non-streaming at c=32 (the load generator shares the 2 cores).
    workers: dict[int, LoadResult] = {}
    procs = {}
    try:
        for n in (1, 2):
            procs[n] = start_proxy(fake_port, tmp, workers=n, tag=f"workers{n}")
            seen = await distinct_workers(procs[n].port, n)
            if seen < n:
                raise RuntimeError(f"--workers {n}: only {seen} distinct worker pids answered")
        for _ in range(rounds):
            for n in (1, 2):
                workers[n] = better(workers.get(n), await measure(procs[n].port, whole, 32, c32_s, warm_s,
                                                                  procs[n].proc.pid, [fake.pid]))
        for n in (1, 2):
            for _ in range(2):
                if workers[n].foreign_pct <= QUIET_PCT or time.perf_counter() - t_start > RETRY_BUDGET_S:
                    break
                workers[n] = better(workers[n], await measure(procs[n].port, whole, 32, c32_s, warm_s,
                                                              procs[n].proc.pid, [fake.pid]))
    finally:
        for p in procs.values():
            kill(p.proc)
    kill(fake)

    # ------------------------------------------------------------------ report
    import h11
    out.append(f"Python {platform.python_version()} ({platform.python_implementation()}), h11 {h11.__version__}, "
               f"{os.cpu_count()} CPUs, Linux {platform.release()}. Load generator, fake Poe and proxy share the "
               f"machine; each load row is the best of {rounds} interleaved round(s) (least disturbed, then fastest), "
               f"disturbed ones re-run up to twice. Speed check (fixed Python loop, before each load phase): "
               f"{min(_speed):.1f} to {max(_speed):.1f} ms (a wide spread means a noisy host).\n")
    out.append(f"Proxy command: `{proxy.command}`  ")
    out.append(f"Bench command: `python {' '.join(shlex.quote(a) for a in [os.path.relpath(os.path.abspath(__file__), os.getcwd())] + sys.argv[1:])}`"
               " (fake upstream: `python bench/fake_poe.py --port 0`)\n")

    out.append("| path | mode | conc | req/s | p50 ms | p99 ms | TTFB p50 ms | server CPU ms/req | "
               "load-gen CPU ms/req | new upstream conns/req | other load % | errors |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows_load = [(p, m, c, r, "fake" if p.startswith("direct") else "proxy") for p, m, c, r in loads]
    rows_load += [(f"proxy --workers {n}", "non-stream", 32, r, f"{n} worker{'s' if n > 1 else ''}")
                  for n, r in workers.items()]
    for path, mode, conc, r, who in rows_load:
        out.append(f"| {path} | {mode} | {conc} | {r.rps:.0f} | {fmt(r.pct(0.5))} | {fmt(r.pct(0.99))} | "
                   f"{fmt(r.pct(0.5, True)) if mode == 'stream' else '-'} | {fmt(r.cpu_ms_per_req, 3)} ({who}) | "
                   f"{fmt(r.client_cpu_ms_per_req, 3)} | {r.upstream_conns_per_req:.2f} | {r.foreign_pct:.0f} | "
                   f"{r.errors} |")
    out.append("")
    out += paced_rows(paced)
    out.append("")

    added_p50 = w1.pct(0.5) - d1.pct(0.5)
    added_ttfb = s1.pct(0.5, True) - d1.pct(0.5, True)
    scale = workers[2].rps / workers[1].rps if workers[1].rps else float("nan")
    idle_mb = statistics.median(idle_rss)
    startup_ms = statistics.median(starts)
    rows = [
        ("Added p50 latency, 1 client, non-stream (proxy p50 - direct p50)", added_p50, "ms", "<= 1", 1.0,
         LITELLM["added_p50"]),
        ("Added TTFB p50, 1 client, stream (proxy TTFB - direct TTFB)", added_ttfb, "ms", "-", None, None),
        ("Proxy CPU per request, non-stream, c=1", w1.cpu_ms_per_req, "ms", "<= 1", 1.0, LITELLM["cpu_whole"]),
        ("Proxy CPU per request, non-stream, c=32", w32.cpu_ms_per_req, "ms", "<= 1", 1.0, LITELLM["cpu_whole"]),
        ("Proxy CPU per request, 20-chunk stream, fast upstream, c=1", s1.cpu_ms_per_req, "ms", "<= 3", 3.0,
         LITELLM["cpu_stream"]),
        ("Proxy CPU per request, 20-chunk stream, fast upstream, c=32", s32.cpu_ms_per_req, "ms", "<= 3", 3.0,
         LITELLM["cpu_stream"]),
        ((f"Proxy CPU per request, 20-chunk stream paced over 2 s, {held['n']} at once (best of 2; includes "
          f"{held['n']} client connections accepted, {held['upstream_conns']} upstream opened)"),
         held["cpu_ms"], "ms", "<= 3", 3.0, LITELLM["cpu_stream"]),
        ("RSS idle after start, `python -m poe2openai` from byte-code as in the Docker image (median of 5)",
         statistics.median(idle_rss_pyc), "MB", "<= 25", 25.0, LITELLM["idle_rss"]),
        ("RSS idle after start, `python poe2openai.py` compiling the source (median of 5)", idle_mb, "MB", "-",
         None, None),
        ((f"RSS peak holding {held['n']} concurrent 2 s streams (twice; all done within {held['wall_s']:.2f} s, "
          f"{held['errors']} errors)"), held["peak_mb"], "MB", "-", None, None),
        (f"RSS peak, {issue['open'] - 200} idle keep-alive connections + 200 streams held at once",
         issue["peak_mb"], "MB", "< 100", 99.999, None),
        (f"Errors in that test (of {issue['attempts']} requests: 200 streams, 2 per idle connection)",
         float(issue["errors"]), "", "0", 0.0, None),
        ("Start-up: spawn to first 200 from /healthz, `python poe2openai.py` (median of 5)", startup_ms, "ms",
         "<= 300", 300.0, LITELLM["startup"]),
        ("Start-up: the same from byte-code, `python -m poe2openai` (median of 5)", statistics.median(starts_pyc),
         "ms", "<= 300", 300.0, LITELLM["startup"]),
        ("--workers 2 / --workers 1 req/s, non-stream c=32", scale, "x", "-", None, None),
        ("Token estimator throughput on tokens/corpus.jsonl (mixed text, code, CJK, JSON)", estimator_speed, "MB/s",
         ">= 5", 5.0, None),
    ]
    out.append("| figure | poe2openai | target | status | LiteLLM (same machine) |")
    out.append("|---|---:|---:|---|---:|")
    for name, value, unit, target_text, target, lite in rows:
        shown = f"{fmt(value, 0 if unit == '' else 2)} {unit}".strip()
        if target is None:
            status = "-"
        elif target_text.startswith(">="):   # higher is better
            status = "pass" if value is not None and value >= target else "**MISS**"
        else:
            status = verdict(value, target)
        tgt = f"{target_text} {unit}".strip() if target is not None else "-"
        out.append(f"| {name} | {shown} | {tgt} | {status} | "
                   f"{fmt(lite, 1) + ' ' + unit if lite is not None else '-'} |")
    out.append("")
    out.append("Reference (not targets): idle RSS of a bare asyncio server on this Python "
               f"{floor_mb:.1f} MB; poe2openai imported from cached bytecode instead of run as a script "
               f"(`python -c 'import poe2openai, sys; sys.exit(poe2openai.main())'`): idle RSS "
               f"{statistics.median(idle_rss_pyc):.1f} MB, start-up {statistics.median(starts_pyc):.0f} ms. "
               f"Main proxy RSS right after start {idle_main_mb:.1f} MB; start-ups "
               f"{', '.join(f'{s:.0f}' for s in starts)} ms.  ")
    out.append("'direct' sends the Poe-protocol request straight to the fake (the very answer both proxy modes "
               "consume); TTFB = first body chunk. CPU from /proc/PID/stat (utime+stime, "
               f"{CLK_TCK} ticks/s) over the measured phase only. 'other load' = CPU used by processes not "
               "started by this benchmark during the phase (% of one core): above ~10 the row is disturbed.")
    return "\n".join(out)


def main() -> int:
    global PROXY
    parser = argparse.ArgumentParser(description="poe2openai benchmark")
    parser.add_argument("--quick", action="store_true", help="short phases (smoke test)")
    parser.add_argument("--paced", action="store_true",
                        help="only the paced-stream phase: proxy CPU per event at 1 and 32 clients")
    parser.add_argument("--proxy", default=PROXY, metavar="PATH",
                        help="the poe2openai.py to measure (default: the one beside bench/), e.g. a copy of "
                             "another version, with its adminpage.html beside it")
    args = parser.parse_args()
    PROXY = os.path.abspath(args.proxy)
    if not os.path.isfile(PROXY):
        parser.error(f"no such file: {PROXY}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ValueError, OSError):
        pass

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="poe2openai-bench-") as tmp:
            try:
                report = asyncio.run(run_paced(args, tmp) if args.paced else run(args, tmp))
            finally:
                kill_all()
    finally:
        kill_all()
    print(report)
    print(f"\n(bench took {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
