"""Tests for poe2openai, in sections that follow the module's own: the pure pieces tested directly,
the rest end to end with the official openai and anthropic SDKs against the proxy and a hand-written
fake Poe upstream that controls the raw bytes (line ends, chunk splits, disconnects, statuses).

Run: python -m pytest -q -n 2 test_poe2openai.py   (pytest-xdist; every test is safe on either worker)
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import email.policy
import gc
import hashlib
import heapq
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Callable, Iterator

import warnings

# The imports below make a few hundred thousand objects (the SDKs' pydantic models, hypothesis, fastapi)
# that live as long as the run. Collected while they grow, they are walked again and again (seconds per
# pytest-xdist worker); frozen once made, never: see gc.freeze() below.
gc.disable()

import h11  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
warnings.filterwarnings("ignore", category=DeprecationWarning, module="pydantic")   # fastapi_poe's own
warnings.filterwarnings("ignore", message=".*class-based `config`.*")
# The anthropic SDK warns about dated model ids, which Claude Code sends and these tests replay.
pytestmark = pytest.mark.filterwarnings("ignore:The model:DeprecationWarning")
from fastapi_poe.types import QueryRequest  # noqa: E402
from hypothesis import example, given, settings as hsettings, strategies as st  # noqa: E402

import poe2openai as p2o  # noqa: E402

try:
    import anthropic  # noqa: E402,F401 - the tests import it where they need it; here for gc.freeze
except ImportError:   # pragma: no cover - the tests that need it skip
    pass

gc.freeze()
gc.enable()

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"   # request bodies as real clients send them
KEY = "poe-test-key-0123456789abcdef"


###############################################################################
# The fake Poe upstream
###############################################################################

def sse(event: str, data: Any, eol: str = "\n") -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"event: {event}{eol}data: {body}{eol}{eol}".encode()


def text_events(*texts: str, eol: str = "\n", done: bool = True) -> list[bytes]:
    steps = [sse("meta", {"content_type": "text/markdown", "suggested_replies": False}, eol)]
    steps += [sse("text", {"text": t}, eol) for t in texts]
    if done:
        steps.append(sse("done", {}, eol))
    return steps


@dataclass
class Script:
    """What the fake Poe does for one bot: a status and a list of steps. A bytes step is one HTTP
    chunk written on its own; a float step sleeps; DISCONNECT drops the connection mid-body."""
    steps: list[Any] = field(default_factory=list)
    status: int = 200
    content_type: str = "text/event-stream"
    body: bytes = b""      # for non-200 answers
    headers: list[tuple[str, str]] = field(default_factory=list)   # extra response headers
    hang_up: bool = False  # read the whole query, then drop the connection without answering


DISCONNECT = "DISCONNECT"
# The pause after each chunk the fake sends. Any timer does: the loop runs the proxy's read of the socket
# before a timer's callback, so the next chunk is written after it (and the loop's timers count whole
# milliseconds: this is one).
CHUNK_GAP_S = 0.0005
UPLOAD_PATH = "/poe_api/file_upload_3RD_PARTY_POST"
FILES_PATH = "/files/"   # where the fake serves the files its media bots make (Poe's attachment URLs)


class FakePoe:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.models: Any = {"object": "list", "data": [
            {"id": "GPT-4o", "object": "model", "created": 1715644800000, "owned_by": "OpenAI"},
            {"id": "Claude-Sonnet-4.5", "object": "model", "created": 1727000000000, "owned_by": "Anthropic"}]}
        self.models_status = 200
        self.models_delay_s = 0.0   # how long /v1/models takes to answer
        self.models_served = 0      # model lists answered in full
        self.when_native: dict[str, Script] = {}   # what a bot does instead when a query carries native tools
        self.requests: list[dict[str, Any]] = []
        self.invalid_queries: list[str] = []
        self.connections = 0
        self.closed_midway = asyncio.Event
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.disconnects: list[float] = []   # when a client dropped us while we streamed
        self.uploads: list[dict[str, Any]] = []   # parsed multipart uploads
        self.upload_status = 200
        self.upload_delay_s = 0.0
        self.upload_bad_keys: set[str] = set()
        self.close_when_done = False   # close each connection right after a model list, as an idle timeout would
        self.files: dict[str, tuple[str, bytes]] = {}   # name -> (content type, bytes), served at FILES_PATH
        self.models_headers: list[tuple[str, str]] = []   # extra headers of the model list's answer
        self.upload_headers: list[tuple[str, str]] = []   # and of an upload's
        self.balance: Any = 1500                          # /usage/current_balance
        self.points: list[dict[str, Any]] = []            # /usage/points_history, newest first
        self.usage_status = 200                           # of both usage endpoints
        self.usage_args: list[dict[str, str]] = []        # the query of each points history request

    def on(self, bot: str, steps: list[Any] | None = None, **kw: Any) -> None:
        self.scripts[bot] = Script(steps=list(steps or []), **kw)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(conn, reader)
                if request is None:
                    return
                watch = asyncio.ensure_future(reader.read(65536))   # notices when the proxy hangs up
                try:
                    keep = await self._answer(conn, writer, request, body, watch)
                finally:
                    watch.cancel()
                    await asyncio.wait([watch])
                    if not watch.cancelled() and watch.exception() is None and watch.result():
                        conn.receive_data(watch.result())
                if not keep or conn.our_state is h11.MUST_CLOSE or self.close_when_done:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            writer.close()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[Any, bytes]:
        request = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:
                return None, b""

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request,
                      body: bytes, watch: "asyncio.Future[bytes]") -> bool:
        path = urllib.parse.urlsplit(request.target.decode()).path   # absolute-form via an HTTP proxy too
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        record = {"method": request.method.decode(), "path": path, "headers": headers, "body": body}
        self.requests.append(record)
        if path == "/v1/models":
            await asyncio.sleep(self.models_delay_s)
            payload = json.dumps(self.models).encode()
            await self._send(conn, writer, h11.Response(status_code=self.models_status, headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(payload))), *self.models_headers]),
                h11.Data(data=payload), h11.EndOfMessage())
            self.models_served += 1
            if self.close_when_done:
                writer.write_eof()   # the FIN leaves right behind the answer, before anything else runs
            return True
        if path.startswith("/usage/"):
            return await self._usage(conn, writer, path, request.target.decode())
        if path == UPLOAD_PATH:
            return await self._upload(conn, writer, headers, body)
        if path.startswith(FILES_PATH):
            return await self._file(conn, writer, urllib.parse.unquote(path[len(FILES_PATH):]))
        bot = path.rsplit("/", 1)[-1]
        query = json.loads(body)
        record["query"] = query
        try:
            QueryRequest.model_validate(query)   # every query must parse as fastapi_poe's QueryRequest
        except Exception as exc:  # noqa: BLE001 - recorded and asserted by the tests
            self.invalid_queries.append(f"{bot}: {exc}")
        script = self.scripts.get(bot) or Script(text_events(f"Hello from {bot}"))
        if query.get("tools") and bot in self.when_native:
            script = self.when_native[bot]
        if script.hang_up:
            writer.transport.abort()
            return False
        if script.status != 200:
            await self._send(conn, writer, h11.Response(status_code=script.status, headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(script.body))), *script.headers]),
                h11.Data(data=script.body), h11.EndOfMessage())
            return True
        await self._send(conn, writer, h11.Response(status_code=200, headers=[
            ("Content-Type", script.content_type), ("Transfer-Encoding", "chunked"), *script.headers]))
        for step in script.steps:
            if step == DISCONNECT:
                writer.transport.abort()
                return False
            if isinstance(step, (int, float)):
                await asyncio.wait([watch], timeout=step)
                if watch.done() and (watch.exception() is not None or not watch.result()):
                    self.disconnects.append(time.monotonic())   # the proxy closed on us while we were silent
                    return False
                continue
            try:
                await self._send(conn, writer, h11.Data(data=step))
            except ConnectionError:
                self.disconnects.append(time.monotonic())
                return False
            await asyncio.sleep(CHUNK_GAP_S)   # let each chunk arrive in a read of its own
        await self._send(conn, writer, h11.EndOfMessage())
        return True

    async def _upload(self, conn: h11.Connection, writer: asyncio.StreamWriter, headers: dict[str, str],
                      body: bytes) -> bool:
        # Parse the multipart body with the standard library's email parser: our encoder must agree with it.
        message = BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + headers["content-type"].encode() + b"\r\n\r\n" + body)
        assert message.is_multipart(), headers["content-type"]
        parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        record: dict[str, Any] = {"authorization": headers.get("authorization")}
        if "file" in parts:
            part = parts["file"]
            record.update(data=part.get_payload(decode=True), filename=part.get_filename(),
                          content_type=part.get_content_type())
        if "download_url" in parts:
            record["download_url"] = parts["download_url"].get_payload(decode=True).decode()
        self.uploads.append(record)
        await asyncio.sleep(self.upload_delay_s)
        if self.upload_status != 200 or headers.get("authorization", "")[7:] in self.upload_bad_keys:
            payload = b'{"error": "upload rejected"}'
            status = self.upload_status if self.upload_status != 200 else 401
        else:
            token = hashlib.sha256(record.get("data") or record.get("download_url", "").encode()).hexdigest()[:16]
            payload = json.dumps({"attachment_url": f"https://pfst.cf2.poecdn.net/base/image/{token}",
                                  "mime_type": record.get("content_type", "image/jpeg"),
                                  "size": len(record.get("data") or b"")}).encode()
            status = 200
        await self._send(conn, writer, h11.Response(status_code=status, headers=[
            ("Content-Type", "application/json"), ("Content-Length", str(len(payload))), *self.upload_headers]),
            h11.Data(data=payload), h11.EndOfMessage())
        return True

    async def _usage(self, conn: h11.Connection, writer: asyncio.StreamWriter, path: str, target: str) -> bool:
        """Poe's usage API: the balance, and the points history in pages of `limit` after `starting_after`."""
        status, payload = self.usage_status, {"error": {"message": "Invalid API key", "type": "authentication_error"}}
        if status == 200 and path == "/usage/current_balance":
            payload = {"current_point_balance": self.balance}
        elif status == 200 and path == "/usage/points_history":
            args = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(target).query))
            self.usage_args.append(args)
            ids = [e["query_id"] for e in self.points]
            start = ids.index(args["starting_after"]) + 1 if "starting_after" in args else 0
            page = self.points[start:start + min(100, int(args.get("limit", 100)))]
            payload = {"data": page, "has_more": start + len(page) < len(self.points), "length": len(page)}
        elif status == 200:
            status = 404
        data = json.dumps(payload).encode()
        await self._send(conn, writer, h11.Response(status_code=status, headers=[
            ("Content-Type", "application/json"), ("Content-Length", str(len(data)))]),
            h11.Data(data=data), h11.EndOfMessage())
        return True

    def file_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}{FILES_PATH}{urllib.parse.quote(name)}"

    async def _file(self, conn: h11.Connection, writer: asyncio.StreamWriter, name: str) -> bool:
        if name not in self.files:
            await self._send(conn, writer, h11.Response(status_code=404, headers=[("Content-Length", "9")]),
                             h11.Data(data=b"not found"), h11.EndOfMessage())
            return True
        content_type, data = self.files[name]
        await self._send(conn, writer, h11.Response(status_code=200, headers=[
            ("Content-Type", content_type), ("Content-Length", str(len(data)))]))
        half = len(data) // 2   # two pieces, so that a relay must pass on more than one read
        for piece in (data[:half], data[half:]):
            await self._send(conn, writer, h11.Data(data=piece))
            await asyncio.sleep(CHUNK_GAP_S)
        await self._send(conn, writer, h11.EndOfMessage())
        return True

    @staticmethod
    async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, *events: Any) -> None:
        for event in events:
            writer.write(conn.send(event))
        await writer.drain()


###############################################################################
# The harness: proxy + fake Poe in a background event loop, the SDK in the test thread
###############################################################################

# One TLS context for every client the tests make: each SDK or httpx client would otherwise build its
# own, reading the whole CA bundle (25 ms), hundreds of times a run. (They speak plain HTTP to the
# proxy here; a test of TLS brings its own context.)
CLIENT_TLS = ssl.create_default_context()
_SDK_HTTP_CLIENTS: dict[str, type] = {}


def sdk_http_client(sdk: Any) -> Any:
    """The HTTP client an SDK (openai, anthropic) makes for itself, with its defaults, on CLIENT_TLS;
    closed when dropped, as the SDK's own is."""
    cls = _SDK_HTTP_CLIENTS.get(sdk.__name__)
    if cls is None:
        class ClosedWhenDropped(sdk.DefaultHttpxClient):   # type: ignore[name-defined,misc]
            def __del__(self) -> None:
                try:
                    self.close()
                except Exception:  # noqa: BLE001 - as the SDK's: at interpreter exit anything goes
                    pass
        cls = _SDK_HTTP_CLIENTS[sdk.__name__] = ClosedWhenDropped
    return cls(verify=CLIENT_TLS)


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.run(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Proxy:
    def __init__(self, lt: LoopThread, settings: p2o.Settings, ssl_context: ssl.SSLContext | None = None) -> None:
        self.lt = lt
        self.settings = settings
        self._port: list[int] = []
        self._stop: asyncio.Event | None = None
        started = threading.Event()

        async def run() -> None:
            self._stop = asyncio.Event()
            await p2o.serve(settings, ready=lambda port: (self._port.append(port), started.set()),
                            stop=self._stop, ssl_context=ssl_context, shutdown_grace_s=2)

        self.future = asyncio.run_coroutine_threadsafe(run(), lt.loop)
        if not started.wait(10):
            raise RuntimeError(f"proxy did not start: {self.future}")
        self.port = self._port[0]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", KEY), max_retries=0,
                             timeout=kw.pop("timeout", 20), http_client=sdk_http_client(openai), **kw)

    def stop(self) -> None:
        assert self._stop is not None
        self.lt.loop.call_soon_threadsafe(self._stop.set)
        self.future.result(10)


@pytest.fixture(scope="module")
def lt() -> Any:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.stop()


@pytest.fixture()
def poe(lt: LoopThread) -> Any:
    fake = FakePoe()
    lt.run(fake.start())
    yield fake
    assert fake.server is not None
    lt.loop.call_soon_threadsafe(fake.server.close)
    assert not fake.invalid_queries, fake.invalid_queries


def make_settings(poe: FakePoe, tmp_path: Path, **kw: Any) -> p2o.Settings:
    base = dict(host="127.0.0.1", port=0, config_dir=str(tmp_path), rate_limit_ms=0,
                poe_base_url=f"http://127.0.0.1:{poe.port}", read_timeout_seconds=5.0,
                poe_file_upload_url=f"http://127.0.0.1:{poe.port}{UPLOAD_PATH}",
                stream_hold_seconds=2.0, sse_keepalive_seconds=5.0, connect_timeout_seconds=2.0)
    base.update(kw)
    return p2o.Settings(**base)


@pytest.fixture()
def start(lt: LoopThread, poe: FakePoe, tmp_path: Path) -> Any:
    proxies: list[Proxy] = []

    def _start(ssl_context: ssl.SSLContext | None = None, **kw: Any) -> Proxy:
        proxy = Proxy(lt, make_settings(poe, tmp_path, **kw), ssl_context)
        proxies.append(proxy)
        return proxy

    yield _start
    for proxy in proxies:
        proxy.stop()


@pytest.fixture()
def proxy(start: Callable[..., Proxy]) -> Proxy:
    return start()


@pytest.fixture()
def fast_reload(monkeypatch: pytest.MonkeyPatch) -> float:
    """Proxies started after this look at models.yaml every 50 ms instead of every 2 s, so a test
    waits for the check it needs instead of for the interval."""
    monkeypatch.setattr(p2o, "MODELS_YAML_CHECK_S", 0.05)
    return 0.05


def raw_sse(proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """POST a chat request and return the status and the raw SSE lines (data and comments)."""
    with httpx.Client(timeout=20, verify=CLIENT_TLS) as http:
        with http.stream("POST", proxy.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}", **(headers or {})}) as r:
            text = "".join(r.iter_text())
    return r.status_code, [line for line in text.split("\n") if line]


def data_chunks(lines: list[str]) -> list[Any]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def last_query(poe: FakePoe) -> dict[str, Any]:
    return [r for r in poe.requests if r["path"].startswith("/bot/")][-1]


def both_ways(proxy: Proxy, model: str) -> tuple[str, str]:
    """The answer to one question asked without and with streaming: (content, streamed content)."""
    client = proxy.client()
    messages = [{"role": "user", "content": "x"}]
    whole = client.chat.completions.create(model=model, messages=messages).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, stream=True, messages=messages) if c.choices)
    return whole or "", streamed


def anthropic_client(proxy: Proxy, **kw: Any) -> Any:
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=proxy.url, api_key=kw.pop("api_key", KEY), max_retries=0, timeout=20,
                               http_client=sdk_http_client(anthropic), **kw)


def ask_failing(proxy: Proxy, dialect: str, model: str, stream: bool) -> Any:
    """The SDK exception a client gets asking `model` in one dialect, whole or streamed."""
    messages = [{"role": "user", "content": "x"}]
    errors = (openai.APIStatusError,)
    if dialect == "messages":
        errors = (pytest.importorskip("anthropic").APIStatusError,)
    with pytest.raises(errors) as info:
        if dialect == "chat":
            result: Any = proxy.client().chat.completions.create(model=model, messages=messages, stream=stream)
        elif dialect == "responses":
            result = proxy.client().responses.create(model=model, input="x", stream=stream)
        else:
            result = anthropic_client(proxy).messages.create(model=model, max_tokens=10, messages=messages,
                                                             stream=stream)
        if stream:
            list(result)
    return info.value


def raw_exchange(proxy: Proxy, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except socket.timeout:
            pass
    return out


def native_chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return sse("json", {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def xml_reply_steps(reply: str, sizes: int = 7) -> list[bytes]:
    return [sse("text", {"text": reply[i:i + sizes]}) for i in range(0, len(reply), sizes)] + [sse("done", {})]


ADMIN = ("admin", "123456")


ALICE_KEY = "team-alice-0123456789abcdef"
BOB_KEY = "team-bob-fedcba9876543210zz"
SERVER_KEY = "poe-server-key-9876543210abcdef"
CHAT = {"model": "GPT-4o", "messages": [{"role": "user", "content": "x"}]}


class ProxyProcess:
    """`python poe2openai.py ARGS` in a session of its own (so a test can Ctrl-C its whole process group,
    as a terminal does), with stderr collected line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in {n for n, _, _ in p2o.SETTINGS_SPEC}}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "poe2openai.py"), "--host", "127.0.0.1",
                                      "--port", str(self.port), *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()
        deadline = time.time() + 10
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1, verify=CLIENT_TLS)
                return
            except httpx.HTTPError:
                assert time.time() < deadline and self.proc.poll() is None, self.log()
                time.sleep(0.05)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, text: str, timeout: float = 5) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)


def wait_until(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.time() + timeout
    while not check() and time.time() < deadline:
        time.sleep(0.02)
    return check()


###############################################################################
# Settings and the command line
###############################################################################

def test_settings_defaults_match_the_reference() -> None:
    s = p2o.Settings.from_env({}, [])
    assert (s.host, s.port, s.admin_username, s.admin_password) == ("0.0.0.0", 8080, "admin", "123456")
    assert (s.max_request_size, s.log_level, s.config_dir, s.rate_limit_ms) == (64 * 1024 * 1024, "info", "./", 100)
    assert (s.url_cache_ttl_seconds, s.url_cache_size_mb) == (259200, 100)
    assert s.poe_base_url == "https://api.poe.com"
    assert s.poe_file_upload_url == "https://www.quora.com/poe_api/file_upload_3RD_PARTY_POST"


def test_settings_env_and_flags() -> None:
    s = p2o.Settings.from_env({"PORT": "9000", "LOG_LEVEL": "info,hyper=warn", "POE_BASE_URL": "http://x:1/",
                               "RATE_LIMIT_MS": "0"}, ["--port", "9100"])
    assert s.port == 9100 and s.log_level == "info" and s.poe_base_url == "http://x:1" and s.rate_limit_ms == 0


def main_before_serving(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                        argv: list[str]) -> tuple[int, list[str]]:
    """What `python poe2openai.py ARGV` exits with, and the lines it prints on stderr, when it stops before
    serving: its main() run here, as a process each would cost a third of a second (the script as a
    process: test_access_keys_need_the_servers_poe_key, test_version_flag, test_help_lists_every_setting).
    Going on to serve fails the test instead of listening."""
    def went_on(level: str) -> None:
        raise AssertionError("main() accepted the settings and went on to serve")
    monkeypatch.setattr(p2o, "configure_logging", went_on)
    capsys.readouterr()
    status = p2o.main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    return status, captured.err.strip().splitlines()


@pytest.mark.parametrize("name, value", [("PORT", "abc"), ("PORT", "70000"), ("MAX_REQUEST_SIZE", "-1"),
                                         ("LOG_LEVEL", "loud"), ("RATE_LIMIT_MS", "1.5"),
                                         ("URL_CACHE_TTL_SECONDS", "x"), ("URL_CACHE_SIZE_MB", "-3"),
                                         ("POE_BASE_URL", "ftp://poe"), ("POE_FILE_UPLOAD_URL", "nope")])
def test_invalid_setting_stops_startup_with_exit_2(name: str, value: str, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(name, value)
    status, lines = main_before_serving(monkeypatch, capsys, [])
    assert status == 2
    assert len(lines) == 1 and name in lines[0]


@pytest.mark.parametrize("argv, flag", [(["--port", "abc"], "--port"), (["--port=70000"], "--port"),
                                        (["--workers", "0"], "--workers"), (["--log-level", "loud"], "--log-level"),
                                        (["--shutdown-grace-seconds", "soon"], "--shutdown-grace-seconds"),
                                        (["--cors-allow-origins", "app.example.com"], "--cors-allow-origins")])
def test_bad_flag_value_names_the_flag_and_exits_2(argv: list[str], flag: str, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = main_before_serving(monkeypatch, capsys, argv)
    assert status == 2
    assert len(lines) == 1 and flag in lines[0], lines
    assert flag.lstrip("-").replace("-", "_").upper() not in lines[0]    # the flag typed, not the variable


def test_a_flag_overrides_a_bad_variable_and_errors_name_their_source() -> None:
    assert p2o.Settings.from_env({"PORT": "abc"}, ["--port", "9000"]).port == 9000   # the bad value is never read
    with pytest.raises(p2o.SettingsError, match=r"^PORT='abc'"):
        p2o.Settings.from_env({"PORT": "abc"}, [])
    with pytest.raises(p2o.SettingsError, match=r"^--port='x'"):
        p2o.Settings.from_env({"PORT": "9000"}, ["--port", "x"])


def test_help_lists_every_setting() -> None:
    result = subprocess.run([sys.executable, str(HERE / "poe2openai.py"), "--help"], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 0
    for name in ("HOST", "PORT", "ADMIN_USERNAME", "ADMIN_PASSWORD", "MAX_REQUEST_SIZE", "LOG_LEVEL", "CONFIG_DIR",
                 "RATE_LIMIT_MS", "URL_CACHE_TTL_SECONDS", "URL_CACHE_SIZE_MB", "POE_BASE_URL", "POE_FILE_UPLOAD_URL"):
        assert f"[{name}]" in result.stdout and f"--{name.lower().replace('_', '-')}" in result.stdout


def test_tool_mode_setting() -> None:
    assert p2o.Settings.from_env({}, []).tool_mode == "xml"
    assert p2o.Settings.from_env({"TOOL_MODE": " Auto "}, []).tool_mode == "auto"
    assert p2o.Settings.from_env({"TOOL_MODE": "auto"}, ["--tool-mode", "native"]).tool_mode == "native"
    with pytest.raises(p2o.SettingsError, match="TOOL_MODE='sometimes' must be one of xml, native, auto"):
        p2o.Settings.from_env({"TOOL_MODE": "sometimes"}, [])
    assert p2o.ModelConfig.from_dict({"models": {"Bot": {"tool_mode": "auto"}}}).models["Bot"]["tool_mode"] == "auto"


def test_every_setting_has_a_variable_and_a_flag() -> None:
    fields = {f.name for f in dataclasses.fields(p2o.Settings)} - {"proxies"}
    assert {name.lower() for name, _, _ in p2o.SETTINGS_SPEC} == fields
    s = p2o.Settings.from_env({}, [f"--{f.replace('_', '-')}=7" for f in ("port", "workers", "rate_limit_ms")])
    assert (s.port, s.workers, s.rate_limit_ms) == (7, 7, 7)


def test_import_starts_nothing() -> None:
    code = ("import threading, asyncio, poe2openai; "
            "assert threading.active_count() == 1; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=20)
    assert result.stdout.strip() == "ok", result.stderr


def test_proxy_settings_come_from_the_environment() -> None:
    s = p2o.Settings.from_env({"HTTPS_PROXY": "http://p:3128", "no_proxy": "internal"}, [])
    assert dict(s.proxies) == {"https": "http://p:3128", "no": "internal"}


def test_access_key_lists_give_each_key_a_label() -> None:
    text = ("# the team's keys\n\nalice: " + ALICE_KEY + "   # laptop\n" + BOB_KEY + "\n"
            "ci bot:" + "k" * 16 + "\n")
    keys = p2o.parse_access_keys(text, "keys.txt")
    assert [k.label for k in keys] == ["alice", "key 2", "ci bot"]
    assert [k.label for k in p2o.parse_access_keys(f" alice:{ALICE_KEY},{BOB_KEY} ,", "ACCESS_KEYS", ",")] == [
        "alice", "key 2"]
    assert ALICE_KEY not in repr(keys)


@pytest.mark.parametrize("text, problem", [
    ("alice: tiny-KEY", "line 1: the key is shorter than 16"),
    (f"# none\n: {ALICE_KEY}", "line 2: the label before ':' is empty"),
    (f"alice: {ALICE_KEY}\nbob: {ALICE_KEY}", "line 2: the same key is listed twice ('alice' and 'bob')"),
    (f"alice: {ALICE_KEY} extra", "line 1: a key is one word"),
    ("# only comments\n\n", "lists no keys"),
    (f"{'x' * 65}: {ALICE_KEY}", "a label is at most 64"),
])
def test_bad_access_key_lists_name_the_line_but_never_a_key(text: str, problem: str) -> None:
    with pytest.raises(p2o.SettingsError) as info:
        p2o.parse_access_keys(text, "keys.txt")
    assert problem in str(info.value) and ALICE_KEY not in str(info.value) and "tiny-KEY" not in str(info.value)


def test_access_keys_need_the_servers_poe_key(tmp_path: Path) -> None:
    with pytest.raises(p2o.SettingsError, match="ACCESS_KEYS is set but POE_API_KEY is not"):
        p2o.Settings.from_env({"ACCESS_KEYS": ALICE_KEY}, [])
    settings = p2o.Settings.from_env({"ACCESS_KEYS": ALICE_KEY, "POE_API_KEY": SERVER_KEY}, [])
    assert settings.access_keys == ALICE_KEY and settings.poe_api_key == SERVER_KEY
    assert ALICE_KEY not in repr(settings) and SERVER_KEY not in repr(settings)
    env = {k: v for k, v in os.environ.items() if k != "POE_API_KEY"}
    result = subprocess.run([sys.executable, str(HERE / "poe2openai.py")], env={**env, "ACCESS_KEYS": ALICE_KEY},
                            capture_output=True, text=True, timeout=20)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "ACCESS_KEYS" in lines[0] and "POE_API_KEY" in lines[0]
    assert ALICE_KEY not in result.stderr
    missing = subprocess.run([sys.executable, str(HERE / "poe2openai.py")], capture_output=True, text=True, timeout=20,
                             env={**env, "ACCESS_KEYS": f"@{tmp_path / 'nope.txt'}", "POE_API_KEY": SERVER_KEY})
    assert missing.returncode == 2 and "nope.txt" in missing.stderr and "cannot read" in missing.stderr


def test_version_flag() -> None:
    result = subprocess.run([sys.executable, str(HERE / "poe2openai.py"), "--version"], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 0 and result.stdout.strip() == f"poe2openai {p2o.__version__}"


def test_cors_allowed_origins_setting(start: Callable[..., Proxy]) -> None:
    proxy = start(cors_allow_origins=("https://app.example.com",))
    with httpx.Client() as http:
        ok = http.get(proxy.url + "/v1/models", headers={"Origin": "https://app.example.com"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "Origin" in ok.headers["vary"] and "access-control-allow-credentials" not in ok.headers
        other = http.get(proxy.url + "/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


###############################################################################
# Errors: Poe's failures, statuses and each dialect's error shape
###############################################################################

@pytest.mark.parametrize("data, status, code", [
    ({"text": "x", "error_type": "insufficient_fund", "allow_retry": False}, 429, "insufficient_quota"),
    ({"text": "You do not have enough points to message this bot."}, 429, "insufficient_quota"),
    ({"text": "This bot needs more points to answer your request."}, 429, "insufficient_quota"),
    ({"text": "Rate limit exceeded"}, 429, "rate_limit_exceeded"),
    ({"text": "Invalid token"}, 401, "invalid_api_key"),
    ({"text": "Unauthorized"}, 401, "invalid_api_key"),
    ({"text": "Bot does not exist"}, 404, "model_not_found"),
    ({"text": "msg", "error_type": "user_message_too_long"}, 400, "context_length_exceeded"),
    ({"text": "msg", "error_type": "user_caused_error"}, 400, "bad_request"),
    ({"text": "msg", "error_type": "privacy_authorization_error"}, 403, "permission_denied"),
    ({"text": "Access denied", "allow_retry": True}, 403, "permission_denied"),
    ({"text": "Your message is too long for this bot."}, 400, "context_length_exceeded"),
    ({"text": "The conversation exceeds the context window."}, 400, "context_length_exceeded"),
    ({"text": "The bot took too long to respond."}, 504, "upstream_timeout"),   # a timeout, not a long prompt
    ({"text": "Request timed out"}, 504, "upstream_timeout"),
    ({"text": "Internal server error", "allow_retry": True}, 502, "bot_error"),
    ({"text": "The endpoints are busy"}, 502, "bot_error"),                  # "points" only as a word
    ({}, 502, "bot_error"),
])
def test_poe_error_classification(data: dict[str, Any], status: int, code: str) -> None:
    err = p2o.classify_poe_error(data)
    assert (err.status, err.code) == (status, code)
    assert err.openai_body()["error"]["message"]
    retry_after = dict(err.headers).get("Retry-After")
    assert (retry_after == str(p2o.DEFAULT_RETRY_AFTER_S)) if status == 429 else retry_after is None


@pytest.mark.parametrize("status, headers, body, want_status, code, retry_after", [
    (429, {"retry-after": "17"}, b'{"error": "slow down"}', 429, "rate_limit_exceeded", "17"),
    (429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, b"", 429, "rate_limit_exceeded",
     "Wed, 21 Oct 2015 07:28:00 GMT"),
    (429, {"retry-after": "soon"}, b"", 429, "rate_limit_exceeded", str(p2o.DEFAULT_RETRY_AFTER_S)),
    (429, {}, b"", 429, "rate_limit_exceeded", str(p2o.DEFAULT_RETRY_AFTER_S)),
    (402, {}, b"", 429, "insufficient_quota", str(p2o.DEFAULT_RETRY_AFTER_S)),
    (413, {}, b'{"error": {"message": "request_too_large"}}', 400, "context_length_exceeded", None),
    (400, {}, b'{"error": {"message": "Input exceeds the maximum context length"}}', 400,
     "context_length_exceeded", None),
    (400, {}, b'{"error": {"message": "temperature must be a number"}}', 400, "bad_request", None),
    (403, {}, b"", 403, "permission_denied", None),
    (503, {"retry-after": "3"}, b"", 502, "upstream_error", "3"),
    (504, {}, b"", 504, "upstream_timeout", None),
    (408, {}, b"", 504, "upstream_timeout", None),
])
def test_poe_status_classification(status: int, headers: dict[str, str], body: bytes, want_status: int,
                                   code: str, retry_after: str | None) -> None:
    err = p2o.classify_poe_status(status, body, "bot X", headers)
    assert (err.status, err.code) == (want_status, code)
    assert dict(err.headers).get("Retry-After") == retry_after
    assert err.message.startswith(f"bot X: Poe answered HTTP {status}")


@pytest.mark.parametrize("status, code, kind", [
    (400, "bad_request", "invalid_request_error"), (401, "invalid_api_key", "authentication_error"),
    (403, "permission_denied", "permission_error"), (404, "model_not_found", "not_found_error"),
    (413, "too_big", "request_too_large"), (429, "rate_limit_exceeded", "rate_limit_error"),
    (429, "insufficient_quota", "rate_limit_error"), (500, "internal_error", "api_error"),
    (502, "upstream_proxy_error", "api_error"), (504, "upstream_timeout", "timeout_error"),
])
def test_anthropic_error_types_follow_the_status(status: int, code: str, kind: str) -> None:
    body = p2o.anthropic_error_body(p2o.ProxyError(status, "m", "x", code), "req_1")
    assert body == {"type": "error", "error": {"type": kind, "message": "m"}, "request_id": "req_1"}


def test_anthropic_context_errors_say_prompt_is_too_long() -> None:
    err = p2o.classify_poe_error({"text": "Message too long for bot", "error_type": "user_message_too_long"})
    body = p2o.anthropic_error_body(err)
    assert body["error"] == {"type": "invalid_request_error", "message": "prompt is too long: Message too long for bot"}
    assert err.openai_body()["error"]["message"] == "Message too long for bot"   # OpenAI's wording is untouched


###############################################################################
# Pure helpers: ids, JSON, SSE, files, the token estimator
###############################################################################


# ----------------------------------------------------------------------------- SSE decoder

SAMPLE_STREAM = (
    'event: meta\r\ndata: {"content_type": "text/markdown"}\r\n\r\n'
    ': ping - 2026-11-25 21:36:09\r\n\r\n'
    'event: text\r\ndata: {"text": "héllo 世界 🎉"}\r\n\r\n'
    'event: text\ndata:{"text": "no space"}\n\n'
    'event: text\rdata: {"text": "cr only"}\r\r'
    'event: text\ndata: {"a":\ndata: 1}\n\n'
    'event: text\rdata: {"text": "cr, then crlf"}\r\r\n'
    'event: done\r\ndata: {}\r\n\r\n'
).encode()


EXPECTED_EVENTS = [
    ("meta", '{"content_type": "text/markdown"}'),
    ("text", '{"text": "héllo 世界 🎉"}'),
    ("text", '{"text": "no space"}'),
    ("text", '{"text": "cr only"}'),
    ("text", '{"a":\n1}'),
    ("text", '{"text": "cr, then crlf"}'),
    ("done", "{}"),
]


def decode_all(chunks: list[bytes]) -> list[tuple[str, str]]:
    decoder = p2o.SSEDecoder()
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return [(e.event, e.data) for e in events]


def test_sse_decoder_whole() -> None:
    assert decode_all([SAMPLE_STREAM]) == EXPECTED_EVENTS


def test_sse_decoder_byte_by_byte() -> None:
    # Splits every CRLF and every multi-byte character across feeds.
    assert decode_all([bytes([b]) for b in SAMPLE_STREAM]) == EXPECTED_EVENTS


@given(st.lists(st.integers(min_value=1, max_value=len(SAMPLE_STREAM) - 1), unique=True, max_size=40))
@hsettings(max_examples=200, deadline=None)
def test_sse_decoder_any_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(SAMPLE_STREAM)]
    chunks = [SAMPLE_STREAM[a:b] for a, b in zip(bounds, bounds[1:])]
    assert decode_all(chunks) == EXPECTED_EVENTS


def test_sse_decoder_flushes_last_event_without_blank_line() -> None:
    assert decode_all([b'event: text\ndata: {"text": "x"}\n\nevent: done\ndata: {}']) == [
        ("text", '{"text": "x"}'), ("done", "{}")]


def test_sse_decoder_invalid_utf8_is_replaced_not_fatal() -> None:
    assert decode_all([b'event: text\ndata: \xff\xfe\n\n']) == [("text", "\ufffd\ufffd")]


def test_sse_decoder_costs_linear_time_however_a_line_is_chunked() -> None:
    # A line that arrives in many pieces must not be searched again from its start on every read: fed
    # in 250-byte pieces, a 4 MB event costs about twice what it costs in one piece (searching the
    # line again from its start on every read costs some 50 times as much: seconds).
    stream = b'event: text\ndata: {"text": "' + b"x" * 4_000_000 + b'"}\r\n\r\nevent: done\ndata: {}\n\n'

    def decode(piece: int) -> tuple[float, list[p2o.SSEEvent]]:
        decoder = p2o.SSEDecoder()
        started = time.perf_counter()
        events = [e for i in range(0, len(stream), piece) for e in decoder.feed(stream[i:i + piece])]
        return time.perf_counter() - started, events

    whole_s = min(decode(len(stream))[0] for _ in range(3))
    pieces_s, events = min((decode(250) for _ in range(3)), key=lambda run: run[0])
    assert [e.event for e in events] == ["text", "done"] and len(events[0].data) == 4_000_012
    assert pieces_s < 10 * whole_s + 0.05


@pytest.mark.parametrize("text", ['{"text": "a"}', ' {"a":1}', '{"a":1}\n', "", " \n", "\ufeff{}", '{"a":1}x',
                                  "x", "[1,2]", '"s"', "null", '{"a":', '{"a":1}{}', "NaN", '{"a": "\\ud800"}'])
def test_event_json_is_json_loads_with_blank_as_empty(text: str) -> None:
    def outcome(load: Callable[[str], Any]) -> tuple[str, Any]:
        try:
            return "value", load(text)
        except ValueError as exc:
            return "error", str(exc)
    assert outcome(p2o.load_event_json) == outcome(lambda t: json.loads(t) if t.strip() else {})


def test_sse_decoder_refuses_oversized_lines_and_events_as_they_come() -> None:
    decoder = p2o.SSEDecoder(max_event_bytes=64 * 1024)
    decoder.feed(b"data: " + b"x" * 60_000)             # under the cap: waits for the line end
    with pytest.raises(ValueError, match="larger than 65536 bytes"):
        decoder.feed(b"x" * 10_000)                     # refused once the line is too long, with no line end
    many_lines = p2o.SSEDecoder(max_event_bytes=64 * 1024)
    with pytest.raises(ValueError, match="event is larger"):
        many_lines.feed(b"".join(b"data: " + b"y" * 1000 + b"\n" for _ in range(70)))   # short lines, one big event
    counted = p2o.SSEDecoder(max_data_lines=100)
    with pytest.raises(ValueError, match="more than 100 data lines"):
        counted.feed(b"data:\n" * 101)
    fine = p2o.SSEDecoder(max_event_bytes=64 * 1024, max_data_lines=100)   # the caps are per event
    events = [e for _ in range(5) for e in fine.feed(b"".join(b"data: " + b"z" * 500 + b"\n" for _ in range(90)) + b"\n")]
    assert len(events) == 5 and all(len(e.data) == 90 * 501 - 1 for e in events)


# ----------------------------------------------------------------------------- files: multipart

PNG_2X2 = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAEklEQVR42mP4z8DA0PCfAUIBACFyBP2pJ3SLAAAAAElFTkSuQmCC")
PDF_LIKE = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def test_multipart_encoder_round_trips_through_the_email_parser() -> None:
    content_type, body = p2o.encode_multipart([("download_url", "https://e.com/a b.png")],
                                              [("file", 'we"ird\r\nname.pdf', "application/pdf", PDF_LIKE)])
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    parts = list(message.iter_parts())
    assert parts[0].get_payload(decode=True) == b"https://e.com/a b.png"
    assert parts[1].get_payload(decode=True) == PDF_LIKE and parts[1].get_content_type() == "application/pdf"
    assert "\r" not in parts[1].get_filename() and '"' not in parts[1].get_filename()


PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAYAAABytg0kAAAAFklEQVR4nGP8z8DwnwEJMDGgAQaGBgAA"
                       "MgH/3lTLmgAAAABJRU5ErkJggg==")
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 40
MP4 = b"\x00\x00\x00\x18ftypmp42" + os.urandom(5000)


def sdk_request(call: Callable[[openai.OpenAI], Any]) -> httpx.Request:
    """The request the openai SDK sends for `call`, caught before it leaves."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"created": 0, "data": []})

    client = openai.OpenAI(base_url="http://x/v1", api_key=KEY, max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    call(client)
    return seen[0]


def test_multipart_parser_reads_what_the_sdk_sends() -> None:
    request = sdk_request(lambda c: c.images.edit(
        model="GPT-Image-1", prompt="a hat\r\n--not a boundary", n=2, size="1024x1024",
        image=[("a.png", PNG, "image/png"), ('we"ird ü.png', b"--\r\n--x" + PNG, "image/png")],
        mask=("mask.png", PNG, "image/png")))
    body, files = p2o.form_fields(p2o.parse_multipart(request.headers["content-type"], request.read()))
    assert body == {"model": "GPT-Image-1", "prompt": "a hat\r\n--not a boundary", "n": "2", "size": "1024x1024"}
    assert [(f.filename, f.content_type, f.data) for f in files["image[]"]] == [
        ("a.png", "image/png", PNG), ("we%22ird ü.png", "image/png", b"--\r\n--x" + PNG)]
    assert files["mask"][0].data == PNG
    single = sdk_request(lambda c: c.images.edit(model="m", prompt="p", image=("one.png", PNG, "image/png")))
    _, files = p2o.form_fields(p2o.parse_multipart(single.headers["content-type"], single.read()))
    assert list(files) == ["image"]
    # The standard library's reading of our own encoder agrees with ours.
    content_type, encoded = p2o.encode_multipart([("a", "1")], [("file", "x.bin", "application/pdf", b"%PDF-\r\n")])
    parts = p2o.parse_multipart(content_type, encoded)
    assert [(x.name, x.filename, x.content_type, x.data) for x in parts] == [
        ("a", None, "", b"1"), ("file", "x.bin", "application/pdf", b"%PDF-\r\n")]


@pytest.mark.parametrize("body, problem", [
    (b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n", "part 1"),            # never closed
    (b"--B\r\nContent-Type: text/plain\r\n\r\n1\r\n--B--\r\n", "part 1"),                     # no name
    (b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--Bx\r\n", "part 2"),  # junk after boundary
    (b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\nbroken\r\n\r\n1\r\n--B--", "part 1"),
    (b"no boundary here", "boundary"),
])
def test_malformed_multipart_is_a_400_naming_the_part(body: bytes, problem: str) -> None:
    with pytest.raises(p2o.ProxyError) as info:
        p2o.parse_multipart("multipart/form-data; boundary=B", body)
    assert info.value.status == 400 and problem in info.value.message
    with pytest.raises(p2o.ProxyError):
        p2o.parse_multipart("application/json", b"{}")


# ----------------------------------------------------------------------------- token estimator

def test_token_estimator_matches_o200k_on_the_corpus() -> None:
    # tokens/corpus.jsonl: English, code, Chinese, Japanese, JSON, emoji, … with o200k_base counts made by
    # tokens/count_o200k.mjs (js-tiktoken). Targets: median error <= 4 %, no text worse than 10 %.
    rows = [json.loads(line) for line in (HERE / "tokens" / "corpus.jsonl").read_text().splitlines() if line]
    errors = sorted((abs(p2o.estimate_tokens(r["text"]) - r["o200k"]) / r["o200k"], r["name"]) for r in rows)
    kinds = {r["kind"] for r in rows}
    assert len(rows) >= 100 and {"english", "code", "chinese", "japanese", "korean", "json", "emoji"} <= kinds
    assert errors[len(errors) // 2][0] <= 0.04 and errors[-1][0] <= 0.10, errors[-5:]
    assert p2o.estimate_tokens("") == 0 and p2o.estimate_tokens("Hello") == 1
    # Any str is accepted (lone surrogates, control chars) and counted the same way every time.
    for odd in ("\ud800x\udfff", "\x00\x01\x7f\u200d\ufe0f", "\U0001F1E6" * 3, "中\ud83d文", "\u3000" * 9):
        assert p2o.estimate_tokens(odd) == p2o.estimate_tokens(odd) >= 1


def test_token_memo_counts_each_long_text_once_and_agrees_with_the_estimator(monkeypatch: pytest.MonkeyPatch) -> None:
    # Agents resend the whole prompt every turn: a long text already counted is not counted again, the
    # count is the estimator's own, and the memo stays bounded however many texts pass.
    counted: list[int] = []
    real = p2o.estimate_tokens
    monkeypatch.setattr(p2o, "estimate_tokens", lambda text: counted.append(len(text)) or real(text))
    memo = p2o.TokenMemo(max_entries=3)
    system = "You are Cline, a coding agent. " * 200          # 6 KB, as agents send
    query = {"query": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}
    first = p2o.count_prompt_tokens(query, memo)
    assert first == p2o.count_prompt_tokens(query) and counted.count(len(system)) == 2   # memo, then none
    counted.clear()
    assert p2o.count_prompt_tokens(query, memo) == first and len(system) not in counted   # remembered
    assert counted == [2]          # short texts are counted every time (cheaper than a lookup)
    other = system.replace("Cline", "Roo C")                 # same length, other text: its own count
    assert len(other) == len(system) and memo.estimate(other) == real(other) and counted[-1] == len(other)
    counted.clear()   # a count remembered for one caller is not another's: timing must not tell who sent what
    assert p2o.count_prompt_tokens(query, memo, "bob's key") == first and counted.count(len(system)) == 1
    for n in range(5):
        memo.estimate("x" * (p2o.TOKEN_MEMO_MIN_CHARS + n))
    assert len(memo) == 3


def tally_of(text: str, pieces: Callable[[int], int], segment_chars: int = 16 * 1024) -> p2o.TokenTally:
    tally = p2o.TokenTally(segment_chars)
    at = 0
    while at < len(text):
        step = pieces(at)
        tally.add(text[at:at + step])
        at += step
    return tally


def test_token_tally_counts_a_streamed_answer_as_the_whole_text() -> None:
    # Streamed answers are counted piece by piece, keeping only a short tail: the count must stay what
    # estimate_tokens() says of the whole text, for every kind of text in the corpus.
    rows = [json.loads(line) for line in (HERE / "tokens" / "corpus.jsonl").read_text().splitlines() if line]
    rng = __import__("random").Random(7)
    for row in rows:   # small segments, so that every text is cut several times
        whole = p2o.estimate_tokens(row["text"])
        tally = tally_of(row["text"], lambda _: rng.randint(1, 12), segment_chars=512)
        assert abs(tally.tokens() - whole) <= 0.01 * whole, row["name"]
    joined = "\n".join(r["text"] for r in rows) * 6   # ~330k chars at the real segment size
    assert abs(tally_of(joined, lambda _: rng.randint(1, 40)).tokens() - p2o.estimate_tokens(joined)) \
        <= 0.01 * p2o.estimate_tokens(joined)
    blank_free = "Zm9vYmFy" * 200_000   # 1.6 M chars without a blank: the tail is cut anyway
    tally = tally_of(blank_free, lambda _: 1000)
    assert tally.held_chars <= 4 * 16 * 1024 + 1000
    assert abs(tally.tokens() - p2o.estimate_tokens(blank_free)) <= 0.01 * p2o.estimate_tokens(blank_free)
    assert p2o.TokenTally().tokens() == 0 and tally_of("Hello", lambda _: 2).tokens() == 1


###############################################################################
# Small machines: the rate gate, login back-off, usage stats, the LRU cache
###############################################################################

class FakeTimers:
    """A clock and a call_later that stand still until the test moves them on: what a wait on the real
    clock would check, without the wait. Due callbacks run in order of their time, each followed by a
    turn of the event loop, so that what they woke runs before the next is due."""

    def __init__(self) -> None:
        self.now = 0.0
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._made = 0   # ties go in the order the callbacks were given

    def clock(self) -> float:
        return self.now

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> object:
        self._made += 1
        entry = (self.now + delay_s, self._made, callback)
        heapq.heappush(self._due, entry)
        return entry   # the handle, as the loop's call_later returns one

    async def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self._due and self._due[0][0] <= end:
            when, _, callback = heapq.heappop(self._due)
            self.now = max(self.now, when)
            callback()
            for _ in range(3):
                await asyncio.sleep(0)
        self.now = end


def test_rate_gate_is_fifo_and_a_leaver_leaves_the_queue() -> None:
    async def scenario() -> list[tuple[str, float]]:
        timers = FakeTimers()
        gate = p2o.RateGate(0.1, clock=timers.clock, call_later=timers.call_later)
        started: list[tuple[str, float]] = []

        async def client(name: str) -> None:
            await gate.wait()
            started.append((name, timers.now))

        tasks = {}
        for name in "abcd":
            tasks[name] = asyncio.ensure_future(client(name))
            await asyncio.sleep(0)                     # arrive in this order
        await timers.advance(0.02)
        tasks["b"].cancel()                           # b hangs up while queued
        await asyncio.sleep(0)
        assert gate.queued == 2
        await timers.advance(0.079)
        assert [n for n, _ in started] == ["a"]       # nobody before the interval is over
        await timers.advance(1.0)
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert gate.queued == 0
        return started

    started = asyncio.run(scenario())
    assert [n for n, _ in started] == ["a", "c", "d"]   # first come first served, b gone
    # The first never waits; c and d moved up into b's slot, one interval apart.
    assert [t for _, t in started] == pytest.approx([0.0, 0.1, 0.2])

    async def on_the_loops_own_timer() -> list[float]:
        gate = p2o.RateGate(0.02)
        starts: list[float] = []

        async def client() -> None:
            await gate.wait()
            starts.append(time.monotonic())
        await asyncio.gather(client(), client())
        return starts

    first, second = asyncio.run(on_the_loops_own_timer())
    assert second - first >= 0.019


def test_rate_gate_refuses_beyond_its_longest_wait() -> None:
    async def scenario() -> p2o.ProxyError:
        timers = FakeTimers()
        gate = p2o.RateGate(0.1, max_wait_s=0.25, clock=timers.clock, call_later=timers.call_later)
        queued = [asyncio.ensure_future(gate.wait()) for _ in range(3)]   # waits of 0, 0.1 and 0.2 s
        await asyncio.sleep(0)
        assert gate.expected_wait_s() == pytest.approx(0.3)
        with pytest.raises(p2o.ProxyError) as info:
            await gate.wait()                                              # would wait 0.3 s
        await timers.advance(0.1)
        assert gate.expected_wait_s() == pytest.approx(0.2)                # one more fits again
        last = asyncio.ensure_future(gate.wait())
        await timers.advance(0.3)
        await asyncio.gather(*queued, last)
        return info.value

    err = asyncio.run(scenario())
    assert err.status == 429 and dict(err.headers)["Retry-After"] == "1"


def test_usage_stats_rows_stay_small_whatever_model_names_clients_send() -> None:
    stats = p2o.UsageStats()
    stats.record("GPT-4o", ok=True, latency_s=0.1, prompt_tokens=5, completion_tokens=7)
    for i in range(150):   # strangers' junk: refused by Poe, never an answer
        stats.record(f"{i:03d}\x1b[31m\n" + "m" * 1_000_000, ok=False, latency_s=0.01)
    stats.record("anything at all", ok=False, latency_s=0.01, refused=True)
    rows = {m["model"]: m for m in stats.snapshot()["models"]}
    assert all(len(name) <= 100 and name.isprintable() for name in rows)
    assert rows["000[31m" + "m" * 93]["errors"] == 1              # names cut, control characters gone
    assert len(rows) == 1 + 100 + 1 and rows["(refused)"]["requests"] == 50 + 1
    stats.record("Claude-Sonnet-4.5", ok=True, latency_s=0.2, prompt_tokens=1, completion_tokens=1)
    assert "Claude-Sonnet-4.5" in {m["model"] for m in stats.snapshot()["models"]}   # real models still get rows
    for _ in range(5000):
        stats.record("GPT-4o", ok=True, latency_s=0.1)
    assert len(stats._models["GPT-4o"]["latency"]) == 1000                  # latency samples are bounded too


def test_lru_cache_evicts_by_bytes_and_by_ttl() -> None:
    now = [0.0]
    cache = p2o.LRUCache(max_bytes=100, ttl_s=10, clock=lambda: now[0])
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"           # a is now the most recently used
    cache.put("c", "C", 40)                # 120 > 100: the least recently used (b) goes
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    assert cache.total_bytes == 80
    cache.put("huge", "H", 101)            # larger than the whole budget: not stored, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2
    now[0] = 10.5                          # past the TTL
    assert cache.get("a") is None and cache.get("c") is None and cache.total_bytes == 0


def test_login_backoff_forgets_after_its_window() -> None:
    now = [0.0]
    backoff = p2o.LoginBackoff(2, 60.0, "slow down", clock=lambda: now[0])
    backoff.failed("10.0.0.1")
    backoff.failed("10.0.0.1")
    with pytest.raises(p2o.ProxyError) as info:
        backoff.check("10.0.0.1")
    assert info.value.status == 429 and info.value.headers == [("Retry-After", "60")]
    backoff.check("10.0.0.2")   # per address
    now[0] = 61.0
    backoff.check("10.0.0.1")
    backoff.failed("10.0.0.1")
    backoff.succeeded("10.0.0.1")
    backoff.failed("10.0.0.1")
    backoff.check("10.0.0.1")   # a success wiped the earlier failure


def test_login_backoff_table_is_bounded_by_evicting_the_oldest() -> None:
    backoff = p2o.LoginBackoff(2, 60.0, "slow down", clock=lambda: 0.0, max_addresses=3)
    for _ in range(2):
        backoff.failed("10.0.0.9")                                      # locked out
    for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):                # a small spray: the table has room
        backoff.failed(address)
    with pytest.raises(p2o.ProxyError):
        backoff.check("10.0.0.9")                                       # not wiped by the others
    backoff.failed("10.0.0.9")                                          # it keeps guessing: the newest again
    backoff.failed("10.0.0.3")                                          # one too many: the oldest goes, no wipe
    with pytest.raises(p2o.ProxyError):
        backoff.check("10.0.0.9")
    backoff.check("10.0.0.1")                                           # forgotten: the global budget covers it


def test_login_backoff_global_budget_stops_a_spray_but_not_the_machine_itself() -> None:
    now = [0.0]
    backoff = p2o.LoginBackoff(5, 300.0, "slow down", clock=lambda: now[0], max_addresses=10000, global_max=10,
                               global_window_s=60.0)
    for i in range(10):                                                 # one guess from each of ten addresses
        now[0] = i
        backoff.check(f"127.0.{i}.1")
        backoff.failed(f"127.0.{i}.1")
    with pytest.raises(p2o.ProxyError) as info:
        backoff.check("127.9.9.9")                                      # a fresh address gains nothing
    assert info.value.status == 429 and info.value.headers == [("Retry-After", "51")]   # the first guess + 60 s
    backoff.check("127.0.0.1")                                          # the owner, through an SSH tunnel
    backoff.check("::1")
    now[0] = 60.5                                                       # the oldest failure left the window
    backoff.check("127.9.9.9")


###############################################################################
# Poe's bot catalogue: what each bot is, declares and accepts
###############################################################################

POE_MODELS = json.loads((FIXTURES / "poe-v1-models-sample.json").read_text())   # a real answer, trimmed


def fixture_catalogue() -> p2o.Catalogue:
    return p2o.catalogue_from_poe(POE_MODELS)


def bot(name: str) -> p2o.BotInfo:
    info = fixture_catalogue().find(name)
    assert info is not None, name
    return info


def synthetic_bot(*parameters: dict[str, Any], **kw: Any) -> p2o.BotInfo:
    info = p2o.bot_info_from_poe({"id": "test-bot", "metadata": {"display_name": "Test-Bot"},
                                  "parameters": list(parameters), **kw})
    assert info is not None
    return info


def test_bot_info_from_every_entry_of_poes_list() -> None:
    for entry in POE_MODELS["data"]:
        info = p2o.bot_info_from_poe(entry)
        assert info is not None and info.id == entry["id"] and info.name == entry["metadata"]["display_name"]
        window = entry.get("context_window") or {}
        assert info.context_length == window.get("context_length")
        assert info.max_output_tokens == window.get("max_output_tokens")
        assert list(info.input_modalities or ()) == entry["architecture"]["input_modalities"]
        assert list(info.output_modalities or ()) == entry["architecture"]["output_modalities"]
        assert list(info.features or ()) == entry["supported_features"]
        assert [p.name for p in info.parameters or ()] == [p["name"] for p in entry["parameters"]]
        assert info.created == entry["created"] // 1000 and info.owned_by == entry["owned_by"]
        assert (info.reasoning is None) == (entry["reasoning"] is None)
        assert (info.pricing is None) == (entry["pricing"] is None)
    sonnet = bot("Claude-Sonnet-4.5")
    assert (sonnet.context_length, sonnet.max_output_tokens) == (983040, 32768)
    assert sonnet.reasoning == p2o.BotReasoning(0, 31999, False, False)
    assert sonnet.parameter("thinking_budget") == p2o.BotParameter(
        "thinking_budget", {"type": "number", "minimum": 0, "maximum": 31999}, 0, True,
        "The maximum number of tokens to spend on thinking.")
    assert bot("claude-opus-4.6").pricing["prompt"] == "0.0000043" and bot("Assistant").pricing is None
    assert bot("Kimi-K2.5-FW").context_length is None and bot("DeepSeek-R1").max_output_tokens is None
    assert bot("Veo-3").output_modalities == ("video",) and bot("nano-banana-2").parameter("aspect_ratio").has_default is False


@pytest.mark.parametrize("entry", [None, [], "gpt-4o", {}, {"id": None}, {"id": ""}, {"id": "  "}, {"id": 5}])
def test_bot_info_needs_an_id(entry: Any) -> None:
    assert p2o.bot_info_from_poe(entry) is None


def test_bot_info_from_hostile_entries() -> None:
    info = p2o.bot_info_from_poe({
        "id": "odd", "created": "yesterday", "owned_by": 7, "description": ["x"], "metadata": None,
        "context_window": "big", "context_length": True, "architecture": [], "supported_features": "tools",
        "parameters": {"name": "web_search"}, "reasoning": "yes", "pricing": [1]})
    assert info == p2o.BotInfo(id="odd", name="odd")   # everything unknown, nothing invented
    info = p2o.bot_info_from_poe({
        "id": "odd", "metadata": {"display_name": ""}, "context_window": {"context_length": -5, "max_output_tokens": 1.5},
        "context_length": 4096.0, "architecture": {"input_modalities": ["text", None, 3], "output_modalities": None},
        "parameters": [None, {"name": 3}, {"name": " "}, {"name": "ok", "schema": "bad"}],
        "reasoning": {"budget": {"min_tokens": "0", "max_tokens": float("inf")}, "required": "no",
                      "supports_reasoning_effort": None},
        "pricing": {"prompt": "0.1", "completion": None, "image": {"x": 1}, "request": 0}})
    assert info is not None and info.name == "odd" and info.context_length == 4096 and info.max_output_tokens is None
    assert info.input_modalities == ("text",) and info.output_modalities is None
    assert info.parameters == (p2o.BotParameter("ok"),)
    assert info.reasoning == p2o.BotReasoning() and info.pricing == {"prompt": "0.1", "request": "0"}
    # A controls request against such a bot neither crashes nor sends anything it does not declare.
    assert p2o.bot_controls({"ok": True, "reasoning_effort": "high"}, info) == (["--ok true"], ["reasoning_effort"])
    with pytest.raises(p2o.ProxyError):
        p2o.catalogue_from_poe({"object": "list"})


def test_catalogue_finds_a_bot_by_id_or_display_name_in_any_case() -> None:
    cat = fixture_catalogue()
    assert len(cat) == 16
    for name in ("Claude-Sonnet-4.5", "claude-sonnet-4.5", "CLAUDE-SONNET-4.5", " claude-sonnet-4.5 "):
        assert cat.find(name) is cat.bots[2]
    assert cat.find("Claude-Sonnet") is None
    twins = p2o.Catalogue([p2o.BotInfo("a", "Bot"), p2o.BotInfo("b", "BOT")])
    assert twins.find("BOT").id == "b" and twins.find("bot").id == "a"   # an exact spelling wins


def test_models_yaml_applies_to_the_catalogue(start: Callable[..., Proxy], poe: FakePoe, tmp_path: Path) -> None:
    poe.models = POE_MODELS
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"enable": True, "models": {
        "claude-sonnet-4.5": {"mapping": "sonnet"}, "GPT-4o": {"enable": False}}, "custom_models": [
        {"id": "My-Image-Bot", "context_length": 4000, "max_output_tokens": 1000, "input_modalities": ["text"],
         "output_modalities": ["image"], "parameters": [{"name": "style", "schema": {"enum": ["photo", "drawing"]},
                                                          "default_value": "photo"}]}]}))
    proxy = start()
    models = {m.id: m.model_dump() for m in proxy.client().models.list().data}
    assert "sonnet" in models and "Claude-Sonnet-4.5" not in models and "GPT-4o" not in models   # by Poe id, or name
    assert models["sonnet"]["context_length"] == 983040            # a renamed bot keeps what it can do
    custom = models["My-Image-Bot"]
    assert (custom["context_length"], custom["max_output_tokens"], custom["owned_by"]) == (4000, 1000, "custom")
    assert custom["architecture"]["modality"] == "text->image" and "style" in custom["supported_parameters"]
    assert custom["parameters"] == [{"name": "style", "schema": {"enum": ["photo", "drawing"]}, "default_value": "photo"}]


def test_models_yaml_resolution_accepts_poe_ids_and_display_names(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("enable: true\nmodels:\n  claude-sonnet-4.5: {mapping: sonnet, tool_mode: native}\n"
                    "  Claude-Haiku-4.5: {enable: false}\ncustom_models:\n  - {id: Private-Bot, context_length: 100}\n")
    registry = p2o.ModelRegistry(str(path))
    cat = fixture_catalogue()
    for asked in ("sonnet", "SONNET", "Claude-Sonnet-4.5", "claude-sonnet-4.5"):
        route = registry.resolve(asked, cat)
        assert (route.bot, route.display, route.tool_mode) == ("Claude-Sonnet-4.5", asked, "native")
    for asked in ("claude-haiku-4.5", "Claude-Haiku-4.5"):
        with pytest.raises(p2o.ProxyError) as info:
            registry.resolve(asked, cat)
        assert info.value.status == 404
    assert registry.resolve("private-bot", cat).bot == "private-bot"      # unknown bots pass through as asked
    assert registry.bot_info("Claude-Sonnet-4.5", cat) is cat.find("claude-sonnet-4.5")
    assert registry.bot_info("PRIVATE-BOT", cat).context_length == 100
    assert registry.bot_info("Private-Bot", cat).parameters is None       # declares none: today's flags apply
    assert registry.bot_info("Unknown-Bot", cat) is None and registry.bot_info("GPT-4o", None) is None


@pytest.mark.parametrize("custom, problem", [
    ({"context_length": "1M"}, "context_length must be a positive whole number"),
    ({"max_output_tokens": 0}, "max_output_tokens must be a positive whole number"),
    ({"max_output_tokens": True}, "max_output_tokens must be a positive whole number"),
    ({"input_modalities": "text"}, "input_modalities must be a list"),
    ({"supported_features": ["tools", 3]}, "supported_features must be a list"),
    ({"parameters": {"name": "x"}}, "parameters must be a list"),
    ({"parameters": [{"schema": {}}]}, "parameters[0] must be a mapping with a `name`"),
    ({"parameters": [{"name": "x", "schema": "boolean"}]}, "parameters[0].schema must be a JSON schema"),
    ({"parameters": [{"name": "x", "schema": {"enum": []}}]}, "parameters[0].schema.enum must be a non-empty list"),
])
def test_custom_model_declarations_are_checked(custom: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"custom_models[Mine].{problem}")):
        p2o.ModelConfig.from_dict({"custom_models": [{"id": "Mine", **custom}]})


def test_model_catalog_gives_a_chat_what_it_has_within_the_deadline() -> None:
    class SlowPoe:
        def __init__(self) -> None:
            self.calls = 0
            self.delay_s = 0.3
            self.fail = False

        async def list_models(self, api_key: str | None) -> p2o.Catalogue:
            self.calls += 1
            await asyncio.sleep(self.delay_s)
            if self.fail:
                raise p2o.upstream_error("Poe is down")
            return fixture_catalogue()

    async def scenario() -> None:
        upstream = SlowPoe()
        catalog = p2o.ModelCatalog(upstream, ttl_s=60.0)   # type: ignore[arg-type]
        started = time.monotonic()
        assert await asyncio.gather(catalog.for_chat(KEY, 0.05), catalog.for_chat(KEY, 0.05)) == [None, None]
        assert time.monotonic() - started < 0.25 and upstream.calls == 1    # did not wait; one fetch for both
        listed = await catalog.catalogue(KEY)                               # a model list joins that same fetch
        assert upstream.calls == 1 and len(listed) == 16
        assert await catalog.for_chat(KEY, 0.0) is listed                   # fresh: no wait, no fetch
        stale = p2o.ModelCatalog(upstream, ttl_s=0.0)                       # type: ignore[arg-type]
        upstream.delay_s = 0.0
        first = await stale.for_chat(KEY, 1.0)
        assert first is not None and len(first) == 16                       # a quick fetch is waited for
        upstream.fail = True
        assert await stale.for_chat(KEY, 1.0) is first                      # Poe fails: the stale catalogue
        assert await p2o.ModelCatalog(upstream, 60.0).for_chat(KEY, 1.0) is None   # type: ignore[arg-type]
        with pytest.raises(p2o.ProxyError):
            await p2o.ModelCatalog(upstream, 60.0).catalogue(KEY)           # type: ignore[arg-type]

    asyncio.run(scenario())


def controls(body: dict[str, Any], name: str) -> tuple[list[str], list[str]]:
    return p2o.bot_controls(body, bot(name))


def test_bot_controls_web_search_from_every_dialect() -> None:
    on = (["--web_search true"], [])
    assert controls({"web_search_options": {}}, "GPT-5.4") == on                                  # OpenAI chat
    assert controls({"tools": [{"type": "web_search_preview"}]}, "GPT-5.4") == on                  # Responses
    assert controls({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "Claude-Sonnet-4.5") == on
    assert controls({"extra_body": {"web_search": True}}, "Claude-Opus-4.6") == on
    assert controls({"enable_web_search": "false"}, "Claude-Opus-4.6") == (["--web_search false"], [])
    other = synthetic_bot({"name": "enable_web_search", "schema": {"type": "boolean"}})
    assert p2o.bot_controls({"web_search_options": {"search_context_size": "low"}}, other) == (
        ["--enable_web_search true"], [])
    assert controls({"web_search_options": {}}, "GPT-4o") == ([], ["web_search_options"])         # not declared
    with pytest.raises(p2o.ProxyError) as info:
        controls({"web_search": "sometimes"}, "GPT-5.4")
    assert info.value.status == 400 and info.value.param == "web_search" and "true or false" in info.value.message


def test_bot_controls_reasoning_effort_goes_to_the_nearest_allowed_value() -> None:
    assert controls({"reasoning_effort": "medium"}, "GPT-5.4") == (["--reasoning_effort medium"], [])
    assert controls({"reasoning_effort": "max"}, "GPT-5.4") == (["--reasoning_effort xhigh"], [])
    assert controls({"reasoning_effort": "minimal"}, "GPT-5.4") == (["--reasoning_effort low"], [])  # tie: stronger
    assert controls({"reasoning": {"effort": "HIGH"}}, "GPT-5.4") == (["--reasoning_effort high"], [])
    assert controls({"output_config": {"effort": "max"}}, "Claude-Opus-4.6") == (["--output_effort max"], [])
    assert controls({"reasoning_effort": "xhigh"}, "Claude-Opus-4.6") == (["--output_effort max"], [])
    assert controls({"reasoning_effort": "xhigh"}, "Assistant") == (["--reasoning_effort high"], [])  # from `reasoning`
    assert controls({"reasoning_effort": "high"}, "Claude-Haiku-4.5") == (["--thinking_budget 51199"], [])
    assert controls({"reasoning_effort": "high"}, "GPT-4o") == ([], ["reasoning_effort"])
    with pytest.raises(p2o.ProxyError) as info:
        controls({"reasoning_effort": "turbo"}, "GPT-5.4")
    assert info.value.param == "reasoning_effort"


def test_bot_controls_thinking_budget_is_clamped() -> None:
    assert controls({"thinking": {"type": "enabled", "budget_tokens": 50000}}, "Claude-Sonnet-4.5") == (
        ["--thinking_budget 31999"], [])
    assert controls({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "Claude-Sonnet-4.5") == (
        ["--thinking_budget 1024"], [])
    gemini = {"extra_body": {"google": {"thinking_config": {"thinking_budget": 99999}}}}
    assert controls(gemini, "Gemini-2.5-Flash") == (["--thinking_budget 24576"], [])
    assert controls({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "GPT-5.4") == (
        ["--reasoning_effort low"], [])                                  # a budget, for an effort-only bot
    assert controls({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "GPT-4o") == ([], ["thinking.budget_tokens"])
    with pytest.raises(p2o.ProxyError):
        controls({"thinking": {"type": "enabled", "budget_tokens": "lots"}}, "Claude-Sonnet-4.5")


def test_bot_controls_enable_thinking() -> None:
    qwen = synthetic_bot({"name": "enable_thinking", "schema": {"type": "boolean"}, "default_value": True})
    assert p2o.bot_controls({"reasoning_effort": "high"}, qwen) == (["--enable_thinking true"], [])
    assert p2o.bot_controls({"reasoning_effort": "none"}, qwen) == (["--enable_thinking false"], [])
    assert p2o.bot_controls({"thinking": {"type": "disabled"}}, qwen) == (["--enable_thinking false"], [])
    assert p2o.bot_controls({"thinking": {"type": "adaptive"}}, qwen) == (["--enable_thinking true"], [])
    assert p2o.bot_controls({"reasoning": {"enabled": False}}, qwen) == (["--enable_thinking false"], [])


def test_bot_controls_forward_the_bots_own_parameters() -> None:
    assert controls({"aspect_ratio": "16:9"}, "Nano-Banana-2") == (["--aspect_ratio 16:9"], [])
    assert controls({"extra_body": {"seed": 42, "duration": 6, "resolution": "1080P", "camera": "pan"},
                     "aspect_ratio": "9:16"}, "Veo-3") == (
        ["--aspect_ratio 9:16", "--duration 6", "--seed 42", "--resolution 1080p"], ["extra_body.camera"])
    assert controls({"verbosity": "low", "user": "u-1", "top_p": 0.5}, "GPT-5.4") == (["--verbosity low"], [])
    assert controls({"no": "blurry\n--seed 1"}, "Veo-3") == (["--no blurry -seed 1"], [])   # one flag stays one
    assert controls({"speaker_count": 3.0}, "ElevenLabs-v3") == (["--speaker_count 3"], [])
    limited = synthetic_bot({"name": "max_output_tokens", "schema": {"type": "number", "minimum": 1, "maximum": 8192}},
                            {"name": "temperature", "schema": {"type": "number", "minimum": 0, "maximum": 1}})
    assert p2o.bot_controls({"max_tokens": 100000, "temperature": 1.3}, limited) == (
        ["--max_output_tokens 8192", "--temperature 1"], [])             # habits are clamped, not refused


def test_bot_controls_on_converted_anthropic_and_responses_bodies() -> None:
    """What the chat pipeline passes: the converted body over the client's own, with the client's tools (the
    converters drop hosted tools and output_config, and keep only a lossy copy of the effort)."""
    raw = {"model": "claude-opus-4-6", "max_tokens": 32000, "output_config": {"effort": "max"},
           "thinking": {"type": "adaptive"}, "messages": [{"role": "user", "content": "hi"}],
           "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                     {"name": "Bash", "description": "Run", "input_schema": {"type": "object"}}]}
    merged = {**raw, **p2o.anthropic_to_openai(raw), "tools": raw["tools"]}
    assert controls(merged, "Claude-Opus-4.6") == (["--web_search true", "--output_effort max"], [])
    assert controls(merged, "Claude-Sonnet-4.5") == (["--thinking_budget 31999", "--web_search true"], [])
    assert controls(merged, "GPT-4o") == ([], ["tools[type=web_search_20250305]", "output_config.effort",
                                               "reasoning_effort", "thinking"])
    codex = json.loads((FIXTURES / "codex-responses.json").read_text())
    codex["tools"].append({"type": "web_search"})
    merged = {**codex, **p2o.responses_to_openai(codex), "tools": codex["tools"]}
    assert controls(merged, "GPT-5.4") == (["--web_search true", f"--reasoning_effort {codex['reasoning']['effort']}"],
                                           [])


@pytest.mark.parametrize("body, bot_name, param, allowed", [
    ({"aspect_ratio": "7:3"}, "Nano-Banana-2", "aspect_ratio", "one of 1:1, 2:3"),
    ({"extra_body": {"duration": 5}}, "Veo-3", "extra_body.duration", "one of 4, 6, 8"),
    ({"speaker_count": 12}, "ElevenLabs-v3", "speaker_count", "a number from 1 to 9"),
    ({"silent": "loud"}, "Veo-3", "silent", "true or false"),
    ({"seed": [1]}, "Veo-3", "seed", "a string"),
])
def test_bot_controls_refuse_values_outside_the_schema(body: dict[str, Any], bot_name: str, param: str,
                                                       allowed: str) -> None:
    with pytest.raises(p2o.ProxyError) as info:
        controls(body, bot_name)
    err = info.value
    assert (err.status, err.param) == (400, param) and allowed in err.message and bot(bot_name).name in err.message


def test_bot_controls_for_unknown_bots_are_todays_flags() -> None:
    body = {"reasoning_effort": "high", "thinking": {"type": "enabled", "budget_tokens": 1000},
            "web_search_options": {}, "aspect_ratio": "1:1"}
    assert p2o.bot_controls(body, None) == (list(p2o.reasoning_flags(body)), [])
    assert p2o.bot_controls(body, None)[0] == ["--thinking_budget 1000", "--reasoning_effort high"]
    undeclared = p2o.custom_bot_info({"id": "Private-Bot", "context_length": 1000})
    assert p2o.bot_controls(body, undeclared) == p2o.bot_controls(body, None)


def test_check_context_refuses_prompts_that_cannot_fit() -> None:
    info = p2o.BotInfo("b", "B", context_length=1000, max_output_tokens=300)
    assert p2o.check_context(1100, 200, info) == 200                    # within the estimate's 10 % margin
    assert p2o.check_context(900, 5000, info) == 300                    # max_tokens clamped, not refused
    assert p2o.check_context(900, None, info) is None
    with pytest.raises(p2o.ProxyError) as caught:
        p2o.check_context(1101, None, info)
    err = caught.value
    assert (err.status, err.code, err.type) == (400, "context_length_exceeded", "invalid_request_error")
    assert err.message == "prompt is too long: 1101 tokens > 1000 maximum"
    assert p2o.anthropic_error_body(err)["error"]["message"] == err.message   # Claude Code compacts on it
    assert p2o.check_context(10 ** 9, 10 ** 6, None) == 10 ** 6          # unknown bot: nothing to check
    assert p2o.check_context(10 ** 9, 10 ** 6, bot("Kimi-K2.5-FW")) == 10 ** 6
    assert p2o.check_context(160000, 10 ** 6, bot("DeepSeek-R1")) == 10 ** 6    # no max output known


###############################################################################
# Converters: OpenAI chat request -> Poe query
###############################################################################


# ----------------------------------------------------------------------------- messages and fields

def test_role_mapping_and_params_reach_poe_query() -> None:
    chat = p2o.parse_chat_request({
        "model": "GPT-4o", "temperature": 0.3, "stop": "END", "logit_bias": {"50256": -100},
        "max_tokens": 10, "max_completion_tokens": 10, "user": "x", "seed": 1, "unknown_field": {"a": 1},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "system", "content": [{"type": "text", "text": "s1"}, {"type": "text", "text": "s2"}]},
                     {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": [{"type": "text", "text": "again"}]}]})
    query = p2o.build_poe_query(chat)
    assert [m["role"] for m in query["query"]] == ["system", "system", "user", "bot", "user"]
    assert query["query"][1]["content"] == "s1\ns2"
    assert query["temperature"] == 0.3 and query["stop_sequences"] == ["END"]
    assert query["logit_bias"] == {"50256": -100.0}
    QueryRequest.model_validate(query)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
])
def test_invalid_chat_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(p2o.ProxyError) as info:
        p2o.parse_chat_request(body)
    assert info.value.status == 400 and info.value.param == param


def test_lenient_fields_are_accepted() -> None:
    chat = p2o.parse_chat_request({"model": "m", "n": 1, "stop": ["a", "b"], "stream": True,
                                   "stream_options": {"include_usage": False},
                                   "tools": [{"type": "function", "function": {"name": "f"}}],
                                   "messages": [{"role": "user", "content": None}]})
    assert chat.stream and not chat.include_usage and chat.stop == ["a", "b"]


# ----------------------------------------------------------------------------- client controls -> bot parameters

def bot_queries(poe: FakePoe, name: str) -> list[dict[str, Any]]:
    return [r["query"] for r in poe.requests if r["path"] == f"/bot/{name}"]


def last_turn(poe: FakePoe) -> str:
    """The end of the last user turn of the last query: where the bot's own parameters go."""
    return [m for m in last_query(poe)["query"]["query"] if m["role"] == "user"][-1]["content"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_controls_become_the_bots_own_parameters(proxy: Proxy, poe: FakePoe, stream: bool) -> None:
    poe.models = POE_MODELS
    client = proxy.client()

    def ask(model: str, **kw: Any) -> str:
        result = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Q"}],
                                                stream=stream, **kw)
        if stream:
            list(result)
        return last_turn(poe)

    assert ask("Claude-Sonnet-4.5", web_search_options={}) == "Q --web_search true"
    assert ask("GPT-4o", web_search_options={}) == "Q"                    # GPT-4o declares no web search
    assert ask("gpt-5.4", extra_body={"reasoning_effort": "max"}) == "Q --reasoning_effort xhigh"
    assert last_query(poe)["path"] == "/bot/GPT-5.4"
    assert ask("Claude-Sonnet-4.5", extra_body={"thinking": {"type": "enabled", "budget_tokens": 50000}}) == (
        "Q --thinking_budget 31999")
    assert ask("Nano-Banana-2", extra_body={"aspect_ratio": "16:9", "image_size": "2K", "style": "x"}) == (
        "Q --aspect_ratio 16:9 --image_size 2K")
    # A hosted search tool, nameless or Anthropic-style, is the search control: one flag, not a tool or a 400.
    for tool in ({"type": "web_search"}, {"type": "web_search_20250305", "name": "web_search"}):
        assert ask("Claude-Sonnet-4.5", tools=[tool]) == "Q --web_search true"
        assert ask("GPT-4o", tools=[tool]) == "Q"
    assert ask("GPT-4o", tools=[{"type": "function", "function": {"name": "web_search"}}]) == "Q"   # not declared
    # Bots the catalogue does not know keep the earlier flags.
    assert ask("Private-Bot", reasoning_effort="high", web_search_options={}) == "Q --reasoning_effort high"
    assert ask("Private-Bot", tools=[{"type": "web_search"}]) == "Q --web_search"
    assert not poe.invalid_queries


def test_messages_and_responses_controls_become_the_bots_own_parameters(proxy: Proxy, poe: FakePoe,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    poe.models = POE_MODELS
    claude = anthropic_client(proxy)
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    for stream in (False, True):
        result = claude.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=64000, stream=stream,
                                        messages=[{"role": "user", "content": "Q"}], tools=[search],
                                        thinking={"type": "enabled", "budget_tokens": 50000})
        if stream:
            list(result)
        assert last_query(poe)["path"] == "/bot/Claude-Sonnet-4.5"
        assert last_turn(poe) == "Q --thinking_budget 31999 --web_search true"
    claude.messages.create(model="claude-opus-4-6", max_tokens=1000, messages=[{"role": "user", "content": "Q"}],
                           extra_body={"output_config": {"effort": "max"}})
    assert last_turn(poe) == "Q --output_effort max"                      # not the lossy `high` of the converter
    with caplog.at_level(logging.DEBUG, logger="poe2openai"):
        claude.messages.create(model="GPT-4o", max_tokens=10, messages=[{"role": "user", "content": "Q"}],
                               tools=[search], extra_body={"output_config": {"effort": "low"}, "top_k": 5})
    assert last_turn(poe) == "Q"
    ignored = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert len(ignored) == 1
    assert "tools[type=web_search_20250305]" in ignored[0] and "output_config.effort" in ignored[0]
    client = proxy.client()
    for stream in (False, True):
        result = client.responses.create(model="GPT-5.4", input="Q", tools=[{"type": "web_search"}], stream=stream,
                                         reasoning={"effort": "high"}, extra_body={"verbosity": "low"})
        if stream:
            list(result)
        assert last_turn(poe) == "Q --web_search true --reasoning_effort high --verbosity low"
    client.responses.create(model="GPT-4o", input="Q", tools=[{"type": "web_search_preview"}])
    assert last_turn(poe) == "Q"
    assert not poe.invalid_queries


def test_a_value_outside_the_bots_schema_is_a_400_in_every_dialect(proxy: Proxy, poe: FakePoe) -> None:
    anthropic = pytest.importorskip("anthropic")
    poe.models = POE_MODELS
    messages = [{"role": "user", "content": "a cat"}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            proxy.client().chat.completions.create(model="Nano-Banana-2", messages=messages, stream=stream,
                                                   extra_body={"aspect_ratio": "7:3"})
        assert info.value.body["param"] == "aspect_ratio"   # type: ignore[index]
        assert "'aspect_ratio' must be one of 1:1, 2:3, 3:2" in info.value.message
        assert "Nano-Banana-2" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:
            proxy.client().responses.create(model="Nano-Banana-2", input="a cat", stream=stream,
                                            extra_body={"aspect_ratio": "7:3"})
        assert "one of 1:1, 2:3" in info.value.message
        with pytest.raises(anthropic.BadRequestError) as caught:
            anthropic_client(proxy).messages.create(model="Nano-Banana-2", max_tokens=10, messages=messages,
                                                    stream=stream, extra_body={"aspect_ratio": "7:3"})
        error = caught.value.body["error"]   # type: ignore[index]
        assert error["type"] == "invalid_request_error" and "one of 1:1, 2:3" in error["message"]
    assert bot_queries(poe, "Nano-Banana-2") == []


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_beyond_the_context_window_is_refused_before_poe(proxy: Proxy, poe: FakePoe, stream: bool) -> None:
    anthropic = pytest.importorskip("anthropic")
    poe.models = POE_MODELS
    prompt = "a watercolour of a lighthouse at dawn, " * 40             # some 400 tokens; FLUX-pro-1.1 takes 256
    messages = [{"role": "user", "content": prompt}]
    with pytest.raises(openai.BadRequestError) as info:
        result = proxy.client().chat.completions.create(model="FLUX-pro-1.1", messages=messages, stream=stream)
    assert info.value.code == "context_length_exceeded"
    message = info.value.body["message"]   # type: ignore[index]
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 256 maximum", message)
    with pytest.raises(openai.BadRequestError) as info:
        proxy.client().responses.create(model="flux-pro-1.1", input=prompt, stream=stream)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(anthropic.BadRequestError) as caught:
        anthropic_client(proxy).messages.create(model="FLUX-pro-1.1", max_tokens=10, messages=messages, stream=stream)
    error = caught.value.body["error"]   # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 256 maximum", error["message"])   # Claude Code compacts
    assert bot_queries(poe, "FLUX-pro-1.1") == []                       # refused before Poe was asked
    with pytest.raises(openai.BadRequestError) as info:                 # with a picture: nothing uploaded
        proxy.client().chat.completions.create(model="FLUX-pro-1.1", stream=stream, messages=[{"role": "user", "content": [
            {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": data_url(PNG, "image/png")}}]}])
    assert info.value.code == "context_length_exceeded" and poe.uploads == []
    result = proxy.client().chat.completions.create(model="FLUX-pro-1.1", messages=[
        {"role": "user", "content": "a lighthouse"}], stream=stream)   # a prompt that fits goes through
    if stream:
        list(result)
    assert len(bot_queries(poe, "FLUX-pro-1.1")) == 1


def test_max_tokens_is_clamped_and_sent_as_the_bots_parameter(start: Callable[..., Proxy], poe: FakePoe,
                                                              tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"enable": True, "custom_models": [
        {"id": "Short-Bot", "context_length": 100000, "max_output_tokens": 1000, "parameters": [
            {"name": "max_output_tokens", "schema": {"type": "number", "minimum": 1, "maximum": 4000}}]}]}))
    proxy = start()
    messages = [{"role": "user", "content": "Q"}]
    proxy.client().chat.completions.create(model="Short-Bot", messages=messages, max_tokens=50000)
    assert last_turn(poe) == "Q --max_output_tokens 1000"               # the bot's longest answer, not refused
    proxy.client().chat.completions.create(model="Short-Bot", messages=messages, max_completion_tokens=300)
    assert last_turn(poe) == "Q --max_output_tokens 300"
    proxy.client().responses.create(model="Short-Bot", input="Q", max_output_tokens=20000)
    assert last_turn(poe) == "Q --max_output_tokens 1000"
    anthropic_client(proxy).messages.create(model="Short-Bot", max_tokens=64000, messages=messages)
    assert last_turn(poe) == "Q --max_output_tokens 1000"
    proxy.client().chat.completions.create(model="GPT-4o", messages=messages, max_tokens=50000)   # declares none
    assert last_turn(poe) == "Q"


@pytest.mark.parametrize("body, flags", [
    ({"reasoning_effort": "high"}, " --reasoning_effort high"),
    ({"reasoning": {"effort": "minimal"}}, " --reasoning_effort minimal"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, " --thinking_budget 2048"),
    ({"extra_body": {"google": {"thinking_config": {"thinking_budget": 512}}}}, " --thinking_budget 512"),
    ({"google": {"thinking_config": {"thinking_budget": 0}}}, " --thinking_budget 0"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}, "reasoning_effort": "low"},
     " --thinking_budget 100 --reasoning_effort low"),
    ({"thinking": {"type": "disabled"}}, ""),
])
def test_reasoning_controls_become_flags_at_the_very_end(body: dict[str, Any], flags: str) -> None:
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "10:00"}]
    q = p2o.build_poe_query(p2o.parse_chat_request({"model": "m", "messages": messages, "tools": WEATHER_TOOLS,
                                                    **body}))
    last = q["query"][-1]["content"]
    assert last.startswith("<tool_result") and "</tools>" in last      # the last turn is the tool result
    assert last.endswith("</tools>" + flags)                           # flags after the tool block


@pytest.mark.parametrize("body, param", [
    ({"reasoning_effort": "maximal"}, "reasoning_effort"),
    ({"reasoning": {"effort": 3}}, "reasoning.effort"),
    ({"thinking": {"type": "enabled", "budget_tokens": "lots"}}, "thinking.budget_tokens"),
    ({"extra_body": {"google": {"thinking_config": {"thinking_budget": -5}}}},
     "extra_body.google.thinking_config.thinking_budget"),
])
def test_invalid_reasoning_controls_are_400(proxy: Proxy, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        proxy.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}],
                                               extra_body=body)
    assert info.value.body["param"] == param  # type: ignore[index]


# ----------------------------------------------------------------------------- tools

WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
            "ratio": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object"}, "note": {"type": ["string", "null"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": {}}},
]
TOOL_REPLY = ('Let me check both.\n<tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
              '<parameter name="days">3</parameter>\n<parameter name="metric">true</parameter>\n'
              '<parameter name="ratio">0.5</parameter>\n<parameter name="tags">["a", "b"]</parameter>\n'
              '<parameter name="where">{"lat": 48.8}</parameter>\n<parameter name="extra">kept</parameter>\n'
              '</invoke>\n</tool_call>\n<tool_call>\n<invoke name="get_time">\n</invoke>\n</tool_call>')
EXPECTED_CALLS = [("get_weather", {"city": "Paris", "days": 3, "metric": True, "ratio": 0.5, "tags": ["a", "b"],
                                   "where": {"lat": 48.8}, "extra": "kept"}),
                  ("get_time", {})]


def test_tool_prompt_follows_tool_choice() -> None:
    def query(**body: Any) -> str:
        chat = p2o.parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                       "tools": WEATHER_TOOLS, **body})
        q = p2o.build_poe_query(chat)
        QueryRequest.model_validate(q)
        assert "tools" not in q          # XML mode never sends Poe's native field
        return q["query"][-1]["content"]
    auto = query()
    assert auto.startswith("hi\n\n") and '<tool name="get_weather">' in auto and '<tool name="get_time">' in auto
    assert "<![CDATA[" in auto and "not inside a code block" in auto   # how to write values that hold tags
    assert query(tool_choice="none") == "hi"
    assert "must call at least one tool" in query(tool_choice="required")
    forced = query(tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "must call the tool get_time" in forced and "get_weather" not in forced
    assert "at most one tool" in query(parallel_tool_calls=False)
    with pytest.raises(p2o.ProxyError) as info:
        query(tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.status == 400 and info.value.param == "tool_choice"


def test_description_less_tools_become_poe_flags() -> None:
    chat = p2o.parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "draw a cat"}],
                                   "tools": [{"type": "function", "function": {"name": "no_watermark"}}]})
    assert p2o.build_poe_query(chat)["query"][-1]["content"] == "draw a cat --no_watermark"


PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                 "required": ["name", "age"]}


def tool_in_every_dialect(name: str, description: str | None, schema: Any) -> list[p2o.ChatRequest]:
    """One tool as the OpenAI chat, Anthropic and Responses dialects send it (description None = absent)."""
    about = {} if description is None else {"description": description}
    fn = {"name": name, **about, **({} if schema is None else {"parameters": schema})}
    messages = [{"role": "user", "content": "go"}]
    return [p2o.parse_chat_request({"model": "m", "messages": messages, "tools": [{"type": "function", "function": fn}]}),
            p2o.parse_chat_request(p2o.anthropic_to_openai({"model": "m", "max_tokens": 9, "messages": messages, "tools": [
                {"name": name, **about, "input_schema": schema if schema is not None else {"type": "object"}}]})),
            p2o.parse_chat_request(p2o.responses_to_openai({"model": "m", "input": "go", "tools": [
                {"type": "function", **fn}]}))]


@pytest.mark.parametrize("description", [None, ""])
def test_a_function_without_a_description_is_still_a_tool(description: str | None) -> None:
    for chat in tool_in_every_dialect("Person", description, PERSON_SCHEMA):
        assert chat.tools is not None and [t.name for t in chat.tools.tools] == ["Person"] and not chat.tools.flags
        prompt = p2o.build_poe_query(chat)["query"][-1]["content"]
        assert '<tool name="Person">' in prompt and "--Person" not in prompt
        assert "<description>" not in prompt and '"age"' in prompt
        native = p2o.build_poe_query(chat, tool_mode="native")
        QueryRequest.model_validate(native)
        assert native["tools"][0]["function"]["name"] == "Person"


@pytest.mark.parametrize("schema", [None, {}, {"type": "object"}, {"type": "object", "properties": {}}])
def test_a_bare_name_is_a_poe_flag_in_every_dialect(schema: Any) -> None:
    for chat in tool_in_every_dialect("web_search", None, schema):
        assert chat.tools is not None and chat.tools.flags == ("web_search",) and not chat.tools.tools
        assert p2o.build_poe_query(chat)["query"][-1]["content"] == "go --web_search"


def test_lenient_tool_schemas() -> None:
    tools = [{"type": "function", "function": {"name": "a", "description": "d", "strict": True, "parameters": {
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
        "$defs": {"X": {"type": "string"}}, "properties": {"x": {"$ref": "#/$defs/X"}}}}},
             {"type": "function", "function": {"name": "b", "description": "d"}},
             {"type": "function", "name": "c", "description": "flat form", "parameters": {"type": "object"}}]
    spec = p2o.parse_tools({"tools": tools})
    assert spec is not None and [t.name for t in spec.tools] == ["a", "b", "c"]


def test_tool_history_reaches_poe_once_each_in_order() -> None:
    body = json.loads((FIXTURES / "cline-chat.json").read_text())
    for mode in ("xml", "native"):
        q = p2o.build_poe_query(p2o.parse_chat_request(body), tool_mode=mode)
        QueryRequest.model_validate(q)
        text = json.dumps(q)
        assert text.count("call_3Zp8VqLk2MwN7xRt4Yb1Hs6C") == (1 if mode == "xml" else 2), mode
        assert text.count("def build_parser") == 1, mode
    xml = p2o.build_poe_query(p2o.parse_chat_request(body))
    roles = [m["role"] for m in xml["query"]]
    assert roles == ["system", "user", "bot", "user", "user"]
    assert '<invoke name="read_file">' in xml["query"][2]["content"]
    assert xml["query"][3]["content"].startswith('<tool_result tool_call_id="call_3Zp8VqLk2MwN7xRt4Yb1Hs6C" '
                                                 'name="read_file">')


def test_native_mode_sends_poe_tool_fields() -> None:
    body = {"model": "m", "tools": WEATHER_TOOLS, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}]}
    q = p2o.build_poe_query(p2o.parse_chat_request(body), tool_mode="native")
    QueryRequest.model_validate(q)
    assert [t["function"]["name"] for t in q["tools"]] == ["get_weather", "get_time"]
    assert q["tools"][1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert q["tool_calls"] == [{"id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]
    assert q["tool_results"] == [{"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                                  "content": "sunny"}]
    assert [m["content"] for m in q["query"]] == ["weather?"]


# ----------------------------------------------------------------------------- images and files in

def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_stand_in_attachments_count_as_the_uploads_will() -> None:
    # The context check runs before uploading, on stand-ins: the count must be the real query's, also when
    # the user sends back the bot's own Poe CDN picture (kept by its URL, so not counted twice).
    cdn = "https://pfst.cf2.poecdn.net/base/image/abc.png"
    messages = [{"role": "user", "content": "draw a cat"}, {"role": "assistant", "content": f"![cat]({cdn})"},
                {"role": "user", "content": [{"type": "text", "text": "make it blue, like this one"},
                                             {"type": "image_url", "image_url": {"url": cdn}},
                                             {"type": "image_url", "image_url": {"url": data_url(PNG)}}]}]
    chat = p2o.parse_chat_request({"model": "m", "messages": messages})
    media = p2o.collect_media(chat.messages)
    uploaded = {2: [{"url": cdn, "content_type": "image/png", "name": "abc.png"},
                    {"url": "https://pfst.cf2.poecdn.net/base/image/up1", "content_type": "image/png", "name": "i.png"}]}
    real = p2o.build_poe_query(chat, attachments=uploaded)
    stand_in = p2o.build_poe_query(chat, attachments=p2o.stand_in_attachments(media))
    assert len(stand_in["query"][-1]["attachments"]) == len(real["query"][-1]["attachments"]) == 2
    assert p2o.count_prompt_tokens(stand_in) == p2o.count_prompt_tokens(real)


def image_message(url: str, text: str = "What is in this image?") -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}]}


def test_a_big_data_url_image_costs_about_twice_its_size() -> None:
    """From the body's bytes to the upload's pieces (the path a 100 MB image takes), at 10 MB."""
    import tracemalloc
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(10 * 1024 * 1024)
    body = json.dumps({"model": "GPT-4o", "messages": [image_message(data_url(image))]}).encode()
    wire = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    tracemalloc.start()
    try:
        protocol = p2o.InboundProtocol(p2o.Settings(), now=0.0)
        (ready,) = [a for start in range(0, len(wire), 65536) for a in protocol.receive_data(wire[start:start + 65536], 0.0)]
        parsed = p2o.parse_json_body(ready.request)
        (media,) = p2o.collect_media(parsed["messages"])
        _, pieces = p2o.multipart_pieces([], [("file", media.name, media.content_type, media.data)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert media.data == image and any(piece is media.data for piece in pieces)   # uploaded as it is
    # The body, then its text, then the parsed data URL beside the decoded bytes: never more than two
    # body-sized things at once (it was five before: copies of the body, its text and the base64).
    assert peak < 2.5 * len(image) + len(body), (peak / len(image), len(body) / len(image))


def test_content_parts_are_collected_and_checked() -> None:
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": data_url(PNG_2X2)},                       # bare string form
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "file", "file": {"file_data": data_url(PDF_LIKE, "application/pdf"), "filename": "spec.pdf"}},
        {"type": "file", "file": {"file_data": base64.b64encode(PDF_LIKE).decode(), "filename": "raw.pdf"}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF0000WAVE").decode(), "format": "wav"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}]}]   # unknown: skipped
    media = p2o.collect_media(messages)
    assert [(m.where, m.content_type, m.name) for m in media] == [
        ("messages[0].content[1]", "image/png", "image.png"),
        ("messages[0].content[2]", "image/jpeg", "cat.jpg"),
        ("messages[0].content[3]", "application/pdf", "spec.pdf"),
        ("messages[0].content[4]", "application/pdf", "raw.pdf"),
        ("messages[0].content[5]", "audio/wav", "audio.wav")]
    assert media[0].data == PNG_2X2 and media[1].url == "https://example.com/cat.jpg" and media[3].data == PDF_LIKE
    assert media[0].cache_key == "sha256:" + hashlib.sha256(PNG_2X2).hexdigest()
    with pytest.raises(p2o.ProxyError) as info:
        p2o.collect_media([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}])
    assert info.value.status == 400 and info.value.param == "messages[0].content[0]"


def test_open_webui_screenshot_reaches_the_bot(proxy: Proxy, poe: FakePoe) -> None:
    body = json.loads((FIXTURES / "openwebui-chat.json").read_text())
    body["stream"] = False
    result = proxy.client().chat.completions.create(**body)
    assert result.choices[0].message.content == "Hello from GPT-4o"   # the catalogue's spelling of the bot
    upload = poe.uploads[0]
    assert upload["data"] == PNG_2X2 and upload["content_type"] == "image/png"
    assert upload["authorization"] == f"Bearer {KEY}"
    sent = last_query(poe)["query"]["query"][-1]
    assert sent["content"] == "What colours do you see in this image?"
    assert sent["attachments"] == [{"url": sent["attachments"][0]["url"], "content_type": "image/png",
                                    "name": "image.png"}]
    assert result.usage is not None and result.usage.prompt_tokens > p2o.ATTACHMENT_TOKENS


def test_same_image_twice_is_uploaded_once(proxy: Proxy, poe: FakePoe) -> None:
    client = proxy.client()
    url = data_url(PNG_2X2 + b"twice")
    for _ in range(2):
        client.chat.completions.create(model="GPT-4o", messages=[image_message(url)])
    assert len(poe.uploads) == 1
    first, second = [r["query"]["query"][-1]["attachments"] for r in poe.requests if r["path"].startswith("/bot/")]
    assert first == second


def test_twenty_concurrent_requests_share_one_upload(proxy: Proxy, poe: FakePoe) -> None:
    poe.upload_delay_s = 0.3                # all twenty arrive while the first upload is still running
    url = data_url(PNG_2X2 + b"concurrent")
    client = proxy.client()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: client.chat.completions.create(
            model="GPT-4o", messages=[image_message(url)]).choices[0].message.content, range(20)))
    assert results == ["Hello from GPT-4o"] * 20 and len(poe.uploads) == 1


def test_remote_and_cdn_urls(proxy: Proxy, poe: FakePoe) -> None:
    client = proxy.client()
    cdn = "https://pfst.cf2.poecdn.net/base/image/abc123?w=100"
    client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "https://example.com/photos/dog.webp"}},
        {"type": "image_url", "image_url": {"url": cdn}}]}])
    assert [u.get("download_url") for u in poe.uploads] == ["https://example.com/photos/dog.webp"]   # Poe fetches it
    attachments = last_query(poe)["query"]["query"][-1]["attachments"]
    assert attachments[1] == {"url": cdn, "content_type": "image/jpeg", "name": "image.jpg"}   # untouched
    assert attachments[0]["name"] == "dog.webp"


def test_files_and_audio_are_uploaded_with_names(proxy: Proxy, poe: FakePoe,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        proxy.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": [
            {"type": "text", "text": "summarise"},
            {"type": "file", "file": {"file_data": data_url(PDF_LIKE, "application/pdf"), "filename": "spec.pdf"}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"ID3fake-mp3").decode(),
                                                    "format": "mp3"}},
            {"type": "mystery_part", "x": 1}]}])
    assert "messages[0].content[3]: a content part of unknown type 'mystery_part'" in caplog.text
    assert [(u["filename"], u["content_type"], u["data"]) for u in poe.uploads] == [
        ("spec.pdf", "application/pdf", PDF_LIKE), ("audio.mp3", "audio/mpeg", b"ID3fake-mp3")]
    assert [a["name"] for a in last_query(poe)["query"]["query"][-1]["attachments"]] == ["spec.pdf", "audio.mp3"]


def test_upload_failure_names_the_part(proxy: Proxy, poe: FakePoe) -> None:
    poe.upload_status = 500
    with pytest.raises(openai.InternalServerError) as info:
        proxy.client().chat.completions.create(model="GPT-4o", messages=[
            {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
            image_message(data_url(PNG_2X2 + b"fail"))])
    assert info.value.status_code == 502 and "messages[2].content[1]" in info.value.message
    assert not [r for r in poe.requests if r["path"].startswith("/bot/")]   # nothing was asked of the bot


def test_unknown_content_parts_are_one_warning_per_request(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    parts = [{"type": "text", "text": "hi"}] + [{"type": "mystery_%d" % i} for i in range(50)]
    with caplog.at_level(logging.WARNING, logger="poe2openai"):
        proxy.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": parts}])
    said = [r.getMessage() for r in caplog.records if "content part" in r.getMessage()]
    assert len(said) == 1 and "skipping 50 content part(s)" in said[0] and len(said[0]) < 400


def test_a_bad_key_does_not_fail_someone_elses_upload(proxy: Proxy, poe: FakePoe) -> None:
    poe.upload_delay_s = 0.3
    poe.upload_bad_keys = {"bad-key"}
    url = data_url(PNG_2X2 + b"two keys")

    def ask(key: str) -> Any:
        try:
            return proxy.client(api_key=key).chat.completions.create(
                model="GPT-4o", messages=[image_message(url)]).choices[0].message.content
        except openai.APIStatusError as exc:
            return exc.status_code

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(ask, ["bad-key", KEY])
    assert bad == 401 and good == "Hello from GPT-4o"


###############################################################################
# Converters: Poe events -> neutral deltas -> OpenAI chunks / body
###############################################################################


# ----------------------------------------------------------------------------- reasoning ("Thinking...")

THINKING_REPLIES = [
    ("*Thinking...*\n\n> The user wants a number.\n> Forty-two fits.\n>\n> Done.\n\nThe answer is **42**.\n"
     "Thinking... is a word I may use later.",
     "The user wants a number.\nForty-two fits.\n\nDone.\n",
     "The answer is **42**.\nThinking... is a word I may use later."),
    ("Thinking...\r\n\r\n> crlf thoughts\r\n\r\nAnswer\r\n", "crlf thoughts\n", "Answer\r\n"),
    ("<think>\nStep 1: add.\nStep 2: done.\n</think>\n\nResult: 3", "Step 1: add.\nStep 2: done.", "Result: 3"),
    ("Thinking... about it, the answer is 3.", "", "Thinking... about it, the answer is 3."),
    ("No thoughts here. *Thinking...* appears late.", "", "No thoughts here. *Thinking...* appears late."),
]


def split_reply(chunks: list[str]) -> tuple[str, str]:
    translator = p2o.PoeTranslator()
    fold = p2o.ChatFold()
    for chunk in chunks:
        for d in translator.feed(p2o.SSEEvent("text", json.dumps({"text": chunk}))):
            fold.add(d)
    for d in translator.feed(p2o.SSEEvent("done", "{}")):
        fold.add(d)
    body = fold.body("x", 0, "m", 0)["choices"][0]["message"]
    return body.get("reasoning_content", ""), body["content"]


@pytest.mark.parametrize("reply, reasoning, content", THINKING_REPLIES)
def test_thinking_is_split_from_the_answer(reply: str, reasoning: str, content: str) -> None:
    assert split_reply([reply]) == (reasoning, content)
    assert split_reply(list(reply)) == (reasoning, content)          # one character at a time


@given(st.sampled_from(THINKING_REPLIES), st.lists(st.integers(min_value=1, max_value=400), max_size=25))
@hsettings(max_examples=400, deadline=None)
def test_any_chunking_gives_the_same_reasoning_and_content(case: tuple[str, str, str], cuts: list[int]) -> None:
    reply, reasoning, content = case
    bounds = [0, *sorted({c for c in cuts if c < len(reply)}), len(reply)]
    assert split_reply([reply[a:b] for a, b in zip(bounds, bounds[1:])]) == (reasoning, content)


def test_reasoning_stream_and_non_stream_agree(proxy: Proxy, poe: FakePoe) -> None:
    reply, reasoning, content = THINKING_REPLIES[0]
    poe.on("Thinker", xml_reply_steps(reply, 4))
    client = proxy.client()
    whole = client.chat.completions.create(model="Thinker", messages=[{"role": "user", "content": "?"}])
    message = whole.model_dump()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)
    assert message["reasoning"] == reasoning                       # the other name some clients read
    assert whole.usage is not None and whole.usage.completion_tokens_details is not None
    assert whole.usage.completion_tokens_details.reasoning_tokens > 0
    status, lines = raw_sse(proxy, {"model": "Thinker", "stream": True, "messages": [{"role": "user", "content": "?"}]})
    deltas = [c["choices"][0]["delta"] for c in data_chunks(lines) if c != "[DONE]" and c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.get("reasoning") or "" for d in deltas) == reasoning
    assert "".join(d.get("content") or "" for d in deltas) == content


# ----------------------------------------------------------------------------- JSON answers

def test_structured_outputs_with_the_sdk_parse_helper(proxy: Proxy, poe: FakePoe) -> None:
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    poe.on("GPT-4o", xml_reply_steps('```json\n{"name": "Oslo", "population": 709000}\n```', 4))
    client = proxy.client()
    parsed = client.chat.completions.parse(model="GPT-4o", response_format=City,
                                           messages=[{"role": "user", "content": "Biggest city of Norway?"}])
    assert parsed.choices[0].message.parsed == City(name="Oslo", population=709000)
    asked = last_query(poe)["query"]["query"][-1]["content"]
    assert asked.startswith("Biggest city of Norway?\n\n") and '"population"' in asked and "JSON schema" in asked
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="GPT-4o", stream=True, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "x"}]) if c.choices)
    assert json.loads(streamed) == {"name": "Oslo", "population": 709000}
    plain = client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    assert plain.choices[0].message.content.startswith("```json")     # fences are only removed in JSON mode


JSON_ANSWERS = [   # (what the bot writes, what a JSON-mode client gets)
    ('{"a": 1, "s": "x}y\\"z"}', '{"a": 1, "s": "x}y\\"z"}'),
    ('```json\n{"a": [1, 2]}\n```', '{"a": [1, 2]}'),
    ('```\n[{"a": 1}]\n```\nThat is all.', '[{"a": 1}]'),
    ('{"a": 1}\n\nHope this helps!', '{"a": 1}'),
    ('Here is the JSON:\n```json\n{"a": 1}\n```\nLet me know.', '{"a": 1}'),
    ('Sure! The answer is {"name": "Oslo", "tags": ["a"]} as asked.', '{"name": "Oslo", "tags": ["a"]}'),
    ('See [1] and [2]: {"a": 1}', '{"a": 1}'),
    ("I cannot answer that.", "I cannot answer that."),
    ('Two of them: {"a": 1} and {"b": 2}', 'Two of them: {"a": 1} and {"b": 2}'),
    ('```json\n{"a": 1\n```', '{"a": 1'),                          # broken JSON: given as it is, unfenced
    ('[not json] then {"a": 1}', '[not json] then {"a": 1}'),       # started as JSON: streamed, so kept
]


def shape_json(chunks: list[str]) -> tuple[str, str]:
    """(everything the client gets, what it got before the end) for a JSON answer fed in these chunks."""
    shaper = p2o.JSONAnswer()
    early = "".join(shaper.feed(chunk) for chunk in chunks)
    return early + shaper.end(), early


@pytest.mark.parametrize("reply, expected", JSON_ANSWERS)
def test_json_answers_give_the_json_value(reply: str, expected: str) -> None:
    assert shape_json([reply])[0] == expected


@given(st.sampled_from(JSON_ANSWERS), st.lists(st.integers(min_value=1, max_value=60), unique=True, max_size=12))
@hsettings(max_examples=300, deadline=None)
def test_json_answers_under_any_chunking(case: tuple[str, str], cuts: list[int]) -> None:
    reply, expected = case
    bounds = [0, *sorted(c for c in cuts if c < len(reply)), len(reply)]
    assert shape_json([reply[a:b] for a, b in zip(bounds, bounds[1:])])[0] == expected


def test_a_json_answer_streams_and_prose_is_held() -> None:
    assert shape_json(['```json\n{"city": ', '"Oslo", "n": [1', ", 2]}", "\n```"]) == (
        '{"city": "Oslo", "n": [1, 2]}', '{"city": "Oslo", "n": [1, 2]}')        # out before the end
    assert shape_json(["Sure, here:", ' {"a": 1}', " ok"]) == ('{"a": 1}', "")    # held until the end


def test_prose_wrapped_json_both_ways(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", xml_reply_steps('Of course! Here is the object:\n\n```json\n{"name": "Oslo"}\n```\nAnything else?', 6))
    client = proxy.client()
    for fmt in ({"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}}):
        messages = [{"role": "user", "content": "x"}]
        whole = client.chat.completions.create(model="GPT-4o", response_format=fmt, messages=messages)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="GPT-4o", response_format=fmt, stream=True, messages=messages) if c.choices)
        assert whole.choices[0].message.content == streamed == '{"name": "Oslo"}'


# ----------------------------------------------------------------------------- XML tool calls

def parse_reply(chunks: list[str], tools: Any = WEATHER_TOOLS, **body: Any) -> tuple[str, list[Any], str]:
    """Run chunks through the translator as Poe text events; (text, [(name, args)], finish)."""
    translator = p2o.PoeTranslator(p2o.parse_tools({"tools": tools, **body}))
    deltas = []
    for chunk in chunks:
        deltas += translator.feed(p2o.SSEEvent("text", json.dumps({"text": chunk})))
    deltas += translator.feed(p2o.SSEEvent("done", "{}"))
    fold = p2o.ChatFold()
    for d in deltas:
        fold.add(d)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in fold.body("x", 0, "m", 0)["choices"][0]["message"].get("tool_calls", [])]
    return fold.content, calls, fold.finish_reason


def test_xml_tool_calls_are_typed_by_schema() -> None:
    text, calls, finish = parse_reply([TOOL_REPLY])
    assert text == "Let me check both.\n" and calls == EXPECTED_CALLS and finish == "tool_calls"


@given(st.lists(st.integers(min_value=1, max_value=len(TOOL_REPLY) - 1), unique=True, max_size=60))
@hsettings(max_examples=300, deadline=None)
def test_any_chunking_gives_the_same_tool_calls(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(TOOL_REPLY)]
    assert parse_reply([TOOL_REPLY[a:b] for a, b in zip(bounds, bounds[1:])]) == (
        "Let me check both.\n", EXPECTED_CALLS, "tool_calls")


MENTION_REPLY = "Write `<tool_call>` to call; a < b, and <invoke> alone, or <tool_call> then prose </tool_call>."


@given(st.lists(st.integers(min_value=1, max_value=len(MENTION_REPLY) - 1), unique=True, max_size=30))
@hsettings(max_examples=200, deadline=None)
def test_text_that_mentions_tags_is_released_unchanged(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(MENTION_REPLY)]
    assert parse_reply([MENTION_REPLY[a:b] for a, b in zip(bounds, bounds[1:])]) == (MENTION_REPLY, [], "stop")


def test_mention_does_not_stall_the_stream() -> None:
    translator = p2o.PoeTranslator(p2o.parse_tools({"tools": WEATHER_TOOLS}))
    out = translator.feed(p2o.SSEEvent("text", json.dumps({"text": "Use <tool_call> like this: "})))
    # the tag was followed by prose, so everything is out before `done`
    assert "".join(d.text for d in out if d.kind == p2o.TEXT) == "Use <tool_call> like this: "
    out = translator.feed(p2o.SSEEvent("text", json.dumps({"text": "it wraps a call. And <tool"})))
    assert "".join(d.text for d in out) == "it wraps a call. And "     # only a possible tag start is held


def test_other_tool_call_forms() -> None:
    assert parse_reply(['<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'])[1] == [
        ("get_weather", {"city": "Oslo"})]
    assert parse_reply(['<tool_call><name>get_weather</name><arguments>{"city": "Rome"}</arguments></tool_call>'])[1] \
        == [("get_weather", {"city": "Rome"})]
    assert parse_reply(["```xml\n<tool_call>\n<invoke name=\"get_time\"></invoke>\n</tool_call>\n```"]) == (
        "", [("get_time", {})], "tool_calls")
    # an unclosed call at the end of the answer is still taken
    assert parse_reply(['<tool_call>\n<invoke name="get_weather">\n<parameter name="city">Nice</parameter>\n'])[1] == [
        ("get_weather", {"city": "Nice"})]
    # unknown tools are not calls
    assert parse_reply(['<tool_call><invoke name="rm_rf"></invoke></tool_call>'])[1] == []


def test_parameter_values_keep_code_intact() -> None:
    code = "if a < b && c:\n    print('<tag>')\n"
    tools = [{"type": "function", "function": {"name": "write", "description": "w", "parameters": {
        "type": "object", "properties": {"content": {"type": "string"}, "path": {"type": "string"}}}}}]
    reply = f'<tool_call>\n<invoke name="write">\n<parameter name="path"> a.py </parameter>\n' \
            f'<parameter name="content">\n{code}</parameter>\n</invoke>\n</tool_call>'
    # the newline after the opening tag and before the closing tag are layout, not content
    assert parse_reply([reply], tools)[1] == [("write", {"path": "a.py", "content": code.rstrip("\n")})]
    escaped = '<tool_call><invoke name="write"><parameter name="content">x &lt; y &amp;&amp; z</parameter>' \
              '</invoke></tool_call>'
    assert parse_reply([escaped], tools)[1] == [("write", {"content": "x < y && z"})]


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text, calls, finish = parse_reply([TOOL_REPLY], parallel_tool_calls=False)
    assert [c[0] for c in calls] == ["get_weather"] and finish == "tool_calls"


def test_langchain_structured_output_tool_gets_its_call(proxy: Proxy, poe: FakePoe) -> None:
    # LangChain's with_structured_output(method="function_calling") on a docstring-less pydantic model:
    # description "", and tool_choice naming the tool.
    tool = {"type": "function", "function": {"name": "Person", "description": "", "parameters": PERSON_SCHEMA}}
    poe.on("GPT-4o", xml_reply_steps('<tool_call>\n<invoke name="Person">\n<parameter name="name">Ada</parameter>\n'
                                     '<parameter name="age">36</parameter>\n</invoke>\n</tool_call>', 5))
    choice = {"type": "function", "function": {"name": "Person"}}
    messages = [{"role": "user", "content": "Ada Lovelace, 36"}]
    result = proxy.client().chat.completions.create(model="GPT-4o", messages=messages, tools=[tool],
                                                    tool_choice=choice)
    call = result.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("Person", {"name": "Ada", "age": 36})
    assert result.choices[0].finish_reason == "tool_calls"
    prompt = last_query(poe)["query"]["query"][-1]["content"]
    assert "must call the tool Person" in prompt and "--Person" not in prompt
    # a tool_choice naming a bare-name tool: the client wants a call, so it is offered as a tool
    chat = p2o.parse_chat_request({"model": "m", "messages": messages, "tool_choice": {
        "type": "function", "function": {"name": "now"}}, "tools": [{"type": "function", "function": {"name": "now"}}]})
    assert chat.tools is not None and [t.name for t in chat.tools.tools] == ["now"] and not chat.tools.flags


def test_cline_request_gets_structured_tool_calls(proxy: Proxy, poe: FakePoe) -> None:
    body = json.loads((FIXTURES / "cline-chat.json").read_text())
    reply = ('I will edit the parser.\n<tool_call>\n<invoke name="replace_in_file">\n'
             '<parameter name="path">src/cli.py</parameter>\n<parameter name="diff">\n------- SEARCH\n'
             "    p.add_argument('--quiet', action='store_true')\n=======\n"
             "    p.add_argument('--quiet', action='store_true')\n    p.add_argument('--verbose', action='store_true')\n"
             "+++++++ REPLACE\n</parameter>\n</invoke>\n</tool_call>")
    poe.on(body["model"], xml_reply_steps(reply))
    status, lines = raw_sse(proxy, body)
    chunks = [c for c in data_chunks(lines) if c != "[DONE]"]
    assert status == 200
    tool_deltas = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    first = tool_deltas[0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"] == {"name": "replace_in_file", "arguments": ""}
    args = json.loads("".join(d["function"]["arguments"] for d in tool_deltas))
    assert args["path"] == "src/cli.py" and "--verbose" in args["diff"] and args["diff"].startswith("------- SEARCH")
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == "I will edit the parser.\n"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0   # include_usage
    whole = proxy.client().chat.completions.create(**{**body, "stream": False})        # and not streamed
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content == content
    assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments) == args


def test_agent_loop_with_the_sdk(proxy: Proxy, poe: FakePoe) -> None:
    client = proxy.client()
    poe.on("GPT-4o", xml_reply_steps(TOOL_REPLY, 5))
    messages: list[Any] = [{"role": "user", "content": "Weather and time?"}]
    with client.chat.completions.stream(model="GPT-4o", messages=messages, tools=WEATHER_TOOLS) as stream:
        first = stream.get_final_completion()
    calls = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == EXPECTED_CALLS
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": calls[0].id, "content": "Sunny, 21 C"},
                 {"role": "tool", "tool_call_id": calls[1].id, "content": [{"type": "text", "text": "10:42"}]}]
    poe.on("GPT-4o", text_events("It is sunny and 10:42."))
    answer = client.chat.completions.create(model="GPT-4o", messages=messages, tools=WEATHER_TOOLS)
    assert answer.choices[0].message.content == "It is sunny and 10:42."
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    sent = json.dumps(last_query(poe)["query"])
    for needle in (calls[0].id, calls[1].id, "Sunny, 21 C", "10:42"):
        assert sent.count(needle) == 1, needle
    query = last_query(poe)["query"]["query"]
    assert [m["role"] for m in query] == ["user", "bot", "user"]
    assert query[2]["content"].index("Sunny") < query[2]["content"].index("10:42") < query[2]["content"].index("<tools>")


def test_claude_code_router_style_request(proxy: Proxy, poe: FakePoe) -> None:
    # What claude-code-router sends after converting a Claude Code turn: $schema / additionalProperties in the
    # schemas, parallel calls answered by part-array tool results, and a system-reminder after them.
    src = json.loads((FIXTURES / "claude-code-messages.json").read_text())
    tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                               "parameters": t["input_schema"]}} for t in src["tools"]]
    body = {"model": "Claude-Sonnet-4.5", "stream": True, "tools": tools, "max_tokens": 32000, "messages": [
        {"role": "system", "content": [{"type": "text", "text": b["text"]} for b in src["system"]]},
        {"role": "user", "content": "Fix the failing test."},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "toolu_01", "type": "function", "function": {"name": tools[0]["function"]["name"],
                                                                "arguments": '{"command": "pytest -q"}'}},
            {"id": "toolu_02", "type": "function", "function": {"name": tools[1]["function"]["name"],
                                                                "arguments": '{"file_path": "/x.py"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "1 failed"},
        {"role": "tool", "tool_call_id": "toolu_02", "content": [{"type": "text", "text": "print(1)"}]},
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>keep going</system-reminder>"}]}]}
    name = tools[0]["function"]["name"]
    reply = f'<tool_call>\n<invoke name="{name}">\n<parameter name="command">pytest -q -x</parameter>\n</invoke>\n</tool_call>'
    poe.on("Claude-Sonnet-4.5", xml_reply_steps(reply, 3))
    client = proxy.client()
    stream = client.chat.completions.create(**body)
    calls: dict[int, dict[str, str]] = {}
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert calls == {0: {"name": name, "arguments": '{"command":"pytest -q -x"}'}}
    body["stream"] = False
    result = client.chat.completions.create(**body)
    assert json.loads(result.choices[0].message.tool_calls[0].function.arguments) == {"command": "pytest -q -x"}


@pytest.mark.parametrize("chunks", [
    ['I would use <invoke name="get_weather"> to look it up. Done.'],
    ['Calling <tool_call>\n<invoke name="get_weather">\n<parameter name="city">Par'],     # cut off mid-value
    ['Use the `', '<invoke name="get_weather">` tag. Bye'],                                # split mention
    ['```xml\n<tool_call><invoke name="rm_rf"></invoke></tool_call>\n```'],               # not our tool
])
def test_prose_is_never_taken_for_a_call(chunks: list[str]) -> None:
    assert parse_reply(chunks) == ("".join(chunks), [], "stop")


@pytest.mark.parametrize("chunks, text", [
    (['Here:\n```\nfoo\n```\n<tool_call><invoke name="get_time"></invoke></tool_call>'], "Here:\n```\nfoo\n```\n"),
    (['Sure.\n``', '`xml\n<tool_call><invoke name="get_time"></invoke></tool_call>\n```'], "Sure.\n"),
])
def test_fences_around_calls(chunks: list[str], text: str) -> None:
    assert parse_reply(chunks) == (text, [("get_time", {})], "tool_calls")


def test_parameter_spelling_and_cdata() -> None:
    reply = ('<tool_call><invoke name="GET_WEATHER"><parameter name="City">Oslo</parameter>'
             '<parameter name="Days">4</parameter><parameter name="note"><![CDATA[a </parameter> b]]></parameter>'
             '</invoke></tool_call>')
    assert parse_reply([reply])[1] == [("get_weather", {"city": "Oslo", "days": 4, "note": "a </parameter> b"})]


def test_a_huge_argument_in_small_chunks_is_linear() -> None:
    content = "x = 1  # filler line\n" * 25_000            # ~500 KB of code
    tools = [{"type": "function", "function": {"name": "write", "description": "w", "parameters": {
        "type": "object", "properties": {"content": {"type": "string"}}}}}]
    reply = f'<tool_call><invoke name="write"><parameter name="content">{content}</parameter></invoke></tool_call>'
    began = time.process_time()
    calls = parse_reply([reply[i:i + 4] for i in range(0, len(reply), 4)], tools)[1]
    assert calls == [("write", {"content": content.rstrip("\n")})]
    assert time.process_time() - began < 5.0               # quadratic buffering took 15 s here


FENCED_MIX = ('Plan:\n```python\nprint("<tool_call>")\n```\nNow `<invoke>` it:\n```xml\n<tool_call>\n'
              '<invoke name="get_weather">\n<parameter name="city">Bergen</parameter>\n</invoke>\n</tool_call>\n```')


@given(st.lists(st.integers(min_value=1, max_value=len(FENCED_MIX) - 1), unique=True, max_size=40))
@hsettings(max_examples=300, deadline=None)
def test_fenced_mix_under_any_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(FENCED_MIX)]
    assert parse_reply([FENCED_MIX[a:b] for a, b in zip(bounds, bounds[1:])]) == (
        'Plan:\n```python\nprint("<tool_call>")\n```\nNow `<invoke>` it:\n', [("get_weather", {"city": "Bergen"})],
        "tool_calls")


# A corpus of what models write when told to use our format: (id, reply, text the client sees, calls).
# Every entry must come out the same however it is split (see the tests below).
WRITE_FILE = {"type": "function", "function": {"name": "write_file", "description": "Write a file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}}
CORPUS_TOOLS = [*WEATHER_TOOLS, WRITE_FILE]
NS = "antml:"   # Anthropic's namespace, spelled out of band
TAGGY = "Close with </parameter></invoke></tool_call> and ]]-free text."
CORPUS: list[tuple[str, str, str, list[Any]]] = [
    ("ours", 'I will check.\n<tool_call>\n<invoke name="get_weather">\n<parameter name="city">Oslo</parameter>\n'
             '<parameter name="days">2</parameter>\n</invoke>\n</tool_call>',
     "I will check.\n", [("get_weather", {"city": "Oslo", "days": 2})]),
    ("ours-in-xml-fence", 'Sure.\n```xml\n<tool_call>\n<invoke name="get_time">\n</invoke>\n</tool_call>\n```',
     "Sure.\n", [("get_time", {})]),
    ("ours-in-plain-fence-two-calls", '```\n<tool_call>\n<invoke name="get_weather">\n<parameter name="city">Rome'
     '</parameter>\n</invoke>\n</tool_call>\n<tool_call>\n<invoke name="get_time">\n</invoke>\n</tool_call>\n```\n',
     "", [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ("ours-cut-before-end-tags", '<tool_call>\n<invoke name="get_weather">\n<parameter name="city">Nice</parameter>\n'
     '<parameter name="metric">false</parameter>\n', "", [("get_weather", {"city": "Nice", "metric": False})]),
    ("ours-without-tool_call-end", '<tool_call><invoke name="get_weather"><parameter name="city">Nice</parameter>'
     '</invoke>', "", [("get_weather", {"city": "Nice"})]),
    ("ours-prose-after-is-dropped", '<tool_call><invoke name="get_time"></invoke></tool_call>\nI will now wait.',
     "", [("get_time", {})]),
    ("wrong-case", '<tool_call><invoke name="Get_Weather"><parameter name="CITY">Oslo</parameter>'
     '<parameter name="Days">3</parameter></invoke></tool_call>', "", [("get_weather", {"city": "Oslo", "days": 3})]),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 3}}\n'
     '</tool_call>', "Let me look.\n", [("get_weather", {"city": "Lima", "days": 3})]),
    ("hermes-string-arguments", '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\", '
     '\\"days\\": \\"4\\"}"}</tool_call>', "", [("get_weather", {"city": "Lima", "days": 4})]),
    ("hermes-two-calls", '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_weather", "parameters": {"city": "Cusco"}}\n</tool_call>', "",
     [("get_time", {}), ("get_weather", {"city": "Cusco"})]),
    ("anthropic", 'Checking.\n<function_calls>\n<invoke name="get_weather">\n<parameter name="city">Oslo</parameter>\n'
     '<parameter name="tags">["x"]</parameter>\n</invoke>\n<invoke name="get_time">\n</invoke>\n</function_calls>',
     "Checking.\n", [("get_weather", {"city": "Oslo", "tags": ["x"]}), ("get_time", {})]),
    ("anthropic-namespaced", f'<{NS}function_calls>\n<{NS}invoke name="get_weather">\n<{NS}parameter name="city">'
     f'Bergen</{NS}parameter>\n<{NS}parameter name="ratio">1.5</{NS}parameter>\n</{NS}invoke>\n</{NS}function_calls>',
     "", [("get_weather", {"city": "Bergen", "ratio": 1.5})]),
    ("qwen3-coder", 'Okay.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n'
     '<parameter=days>\n5\n</parameter>\n</function>\n</tool_call>', "Okay.\n",
     [("get_weather", {"city": "San Francisco", "days": 5})]),
    ("qwen3-coder-bare", '<function=get_weather>\n<parameter=city>\nBerlin\n</parameter>\n<parameter=where>\n'
     '{"lat": 52.5}\n</parameter>\n</function>', "", [("get_weather", {"city": "Berlin", "where": {"lat": 52.5}})]),
    ("qwen3-coder-no-parameter-ends", '<tool_call>\n<function=get_weather>\n<parameter=city>\nBern\n<parameter=metric>\n'
     'true\n</function>\n</tool_call>', "", [("get_weather", {"city": "Bern", "metric": True})]),
    ("glm", '<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n<arg_key>days</arg_key>\n'
     '<arg_value>2</arg_value>\n</tool_call>', "", [("get_weather", {"city": "Beijing", "days": 2})]),
    ("glm-inline-no-arguments", 'Time first.<tool_call>get_time</tool_call>', "Time first.", [("get_time", {})]),
    ("json-fence", 'Calling the tool:\n```json\n{"name": "get_weather", "arguments": {"city": "Quito"}}\n```',
     "Calling the tool:\n", [("get_weather", {"city": "Quito"})]),
    ("json-fence-parameters", '```json\n{\n  "name": "get_weather",\n  "parameters": {"city": "Quito", "ratio": "0.25"}\n'
     '}\n```', "", [("get_weather", {"city": "Quito", "ratio": 0.25})]),
    ("json-fence-openai-shape", '```json\n{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}\n```',
     "", [("get_time", {})]),
    ("cdata-with-tags", '<tool_call>\n<invoke name="write_file">\n<parameter name="path">notes.md</parameter>\n'
     f'<parameter name="content"><![CDATA[{TAGGY}]]></parameter>\n</invoke>\n</tool_call>', "",
     [("write_file", {"path": "notes.md", "content": TAGGY})]),
    ("raw-value-with-end-tags", '<tool_call>\n<invoke name="write_file">\n<parameter name="content">A block ends with '
     '</invoke> and </tool_call>.</parameter>\n</invoke>\n</tool_call>', "",
     [("write_file", {"content": "A block ends with </invoke> and </tool_call>."})]),
    # what must stay text, unchanged
    ("not-offered", '<tool_call>\n<invoke name="delete_everything">\n<parameter name="path">/</parameter>\n</invoke>\n'
     '</tool_call>', "=", []),
    ("hermes-not-offered", 'Try <tool_call>{"name": "launch", "arguments": {}}</tool_call> now.', "=", []),
    ("backtick-mentions", 'Wrap each call in `<tool_call>` and `<invoke name="get_time">`, then `</tool_call>`.', "=", []),
    ("json-fence-not-a-call", 'Here is the data:\n```json\n{"name": "Ada", "arguments": ["x"]}\n```\nAnd:\n```json\n'
     '{"city": "Oslo", "days": 3}\n```\n', "=", []),
    ("html-answer", 'Use this markup:\n<div class="card">\n  <h1>Title</h1>\n  <p>a < b && c > d</p>\n</div>\n', "=", []),
    ("xml-answer", '<?xml version="1.0"?>\n<config><tool name="x"/><invoke>no</invoke><function>f</function></config>',
     "=", []),
    ("unclosed-invoke-in-prose", 'You could call <invoke name="get_weather"> with a city, e.g. Paris.', "=", []),
    ("call-shown-in-code-block", 'Example:\n```python\nreply = """\n<tool_call>\n<invoke name="get_time"></invoke>\n'
     '</tool_call>\n"""\n```\nThat is all.', "=", []),
    ("tag-then-prose", 'The <tool_call> tag wraps get_weather. <tool_call>get_weather is a tool</tool_call>.', "=", []),
    ("markup-in-a-wrapper", 'The <tool_call><em>wrapper</em></tool_call> holds <function_calls><b>x</b>.', "=", []),
    ("qwen-mention", 'In Qwen format you write <function=name> tags, or <function=get_time> then words.', "=", []),
    ("cut-off-mid-value", 'Calling <tool_call>\n<invoke name="get_weather">\n<parameter name="city">Par', "=", []),
    ("many-backticks", 'Use ``` fences or `code` spans; ```` too.\n```\nplain < text\n```\n`` ` ```', "=", []),
]
CORPUS_IDS = [entry[0] for entry in CORPUS]


def pieces(text: str, sizes: list[int]) -> list[str]:
    """`text` cut into pieces of the given sizes, cycling through them."""
    out, at, i = [], 0, 0
    while at < len(text):
        out.append(text[at:at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    return out


def parse_directly(chunks: list[str], tools: Any = CORPUS_TOOLS, **body: Any) -> tuple[str, list[Any], bool]:
    """Run chunks through the parser itself; (text, [(name, args)], whether it stopped)."""
    parser = p2o.XMLToolParser(p2o.parse_tools({"tools": tools, **body}))  # type: ignore[arg-type]
    deltas = [d for chunk in chunks for d in parser.feed(chunk)] + parser.end()
    calls = [(d.name, json.loads(args.text)) for d, args in zip(deltas, deltas[1:]) if d.kind == p2o.TOOL_START]
    assert [d.index for d in deltas if d.kind == p2o.TOOL_START] == list(range(len(calls)))
    return "".join(d.text for d in deltas if d.kind == p2o.TEXT), calls, parser.stopped


@pytest.mark.parametrize("name, reply, text, calls", CORPUS, ids=CORPUS_IDS)
def test_corpus_of_model_outputs_in_token_sized_pieces(name: str, reply: str, text: str, calls: list[Any]) -> None:
    expected = (reply if text == "=" else text, calls)
    for sizes in ([len(reply)], [1], [2], [3], [4], [5], [1, 3, 2, 5, 4]):
        assert parse_directly(pieces(reply, sizes))[:2] == expected, sizes
        got = parse_reply(pieces(reply, sizes), CORPUS_TOOLS)
        assert got == (*expected, "tool_calls" if calls else "stop"), sizes


@given(st.sampled_from(CORPUS), st.lists(st.floats(min_value=0, max_value=1), max_size=40))
@hsettings(max_examples=400, deadline=None)
def test_corpus_under_any_chunking(entry: tuple[str, str, str, list[Any]], cuts: list[float]) -> None:
    _, reply, text, calls = entry
    bounds = sorted({0, len(reply), *(int(c * len(reply)) for c in cuts)})
    assert parse_directly([reply[a:b] for a, b in zip(bounds, bounds[1:])])[:2] == (
        reply if text == "=" else text, calls)


call_pieces = st.lists(st.sampled_from(list("ab <>/`\n\"'=![]{}:,&;x") + [
    "<tool_call>", "</tool_call>", '<invoke name="get_time">', '<invoke name="nope">', "</invoke>",
    '<parameter name="city">', "</parameter>", "<function_calls>", "</function_calls>", "<function=get_weather>",
    "</function>", "<parameter=city>", "get_weather", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
    "<![CDATA[", "]]>", "```", "```json\n", "```xml\n", "\n```\n", '{"name": "get_time", "arguments": {}}',
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}', "`<tool_call>`", "</", "<tool"]), max_size=40).map("".join)


@given(call_pieces, st.lists(st.floats(min_value=0, max_value=1), max_size=30), st.booleans())
@hsettings(max_examples=500, deadline=None)
def test_any_text_gives_the_same_result_however_it_is_split(text: str, cuts: list[float], parallel: bool) -> None:
    bounds = sorted({0, len(text), *(int(c * len(text)) for c in cuts)})
    whole = parse_directly([text], parallel_tool_calls=parallel)
    assert parse_directly([text[a:b] for a, b in zip(bounds, bounds[1:])], parallel_tool_calls=parallel) == whole
    assert parse_directly(list(text), parallel_tool_calls=parallel) == whole
    if not whole[1]:
        assert whole[0] == text        # no call: every character reaches the client, in order
    for name, arguments in whole[1]:
        assert name in ("get_time", "get_weather") and isinstance(arguments, dict)


SSE_SUBSET = ["ours-in-xml-fence", "hermes-string-arguments", "anthropic-namespaced", "qwen3-coder", "glm",
              "json-fence", "cdata-with-tags", "not-offered", "json-fence-not-a-call", "call-shown-in-code-block"]


@pytest.mark.parametrize("name", SSE_SUBSET)
def test_corpus_through_the_proxy_streamed_and_not(proxy: Proxy, poe: FakePoe, name: str) -> None:
    _, reply, text, calls = CORPUS[CORPUS_IDS.index(name)]
    text = reply if text == "=" else text
    client = proxy.client()
    ask = {"model": "GPT-4o", "tools": CORPUS_TOOLS, "messages": [{"role": "user", "content": "go"}]}
    poe.on("GPT-4o", xml_reply_steps(reply, 3))
    content, streamed, finishes = "", {}, []
    for chunk in client.chat.completions.create(stream=True, **ask):
        choice = chunk.choices[0] if chunk.choices else None
        if choice is None:
            continue
        content += choice.delta.content or ""
        finishes += [choice.finish_reason] if choice.finish_reason else []
        for tc in choice.delta.tool_calls or []:
            entry = streamed.setdefault(tc.index, ["", ""])
            entry[0] += tc.function.name or "" if tc.function else ""
            entry[1] += tc.function.arguments or "" if tc.function else ""
    assert content == text
    assert [(n, json.loads(a)) for n, a in (streamed[i] for i in sorted(streamed))] == calls
    assert finishes == ["tool_calls" if calls else "stop"]
    poe.on("GPT-4o", xml_reply_steps(reply, 2))
    whole = client.chat.completions.create(**ask).choices[0]
    assert (whole.message.content or "") == text and whole.finish_reason == ("tool_calls" if calls else "stop")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []] == calls


@pytest.mark.parametrize("reply", [TOOL_REPLY, CORPUS[CORPUS_IDS.index("qwen3-coder")][1],
                                   CORPUS[CORPUS_IDS.index("json-fence")][1], CORPUS[CORPUS_IDS.index("glm")][1],
                                   CORPUS[CORPUS_IDS.index("anthropic")][1]])
def test_a_call_is_made_as_soon_as_its_end_tag_arrives(reply: str) -> None:
    # Poe streams token by token, so an end tag comes in many pieces: the call must not wait for the answer's end.
    parser = p2o.XMLToolParser(p2o.parse_tools({"tools": CORPUS_TOOLS, "parallel_tool_calls": False}))  # type: ignore
    closer = next(c for c in ("</tool_call>", "</function_calls>", "\n```") if c in reply)
    done_at = (reply.rindex(closer) if closer == "\n```" else reply.index(closer)) + len(closer)
    for at in range(len(reply)):
        out = parser.feed(reply[at])
        assert parser.stopped == (at + 1 >= done_at), at
        if parser.stopped:
            assert [d.kind for d in out].count(p2o.TOOL_START) == 1
            break
    assert parser.stopped and parser.feed("more prose") == [] and parser.end() == []


def test_text_before_a_call_goes_out_at_once() -> None:
    parser = p2o.XMLToolParser(p2o.parse_tools({"tools": CORPUS_TOOLS}))  # type: ignore[arg-type]
    assert [d.text for d in parser.feed("Let me check the weather.\n")] == ["Let me check the weather.\n"]
    assert parser.feed("```xml\n<tool_call>\n<invoke name=\"get_time\">") == []   # might be a call: held
    assert parser.feed("</invoke>\n</tool_call>")[0].kind == p2o.TOOL_START
    prose = p2o.XMLToolParser(p2o.parse_tools({"tools": CORPUS_TOOLS}))  # type: ignore[arg-type]
    out = prose.feed("Markup: <div><tool_call><em>x</em> ```json\n<tool_call> then <function=nope> and <tool")
    assert "".join(d.text for d in out) == "Markup: <div><tool_call><em>x</em> ```json\n<tool_call> then " \
                                           "<function=nope> and "


def test_single_call_in_tiny_events_stops_poe_at_once(proxy: Proxy, poe: FakePoe) -> None:
    call = '<tool_call>\n<invoke name="get_weather">\n<parameter name="city">Oslo</parameter>\n</invoke>\n</tool_call>'
    poe.on("Chatty", [sse("text", {"text": call[i:i + 2]}) for i in range(0, len(call), 2)]
           + [sse("text", {"text": " And now"}), 3.0, sse("text", {"text": " more."}), sse("done", {})])
    began = time.monotonic()
    with proxy.client().chat.completions.stream(model="Chatty", tools=WEATHER_TOOLS, parallel_tool_calls=False,
                                                messages=[{"role": "user", "content": "weather?"}]) as stream:
        final = stream.get_final_completion()
    assert time.monotonic() - began < 1.5
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}


def parser_cost(text: str, step: int = 64) -> float:
    """CPU seconds to stream `text` through the parser in `step`-character events (best of three)."""
    spec = p2o.parse_tools({"tools": CORPUS_TOOLS})
    chunks = [text[i:i + step] for i in range(0, len(text), step)]
    best = float("inf")
    for _ in range(3):
        parser = p2o.XMLToolParser(spec)  # type: ignore[arg-type]
        began = time.process_time()
        for chunk in chunks:
            parser.feed(chunk)
        parser.end()
        best = min(best, time.process_time() - began)
    return best


def test_a_megabyte_argument_costs_no_more_than_plain_text() -> None:
    content = ("    if a < b and `c`:  # ``` a <tag> line\n" * 30_000)[:1_000_000]
    plain = parser_cost(content)
    for value in (content, f"<![CDATA[{content}]]>"):
        call = f'<tool_call>\n<invoke name="write_file">\n<parameter name="content">{value}</parameter>\n</invoke>\n' \
               '</tool_call>'
        assert parser_cost(call) <= 2 * plain + 0.05
    assert parser_cost(f"<function=write_file>\n<parameter=content>\n{content}\n</parameter>\n</function>") \
        <= 2 * plain + 0.05


@pytest.mark.parametrize("unit", ["a < b <c <t <tool <invoke x <function=y ``` `` \n```\n", "``` `a` ```\n" * 3,
                                  "<tool_call><x>", '<invoke name="get_time">', "\n```json\n{\"name\": \"get_time\""])
def test_awkward_text_costs_linear_time(unit: str) -> None:
    small = unit * (100_000 // len(unit))
    assert parser_cost(small * 4) <= 4 * 2.5 * parser_cost(small) + 0.05


# ----------------------------------------------------------------------------- files out

FILE_EVENT = {"url": "https://pfst.cf2.poecdn.net/base/image/out1", "content_type": "image/png",
              "name": "cat.png", "inline_ref": "ref1"}


@pytest.mark.parametrize("order", ["file_first", "text_first"])
@pytest.mark.parametrize("stream", [False, True])
def test_image_bot_pictures_reach_the_client(proxy: Proxy, poe: FakePoe, order: str, stream: bool) -> None:
    text = [sse("text", {"text": "Here is your cat: ![cat]["}), sse("text", {"text": "ref1] Enjoy."})]
    other = sse("file", {"url": "https://pfst.cf2.poecdn.net/base/text/notes", "content_type": "text/plain",
                         "name": "notes.txt", "inline_ref": "ref2"})
    file_event = sse("file", FILE_EVENT)
    steps = [file_event, *text] if order == "file_first" else [*text, file_event]
    poe.on("ImageBot", [*steps, other, sse("done", {})])
    client = proxy.client()
    messages = [{"role": "user", "content": "draw a cat"}]
    if stream:
        content = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="ImageBot", messages=messages, stream=True) if c.choices)
    else:
        content = client.chat.completions.create(model="ImageBot", messages=messages).choices[0].message.content
    assert content == ("Here is your cat: ![cat](https://pfst.cf2.poecdn.net/base/image/out1) Enjoy."
                       "\n\n[notes.txt](https://pfst.cf2.poecdn.net/base/text/notes)")


def test_follow_up_edit_sees_the_previous_picture() -> None:
    picture = "https://pfst.cf2.poecdn.net/base/image/out1"
    messages = [{"role": "user", "content": "draw a cat"},
                {"role": "assistant", "content": f"Here: ![cat]({picture}) and again {picture}."},
                {"role": "user", "content": "make it blue"}]
    q = p2o.build_poe_query(p2o.parse_chat_request({"model": "m", "messages": messages}))
    QueryRequest.model_validate(q)
    assert q["query"][-1]["attachments"] == [{"url": picture, "content_type": "image/jpeg", "name": "image.jpg"}]
    assert "attachments" not in q["query"][0]
    # the last user turn comes before the assistant's picture: nothing is carried back
    q = p2o.build_poe_query(p2o.parse_chat_request({"model": "m", "messages": messages[:2]}))
    assert all("attachments" not in m for m in q["query"])
    # the picture is already attached by the client: no duplicate
    again = [*messages[:2], image_message(picture, "make it blue")]
    q = p2o.build_poe_query(p2o.parse_chat_request({"model": "m", "messages": again}),
                            attachments={2: [{"url": picture, "content_type": "image/png", "name": "cat.png"}]})
    assert [a["url"] for a in q["query"][-1]["attachments"]] == [picture]


# ----------------------------------------------------------------------------- the translator

def test_hostile_bot_output_never_breaks_the_stream() -> None:
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object",
              "properties": {"n": {"type": "integer"}, "o": {"type": "object"}, "s": {"type": "string"}}}}}]
    reply = ('<tool_call><invoke name="f"><parameter name="s">&#99999999; &#x110000;</parameter>'
             f'<parameter name="n">{"9" * 5000}</parameter><parameter name="o">{"[" * 100000}</parameter>'
             '</invoke></tool_call>')
    text, calls, finish = parse_reply([reply], tools)
    assert finish == "tool_calls" and calls[0][1]["s"] == "&#99999999; &#x110000;"
    assert calls[0][1]["n"] == "9" * 5000 and calls[0][1]["o"] == "[" * 100000   # kept as text


def test_file_then_single_tool_call_finishes_once() -> None:
    translator = p2o.PoeTranslator(p2o.parse_tools({"tools": WEATHER_TOOLS, "parallel_tool_calls": False}))
    deltas = translator.feed(p2o.SSEEvent("file", json.dumps(FILE_EVENT)))
    deltas += translator.feed(p2o.SSEEvent("text", json.dumps(
        {"text": '<tool_call><invoke name="get_time"></invoke></tool_call> and more talk'})))
    deltas += translator.feed(p2o.SSEEvent("done", "{}"))
    assert [d.kind for d in deltas].count(p2o.FINISH) == 1
    fold = p2o.ChatFold()
    for d in deltas:
        fold.add(d)
    message = fold.body("x", 0, "m", 0)["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time"]
    assert message["content"] == "\n\n![cat.png](https://pfst.cf2.poecdn.net/base/image/out1)"   # not lost


def translate(events: list[tuple[str, Any]], **kw: Any) -> tuple[dict[str, Any], str]:
    """Poe events through a translator: (the folded message, the text an OpenAI stream would show)."""
    body = kw.pop("body", {"tools": WEATHER_TOOLS})
    translator = p2o.PoeTranslator(p2o.parse_tools(body), **kw)
    deltas = [d for kind, data in events for d in translator.feed(p2o.SSEEvent(kind, json.dumps(data)))]
    deltas += translator.feed(p2o.SSEEvent("done", "{}"))
    fold, encoder = p2o.ChatFold(), p2o.OpenAIStreamEncoder("x", 0, "m", False)
    stream = b""
    for d in deltas:
        fold.add(d)
        stream += encoder.encode(d) if d.kind != p2o.FINISH else b""
    shown = "".join(c["choices"][0]["delta"].get("content") or "" for c in
                    (json.loads(line[6:]) for line in stream.decode().split("\n\n") if line))
    return fold.body("x", 0, "m", 0)["choices"][0], shown


def native_call(index: int, call_id: str, name: str, arguments: str) -> tuple[str, Any]:
    return "json", {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}}]}


XML_TIME_CALL = '<tool_call><invoke name="get_time"></invoke></tool_call>'


def test_native_calls_are_taken_in_xml_mode_too(proxy: Proxy, poe: FakePoe) -> None:
    # GPT-4o is in XML mode, but Poe passes the bot's own function calls on as `json` events.
    poe.on("GPT-4o", [sse("text", {"text": "Checking.\n" + XML_TIME_CALL}),
                      native_chunk({"tool_calls": [{"index": 0, "id": "call_native1", "type": "function",
                                                    "function": {"name": "get_weather", "arguments": '{"city":'}}]}),
                      native_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
                      sse("done", {})])
    client = proxy.client()
    messages = [{"role": "user", "content": "time and weather?"}]
    expected = [("get_time", {}), ("get_weather", {"city": "Oslo"})]
    whole = client.chat.completions.create(model="GPT-4o", messages=messages, tools=WEATHER_TOOLS)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls] == expected
    assert whole.choices[0].message.tool_calls[1].id == "call_native1"
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content == "Checking.\n"
    with client.chat.completions.stream(model="GPT-4o", messages=messages, tools=WEATHER_TOOLS) as stream:
        final = stream.get_final_completion()
    assert [(c.function.name, json.loads(c.function.arguments)) for c in final.choices[0].message.tool_calls] == expected
    message = anthropic_client(proxy).messages.create(model="GPT-4o", max_tokens=50, messages=messages, tools=[
        {"name": t["function"]["name"], "description": "d", "input_schema": {"type": "object"}} for t in WEATHER_TOOLS])
    assert [(b.name, b.input) for b in message.content if b.type == "tool_use"] == expected
    assert message.stop_reason == "tool_use"


def test_a_native_call_in_many_small_pieces_is_linear_and_bounded() -> None:
    # A bot writing a file through a native call sends its arguments a few characters at a time: gathering
    # them (whole for Anthropic and Responses, folded for a non-streamed reply) must not copy the growing
    # text on every piece, and what is gathered stays within MAX_ANSWER_SIZE.
    content = "def f():\n    return 1\n" * 65_000      # ~1.5 MB of code, JSON-escaped
    arguments = json.dumps({"path": "big.py", "content": content})
    pieces = [arguments[i:i + 64] for i in range(0, len(arguments), 64)]
    events = [native_call(0, "c_1", "write_file", pieces[0])] + [
        ("json", {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}}]})
        for piece in pieces[1:]]
    body = {"tools": [WRITE_FILE]}
    raw = [p2o.SSEEvent(kind, json.dumps(data)) for kind, data in events] + [p2o.SSEEvent("done", "{}")]
    for whole_calls in (False, True):
        began = time.process_time()
        translator, fold = p2o.PoeTranslator(p2o.parse_tools(body), whole_calls=whole_calls), p2o.ChatFold()
        for event in raw:
            for delta in translator.feed(event):
                fold.add(delta)
        message = fold.body("x", 0, "m", 0)["choices"][0]["message"]
        assert json.loads(message["tool_calls"][0]["function"]["arguments"])["content"] == content
        assert time.process_time() - began < 2.0, whole_calls    # ~0.3 s; gathering with += took ~8 s
    token = p2o.answer_limit.set(100_000)   # the request's MAX_ANSWER_SIZE, in force while it is handled
    try:
        translator = p2o.PoeTranslator(p2o.parse_tools(body), whole_calls=True)
    finally:
        p2o.answer_limit.reset(token)   # a stream's later events are read outside that context
    with pytest.raises(p2o.ProxyError) as info:
        for event in raw:
            translator.feed(event)
    assert (info.value.status, info.value.code) == (502, "answer_too_large")


def test_native_and_xml_calls_share_one_numbering() -> None:
    message, _ = translate([native_call(0, "c_a", "get_weather", '{"city": "Rome"}'), ("text", {"text": XML_TIME_CALL}),
                            native_call(1, "c_b", "get_time", "{}")])
    assert [(c["id"], c["function"]["name"]) for c in message["message"]["tool_calls"]] == [
        ("c_a", "get_weather"), (message["message"]["tool_calls"][1]["id"], "get_time"), ("c_b", "get_time")]
    assert message["finish_reason"] == "tool_calls"
    # parallel_tool_calls=false: the first call, whichever way it came, is the whole answer
    for events in ([("text", {"text": XML_TIME_CALL}), native_call(0, "c_a", "get_weather", "{}")],
                   [native_call(0, "c_a", "get_time", "{}"), ("text", {"text": XML_TIME_CALL}),
                    native_call(1, "c_b", "get_weather", "{}")]):
        for whole_calls in (False, True):
            message, _ = translate(events, body={"tools": WEATHER_TOOLS, "parallel_tool_calls": False},
                                   whole_calls=whole_calls)
            calls = message["message"]["tool_calls"]
            assert [c["function"]["name"] for c in calls] == ["get_time"] and message["finish_reason"] == "tool_calls"
    # without tools in the request there is nothing to call
    message, _ = translate([native_call(0, "c_a", "get_time", "{}")], body={})
    assert "tool_calls" not in message["message"] and message["finish_reason"] == "stop"


def test_replace_response_goes_through_the_tool_parser(proxy: Proxy, poe: FakePoe) -> None:
    weather = '<tool_call><invoke name="get_weather"><parameter name="city">Lima</parameter></invoke></tool_call>'
    # a replacement that extends the text: only its new tail is parsed, and the call is found
    message, shown = translate([("text", {"text": "Working"}), ("replace_response", {"text": "Working.\n" + weather})])
    assert message["message"]["content"] == shown == "Working.\n"
    assert json.loads(message["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Lima"}
    # a different answer: the client gets exactly the new one whole, a stream what it can after a blank line
    message, shown = translate([("text", {"text": "Draft"}), ("replace_response", {"text": "Final: " + weather})])
    assert message["message"]["content"] == "Final: " and shown == "Draft\n\nFinal: "
    assert message["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    poe.on("GPT-4o", [sse("text", {"text": "One moment"}), sse("replace_response", {"text": "Sure. " + XML_TIME_CALL}),
                      sse("done", {})])
    client = proxy.client()
    for stream in (False, True):
        if stream:
            with client.chat.completions.stream(model="GPT-4o", tools=WEATHER_TOOLS,
                                                messages=[{"role": "user", "content": "x"}]) as s:
                result = s.get_final_completion()
        else:
            result = client.chat.completions.create(model="GPT-4o", tools=WEATHER_TOOLS,
                                                    messages=[{"role": "user", "content": "x"}])
        assert result.choices[0].message.tool_calls[0].function.name == "get_time", stream
        assert result.choices[0].finish_reason == "tool_calls"
        assert "<tool_call>" not in (result.choices[0].message.content or "")


def test_replace_response_goes_through_the_json_stage() -> None:
    fenced = '```json\n{"a": 1}\n```'
    for events in ([("text", {"text": '```json\n{"a"'}), ("replace_response", {"text": fenced})],     # extends
                   [("text", {"text": "Let me think"}), ("replace_response", {"text": fenced})],    # replaces
                   [("replace_response", {"text": "Here it is:\n" + fenced + "\nDone."})]):
        message, shown = translate(events, body={}, json_answer=True)
        assert message["message"]["content"] == shown == '{"a": 1}', events


def test_many_small_texts_then_a_replacement_stay_linear() -> None:
    piece = "0123456789 abcdefghij ABCDEFGHIJ qrstuvw\n"            # 40 characters, no tag in sight
    translator = p2o.PoeTranslator(p2o.parse_tools({"tools": WEATHER_TOOLS}))
    event = p2o.SSEEvent("text", json.dumps({"text": piece}))
    began = time.process_time()
    out = [d for _ in range(100_000) for d in translator.feed(event)]   # 4 MB of answer
    out += translator.feed(p2o.SSEEvent("replace_response", json.dumps({"text": piece * 100_000 + "!"})))
    assert time.process_time() - began < 3.0                        # copying what was seen on each piece: 6 s
    assert "".join(d.text for d in out if d.kind == p2o.TEXT) == piece * 100_000 + "!"


def test_ordinary_brackets_never_hold_the_stream() -> None:
    translator = p2o.PoeTranslator()
    out = translator.feed(p2o.SSEEvent("text", json.dumps({"text": "v = m[0][1] and see [the docs][1] too"})))
    assert "".join(d.text for d in out) == "v = m[0][1] and see [the docs][1] too"


def test_single_call_answer_stops_poe_at_once(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("Chatty", [sse("text", {"text": '<tool_call><invoke name="get_time"></invoke></tool_call>'}),
                      sse("text", {"text": " Now I will also"}), 3.0, sse("text", {"text": " go on."}),
                      sse("done", {})])
    began = time.monotonic()
    result = proxy.client().chat.completions.create(model="Chatty", tools=WEATHER_TOOLS, parallel_tool_calls=False,
                                                    messages=[{"role": "user", "content": "time?"}])
    assert time.monotonic() - began < 1.5 and result.choices[0].message.tool_calls[0].function.name == "get_time"
    deadline = time.monotonic() + 2
    while not poe.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert poe.disconnects                              # Poe was told to stop


awkward_text = st.lists(st.sampled_from(list("ab <>/`\n\"'=![]()*>{}:&;#x") + [
    "<tool_call>", "</tool_call>", '<invoke name="get_time">', "</invoke>", '<parameter name="city">',
    "</parameter>", "```", "```xml\n", "*Thinking...*\n", "> ", "<think>", "</think>", "![c][ref1]", "🎉", "世"]),
    max_size=30).map("".join)


@given(st.lists(st.tuples(st.sampled_from(["text", "text", "text", "file", "replace_response", "json"]), awkward_text),
                max_size=12),
       st.booleans(), st.booleans(), st.booleans())
@hsettings(max_examples=300, deadline=None)
def test_translator_survives_anything_a_bot_sends(events: list[tuple[str, str]], with_tools: bool, parallel: bool,
                                                  json_answer: bool) -> None:
    body = {"tools": WEATHER_TOOLS, "parallel_tool_calls": parallel} if with_tools else {}
    translator = p2o.PoeTranslator(p2o.parse_tools(body), json_answer=json_answer)
    deltas: list[p2o.Delta] = []
    for kind, text in events:
        data = {"url": "https://pfst.cf2.poecdn.net/x", "content_type": "image/png", "name": "x.png",
                "inline_ref": "ref1"} if kind == "file" else {"choices": [{"delta": {"content": text}}]} \
            if kind == "json" else {"text": text}
        deltas += translator.feed(p2o.SSEEvent(kind, json.dumps(data)))
    deltas += translator.feed(p2o.SSEEvent("done", "{}"))
    assert [d.kind for d in deltas].count(p2o.FINISH) == 1 and deltas[-1].kind == p2o.FINISH
    fold = p2o.ChatFold()
    encoder = p2o.OpenAIStreamEncoder("x", 0, "m", True)
    stream = encoder.start()
    for d in deltas:
        fold.add(d)
        if d.kind != p2o.FINISH:
            stream += encoder.encode(d)
    stream += encoder.finish(deltas[-1].text, 5)
    for line in stream.decode().split("\n\n"):
        assert not line or line == "data: [DONE]" or json.loads(line[6:])   # every chunk is JSON
    body_out = fold.body("x", 0, "m", 5)
    for call in body_out["choices"][0]["message"].get("tool_calls", []):
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


# ----------------------------------------------------------------------------- OpenAI renderings: stream and fold

def test_stream_and_fold_agree_on_replace_response() -> None:
    deltas = [p2o.Delta(p2o.TEXT, "Hello"), p2o.Delta(p2o.REPLACE, "Hello, world"), p2o.Delta(p2o.TEXT, "!"),
              p2o.Delta(p2o.REPLACE, "Other"), p2o.Delta(p2o.TEXT, " end")]
    fold = p2o.ChatFold()
    enc = p2o.OpenAIStreamEncoder("id", 1, "m", False)
    streamed = ""
    for d in deltas:
        fold.add(d)
        out = enc.encode(d)
        for line in out.decode().split("\n\n"):
            if line.startswith("data: "):
                streamed += json.loads(line[6:])["choices"][0]["delta"]["content"]
    assert fold.content == "Other end"          # non-stream: exactly Poe's final text
    assert streamed == "Hello, world!\n\nOther end"   # stream: nothing repeated, nothing lost


# Stream and fold agree by construction: any mix of Poe events, through the translator, rendered by each
# dialect's stream encoder (accumulated the way its SDK does) and by its fold, says the same answer. The
# one allowed difference is the design's: after a replace_response that does not extend what was sent, the
# stream shows the old text, a blank line and the replacement; the whole answer is the replacement.

_ANSWER_PIECES = ["Hello", " world", "\n", "\n\n", "*Thinking...*\n", "> a thought\n", "<think>", "</think>",
                  '<tool_call>\n<invoke name="get_time">\n</invoke>\n</tool_call>', "<tool_call>",
                  '<invoke name="get_weather"><parameter name="city">Paris</parameter></invoke>', "</tool_call>",
                  "![a cat][ref1]", "![a cat]", "[ref1]", "]", "[", '{"a": 1}', "```json\n", "```", "é", "🎉"]
_answer_text = st.lists(st.sampled_from(_ANSWER_PIECES) | st.text(max_size=4), max_size=4).map("".join)


def _native_call(index: int, call_id: str, name: str, arguments: str, content: str) -> tuple[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call["id"] = call_id
    if name:
        call["function"]["name"] = name
    return "json", {"choices": [{"index": 0, "delta": {"content": content, "tool_calls": [call]}}]}


_poe_event = st.one_of(
    _answer_text.map(lambda t: ("text", {"text": t})),
    _answer_text.map(lambda t: ("text", {"text": t})),
    _answer_text.map(lambda t: ("replace_response", {"text": t})),
    st.builds(_native_call, st.integers(0, 2), st.sampled_from(["", "call_poe1"]),
              st.sampled_from(["", "get_weather", "get_time", "not_offered"]),
              st.sampled_from(["", '{"city": ', '"Paris"}', "{}"]), st.sampled_from(["", "Hi"])),
    st.just(("file", {"url": "https://pfst.cf2.poecdn.net/base/image/f.png", "name": "f.png", "inline_ref": "ref1",
                      "content_type": "image/png"})),
    st.just(("file", {"url": "https://pfst.cf2.poecdn.net/base/text/notes.txt", "name": "notes.txt"})),
    st.just(("error", {"text": "The bot failed.", "error_type": "bot_error"})),
    st.just(("done", {})),
    st.just(("meta", {"content_type": "text/markdown"})))


def _dialect_deltas(events: list[tuple[str, Any]], tools: bool, native: bool, json_answer: bool, parallel: bool,
                    whole_calls: bool) -> list[p2o.Delta]:
    """The deltas of one answer, up to and with its FINISH or ERROR, as the pipeline's source sees them."""
    spec = p2o.parse_tools({"tools": WEATHER_TOOLS, "parallel_tool_calls": parallel}) if tools else None
    ids = iter(range(1000))
    translator = p2o.PoeTranslator(spec, native_tools=native, json_answer=json_answer, whole_calls=whole_calls,
                                   make_id=lambda: f"call_{next(ids)}")
    deltas: list[p2o.Delta] = []
    for name, data in events:
        deltas += translator.feed(p2o.SSEEvent(name, json.dumps(data)))
    deltas += translator.end()
    assert [d.kind for d in deltas].count(p2o.FINISH) + [d.kind for d in deltas].count(p2o.ERROR) == 1
    assert deltas[-1].kind in (p2o.FINISH, p2o.ERROR)   # and nothing after it
    return deltas


def _sse_events(data: bytes) -> list[tuple[str, Any]]:
    out = []
    for block in data.decode().split("\n\n"):
        name, payload = "", None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and line[6:] != "[DONE]":
                payload = json.loads(line[6:])
        if payload is not None:
            out.append((name, payload))
    return out


def _answer(content: str, reasoning: str, calls: list[tuple[str, str, Any]], finish: str,
            usage: Any) -> dict[str, Any]:
    return {"content": content, "reasoning": reasoning, "calls": calls, "finish": finish, "usage": usage}


def _chat_stream_answer(pieces: list[bytes]) -> tuple[dict[str, Any], list[str], Any]:
    """What the openai SDK accumulates: content, reasoning, tool calls by index, finish reason, usage.
    Also the content seen before each piece, and the error event if any."""
    content, reasoning, calls, finish, usage, error, before = "", "", {}, "", None, None, []
    for piece in pieces:
        before.append(content)
        for _, chunk in _sse_events(piece):
            if "error" in chunk:
                error = chunk["error"]
                continue
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                delta = choice["delta"]
                content += delta.get("content") or ""
                reasoning += delta.get("reasoning_content") or ""
                for call in delta.get("tool_calls") or []:
                    entry = calls.setdefault(call["index"], ["", "", ""])
                    entry[0] = entry[0] or call.get("id") or ""
                    entry[1] += call["function"].get("name") or ""
                    entry[2] += call["function"].get("arguments") or ""
                finish = choice["finish_reason"] or finish
    return (_answer(content, reasoning, [tuple(calls[i]) for i in sorted(calls)], finish, usage), before, error)


def _chat_fold_answer(body: dict[str, Any]) -> dict[str, Any]:
    message = body["choices"][0]["message"]
    calls = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    return _answer(message["content"] or "", message.get("reasoning_content", ""), calls,
                   body["choices"][0]["finish_reason"], body["usage"])


def _anthropic_stream_answer(pieces: list[bytes]) -> tuple[dict[str, Any], list[str], Any]:
    """What the anthropic SDK accumulates: content blocks (text, thinking, tool_use with its input)."""
    blocks: dict[int, dict[str, Any]] = {}
    finish, usage, error, before = "", None, None, []
    for piece in pieces:
        before.append("".join(b["text"] for b in blocks.values()))
        for name, event in _sse_events(piece):
            if name == "content_block_start":
                block = event["content_block"]
                blocks[event["index"]] = {"type": block["type"], "text": block.get("text", ""),
                                          "thinking": block.get("thinking", ""), "id": block.get("id"),
                                          "name": block.get("name"), "json": ""}
            elif name == "content_block_delta":
                block, delta = blocks[event["index"]], event["delta"]
                block["text"] += delta.get("text", "")
                block["thinking"] += delta.get("thinking", "")
                block["json"] += delta.get("partial_json", "")
            elif name == "message_delta":
                finish, usage = event["delta"]["stop_reason"], event["usage"]
            elif name == "error":
                error = event["error"]
    ordered = [blocks[i] for i in sorted(blocks)]
    calls = [(b["id"], b["name"], p2o._arguments_dict(b["json"]) or {}) for b in ordered if b["type"] == "tool_use"]
    return (_answer("".join(b["text"] for b in ordered), "".join(b["thinking"] for b in ordered), calls, finish,
                    usage), before, error)


def _anthropic_fold_answer(body: dict[str, Any]) -> dict[str, Any]:
    blocks = body["content"]
    return _answer("".join(b["text"] for b in blocks if b["type"] == "text"),
                   "".join(b["thinking"] for b in blocks if b["type"] == "thinking"),
                   [(b["id"], b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"],
                   body["stop_reason"], body["usage"])


def _responses_stream_answer(pieces: list[bytes]) -> tuple[dict[str, Any], list[str], Any]:
    """What the openai SDK accumulates from Responses events: output_text, reasoning summaries, function
    calls with their argument deltas; the final object's status and usage."""
    content, reasoning, items, usage, status, error, before = "", "", {}, None, "", None, []
    for piece in pieces:
        before.append(content)
        for name, event in _sse_events(piece):
            if name == "response.output_item.added":
                items[event["output_index"]] = dict(event["item"], arguments="")
            elif name == "response.output_text.delta":
                content += event["delta"]
            elif name == "response.reasoning_summary_text.delta":
                reasoning += event["delta"]
            elif name == "response.function_call_arguments.delta":
                items[event["output_index"]]["arguments"] += event["delta"]
            elif name in ("response.completed", "response.failed"):
                usage, status = event["response"]["usage"], event["response"]["status"]
                error = event["response"].get("error")
    calls = [(i["call_id"], i["name"], i["arguments"]) for _, i in sorted(items.items()) if i["type"] == "function_call"]
    return _answer(content, reasoning, calls, status, usage), before, error


def _responses_fold_answer(body: dict[str, Any]) -> dict[str, Any]:
    content = "".join(p["text"] for i in body["output"] if i["type"] == "message" for p in i["content"])
    reasoning = "".join(p["text"] for i in body["output"] if i["type"] == "reasoning" for p in i["summary"])
    calls = [(i["call_id"], i["name"], i["arguments"]) for i in body["output"] if i["type"] == "function_call"]
    return _answer(content, reasoning, calls, body["status"], body["usage"])


_DIALECTS = {
    "chat": (False, lambda: p2o.OpenAIStreamEncoder("chatcmpl-1", 0, "m", True), p2o.ChatFold,
             _chat_stream_answer, _chat_fold_answer),
    "anthropic": (True, lambda: p2o.AnthropicStreamEncoder("msg_1", "m", 7), p2o.AnthropicFold,
                  _anthropic_stream_answer, _anthropic_fold_answer),
    "responses": (True, lambda: p2o.ResponsesStreamEncoder(p2o.responses_envelope("resp_1", 0, "m", {})),
                  lambda: p2o.ResponsesFold(p2o.responses_envelope("resp_1", 0, "m", {})),
                  _responses_stream_answer, _responses_fold_answer),
}


@given(events=st.lists(_poe_event, max_size=10), tools=st.booleans(), native=st.booleans(),
       json_answer=st.booleans(), parallel=st.booleans())
# Found by this test: a replacement after a tool call had closed the message (Responses kept the old text).
@example(events=[("text", {"text": 'Hello<tool_call>\n<invoke name="get_time">\n</invoke>\n</tool_call>'}),
                 ("replace_response", {"text": "HelloHello"}), ("replace_response", {"text": ""})],
         tools=True, native=False, json_answer=False, parallel=True)
@hsettings(max_examples=400, deadline=None)
def test_stream_and_fold_say_the_same_answer_in_every_dialect(events: list[tuple[str, Any]], tools: bool,
                                                              native: bool, json_answer: bool,
                                                              parallel: bool) -> None:
    for dialect, (whole_calls, encoder_of, fold_of, from_stream, from_fold) in _DIALECTS.items():
        deltas = _dialect_deltas(events, tools, native, json_answer, parallel, whole_calls)
        encoder, fold, end = encoder_of(), fold_of(), deltas[-1]
        pieces = [encoder.start()] + [encoder.encode(d) for d in deltas[:-1]]
        if end.kind == p2o.ERROR:
            assert end.error is not None
            pieces.append(encoder.error(end.error))
            streamed, _, error = from_stream(pieces)
            assert error is not None and error["message"] == end.error.message, dialect   # the whole answer raises it
            continue
        pieces.append(encoder.finish(end.text, 7))
        for delta in deltas:
            fold.add(delta)
        streamed, before, error = from_stream(pieces)
        whole = from_fold(fold.body("id-1", 0, "m", 7))
        assert error is None
        assert {k: v for k, v in streamed.items() if k != "content"} == \
            {k: v for k, v in whole.items() if k != "content"}, dialect
        if streamed["content"] != whole["content"]:
            # Only after a replacement: the stream's text at that point, a blank line, then the whole answer.
            replaced = [before[i + 1] for i, d in enumerate(deltas[:-1]) if d.kind == p2o.REPLACE]
            assert any(streamed["content"] == seen + "\n\n" + whole["content"] for seen in replaced if seen), \
                (dialect, streamed["content"], whole["content"])


def test_a_fold_refuses_an_answer_past_max_answer_size() -> None:
    for fold in (p2o.ChatFold(max_answer_size=1000), p2o.AnthropicFold(max_answer_size=1000)):
        fold.add(p2o.Delta(p2o.TEXT, "x" * 600))
        fold.add(p2o.Delta(p2o.REPLACE, "y" * 900))   # a replacement takes the place of what was said
        with pytest.raises(p2o.ProxyError) as info:
            fold.add(p2o.Delta(p2o.REASONING, "é" * 60))   # bytes, not characters, are counted
        assert (info.value.status, info.value.code) == (502, "answer_too_large")
        assert "MAX_ANSWER_SIZE" in info.value.message


###############################################################################
# The Anthropic Messages dialect (Claude Code, the anthropic SDK)
###############################################################################

CITY_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
               "required": ["name", "population"], "additionalProperties": False}


def test_anthropic_structured_outputs(proxy: Proxy, poe: FakePoe) -> None:
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    poe.on("Claude-Sonnet-4.5", xml_reply_steps('Here you go:\n```json\n{"name": "Oslo", "population": 709000}\n```', 5))
    client = anthropic_client(proxy)
    messages = [{"role": "user", "content": "Biggest city of Norway?"}]
    parsed = client.messages.parse(model="claude-sonnet-4-5", max_tokens=200, messages=messages, output_format=City)
    assert parsed.parsed_output == City(name="Oslo", population=709000)     # output_config.format, as the SDK sends it
    asked = last_query(poe)["query"]["query"][-1]["content"]
    assert asked.startswith("Biggest city of Norway?\n\n") and "JSON schema" in asked and '"population"' in asked
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=200, messages=messages,
                                output_config={"format": {"type": "json_schema", "schema": CITY_SCHEMA}}) as stream:
        assert stream.get_final_text() == '{"name": "Oslo", "population": 709000}'
    older = client.messages.create(model="claude-sonnet-4-5", max_tokens=200, messages=messages,   # the beta's field
                                   extra_body={"output_format": {"type": "json_schema", "schema": CITY_SCHEMA}})
    assert older.content[0].text == '{"name": "Oslo", "population": 709000}'
    assert '"additionalProperties":false' in last_query(poe)["query"]["query"][-1]["content"]
    anthropic = pytest.importorskip("anthropic")
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=messages,
                               output_config={"format": {"type": "json_schema"}})  # type: ignore[typeddict-item]
    assert "output_config.format.schema" in info.value.body["error"]["message"]  # type: ignore[index]


def sdk_args(body: dict[str, Any]) -> dict[str, Any]:
    """A captured request body as SDK keyword arguments: fields the SDK no longer types go in extra_body."""
    typed = {"model", "max_tokens", "messages", "system", "tools", "tool_choice", "thinking", "stop_sequences",
             "metadata"}
    args = {k: v for k, v in body.items() if k in typed}
    extra = {k: v for k, v in body.items() if k not in typed and k != "stream"}
    return {**args, "extra_body": extra} if extra else args


def test_claude_model_ids_are_aliased_to_poe_bots() -> None:
    assert p2o.claude_alias("claude-sonnet-4-5-20250929") == "Claude-Sonnet-4.5"
    assert p2o.claude_alias("claude-haiku-4-5-20251001") == "Claude-Haiku-4.5"
    assert p2o.claude_alias("claude-3-5-sonnet-latest") == "Claude-Sonnet-3.5"
    assert p2o.claude_alias("claude-opus-4-1") == "Claude-Opus-4.1"
    assert p2o.claude_alias("GPT-4o") == "GPT-4o"


def test_messages_non_stream_and_stream(proxy: Proxy, poe: FakePoe) -> None:
    client = anthropic_client(proxy)
    poe.on("Claude-Sonnet-4.5", text_events("Hello", " from Poe"))
    message = client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=100, system="Be brief.",
                                     messages=[{"role": "user", "content": "Hi"}])
    assert message.model == "claude-sonnet-4-5-20250929" and message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == "Hello from Poe"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert last_query(poe)["path"] == "/bot/Claude-Sonnet-4.5"
    assert [m["role"] for m in last_query(poe)["query"]["query"]] == ["system", "user"]
    with client.messages.stream(model="claude-sonnet-4-5-20250929", max_tokens=100,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        assert "".join(stream.text_stream) == "Hello from Poe"
        final = stream.get_final_message()
    assert final.content[0].text == "Hello from Poe" and final.usage.output_tokens > 0


def test_claude_code_turn_with_thinking_and_tools(proxy: Proxy, poe: FakePoe) -> None:
    body = json.loads((FIXTURES / "claude-code-messages.json").read_text())
    reply = ("*Thinking...*\n\n> Run the tests first.\n\nRunning them now.\n<tool_call>\n<invoke name=\"Bash\">\n"
             "<parameter name=\"command\">pytest -q</parameter>\n</invoke>\n</tool_call>")
    poe.on("Claude-Sonnet-4.5", xml_reply_steps(reply, 6))
    client = anthropic_client(proxy)
    with client.messages.stream(**sdk_args(body)) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "Run the tests first.\n" and final.content[0].signature
    assert final.content[1].text == "Running them now.\n"
    assert (final.content[2].name, final.content[2].input) == ("Bash", {"command": "pytest -q"})
    assert final.content[2].id.startswith("toolu_") and final.stop_reason == "tool_use"
    query = last_query(poe)["query"]
    assert query["query"][-1]["content"].endswith(" --thinking_budget 10000")      # thinking budget as a flag
    sent = "\n".join(m["content"] for m in query["query"])
    assert "<tools>" in sent and '<tool name="Bash">' in sent and "<tool_result" in sent
    whole = client.messages.create(**sdk_args(body))                                  # and not streamed
    assert [b.type for b in whole.content] == ["thinking", "text", "tool_use"]
    assert whole.content[2].input == {"command": "pytest -q"}


def test_inline_system_messages_and_count_tokens(proxy: Proxy, poe: FakePoe) -> None:
    client = anthropic_client(proxy)
    body = json.loads((FIXTURES / "claude-code-inline-system.json").read_text())
    message = client.messages.create(**sdk_args(body))
    assert message.content[0].text == "Hello from Claude-Haiku-4.5"
    assert [m["role"] for m in last_query(poe)["query"]["query"]] == ["system", "user", "system", "bot", "user"]
    before = len(poe.requests)
    counted = client.messages.count_tokens(**sdk_args(json.loads((FIXTURES / "claude-code-count-tokens.json")
                                                                 .read_text())))
    assert counted.input_tokens > 20 and len(poe.requests) == before      # answered locally


def test_messages_errors_have_anthropic_shape(proxy: Proxy, poe: FakePoe) -> None:
    anthropic = pytest.importorskip("anthropic")
    poe.on("Broke", [sse("error", {"text": "You do not have enough points.", "error_type": "insufficient_fund"})])
    with pytest.raises(anthropic.RateLimitError) as info:
        anthropic_client(proxy).messages.create(model="Broke", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "rate_limit_error"
    with httpx.Client() as http:
        r = http.post(proxy.url + "/v1/messages?beta=true", json={"model": "m", "max_tokens": 5, "messages": []},
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    poe.on("Late", [sse("text", {"text": "partial"}), sse("error", {"text": "Internal server error"})])
    with pytest.raises(anthropic.APIStatusError):
        with anthropic_client(proxy).messages.stream(model="Late", max_tokens=10,
                                                     messages=[{"role": "user", "content": "x"}]) as stream:
            stream.get_final_message()


def test_messages_stream_events_are_named_and_ordered(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", xml_reply_steps(THINKING_REPLIES[0][0] + '\n<tool_call><invoke name="get_time"></invoke>'
                                     '</tool_call>', 7))
    with httpx.Client(timeout=20) as http:
        r = http.post(proxy.url + "/v1/messages", headers={"x-api-key": KEY}, json={
            "model": "GPT-4o", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "get_time", "description": "time", "input_schema": {"type": "object"}}]})
    events = [block.split("\n") for block in r.text.strip().split("\n\n") if not block.startswith(":")]
    names = [lines[0][len("event: "):] for lines in events]
    datas = [json.loads(lines[1][len("data: "):]) for lines in events]
    assert all(d["type"] == n for n, d in zip(names, datas))                 # every event named, type matching
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    starts = [d["content_block"]["type"] for d in datas if d["type"] == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    opened: list[int] = []
    for d in datas:                                                          # one block at a time, in order
        if d["type"] == "content_block_start":
            assert not opened and d["index"] == len(starts[:0]) + sum(1 for x in datas[:datas.index(d)]
                                                                       if x["type"] == "content_block_stop")
            opened.append(d["index"])
        elif d["type"] == "content_block_stop":
            assert opened.pop() == d["index"]
        elif d["type"] == "content_block_delta":
            assert opened == [d["index"]]
    assert datas[-2]["delta"]["stop_reason"] == "tool_use" and datas[-2]["usage"]["output_tokens"] > 0


def test_claude_code_billing_line_stays_home(proxy: Proxy, poe: FakePoe, caplog: pytest.LogCaptureFixture) -> None:
    body = json.loads((FIXTURES / "claude-code-messages.json").read_text())
    assert body["system"][0]["text"].startswith("x-anthropic-billing-header:")
    body["tools"].append({"type": "web_search_20250305", "name": "web_search", "max_uses": 3})
    with caplog.at_level(logging.WARNING, logger="poe2openai"):
        anthropic_client(proxy).messages.create(**sdk_args(body))
    sent = json.dumps(last_query(poe)["query"])
    assert "x-anthropic-billing-header" not in sent and "cc_version" not in sent
    assert last_query(poe)["query"]["query"][0] == {"role": "system", "content_type": "text/markdown", "content":
                                                    "\n".join(b["text"] for b in body["system"][1:])}
    # web search is a control (the bot's own parameter when it declares one), not a tool it cannot run
    assert [r.getMessage() for r in caplog.records if "web_search_20250305" in r.getMessage()] == []
    # the string form of `system` too, and only that line
    chat = p2o.anthropic_to_openai({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                    "system": "x-anthropic-billing-header: cc_version=1; cch=0;\nBe brief."})
    assert chat["messages"][0] == {"role": "system", "content": "Be brief."}


def test_trailing_system_messages_join_the_last_user_turn() -> None:
    q = p2o.build_poe_query(p2o.parse_chat_request({"model": "m", "reasoning_effort": "high", "messages": [
        {"role": "system", "content": "You are Claude Code."}, {"role": "user", "content": "say hello"},
        {"role": "system", "content": "Available agents: general."}]}))
    assert [m["role"] for m in q["query"]] == ["system", "user"]
    assert q["query"][-1]["content"] == "say hello\n\nAvailable agents: general. --reasoning_effort high"


def test_anthropic_tool_results_with_documents_images_and_search_results(proxy: Proxy, poe: FakePoe) -> None:
    client = anthropic_client(proxy)
    png = base64.b64encode(PNG_2X2 + b"tool").decode()
    client.messages.create(model="GPT-4o", max_tokens=50, tools=[
        {"name": "read", "description": "read", "input_schema": {"type": "object"}}], messages=[
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Hello, world!"}},
            {"type": "search_result", "title": "Docs", "source": "s", "content": [{"type": "text", "text": "found"}]},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]}]}])
    last = last_query(poe)["query"]["query"][-1]
    assert "Hello, world!" in last["content"] and "Docs\nfound" in last["content"]
    assert [u["data"] for u in poe.uploads] == [PNG_2X2 + b"tool"] and last["attachments"][0]["content_type"] == "image/png"


INTERLEAVED = [native_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                             "function": {"name": "get_weather", "arguments": '{"city":'}}]}),
               native_chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                             "function": {"name": "get_time", "arguments": "{"}}]}),
               native_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
               native_chunk({"tool_calls": [{"index": 1, "function": {"arguments": "}"}}]}), sse("done", {})]


def test_interleaved_native_calls_in_every_dialect(start: Callable[..., Proxy], poe: FakePoe, tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("models:\n  NativeBot: {tool_mode: native}\n")
    poe.on("NativeBot", INTERLEAVED)
    proxy = start()
    expected = [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    with proxy.client().chat.completions.stream(model="NativeBot", tools=WEATHER_TOOLS,
                                                messages=[{"role": "user", "content": "x"}]) as stream:
        calls = stream.get_final_completion().choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected
    tools = [{"name": t["function"]["name"], "description": "d", "input_schema": t["function"]["parameters"] or
              {"type": "object"}} for t in WEATHER_TOOLS]
    with anthropic_client(proxy).messages.stream(model="NativeBot", max_tokens=50, tools=tools,
                                                 messages=[{"role": "user", "content": "x"}]) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content] == expected
    flat = [{"type": "function", **t["function"]} for t in WEATHER_TOOLS]
    with proxy.client().responses.stream(model="NativeBot", input="x", tools=flat) as stream:
        output = stream.get_final_response().output
    assert [(o.name, json.loads(o.arguments)) for o in output] == expected


def test_oversized_messages_request_gets_an_anthropic_error(start: Callable[..., Proxy]) -> None:
    proxy = start(max_request_size=100)
    with httpx.Client() as http:
        r = http.post(proxy.url + "/v1/messages", content=b"x" * 500, headers={"x-api-key": KEY})
    assert r.status_code == 413 and r.json()["type"] == "error" and r.json()["error"]["type"] == "request_too_large"


###############################################################################
# The OpenAI Responses dialect (Codex, client.responses)
###############################################################################

def test_responses_text_format_gets_clean_json(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", xml_reply_steps('Sure:\n```json\n{"name": "Oslo", "population": 709000}\n```', 5))
    client = proxy.client()
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}}
    response = client.responses.create(model="GPT-4o", input="Biggest city of Norway?", text=fmt)  # type: ignore[arg-type]
    assert json.loads(response.output_text) == {"name": "Oslo", "population": 709000}
    assert '"population"' in last_query(poe)["query"]["query"][-1]["content"]
    with client.responses.stream(model="GPT-4o", input="x", text=fmt) as stream:  # type: ignore[arg-type]
        assert stream.get_final_response().output_text == response.output_text


def test_responses_create_and_stream(proxy: Proxy, poe: FakePoe) -> None:
    client = proxy.client()
    poe.on("GPT-4o", xml_reply_steps(THINKING_REPLIES[0][0], 5))
    response = client.responses.create(model="GPT-4o", instructions="Be brief.", input="What is it?")
    assert response.status == "completed" and response.id.startswith("resp_")
    assert response.output_text == THINKING_REPLIES[0][2]
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == THINKING_REPLIES[0][1]
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens > 0
    assert [m["role"] for m in last_query(poe)["query"]["query"]] == ["system", "user"]
    with client.responses.stream(model="GPT-4o", input=[{"role": "user", "content": "What is it?"}]) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text == THINKING_REPLIES[0][2]


def test_codex_turn_gets_function_calls(proxy: Proxy, poe: FakePoe) -> None:
    body = json.loads((FIXTURES / "codex-responses.json").read_text())
    reply = ('Updating the plan.\n<tool_call>\n<invoke name="shell">\n<parameter name="command">["pytest", "-q"]'
             '</parameter>\n</invoke>\n</tool_call>')
    poe.on(body["model"], xml_reply_steps(reply, 6))
    with httpx.Client(timeout=20) as http:
        r = http.post(proxy.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"})
    events = [block.split("\n", 1) for block in r.text.strip().split("\n\n") if block.startswith("event: ")]
    datas = [json.loads(data[len("data: "):]) for _, data in events]
    assert [e[0][len("event: "):] for e in events] == [d["type"] for d in datas]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    assert datas[0]["type"] == "response.created" and datas[-1]["type"] == "response.completed"
    final = datas[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    call = final["output"][1]
    assert call["name"] == "shell" and json.loads(call["arguments"]) == {"command": ["pytest", "-q"]}
    assert call["call_id"].startswith("call_") and final["usage"]["input_tokens_details"] == {"cached_tokens": 0}
    sent = "\n".join(m["content"] for m in last_query(poe)["query"]["query"])
    # the earlier call and its output reach the bot once each, as XML history
    assert sent.count('<invoke name="shell">') == 1 and sent.count('tool_call_id="call_Wd81sKq0n3Jt5vLb9XyE2fRm"') == 1
    QueryRequest.model_validate(last_query(poe)["query"])


CODEX_NAMESPACES = [
    {"type": "namespace", "name": "docs", "description": "The docs MCP server", "tools": [
        {"type": "function", "name": "search", "description": "Search the docs",
         "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
        {"type": "custom", "name": "note", "description": "Write a note"}]},
    {"type": "namespace", "name": "agents", "tools": [
        {"type": "function", "name": "spawn", "parameters": {"type": "object", "properties": {
            "task": {"type": "string"}}}}]},
    {"type": "web_search"}, {"type": "image_generation"},
]


def test_codex_namespace_tools_round_trip(proxy: Proxy, poe: FakePoe, caplog: pytest.LogCaptureFixture) -> None:
    reply = ('<tool_call><invoke name="docs__search"><parameter name="query">build</parameter></invoke></tool_call>'
             '<tool_call><invoke name="docs__note"><parameter name="input">remember this</parameter></invoke></tool_call>'
             '<tool_call><invoke name="agents__spawn"><parameter name="task">lint</parameter></invoke></tool_call>')
    poe.on("GPT-4o", xml_reply_steps(reply, 8))
    client = proxy.client()
    with caplog.at_level(logging.WARNING, logger="poe2openai"):
        response = client.responses.create(model="GPT-4o", input="go", tools=CODEX_NAMESPACES)  # type: ignore[arg-type]
    assert [(o.type, o.namespace, o.name) for o in response.output] == [   # type: ignore[union-attr]
        ("function_call", "docs", "search"), ("custom_tool_call", "docs", "note"), ("function_call", "agents", "spawn")]
    assert json.loads(response.output[0].arguments) == {"query": "build"}    # type: ignore[union-attr]
    assert response.output[1].input == "remember this"                       # type: ignore[union-attr]
    prompt = last_query(poe)["query"]["query"][-1]["content"]
    assert '<tool name="docs__search">' in prompt and "The docs MCP server" in prompt and "--agents" not in prompt
    warnings_seen = [r.getMessage() for r in caplog.records if "cannot run" in r.getMessage()]
    assert warnings_seen == ["leaving out tools a Poe bot cannot run: image_generation"]   # web_search: a control
    with client.responses.stream(model="GPT-4o", input="go", tools=CODEX_NAMESPACES) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_response().output
    assert [(o.namespace, o.name) for o in streamed] == [("docs", "search"), ("docs", "note"), ("agents", "spawn")]  # type: ignore[union-attr]
    # the next turn: the calls and their outputs, in the client's own names, reach the bot as what it called
    history = [{"role": "user", "content": "go"}, *[o.model_dump(exclude_none=True) for o in response.output],
               *[{"type": "function_call_output" if o.type == "function_call" else "custom_tool_call_output",
                  "call_id": o.call_id, "output": f"result {i}"} for i, o in enumerate(response.output)]]  # type: ignore[union-attr]
    poe.on("GPT-4o", text_events("Done."))
    assert client.responses.create(model="GPT-4o", input=history, tools=CODEX_NAMESPACES).output_text == "Done."  # type: ignore[arg-type]
    sent = "\n".join(m["content"] for m in last_query(poe)["query"]["query"])
    for name in ("docs__search", "docs__note", "agents__spawn"):
        assert sent.count(f'<invoke name="{name}">') == 1 and f'name="{name}"' in sent, name
    assert '<invoke name="search">' not in sent


def test_namespaced_tools_called_by_their_bare_or_dotted_name(proxy: Proxy, poe: FakePoe) -> None:
    # Bots often call `docs.search` or just `search` for the `docs__search` they were offered.
    reply = ('<tool_call><invoke name="docs.search"><parameter name="query">a</parameter></invoke></tool_call>'
             '<tool_call><invoke name="spawn"><parameter name="task">b</parameter></invoke></tool_call>')
    poe.on("GPT-4o", xml_reply_steps(reply, 5))
    response = proxy.client().responses.create(model="GPT-4o", input="go", tools=CODEX_NAMESPACES)  # type: ignore[arg-type]
    assert [(o.type, o.namespace, o.name) for o in response.output] == [   # type: ignore[union-attr]
        ("function_call", "docs", "search"), ("function_call", "agents", "spawn")]
    spec = p2o.ToolSpec((p2o.Tool("a__run", "", {}), p2o.Tool("b__run", "", {}), p2o.Tool("x", "", {})))
    assert spec.find("run") is None and spec.find("b.run").name == "b__run"   # ambiguous: no guess
    assert spec.find("y") is None and spec.find("") is None


def test_namespace_calls_in_native_mode(start: Callable[..., Proxy], poe: FakePoe, tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("models:\n  NativeBot: {tool_mode: native}\n")
    poe.on("NativeBot", [native_chunk({"tool_calls": [{"index": 0, "id": "call_n1", "type": "function", "function": {
        "name": "docs__search", "arguments": '{"query": "x"}'}}]}), sse("done", {})])
    response = start().client().responses.create(model="NativeBot", input="go", tools=CODEX_NAMESPACES)  # type: ignore[arg-type]
    assert [(o.namespace, o.name, o.call_id) for o in response.output] == [("docs", "search", "call_n1")]  # type: ignore[union-attr]
    assert [t["function"]["name"] for t in last_query(poe)["query"]["tools"]] == [
        "docs__search", "docs__note", "agents__spawn"]


def test_responses_refuses_previous_response_id(proxy: Proxy) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        proxy.client().responses.create(model="GPT-4o", input="hi", previous_response_id="resp_123")
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_responses_tools_without_description_and_custom_tools(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", xml_reply_steps('<tool_call><invoke name="apply_patch"><parameter name="input">*** Begin Patch\n'
                                     '*** End Patch</parameter></invoke></tool_call>', 9))
    with httpx.Client(timeout=20) as http:
        r = http.post(proxy.url + "/v1/responses", headers={"Authorization": f"Bearer {KEY}"}, json={
            "model": "GPT-4o", "input": "patch it", "tools": [
                {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                         "additionalProperties": False}},
                {"type": "custom", "name": "apply_patch", "description": "Apply a patch"}]})
    body = r.json()
    assert r.status_code == 200 and body["output"][0]["type"] == "custom_tool_call"
    assert body["output"][0]["input"] == "*** Begin Patch\n*** End Patch"
    prompt = last_query(poe)["query"]["query"][-1]["content"]
    assert '<tool name="get_time">' in prompt and "--get_time" not in prompt    # a tool, not a bot flag


def test_native_tool_result_images_are_kept(start: Callable[..., Proxy], poe: FakePoe, tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("models:\n  NativeBot: {tool_mode: native}\n")
    proxy = start()
    proxy.client().chat.completions.create(model="NativeBot", tools=WEATHER_TOOLS, messages=[
        {"role": "user", "content": "screenshot?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "here"}, {
            "type": "image_url", "image_url": {"url": data_url(PNG_2X2 + b"native")}}]}])
    query = last_query(poe)["query"]
    assert query["tool_results"][0]["content"] == "here"
    assert query["query"][-1]["role"] == "user" and len(query["query"][-1]["attachments"]) == 1


###############################################################################
# Converters: OpenAI's media APIs (images, speech, videos) <-> Poe's media bots
###############################################################################

def test_media_requests_become_valid_poe_queries_with_the_bots_flags() -> None:
    image = p2o.parse_image_request({"model": "GPT-Image-1", "prompt": "a cat", "quality": "hd", "style": "vivid",
                                     "size": "1536x1024", "n": 3}, bot("GPT-Image-1"), has_mask=True)
    assert image.n == 3 and image.flags == ("--aspect 3:2", "--quality high", "--use_mask true")  # style: undeclared
    query = p2o.media_query(image, [{"url": "https://pfst.cf2.poecdn.net/x", "content_type": "image/png",
                                     "name": "a.png"}])
    QueryRequest.model_validate(query)
    assert query["query"][0]["content"] == "a cat --aspect 3:2 --quality high --use_mask true"
    video = p2o.parse_video_request({"model": "Veo-3", "prompt": "waves", "seconds": "4", "size": "1280x720",
                                     "seed": "7"}, bot("Veo-3"))
    assert video.flags == ("--aspect_ratio 16:9", "--duration 4", "--seed 7", "--resolution 720p")
    speech = p2o.parse_speech_request({"model": "ElevenLabs-v3", "input": "hi", "voice": "laura"}, bot("ElevenLabs-v3"))
    assert speech.flags == ("--voice_1 Laura",) and speech.response_format == "mp3"
    assert p2o.parse_speech_request({"model": "m", "input": "hi", "voice": "alloy"}, bot("ElevenLabs-v3")).flags == ()
    for parse, body, param in [
            (p2o.parse_video_request, {"model": "Veo-3", "prompt": "w", "seconds": "12"}, "seconds"),
            (p2o.parse_speech_request, {"model": "ElevenLabs-v3", "input": "hi", "voice": "Nobody"}, "voice"),
            (p2o.parse_image_request, {"model": "GPT-Image-1", "prompt": "p", "n": 5}, "n"),
            (p2o.parse_image_request, {"model": "GPT-Image-1", "prompt": "p", "quality": "ultra"}, "quality"),
            (p2o.parse_image_request, {"model": "GPT-Image-1"}, "prompt"),
            (p2o.parse_image_request, {"model": "GPT-Image-1", "prompt": "p", "stream": True}, "stream"),
            (p2o.parse_image_request, {"model": "GPT-4o", "prompt": "p"}, "model")]:
        with pytest.raises(p2o.ProxyError) as info:
            parse(body, bot(body["model"]))
        assert info.value.status == 400 and info.value.param == param, (body, info.value.message)


def test_size_maps_to_each_bots_own_parameters() -> None:
    def mapped(name: str, size: str) -> dict[str, Any]:
        return p2o.size_settings(size, bot(name), name)
    assert mapped("FLUX-pro-1.1", "1024x1024") == {"aspect": "1:1"}
    assert mapped("FLUX-pro-1.1", "1792x1024") == {"aspect": "16:9"}      # 7:4 is near enough to 16:9
    assert mapped("FLUX-pro-1.1", "9:16") == {"aspect": "9:16"}           # a value the bot knows, as it is
    assert mapped("nano-banana-2", "1536x1024") == {"aspect_ratio": "3:2", "image_size": "2K"}
    assert mapped("Veo-3", "720x1280") == {"aspect_ratio": "9:16", "resolution": "720p"}
    assert mapped("Veo-3", "1080p") == {"resolution": "1080p"}
    assert mapped("GPT-Image-1", "auto") == {} and mapped("Assistant", "1024x1024") == {}   # nothing to map to
    with pytest.raises(p2o.ProxyError) as info:
        mapped("FLUX-pro-1.1", "1024x1536")
    assert info.value.status == 400 and info.value.param == "size"
    assert "16:9, 4:3, 1:1, 3:4, 9:16" in info.value.message and "aspect" in info.value.message
    with pytest.raises(p2o.ProxyError):
        mapped("GPT-Image-1", "huge")


###############################################################################
# Model registry: models.yaml (hot reload) and the model-list cache
###############################################################################

def test_models_list_is_cached_and_served_stale(start: Callable[..., Proxy], poe: FakePoe) -> None:
    proxy = start(models_cache_ttl_seconds=0.0)
    client = proxy.client()
    assert len(client.models.list().data) == 2
    poe.models_status = 500                      # Poe now fails: the last good list is served
    assert [m.id for m in client.models.list().data] == ["GPT-4o", "Claude-Sonnet-4.5"]
    fresh = start()                              # nothing cached yet: the failure is a 502
    with pytest.raises(openai.InternalServerError) as info:
        fresh.client().models.list()
    assert info.value.status_code == 502


def admin_config(proxy: Proxy) -> dict[str, Any]:
    with httpx.Client(auth=ADMIN, timeout=20, verify=CLIENT_TLS) as http:
        return http.get(proxy.url + "/api/admin/config").json()


def wait_for_config(proxy: Proxy, check: Callable[[dict[str, Any]], bool], timeout: float = 8) -> dict[str, Any]:
    deadline = time.time() + timeout
    while True:
        cfg = admin_config(proxy)
        if check(cfg) or time.time() > deadline:
            return cfg
        time.sleep(0.02)


def test_models_yaml_mapping_hiding_and_hand_edits(start: Callable[..., Proxy], poe: FakePoe,
                                                   tmp_path: Path, fast_reload: float) -> None:
    cfg = tmp_path / "models.yaml"
    cfg.write_text("enable: true\nmodels:\n  gpt-4o: {mapping: gpt-4o-poe}\n  Claude-Sonnet-4.5: {enable: false}\n"
                   "custom_models:\n  - {id: MyPrivateBot}\n")
    proxy = start()
    client = proxy.client()
    assert [m.id for m in client.models.list().data] == ["gpt-4o-poe", "MyPrivateBot"]
    result = client.chat.completions.create(model="GPT-4O-POE", messages=[{"role": "user", "content": "x"}])
    # the catalogue's own spelling of the bot the mapping names; the client's name is echoed
    assert last_query(poe)["path"] == "/bot/GPT-4o" and result.model == "GPT-4O-POE"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="Claude-Sonnet-4.5", messages=[{"role": "user", "content": "x"}])
    cfg.write_text("enable: true\nmodels:\n  GPT-4o: {mapping: renamed}\n")    # a hand edit...
    deadline = time.time() + 5
    while time.time() < deadline and client.models.list().data[0].id != "renamed":
        time.sleep(0.02)
    assert [m.id for m in client.models.list().data] == ["renamed", "Claude-Sonnet-4.5"]   # ...takes effect
    cfg.write_text("enable: true\nmodels: [broken\n")                            # a broken edit...
    assert wait_for_config(proxy, lambda c: bool(c["load_error"]))["load_error"]          # (once it was read)
    assert [m.id for m in client.models.list().data] == ["renamed", "Claude-Sonnet-4.5"]   # ...changes nothing
    assert cfg.read_text() == "enable: true\nmodels: [broken\n"                  # and the file is left alone


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_models_yaml_that_would_wedge_the_proxy_is_refused(start: Callable[..., Proxy], poe: FakePoe,
                                                             tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             fast_reload: float) -> None:
    cfg = tmp_path / "models.yaml"
    cfg.write_text("enable: true\nmodels:\n  GPT-4o: {mapping: good-name}\n")
    proxy = start()
    client = proxy.client()
    assert client.models.list().data[0].id == "good-name"
    cfg.write_text("enable: true\nmodels:\n  GPT-4o: {mapping: bad}\n" + ALIAS_BOMB)   # 9^9 items if expanded
    got = wait_for_config(proxy, lambda c: bool(c["load_error"]))
    assert "aliases (*name) are not allowed" in got["load_error"] and "line 5" in got["load_error"]
    assert got["models"] == {"GPT-4o": {"mapping": "good-name"}} and client.models.list().data[0].id == "good-name"
    cfg.write_text("enable: true\n" + "# padding\n" * 30_000)                            # over 256 KiB
    got = wait_for_config(proxy, lambda c: "larger than" in (c["load_error"] or ""))
    assert "larger than 256 KiB" in got["load_error"] and client.models.list().data[0].id == "good-name"
    with caplog.at_level(logging.WARNING, logger="poe2openai"):
        cfg.write_text("enable: true\nmodels:\n  GPT-4o: {mapping: renamed, colour: red, notes: [a, b]}\n"
                       "custom_models:\n  - {id: Mine, owned_by: me, payload: xxxxxxxx}\n")
        got = wait_for_config(proxy, lambda c: not c["load_error"])
    assert got["models"] == {"GPT-4o": {"mapping": "renamed"}}                  # unknown keys are not kept...
    assert got["custom_models"] == [{"id": "Mine", "owned_by": "me"}]
    warnings_ = [r.getMessage() for r in caplog.records if "unknown keys" in r.getMessage()]
    assert len(warnings_) == 1 and "'colour'" in warnings_[0] and "'payload'" in warnings_[0]   # ...and said once
    assert [m.id for m in client.models.list().data][0] == "renamed"


@pytest.mark.parametrize("libyaml", [True, False])
def test_models_yaml_aliases_are_refused_when_read_directly_too(tmp_path: Path, libyaml: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if not libyaml:   # PyYAML built without libyaml: the pure-Python loader refuses them as well
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    for text in ("models: &m {GPT-4o: {mapping: x}}\nagain: *m\n", "base: &b {enable: false}\nmodels:\n  X: {<<: *b}\n"):
        with pytest.raises(yaml.YAMLError, match="aliases") as info:
            p2o.ModelConfig.from_yaml(text)
        assert info.value.problem_mark.line in (1, 2)    # type: ignore[attr-defined]
    assert p2o.ModelConfig.from_yaml("models: &m {GPT-4o: {mapping: x}}\n").models == {"GPT-4o": {"mapping": "x"}}
    assert gc.isenabled()
    (tmp_path / "models.yaml").write_text("enable: true\nmodels:\n  GPT-4o: {mapping: sync}\n")
    registry = p2o.ModelRegistry(str(tmp_path / "models.yaml"))   # no event loop: read on the spot
    assert registry.config().models == {"GPT-4o": {"mapping": "sync"}} and registry.last_error is None


def test_temporary_files_of_an_interrupted_save_are_removed_at_start(start: Callable[..., Proxy],
                                                                     tmp_path: Path) -> None:
    ours_old = [tmp_path / ".models.yaml.k3j4h5g6", tmp_path / ".models.yaml.bak.ab_d3fgh"]
    kept = [tmp_path / ".models.yaml.zz9zzzzz",            # ours, but young: a save may be running
            tmp_path / ".models.yaml.mine", tmp_path / "models.yaml.k3j4h5g6", tmp_path / "notes.txt"]
    past = time.time() - 300
    for path in ours_old + kept:
        path.write_text("x")
        if path.name != ".models.yaml.zz9zzzzz":
            os.utime(path, (past, past))
    start()
    assert [p.exists() for p in ours_old] == [False, False] and all(p.exists() for p in kept)


def test_shipped_models_yaml_is_valid() -> None:
    cfg = p2o.ModelConfig.from_yaml((HERE / "models.yaml").read_text())
    assert cfg.enable is False and cfg.models == {}


def test_yaml_errors_do_not_leak_the_api_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "models.yaml").write_text("models: {}\napi_token: sk-SECRET-123: x\n")
    registry = p2o.ModelRegistry(str(tmp_path / "models.yaml"))
    with caplog.at_level(logging.INFO):
        registry.config()
    assert registry.last_error and "line 2" in registry.last_error
    assert "SECRET" not in registry.last_error and "SECRET" not in caplog.text


def test_missing_models_yaml_is_a_warning_only_when_config_dir_was_chosen(tmp_path: Path) -> None:
    for args, level in (([], "INFO"), (["--config-dir", str(tmp_path / "conf")], "WARNING")):
        server = ProxyProcess(args, tmp_path)
        try:
            line = server.wait_for_log("no models.yaml")
            assert f" {level} " in line and "models are served as they are" in line, line
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(10) == 0      # one signal, nothing running: a clean stop
        finally:
            server.stop()


###############################################################################
# HTTP plumbing: outbound TLS, proxies, the connection pool
###############################################################################

def test_upstream_unreachable_is_502(start: Callable[..., Proxy]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    proxy = start(poe_base_url=f"http://127.0.0.1:{dead_port}")
    with pytest.raises(openai.InternalServerError) as info:
        proxy.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and "refused" in info.value.message


def test_outbound_connection_is_reused(proxy: Proxy, poe: FakePoe) -> None:
    client = proxy.client()
    for _ in range(3):
        client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
        list(client.chat.completions.create(model="GPT-4o", stream=True, messages=[{"role": "user", "content": "x"}]))
    assert len([r for r in poe.requests if r["path"].startswith("/bot/")]) == 6
    assert poe.connections == 1


async def _close_all_server_sides(poe: FakePoe) -> None:
    assert poe.server is not None
    poe.server.close()
    if sys.version_info >= (3, 12):
        poe.server.close_clients()
    else:  # no public way before 3.12: restart the fake on the same port after closing transports
        for task in asyncio.all_tasks():
            if "_handle" in repr(task.get_coro()):
                task.cancel()
    await asyncio.sleep(0.05)
    poe.server = await asyncio.start_server(poe._handle, "127.0.0.1", poe.port)


def test_stale_pooled_connection_is_replaced(proxy: Proxy, poe: FakePoe, lt: LoopThread) -> None:
    client = proxy.client()
    client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    # Poe closes idle keep-alive connections: the pooled one must not fail the next request.
    lt.run(_close_all_server_sides(poe))
    assert client.chat.completions.create(
        model="GPT-4o", messages=[{"role": "user", "content": "x"}]).choices[0].message.content == "Hello from GPT-4o"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", ["chat", "messages", "responses"])
def test_query_lost_after_sending_is_never_sent_twice(proxy: Proxy, poe: FakePoe, dialect: str, stream: bool) -> None:
    proxy.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    poe.on("Dropper", hang_up=True)   # Poe gets the whole query on the pooled connection, then it dies
    err = ask_failing(proxy, dialect, "Dropper", stream)
    assert err.status_code == 502 and "not sent again" in str(err.body)
    assert [r["path"] for r in poe.requests].count("/bot/Dropper") == 1   # one query: paid for at most once
    assert poe.connections == 1                                            # and no second connection tried
    assert proxy.client().chat.completions.create(
        model="GPT-4o", messages=[{"role": "user", "content": "x"}]).choices[0].message.content == "Hello from GPT-4o"


def test_connection_poe_closed_after_answering_is_not_reused(lt: LoopThread, poe: FakePoe, tmp_path: Path) -> None:
    # Poe's close arrives right behind its answer: the next request, issued at once, must see it before
    # writing (else it would be lost after sending, a 502), and go out on a fresh connection instead.
    poe.close_when_done = True

    async def scenario() -> list[bytes]:
        pool = p2o.UpstreamPool(make_settings(poe, tmp_path))
        bodies = []
        try:
            for _ in range(4):
                response = await pool.request("GET", f"http://127.0.0.1:{poe.port}/v1/models", [], b"", "model list")
                bodies.append(await response.read_all(1 << 20, 5.0))
        finally:
            await pool.close()
        return bodies

    bodies = lt.run(scenario())
    assert all(json.loads(body)["data"] for body in bodies)
    assert len(poe.requests) == poe.connections == 4


class TunnelProxy:
    """A tiny forward proxy: CONNECT tunnels, and absolute-form requests piped to their origin. Other
    modes misbehave on CONNECT: "garbage" answers with bytes that are not HTTP, "close" hangs up
    before answering, "close_after_200" grants the tunnel and hangs up, "silent" never answers."""

    def __init__(self, mode: str = "tunnel") -> None:
        self.mode = mode
        self.requests: list[str] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            first = head.split(b"\r\n", 1)[0].decode()
            self.requests.append(first)
            method, target, _ = first.split(" ")
            if method == "CONNECT" and self.mode != "tunnel":
                if self.mode == "garbage":
                    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
                elif self.mode == "close_after_200":
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                elif self.mode == "silent":
                    await reader.read()   # until the client gives up
                await writer.drain()
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = urllib.parse.urlsplit(target)
                up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
                up_writer.write(head)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()


@pytest.fixture(scope="module")
def ca() -> Any:
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture()
def tls_poe(lt: LoopThread, ca: Any) -> Any:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    fake = FakePoe()
    lt.run(fake.start(server_ctx))
    yield fake
    lt.loop.call_soon_threadsafe(fake.server.close)   # type: ignore[union-attr]


def trusting_context(ca: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def test_https_upstream_with_verification(start: Callable[..., Proxy], tls_poe: FakePoe, ca: Any) -> None:
    base = f"https://127.0.0.1:{tls_poe.port}"
    proxy = start(trusting_context(ca), poe_base_url=base)
    client = proxy.client()
    for _ in range(2):
        result = client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
        assert result.choices[0].message.content == "Hello from GPT-4o"
    assert tls_poe.connections == 1                       # keep-alive over TLS too
    untrusting = start(poe_base_url=base)                # system CAs only: the fake's cert is refused
    with pytest.raises(openai.InternalServerError) as info:
        untrusting.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and "certificate verification failed" in info.value.message


def test_https_proxy_connect_tunnel(start: Callable[..., Proxy], tls_poe: FakePoe, ca: Any, lt: LoopThread) -> None:
    tunnel = TunnelProxy()
    lt.run(tunnel.start())
    proxy = start(trusting_context(ca), poe_base_url=f"https://127.0.0.1:{tls_poe.port}",
                  proxies=(("https", f"http://user:secret@127.0.0.1:{tunnel.port}"),))
    result = proxy.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    assert result.choices[0].message.content == "Hello from GPT-4o"
    assert tunnel.requests == [f"CONNECT 127.0.0.1:{tls_poe.port} HTTP/1.1"]
    lt.loop.call_soon_threadsafe(tunnel.server.close)   # type: ignore[union-attr]


async def _close_server(server: asyncio.AbstractServer | None) -> None:
    assert server is not None
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("mode, code, words", [
    ("garbage", "upstream_proxy_error", "not valid HTTP"),
    ("close", "upstream_proxy_error", "without answering the CONNECT request"),
    ("close_after_200", "upstream_proxy_error", "closed the tunnel"),
    ("silent", "upstream_unreachable", "did not answer the CONNECT request"),   # the connect deadline
    ("down", "upstream_proxy_error", "cannot be reached"),
])
def test_misbehaving_https_proxy_is_a_502(start: Callable[..., Proxy], tls_poe: FakePoe, ca: Any, lt: LoopThread,
                                          mode: str, code: str, words: str) -> None:
    tunnel = TunnelProxy(mode)
    lt.run(tunnel.start())
    if mode == "down":
        lt.run(_close_server(tunnel.server))
    proxy = start(trusting_context(ca), poe_base_url=f"https://127.0.0.1:{tls_poe.port}", connect_timeout_seconds=0.5,
                  proxies=(("https", f"http://127.0.0.1:{tunnel.port}"),))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        proxy.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and info.value.code == code, info.value.message
    assert words in info.value.message and f"127.0.0.1:{tunnel.port}" in info.value.message
    assert time.monotonic() - started < 3
    assert not tls_poe.requests                                 # nothing reached Poe
    lt.loop.call_soon_threadsafe(tunnel.server.close)   # type: ignore[union-attr]


def test_http_proxy_and_no_proxy(start: Callable[..., Proxy], poe: FakePoe, lt: LoopThread) -> None:
    tunnel = TunnelProxy()
    lt.run(tunnel.start())
    via = start(proxies=(("http", f"http://127.0.0.1:{tunnel.port}"),))
    assert via.client().models.list().data[0].id == "GPT-4o"
    assert tunnel.requests == [f"GET http://127.0.0.1:{poe.port}/v1/models HTTP/1.1"]
    direct = start(proxies=(("http", f"http://127.0.0.1:{tunnel.port}"), ("no", "127.0.0.1,localhost")))
    direct.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    assert len(tunnel.requests) == 1                       # NO_PROXY: straight to Poe
    lt.loop.call_soon_threadsafe(tunnel.server.close)   # type: ignore[union-attr]


def test_dns_failure_is_a_502_that_says_so(start: Callable[..., Proxy]) -> None:
    proxy = start(poe_base_url="http://poe-does-not-exist.invalid")
    with pytest.raises(openai.InternalServerError) as info:
        proxy.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and "DNS" in info.value.message


###############################################################################
# Poe client: bot queries, model list, uploads (and fastapi_poe as a real upstream)
###############################################################################

def test_utf8_character_split_across_reads(proxy: Proxy, poe: FakePoe) -> None:
    event = sse("text", {"text": "前🎉後"})
    cut = event.index("🎉".encode()) + 2                # inside the 4-byte emoji
    cut2 = event.index("後".encode()) + 1               # inside a 3-byte character
    poe.on("GPT-4o", [event[:cut], event[cut:cut2], event[cut2:], sse("done", {})])
    assert both_ways(proxy, "GPT-4o") == ("前🎉後", "前🎉後")


def test_missing_done_still_finishes(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", text_events("partial", " answer", done=False))
    client = proxy.client()
    assert client.chat.completions.create(
        model="GPT-4o", messages=[{"role": "user", "content": "x"}]).choices[0].message.content == "partial answer"
    chunks = list(client.chat.completions.create(model="GPT-4o", stream=True,
                                                 messages=[{"role": "user", "content": "x"}]))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_idle_timeout_is_idle_not_total(start: Callable[..., Proxy], poe: FakePoe) -> None:
    proxy = start(read_timeout_seconds=0.45, stream_hold_seconds=0.1, sse_keepalive_seconds=0.2)
    # 0.6 s in total, never silent for more than 0.1 s: never cut.
    poe.on("Talker", [x for i in range(6) for x in (sse("text", {"text": f"{i}"}), 0.1)] + [sse("done", {})])
    client = proxy.client()
    assert client.chat.completions.create(
        model="Talker", messages=[{"role": "user", "content": "x"}]).choices[0].message.content == "012345"
    # silent for longer than the idle timeout after starting: an in-stream error, or a 504
    poe.on("Mute", [sse("text", {"text": "start"}), 2.0, sse("done", {})])
    status, lines = raw_sse(proxy, {"model": "Mute", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    chunks = data_chunks(lines)
    assert status == 200 and chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == "upstream_timeout"
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="Mute", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 504


def test_read_deadline_moves_with_each_read_and_an_outside_cancel_stays_a_cancel() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=ours)
        stream = p2o.HTTPStream(reader, writer, h11.CLIENT, 1024)
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(10):   # a piece every 60 ms, 0.5 s allowed each: 0.6 s in all, never a timeout
            loop.call_later(0.06, theirs.send, b"x")
            assert await stream.receive(0.5) == b"x"
        assert loop.time() - began > 0.5   # longer than one read's allowance: each read moved the deadline
        began = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await stream.receive(0.1)
        assert 0.09 < loop.time() - began < 2.0
        task = asyncio.ensure_future(stream.receive(5.0))
        await asyncio.sleep(0.02)
        task.cancel()                      # the client left: a cancel, never mistaken for a timeout
        with pytest.raises(asyncio.CancelledError):
            await task
        began = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await stream.receive(0.05)     # a nearer deadline than the timer's: the timer is moved up
        assert loop.time() - began < 1.0
        theirs.send(b"late")
        assert await stream.receive(1.0) == b"late"   # nothing lost to a timeout
        await stream.aclose()
        theirs.close()
    asyncio.run(scenario())


class ScriptedEvents:
    """A PoeEventStream stand-in for DeltaSource: pieces of Poe events read one per pull (None: the body
    ended; an exception: raised by the read; "hang": Poe silent until cancelled). Records how the
    upstream was let go."""

    def __init__(self, *pieces: Any) -> None:
        self.pieces = list(pieces)
        self.let_go: list[tuple[Any, ...]] = []

    async def read(self, wait_s: float) -> list[p2o.SSEEvent] | None:
        piece = self.pieces.pop(0) if self.pieces else None
        if isinstance(piece, BaseException):
            raise piece
        if piece == "hang":
            await asyncio.sleep(30)
        return None if piece is None else [p2o.SSEEvent(name, json.dumps(data)) for name, data in piece]

    async def finish(self, complete: bool, wait_s: float = 1.0) -> None:
        self.let_go.append(("finish", complete, wait_s))

    async def aclose(self) -> None:
        self.let_go.append(("close",))


def _source(*pieces: Any) -> tuple[p2o.DeltaSource, ScriptedEvents]:
    events = ScriptedEvents(*pieces)
    return p2o.DeltaSource(events, p2o.PoeTranslator(), finish_wait_s=0.05), events   # type: ignore[arg-type]


def test_delta_source_finishes_the_upstream_once_after_done() -> None:
    async def scenario() -> None:
        source, events = _source([("text", {"text": "a"})], [("text", {"text": "b"}), ("done", {})])
        assert [d.text for d in await source.next(1.0)] == ["a"] and source.finish is None
        assert [d.text for d in await source.next(1.0)] == ["b"]      # FINISH is not in a batch...
        assert source.finish is not None and source.finish.text == "stop"   # ...but here
        assert await source.next(1.0) == []
        await source.aclose()
        assert events.let_go == [("finish", True, 0.05)]   # read to its end: the connection is reused
    asyncio.run(scenario())


def test_delta_source_without_done_closes_the_upstream_once() -> None:
    async def scenario() -> None:
        source, events = _source([("text", {"text": "a"})], None)
        assert [d.text for d in await source.next(1.0)] == ["a"]
        assert await source.next(1.0) == [] and source.finish is not None
        await source.aclose()
        assert events.let_go == [("finish", False, 0.05)]   # PoeEventStream closes an answer without done
    asyncio.run(scenario())


@pytest.mark.parametrize("text_first", [True, False])
def test_delta_source_raises_poes_error_after_what_came_before_it(text_first: bool) -> None:
    async def scenario() -> None:
        piece = [("text", {"text": "partial"})] if text_first else []
        source, events = _source(piece + [("error", {"text": "no points", "error_type": "insufficient_fund"}),
                                          ("text", {"text": "never"})])
        if text_first:
            assert [d.text for d in await source.next(1.0)] == ["partial"]
        with pytest.raises(p2o.ProxyError) as info:
            await source.next(1.0)
        assert info.value.code == "insufficient_quota" and source.poe_error
        with pytest.raises(p2o.ProxyError):
            await source.next(1.0)      # still the error, without reading on
        await source.aclose()
        assert events.let_go == [("close",)] and len(events.pieces) == 0
    asyncio.run(scenario())


def test_delta_source_closes_the_upstream_once_when_reading_fails_or_is_cancelled() -> None:
    async def scenario() -> None:
        source, events = _source(p2o.upstream_error("Poe sent nothing", 504, "upstream_timeout"))
        with pytest.raises(p2o.ProxyError):
            await source.next(1.0)
        await source.aclose()
        assert events.let_go == [("close",)] and not source.poe_error

        source, events = _source([("text", {"text": "a"})], "hang")   # the client leaves while Poe is silent
        await source.next(1.0)
        task = asyncio.ensure_future(source.next(1.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await source.aclose()
        assert events.let_go == [("close",)]
    asyncio.run(scenario())


BIG_PIECE = ("lorem ipsum " * 5462)[:64 * 1024]   # 64 KiB of answer text per event


def test_an_answer_past_max_answer_size_is_a_502_and_poe_is_hung_up_on(start: Callable[..., Proxy],
                                                                         poe: FakePoe) -> None:
    anthropic = pytest.importorskip("anthropic")
    proxy = start(max_answer_size=1024 * 1024)
    poe.on("Huge", [sse("text", {"text": BIG_PIECE}) for _ in range(24)] + [5.0, sse("done", {})])   # 1.5 MiB
    client, claude = proxy.client(), anthropic_client(proxy)
    user = [{"role": "user", "content": "x"}]
    refusals = []
    with pytest.raises(openai.InternalServerError) as chat_error:
        client.chat.completions.create(model="Huge", messages=user)
    refusals.append((chat_error.value.status_code, chat_error.value.code))
    with pytest.raises(anthropic.InternalServerError) as claude_error:
        claude.messages.create(model="Huge", max_tokens=10, messages=user)
    refusals.append((claude_error.value.status_code, claude_error.value.body["error"]["type"]))
    with pytest.raises(openai.InternalServerError) as responses_error:
        client.responses.create(model="Huge", input="x")
    refusals.append((responses_error.value.status_code, responses_error.value.code))
    assert refusals == [(502, "answer_too_large"), (502, "api_error"), (502, "answer_too_large")]
    assert "MAX_ANSWER_SIZE" in chat_error.value.message
    assert wait_until(lambda: len(poe.disconnects) == 3)   # each time Poe was told to stop at once
    # The Responses stream repeats the whole text in its closing events, so it is bounded the same way...
    with httpx.Client(timeout=20) as http:
        r = http.post(proxy.url + "/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "Huge", "input": "x", "stream": True})
    failed = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")][-1]
    assert failed["type"] == "response.failed" and failed["response"]["error"]["code"] == "answer_too_large"
    # ...while a chat completion stream keeps nothing of what it sent, so it has no such limit.
    poe.on("Huge", [sse("text", {"text": BIG_PIECE}) for _ in range(24)] + [sse("done", {})])
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="Huge", messages=user, stream=True) if c.choices)
    assert streamed == BIG_PIECE * 24


def test_an_endless_event_line_from_poe_is_a_502(start: Callable[..., Proxy], poe: FakePoe,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p2o, "MAX_SSE_EVENT_BYTES", 256 * 1024)
    proxy = start()
    poe.on("Endless", [b"event: text\ndata: " + b"x" * 100_000 for _ in range(5)] + [5.0])   # no line end ever
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            proxy.client().chat.completions.create(model="Endless", stream=stream,
                                                   messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 502 and "larger than 262144 bytes" in info.value.message
    assert wait_until(lambda: len(poe.disconnects) == 2)


def test_a_compressed_body_poe_was_not_asked_for_is_a_502_naming_it(proxy: Proxy, poe: FakePoe) -> None:
    import gzip
    poe.on("Zipped", [gzip.compress(b"".join(text_events("hello")))], headers=[("Content-Encoding", "gzip")])
    poe.models_headers = [("Content-Encoding", "br")]   # from the start: a chat reads the model list too
    client = proxy.client()
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="Zipped", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and "Content-Encoding 'gzip'" in info.value.message
    poe.upload_headers = [("Content-Encoding", "deflate")]
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="GPT-4o", messages=[image_message(data_url(PNG_2X2 + b"zip"))])
    assert info.value.status_code == 502 and "'deflate'" in info.value.message
    with pytest.raises(openai.InternalServerError) as info:
        client.models.list()
    assert info.value.status_code == 502 and "'br'" in info.value.message


class RealPoeBot:
    """A fastapi_poe bot served by uvicorn in a thread: the real Poe library as the upstream. It
    answers by the last user message: "error" -> partial text then an insufficient_fund error;
    "think" -> a reasoning answer; "file" -> a text with an attachment; "tool" -> an XML tool call in
    split chunks; anything else -> an echo of the bot name, the message and the flags it saw."""

    def __init__(self) -> None:
        import fastapi_poe as fp
        import uvicorn

        owner = self
        self.queries: list[Any] = []

        class Bot(fp.PoeBot):
            async def get_response_with_context(self, request: Any, context: Any) -> Any:
                owner.queries.append(request)
                name = context.http_request.path_params.get("bot_name")
                last = request.query[-1].content
                word = last.strip().split()[0].lower() if last.strip() else ""
                yield fp.MetaResponse(text="", content_type="text/markdown", suggested_replies=False)
                if word == "error":
                    yield fp.PartialResponse(text="partial ")
                    yield fp.ErrorResponse(text="You do not have enough points.", allow_retry=False,
                                           error_type="insufficient_fund")
                elif word == "think":
                    for piece in ("*Thinking...*\n\n> weigh", "ing it\n> done\n\n", "Forty-", "two."):
                        yield fp.PartialResponse(text=piece)
                elif word == "file":
                    yield fp.PartialResponse(text="See ![chart][c1] here.")
                    yield fp.PartialResponse(text="", attachment=fp.Attachment(
                        url="https://pfst.cf2.poecdn.net/base/image/chart", content_type="image/png",
                        name="chart.png", inline_ref="c1"))
                elif word == "tool":
                    call = ('Checking.\n<tool_call>\n<invoke name="get_weather">\n'
                            '<parameter name="city">Zürich</parameter>\n<parameter name="days">2</parameter>\n'
                            '</invoke>\n</tool_call>')
                    for i in range(0, len(call), 9):
                        yield fp.PartialResponse(text=call[i:i + 9])
                else:
                    yield fp.PartialResponse(text=f"{name} heard: {last}")

        bot = Bot(path="/bot/{bot_name}", access_key=None, should_insert_attachment_messages=False)
        app = fp.make_app(bot, allow_without_key=True)

        @app.get("/v1/models")
        async def models() -> Any:
            return {"object": "list", "data": [{"id": "GPT-4o", "object": "model", "created": 1715644800000,
                                                "owned_by": "OpenAI"}]}

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture()
def real_poe(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("uvicorn")
    monkeypatch.delenv("POE_ACCESS_KEY", raising=False)
    server = RealPoeBot()
    yield server
    server.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # fastapi_poe's own use of old pydantic APIs
def test_real_fastapi_poe_bot_as_upstream(lt: LoopThread, tmp_path: Path, real_poe: RealPoeBot) -> None:
    proxy = Proxy(lt, p2o.Settings(host="127.0.0.1", port=0, config_dir=str(tmp_path), rate_limit_ms=0,
                                   poe_base_url=f"http://127.0.0.1:{real_poe.port}"))
    try:
        client = proxy.client()
        assert [m.id for m in client.models.list().data] == ["GPT-4o"]
        hello = client.chat.completions.create(model="GPT-4o", reasoning_effort="low", messages=[
            {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "héllo 世界"}])
        assert hello.choices[0].message.content == "GPT-4o heard: héllo 世界 --reasoning_effort low"
        assert [m.role for m in real_poe.queries[-1].query] == ["system", "user"]
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="Claude-Sonnet-4.5", stream=True, messages=[{"role": "user", "content": "again"}]) if c.choices)
        assert streamed == "Claude-Sonnet-4.5 heard: again"

        think = client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "think"}])
        message = think.model_dump()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == ("weighing it\ndone\n", "Forty-two.")

        picture = client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "file"}])
        assert picture.choices[0].message.content == \
            "See ![chart](https://pfst.cf2.poecdn.net/base/image/chart) here."

        with client.chat.completions.stream(model="GPT-4o", tools=WEATHER_TOOLS,
                                            messages=[{"role": "user", "content": "tool please"}]) as stream:
            final = stream.get_final_completion()
        call = final.choices[0].message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Zürich", "days": 2})
        assert final.choices[0].message.content == "Checking.\n" and final.choices[0].finish_reason == "tool_calls"

        with pytest.raises(openai.APIError) as info:     # text first, then the error: an in-stream error
            list(client.chat.completions.create(model="GPT-4o", stream=True,
                                                messages=[{"role": "user", "content": "error"}]))
        assert "points" in info.value.message
        with pytest.raises(openai.RateLimitError):       # non-stream: the real status
            client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "error"}])
    finally:
        proxy.stop()


###############################################################################
# Handlers: the router, the admin API, the model list, the chat pipeline, access keys
###############################################################################


# ----------------------------------------------------------------------------- the app and its router

def test_unknown_path_and_wrong_method_are_openai_errors(proxy: Proxy) -> None:
    with httpx.Client() as http:
        r = http.get(proxy.url + "/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        r = http.get(proxy.url + "/v1/chat/completions")
        assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]["code"]
        r = http.post(proxy.url + "/v1/chat/completions", content=b"{not json",
                      headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = http.get(proxy.url + "/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"


def test_cors_preflight(proxy: Proxy) -> None:
    with httpx.Client() as http:
        r = http.options(proxy.url + "/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-custom-thing, cookie"})
        assert r.status_code == 204 and r.content == b""
        assert r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "x-custom-thing" in allowed and "cookie" not in allowed
        r = http.get(proxy.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers


def test_admin_page_needs_basic_auth(proxy: Proxy) -> None:
    with httpx.Client() as http:
        r = http.get(proxy.url + "/admin")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert http.get(proxy.url + "/admin", auth=("admin", "wrong")).status_code == 401
        r = http.get(proxy.url + "/admin", auth=("admin", "123456"))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


def test_deeply_nested_request_json_is_a_400(proxy: Proxy) -> None:
    with httpx.Client() as http:
        r = http.post(proxy.url + "/v1/chat/completions", content=b"[" * 100000,
                      headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_body_with_a_byte_order_mark(proxy: Proxy) -> None:
    body = "\ufeff" + json.dumps({"model": "GPT-4o", "messages": [{"role": "user", "content": "x"}]})
    with httpx.Client() as http:
        r = http.post(proxy.url + "/v1/chat/completions", content=body.encode(),
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello from GPT-4o"


# ----------------------------------------------------------------------------- the admin API

def test_admin_api_needs_credentials(proxy: Proxy) -> None:
    with httpx.Client() as http:
        for method, path in (("GET", "/api/admin/config"), ("POST", "/api/admin/config"), ("GET", "/api/models"),
                             ("GET", "/api/admin/stats")):
            r = http.request(method, proxy.url + path, json={})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
            assert http.request(method, proxy.url + path, auth=("admin", "nope"), json={}).status_code == 401


def test_admin_config_round_trip_is_atomic_and_takes_effect(proxy: Proxy, poe: FakePoe, tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("# my notes\nenable: false\nmodels: {}\n")
    with httpx.Client(auth=ADMIN) as http:
        got = http.get(proxy.url + "/api/admin/config").json()
        assert got == {"enable": False, "models": {}, "custom_models": [], "api_token": None, "use_v1_api": False,
                       "load_error": None}
        new = {"enable": True, "models": {"GPT-4o": {"mapping": "gpt-4o-poe"}, "Claude-Sonnet-4.5": {"enable": False},
                                          "Img": {"replace_response": True, "tool_mode": "native"},
                                          "MyBot": {"mapping": "my-bot"}},
               "custom_models": [{"id": "MyBot", "owned_by": "me", "created": 1700000000}],
               "api_token": None, "use_v1_api": True}
        assert http.post(proxy.url + "/api/admin/config", json=new).json() == {"status": "success"}
        assert http.get(proxy.url + "/api/admin/config").json() == {**new, "load_error": None}
        bad = http.post(proxy.url + "/api/admin/config", json={**new, "models": {"X": {"tool_mode": "telepathy"}}})
        assert bad.status_code == 400 and "tool_mode" in bad.json()["error"]["message"]
        raw = http.get(proxy.url + "/api/models").json()
        assert [m["id"] for m in raw["data"]] == ["GPT-4o", "Claude-Sonnet-4.5"]     # Poe's own names
    assert yaml.safe_load(path.read_text())["models"]["GPT-4o"] == {"mapping": "gpt-4o-poe"}
    assert (tmp_path / "models.yaml.bak").read_text() == "# my notes\nenable: false\nmodels: {}\n"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".models.yaml")]       # no temp files left
    client = proxy.client()
    assert [m.id for m in client.models.list().data] == ["gpt-4o-poe", "my-bot"]       # at once; custom renamed
    client.chat.completions.create(model="gpt-4o-poe", messages=[{"role": "user", "content": "x"}])
    assert last_query(poe)["path"] == "/bot/GPT-4o"
    client.chat.completions.create(model="MY-BOT", messages=[{"role": "user", "content": "x"}])
    assert last_query(poe)["path"] == "/bot/MyBot"


def test_broken_file_is_reported_and_never_replaced(fast_reload: float, proxy: Proxy, tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("enable: true\nmodels: {GPT-4o: {mapping: first}}\n")
    client = proxy.client()
    assert client.models.list().data[0].id == "first"
    path.write_text("enable: true\nmodels: {GPT-4o: {mapping: second}\n")      # a typo
    got = wait_for_config(proxy, lambda c: bool(c["load_error"]))
    assert got["load_error"] and "line" in got["load_error"] and got["models"] == {"GPT-4o": {"mapping": "first"}}
    assert client.models.list().data[0].id == "first"
    assert path.read_text() == "enable: true\nmodels: {GPT-4o: {mapping: second}\n"


def test_admin_api_refuses_cross_site_requests(proxy: Proxy, tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("enable: false\nmodels: {}\n")
    url = proxy.url + "/api/admin/config"
    host = f"127.0.0.1:{proxy.port}"
    evil = {"enable": True, "models": {"GPT-4o": {"mapping": "stolen"}}}
    with httpx.Client(auth=ADMIN) as http:
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Origin": f"http://{host}.evil.example"}):
            r = http.post(url, json=evil, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_request", headers
            assert "Cross-site request to the admin API refused" in r.json()["error"]["message"]
            assert "access-control-allow-origin" not in r.headers
        for method, path_ in (("GET", "/api/admin/config"), ("GET", "/api/admin/stats"), ("GET", "/api/models")):
            assert http.request(method, proxy.url + path_, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        # Bodies a cross-site page can send without a preflight are not configurations.
        for content_type, data in (("text/plain", json.dumps(evil)), ("application/x-www-form-urlencoded", "enable=1"),
                                   ("multipart/form-data; boundary=x", "--x--")):
            r = http.post(url, content=data, headers={"Content-Type": content_type})
            assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], content_type
        assert yaml.safe_load(path.read_text()) == {"enable": False, "models": {}}     # untouched by all of that
        # The page itself, a browser without Sec-Fetch-* (Origin only), one behind a reverse proxy, and curl.
        for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": f"http://{host}"}, {"Origin": f"http://{host}"},
                        {"Origin": "https://admin.example.com", "X-Forwarded-Host": "admin.example.com"},
                        {"Sec-Fetch-Site": "none"}, {}):
            r = http.post(url, json={"enable": True}, headers={**headers, "Content-Type": "application/json; charset=utf-8"})
            assert r.status_code == 200, (headers, r.text)
    with httpx.Client() as http:   # refused before the credentials are looked at: no failed login counted
        for _ in range(p2o.ADMIN_MAX_FAILURES + 1):
            assert http.get(url, auth=("admin", "guess"), headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert http.get(url, auth=ADMIN).status_code == 200


def test_admin_routes_send_no_cors_headers_and_the_page_strict_headers(proxy: Proxy) -> None:
    origin = {"Origin": "https://app.example.com"}
    with httpx.Client(auth=ADMIN) as http:
        assert http.get(proxy.url + "/v1/models", headers=origin).headers["access-control-allow-origin"] == "*"
        preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        for path in ("/admin", "/api/admin/config", "/api/admin/stats", "/api/models"):
            r = http.options(proxy.url + path, headers=preflight)
            assert r.status_code == 405 and not [h for h in r.headers if h.startswith("access-control-")], path
            r = http.get(proxy.url + path)
            assert not [h for h in r.headers if h.startswith("access-control-")], path
        page = http.get(proxy.url + "/admin")
    assert page.status_code == 200
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'" and csp["img-src"] == "'self' data:"
    assert (csp["frame-ancestors"], csp["base-uri"], csp["form-action"]) == ("'none'", "'none'", "'none'")
    for directive, tag in (("script-src", "script"), ("style-src", "style")):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page.text, re.S)
        assert blocks and csp[directive].split() == [
            "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in blocks]
    assert "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"


def test_admin_stats_count_requests_tokens_and_latency(proxy: Proxy, poe: FakePoe) -> None:
    client = proxy.client()
    client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    list(client.chat.completions.create(model="GPT-4o", stream=True, messages=[{"role": "user", "content": "x"}]))
    poe.scripts["Broken"] = Script(status=500, body=b"x")
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="Broken", messages=[{"role": "user", "content": "x"}])
    with httpx.Client(auth=ADMIN) as http:
        stats = http.get(proxy.url + "/api/admin/stats").json()
    by_model = {m["model"]: m for m in stats["models"]}
    assert by_model["GPT-4o"]["requests"] == 2 and by_model["GPT-4o"]["errors"] == 0
    assert by_model["GPT-4o"]["completion_tokens"] > 0 and by_model["GPT-4o"]["latency_ms"]["p50"] > 0
    assert by_model["Broken"] == {**by_model["Broken"], "requests": 1, "errors": 1}
    assert stats["totals"]["requests"] == 3
    assert stats["upstream"]["connections_opened"] >= 1 and stats["upstream"]["uploads"] == 0


def test_admin_stats_key_by_the_bot_and_pool_made_up_names(proxy: Proxy, poe: FakePoe) -> None:
    client = proxy.client()
    client.chat.completions.create(model="gpt-4O", messages=[{"role": "user", "content": "x"}])   # any case
    for i in range(3):   # names Poe does not know: one row for all of them, however long they are
        poe.on(f"Nope{i}" + "x" * 5000, status=404, body=b'{"detail": "Bot not found"}')
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model=f"Nope{i}" + "x" * 5000, messages=[{"role": "user", "content": "x"}])
        assert len(caught.value.message) < 1000   # the name is quoted cut, not echoed whole
    stats = httpx.get(proxy.url + "/api/admin/stats", auth=ADMIN).json()
    by_model = {m["model"]: m for m in stats["models"]}
    assert set(by_model) == {"GPT-4o", "(refused)"}
    assert by_model["GPT-4o"]["requests"] == 1 and by_model["(refused)"]["requests"] == 3


def test_forwarded_for_decides_the_admin_back_off_only_when_trusted(start: Callable[..., Proxy]) -> None:
    for trusted in (True, False):
        proxy = start(trust_forwarded_for=trusted)
        with httpx.Client() as http:
            for _ in range(5):
                http.get(proxy.url + "/api/admin/config", auth=("admin", "guess"),
                         headers={"X-Forwarded-For": "203.0.113.7"})
            owner = http.get(proxy.url + "/api/admin/config", auth=ADMIN,
                             headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.2"})   # the last hop counts
            assert owner.status_code == (200 if trusted else 429)


def points_entry(n: int, bot_name: str, hours_ago: float, cost: Any, now_s: float) -> dict[str, Any]:
    return {"bot_name": bot_name, "creation_time": int((now_s - hours_ago * 3600) * 1e6), "query_id": f"q{n}",
            "usage_type": "API", "cost_points": cost}


def test_points_summary_totals_per_bot_and_day() -> None:
    now_s = 1_760_000_000.0   # 2025-10-09 08:53 UTC
    entries = [points_entry(1, "GPT-4o", 1, 100, now_s), points_entry(2, "Claude-Sonnet-4.5", 2, 300, now_s),
               points_entry(3, "GPT-4o", 24 * 3, 50, now_s), points_entry(4, "GPT-4o", 24 * 10, 7, now_s),
               points_entry(4, "GPT-4o", 24 * 10, 7, now_s),            # listed twice (pages overlapping): once
               points_entry(5, "GPT-4o", 24 * 31, 1000, now_s),         # older than the window
               {"bot_name": "X", "creation_time": "soon", "cost_points": 5}, {"bot_name": None, "cost_points": 1},
               points_entry(6, "Y", 1, "lots", now_s)]                  # malformed: skipped, not guessed
    got = p2o.points_summary(entries, now_s)
    assert got["by_bot"] == [
        {"bot": "Claude-Sonnet-4.5", "points": 300, "queries": 1, "points_recent": 300, "queries_recent": 1},
        {"bot": "GPT-4o", "points": 157, "queries": 3, "points_recent": 150, "queries_recent": 2}]
    assert got["days"] == [{"day": "2025-09-29", "points": 7, "queries": 1},
                           {"day": "2025-10-06", "points": 50, "queries": 1},
                           {"day": "2025-10-09", "points": 400, "queries": 2}]
    assert (got["window_days"], got["recent_days"]) == (30, 7)
    assert p2o.points_summary([], now_s)["by_bot"] == []


def test_admin_login_back_off(proxy: Proxy) -> None:
    with httpx.Client() as http:
        statuses = [http.get(proxy.url + "/api/admin/config", auth=("admin", "guess")).status_code for _ in range(6)]
        assert statuses == [401] * 5 + [429]
        locked = http.get(proxy.url + "/api/admin/config", auth=ADMIN)    # even the right password waits
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0


def test_admin_is_refused_on_a_public_address_with_a_default_password(start: Callable[..., Proxy]) -> None:
    proxy = start(host="0.0.0.0")   # reachable from elsewhere, and ADMIN_PASSWORD is still 123456
    with httpx.Client() as http:
        for path in ("/admin", "/api/admin/config", "/api/admin/stats", "/api/models"):
            r = http.get(proxy.url + path, auth=ADMIN)
            assert r.status_code == 403 and "ADMIN_PASSWORD" in r.json()["error"]["message"], path
        assert http.get(proxy.url + "/healthz").status_code == 200   # the API itself is not affected
    for password, host in (("change-me", "0.0.0.0"), ("", "::")):
        reason = p2o.admin_disabled_reason(p2o.Settings(host=host, admin_password=password))
        assert "ADMIN_PASSWORD" in reason and "restart" in reason
    assert p2o.admin_disabled_reason(p2o.Settings(host="127.0.0.1")) == ""
    assert p2o.admin_disabled_reason(p2o.Settings(host="0.0.0.0", admin_password="a long own one")) == ""


def usage_requests(poe: FakePoe) -> list[dict[str, Any]]:
    return [r for r in poe.requests if r["path"].startswith("/usage/")]


def test_admin_points_use_the_api_token_follow_pages_and_are_cached(fast_reload: float, proxy: Proxy, poe: FakePoe,
                                                                     tmp_path: Path) -> None:
    now_s = time.time()
    bots = ["GPT-4o", "Claude-Sonnet-4.5", "Gemini-2.5-Pro"]
    poe.points = [points_entry(n, bots[n % 3], n * 2.5, n % 7 + 1, now_s) for n in range(250)]   # 26 days, 3 pages
    poe.balance = 987654
    url = proxy.url + "/api/admin/points"
    with httpx.Client(auth=ADMIN) as http:
        assert httpx.get(url).status_code == 401                                   # admin credentials needed
        assert http.get(url, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        got = http.get(url).json()                           # no api_token: nothing asked of Poe, the page says why
        assert got["balance"] is None and got["error_code"] == "no_token" and "api_token" in got["error"]
        assert not usage_requests(poe)
        (tmp_path / "models.yaml").write_text("enable: true\nmodels: {}\napi_token: admin-token-123\n")
        wait_for_config(proxy, lambda c: c["api_token"] == "admin-token-123")   # the registry read the edit
        proxy.client(api_key="a-clients-own-key").chat.completions.create(
            model="GPT-4o", messages=[{"role": "user", "content": "x"}])
        got = http.get(url, headers={"X-Api-Key": "a-clients-own-key"}).json()
    assert got["error"] is None and got["balance"] == 987654 and got["key"] == "api_token" and got["complete"]
    want: dict[str, list[int]] = {}
    for e in poe.points:
        want.setdefault(e["bot_name"], [0, 0, 0])
        want[e["bot_name"]][0] += e["cost_points"]
        want[e["bot_name"]][1] += 1
        want[e["bot_name"]][2] += e["cost_points"] if e["creation_time"] / 1e6 >= now_s - 7 * 86400 else 0
    assert {r["bot"]: [r["points"], r["queries"], r["points_recent"]] for r in got["by_bot"]} == want
    assert sum(d["points"] for d in got["days"]) == sum(e["cost_points"] for e in poe.points)
    assert sum(d["queries"] for d in got["days"]) == 250 and got["days"] == sorted(got["days"], key=lambda d: d["day"])
    seen = usage_requests(poe)
    assert {r["headers"]["authorization"] for r in seen} == {"Bearer admin-token-123"}   # never the client's key
    assert [r["path"] for r in seen] == ["/usage/current_balance"] + ["/usage/points_history"] * 3
    assert [a.get("starting_after") for a in poe.usage_args] == [None, "q99", "q199"]
    # Cached: the page reloading asks Poe nothing new.
    assert httpx.get(url, auth=ADMIN).json()["balance"] == 987654 and len(usage_requests(poe)) == 4


def test_admin_points_history_paging_is_bounded(fast_reload: float, proxy: Proxy, poe: FakePoe, tmp_path: Path) -> None:
    now_s = time.time()
    poe.points = [points_entry(n, "GPT-4o", n * 0.1, 1, now_s) for n in range(1500)]   # all within the window
    (tmp_path / "models.yaml").write_text("enable: true\nmodels: {}\napi_token: admin-token\n")
    wait_for_config(proxy, lambda c: c["api_token"] == "admin-token")
    got = httpx.get(proxy.url + "/api/admin/points", auth=ADMIN, timeout=20).json()
    assert got["complete"] is False and got["by_bot"] == [{"bot": "GPT-4o", "points": 1000, "queries": 1000,
                                                           "points_recent": 1000, "queries_recent": 1000}]
    assert len([r for r in usage_requests(poe) if r["path"] == "/usage/points_history"]) == 10


@pytest.mark.parametrize("status, code, text", [(401, "token_rejected", "api_token rejected by Poe"),
                                                (500, "upstream", "points balance: Poe answered HTTP 500")])
def test_admin_points_say_what_poe_refused(fast_reload: float, proxy: Proxy, poe: FakePoe, tmp_path: Path, status: int, code: str,
                                           text: str) -> None:
    poe.usage_status = status
    (tmp_path / "models.yaml").write_text("enable: true\nmodels: {}\napi_token: bad-token\n")
    wait_for_config(proxy, lambda c: c["api_token"] == "bad-token")
    r = httpx.get(proxy.url + "/api/admin/points", auth=ADMIN, timeout=20)
    got = r.json()
    assert r.status_code == 200 and got["balance"] is None and got["by_bot"] == []   # the page shows why, not a 5xx
    assert got["error_code"] == code and got["error"].startswith(text), got["error"]
    asked = len(usage_requests(poe))
    assert asked == (1 if status == 401 else 2)          # a rejected key is not tried on the history too
    poe.usage_status = 200                               # failures are cached only briefly ...
    assert httpx.get(proxy.url + "/api/admin/points", auth=ADMIN).json()["error_code"] == code
    assert len(usage_requests(poe)) == asked             # ... but cached


# ----------------------------------------------------------------------------- the model list

def test_models_list_with_the_sdk(proxy: Proxy, poe: FakePoe) -> None:
    models = proxy.client().models.list()
    ids = [m.id for m in models.data]
    assert ids == ["GPT-4o", "Claude-Sonnet-4.5"]
    assert models.data[0].created == 1715644800 and models.data[0].object == "model"   # ms -> s
    with httpx.Client() as http:   # the un-prefixed path works too, and needs no key
        body = http.get(proxy.url + "/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ids


def test_models_list_tells_what_each_bot_can_do(proxy: Proxy, poe: FakePoe) -> None:
    poe.models = POE_MODELS
    client = proxy.client()
    models = {m.id: m.model_dump() for m in client.models.list().data}
    # Poe lists lower-case ids; clients see the cased display names (what users type, and models.yaml keys).
    assert list(models) == [e["metadata"]["display_name"] for e in POE_MODELS["data"]]
    sonnet = models["Claude-Sonnet-4.5"]
    assert (sonnet["object"], sonnet["created"], sonnet["owned_by"]) == ("model", 1758868894, "Anthropic")
    assert sonnet["name"] == "Claude-Sonnet-4.5" and sonnet["root"] == "claude-sonnet-4.5"
    assert sonnet["context_length"] == 983040 and sonnet["max_output_tokens"] == 32768
    assert sonnet["top_provider"] == {"context_length": 983040, "max_completion_tokens": 32768, "is_moderated": False}
    assert sonnet["architecture"] == {"input_modalities": ["text", "image"], "output_modalities": ["text"],
                                      "modality": "text,image->text"}
    assert sonnet["supported_features"] == ["web_search", "tools"]
    assert {"tools", "reasoning", "web_search_options", "thinking_budget", "web_search"} <= set(
        sonnet["supported_parameters"])
    assert sonnet["parameters"][0]["name"] == "thinking_budget" and sonnet["parameters"][0]["schema"]["maximum"] == 31999
    assert sonnet["reasoning"]["budget"] == {"min_tokens": 0, "max_tokens": 31999}
    assert sonnet["pricing"]["prompt"] == "0.0000026" and sonnet["pricing"]["completion"] == "0.000013"
    veo = models["Veo-3"]
    assert veo["architecture"]["output_modalities"] == ["video"] and "tools" not in veo["supported_parameters"]
    assert {"aspect_ratio", "duration", "seed"} <= set(veo["supported_parameters"])
    assert "reasoning" not in models["GPT-4o"]["supported_parameters"]
    kimi = models["Kimi-K2.5-FW"]                 # no context window known: left out, not guessed
    assert "context_length" not in kimi and "top_provider" not in kimi
    one = client.models.retrieve("claude-sonnet-4.5")   # Poe's id works too
    assert one.id == "Claude-Sonnet-4.5" and one.model_dump()["context_length"] == 983040
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("Claude-Sonnet")


def test_models_list_in_the_anthropic_shape(proxy: Proxy, poe: FakePoe) -> None:
    import datetime
    poe.models = POE_MODELS
    client = anthropic_client(proxy)
    page = client.models.list()
    assert page.has_more is False and page.first_id == "Assistant" and page.last_id == "Web-Search"
    models = {m.id: m for m in page}
    assert len(models) == 16 and all(m.type == "model" and m.display_name == m.id for m in models.values())
    sonnet = models["Claude-Sonnet-4.5"]
    assert sonnet.created_at == datetime.datetime(2025, 9, 26, 6, 41, 34, tzinfo=datetime.timezone.utc)
    assert (sonnet.max_input_tokens, sonnet.max_tokens) == (983040, 32768)
    one = client.models.retrieve("gpt-4o")
    assert (one.id, one.display_name, one.max_tokens) == ("GPT-4o", "GPT-4o", 8192)
    anthropic = pytest.importorskip("anthropic")
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-bot")


def test_a_chat_waits_for_the_catalogue_only_briefly(start: Callable[..., Proxy], poe: FakePoe,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p2o, "MODELS_WAIT_SECONDS", 0.3)
    poe.models = POE_MODELS
    poe.models_delay_s = 1.2
    client = start().client()
    began = time.monotonic()
    client.chat.completions.create(model="GPT-5.4", messages=[{"role": "user", "content": "Q"}],
                                   reasoning_effort="high", web_search_options={})
    assert time.monotonic() - began < 0.9                                # did not wait for the slow list
    assert last_turn(poe) == "Q --reasoning_effort high"                 # without it: the earlier flags
    assert wait_until(lambda: poe.models_served == 1)                    # the fetch went on in the background
    client.chat.completions.create(model="GPT-5.4", messages=[{"role": "user", "content": "Q"}],
                                   reasoning_effort="high", web_search_options={})
    assert last_turn(poe) == "Q --web_search true --reasoning_effort high"
    assert sum(r["path"] == "/v1/models" for r in poe.requests) == 1


def test_a_failing_model_list_is_not_asked_again_by_every_chat(proxy: Proxy, poe: FakePoe) -> None:
    # An upstream without /v1/models (a bot server of one's own) or a Poe outage: the chats go on without
    # metadata, and only the first one pays for asking.
    poe.models_status = 404
    client = proxy.client()
    for _ in range(5):
        assert client.chat.completions.create(
            model="GPT-4o", messages=[{"role": "user", "content": "x"}]).choices[0].message.content
    assert sum(r["path"] == "/v1/models" for r in poe.requests) == 1
    assert sum(r["path"] == "/bot/GPT-4o" for r in poe.requests) == 5


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", ["chat", "messages", "responses"])
def test_an_unknown_model_points_to_the_model_list(proxy: Proxy, poe: FakePoe, dialect: str, stream: bool) -> None:
    poe.models = POE_MODELS
    poe.on("No-Such-Bot", [sse("error", {"text": "Bot does not exist", "allow_retry": False})])
    poe.on("Gone-Bot", status=404, body=b'{"detail": "Bot not found"}')
    for model in ("No-Such-Bot", "Gone-Bot"):
        err = ask_failing(proxy, dialect, model, stream)
        assert err.status_code == 404 and type(err).__name__ == "NotFoundError", model
        message = err.body["error"]["message"] if dialect == "messages" else err.body["message"]
        assert message.startswith(f"The model '{model}' does not exist on Poe; GET /v1/models lists the bots")
        if dialect == "messages":
            assert err.body["error"]["type"] == "not_found_error"
        else:
            assert err.code == "model_not_found"
    assert len(bot_queries(poe, "No-Such-Bot")) == 1                     # not in the catalogue, still asked for


def test_stalled_model_list_is_a_504(start: Callable[..., Proxy], poe: FakePoe, lt: LoopThread) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"data\"")
        await asyncio.sleep(3)
        writer.close()

    async def serve_stall() -> int:
        server = await asyncio.start_server(stall, "127.0.0.1", 0)
        return server.sockets[0].getsockname()[1]
    port = lt.run(serve_stall())
    proxy = start(poe_base_url=f"http://127.0.0.1:{port}", read_timeout_seconds=0.2)   # the rest never comes
    with pytest.raises(openai.APIStatusError) as info:
        proxy.client().models.list()
    assert info.value.status_code == 504


def test_models_retrieve(proxy: Proxy) -> None:
    client = proxy.client()
    model = client.models.retrieve("gpt-4o")                      # any case
    assert (model.id, model.object, model.created) == ("GPT-4o", "model", 1715644800)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("No-Such-Bot")


# ----------------------------------------------------------------------------- the media APIs: images, speech, videos

def media_bot(poe: FakePoe, bot: str, name: str, content_type: str, data: bytes, text: str = "",
              wait_s: float = 0.0) -> None:
    """A Poe media bot: maybe some words, then its file as a `file` event, served by the fake itself."""
    poe.files[name] = (content_type, data)
    steps: list[Any] = [sse("meta", {"content_type": "text/markdown"})]
    if text:
        steps.append(sse("text", {"text": text}))
    if wait_s:
        steps.append(wait_s)
    steps += [sse("file", {"url": poe.file_url(name), "content_type": content_type, "name": name,
                           "inline_ref": None}), sse("done", {})]
    poe.on(bot, steps)


def downloads(poe: FakePoe) -> list[str]:
    return [r["path"] for r in poe.requests if r["path"].startswith(FILES_PATH)]


def test_images_generate_with_the_sdk_in_both_response_formats(proxy: Proxy, poe: FakePoe) -> None:
    poe.models = POE_MODELS
    media_bot(poe, "FLUX-pro-1.1", "cat.png", "image/png", PNG, text="A tabby cat on a red mat.")
    client = proxy.client()
    result = client.images.generate(model="flux-pro-1.1", prompt="a cat", size="1792x1024", n=2)
    assert [d.url for d in result.data] == [poe.file_url("cat.png")] * 2
    assert result.data[0].revised_prompt == "A tabby cat on a red mat." and result.created > 0
    assert result.usage is not None and result.usage.output_tokens_details.image_tokens == 2 * p2o.ATTACHMENT_TOKENS
    queries = bot_queries(poe, "FLUX-pro-1.1")
    assert len(queries) == 2 and all(q["query"][-1]["content"] == "a cat --aspect 16:9" for q in queries)
    assert downloads(poe) == []   # url: Poe's own address, nothing fetched
    result = client.images.generate(model="FLUX-pro-1.1", prompt="a cat", response_format="b64_json")
    assert base64.b64decode(result.data[0].b64_json) == PNG and result.data[0].url is None
    assert downloads(poe) == [FILES_PATH + "cat.png"]
    # Some bots answer with a Markdown link instead of a file event.
    poe.on("Nano-Banana-2", text_events("Here you go: ![pic](https://pfst.cf2.poecdn.net/base/image/abc.png)"))
    result = client.images.generate(model="nano-banana-2", prompt="a dog")
    assert result.data[0].url == "https://pfst.cf2.poecdn.net/base/image/abc.png"
    assert result.data[0].revised_prompt == "Here you go:"


def test_images_failures_carry_the_bots_words(proxy: Proxy, poe: FakePoe) -> None:
    poe.models = POE_MODELS
    client = proxy.client()
    with pytest.raises(openai.BadRequestError, match="does not make images") as info:
        client.images.generate(model="Claude-Sonnet-4.5", prompt="a cat")
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="16:9, 4:3, 1:1, 3:4, 9:16"):
        client.images.generate(model="FLUX-pro-1.1", prompt="a cat", size="1024x1536")
    poe.on("FLUX-pro-1.1", text_events("I cannot draw that: it breaks the content policy."))
    with pytest.raises(openai.InternalServerError, match="breaks the content policy") as info:
        client.images.generate(model="FLUX-pro-1.1", prompt="a cat")
    assert info.value.status_code == 502
    poe.on("FLUX-pro-1.1", [sse("error", {"text": "Rate limit exceeded"})])
    with pytest.raises(openai.RateLimitError):
        client.images.generate(model="FLUX-pro-1.1", prompt="a cat")
    poe.on("Private-Painter", status=404, body=b'{"detail": "Bot does not exist"}')
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        client.images.generate(model="Private-Painter", prompt="a cat")
    assert len(bot_queries(poe, "Claude-Sonnet-4.5")) == 0   # refused before Poe was asked


def test_images_edit_uploads_the_images_and_the_mask(proxy: Proxy, poe: FakePoe) -> None:
    poe.models = POE_MODELS
    media_bot(poe, "GPT-Image-1", "edited.png", "image/png", PNG)
    client = proxy.client()
    other = PNG + b"\x00"
    result = client.images.edit(model="GPT-Image-1", prompt="add a hat", size="1024x1024",
                                image=[("a.png", PNG, "image/png"), ("b.png", other, "image/png")],
                                mask=("mask.png", PNG + b"\x01", "image/png"), response_format="b64_json")
    assert base64.b64decode(result.data[0].b64_json) == PNG
    assert [u["data"] for u in poe.uploads] == [PNG, other, PNG + b"\x01"]
    message = bot_queries(poe, "GPT-Image-1")[-1]["query"][-1]
    assert message["content"] == "add a hat --aspect 1:1 --use_mask true"
    assert [a["name"] for a in message["attachments"]] == ["a.png", "b.png", "mask.png"]
    result = client.images.edit(model="GPT-Image-1", prompt="again", image=("a.png", PNG, "image/png"))
    assert result.data[0].url == poe.file_url("edited.png") and len(poe.uploads) == 3   # the upload cache
    with httpx.Client(timeout=10) as http:
        bad = http.post(proxy.url + "/v1/images/edits", headers={"Authorization": f"Bearer {KEY}",
                        "Content-Type": "multipart/form-data; boundary=B"},
                        content=b"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nGPT-Image-1\r\n"
                                b"--B\r\nContent-Type: image/png\r\n\r\nxx\r\n--B--\r\n")
        assert bad.status_code == 400 and "part 2" in bad.json()["error"]["message"]
        none = http.post(proxy.url + "/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"},
                         data={"model": "GPT-Image-1", "prompt": "p"}, files={"other": ("x.png", PNG, "image/png")})
        assert none.status_code == 400 and none.json()["error"]["param"] == "image"


def test_speech_streams_the_bots_audio_with_its_type(proxy: Proxy, poe: FakePoe) -> None:
    poe.models = POE_MODELS
    media_bot(poe, "ElevenLabs-v3", "speech.mp3", "audio/mpeg", MP3)
    client = proxy.client()
    with client.audio.speech.with_streaming_response.create(model="ElevenLabs-v3", voice="alloy",
                                                            input="Hello there") as response:
        assert response.headers["content-type"] == "audio/mpeg"
        audio = b"".join(response.iter_bytes())
    assert audio == MP3 and downloads(poe) == [FILES_PATH + "speech.mp3"]
    assert last_turn(poe) == "Hello there"   # OpenAI's voice: the bot keeps its own default
    client.audio.speech.create(model="ElevenLabs-v3", voice="Laura", input="Hi", speed=1.0)
    assert last_turn(poe) == "Hi --voice_1 Laura"
    with pytest.raises(openai.BadRequestError, match="does not make speech"):
        client.audio.speech.create(model="FLUX-pro-1.1", voice="alloy", input="Hi")
    poe.files.pop("speech.mp3")   # Poe's file is gone: a gateway error, not an empty 200
    with pytest.raises(openai.InternalServerError, match="HTTP 404"):
        client.audio.speech.create(model="ElevenLabs-v3", voice="alloy", input="Hi")


def start_shared(start: Callable[..., Proxy], **kw: Any) -> Proxy:
    return start(access_keys=f"alice: {ALICE_KEY}, bob: {BOB_KEY}", poe_api_key=SERVER_KEY, **kw)


def keys_poe_saw(poe: FakePoe) -> set[str]:
    return {r["headers"].get("authorization", "") for r in poe.requests} | {u["authorization"] for u in poe.uploads}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_shared_proxy_keeps_video_jobs_per_access_key(start: Callable[..., Proxy], poe: FakePoe) -> None:
    poe.models = POE_MODELS
    media_bot(poe, "Veo-3", "clip.mp4", "video/mp4", MP4)
    proxy = start_shared(start)
    alice, bob = proxy.client(api_key=ALICE_KEY), proxy.client(api_key=BOB_KEY)
    job = alice.videos.create(model="Veo-3", prompt="waves")
    assert [v.id for v in alice.videos.list()] == [job.id] and list(bob.videos.list()) == []
    with pytest.raises(openai.NotFoundError):
        bob.videos.delete(job.id)
    assert keys_poe_saw(poe) <= {f"Bearer {SERVER_KEY}", ""}   # "": the model list, and file downloads


def test_models_list_names_each_bots_endpoints(proxy: Proxy, poe: FakePoe) -> None:
    poe.models = POE_MODELS
    models = {m.id: m.model_dump() for m in proxy.client().models.list().data}
    assert models["Claude-Sonnet-4.5"]["endpoints"] == ["/v1/chat/completions", "/v1/messages", "/v1/responses"]
    assert models["FLUX-pro-1.1"]["endpoints"][3:] == ["/v1/images/generations"]   # takes no images: no edits
    assert models["GPT-Image-1"]["endpoints"][3:] == ["/v1/images/generations", "/v1/images/edits"]
    assert models["ElevenLabs-v3"]["endpoints"][3:] == ["/v1/audio/speech"]
    assert models["Veo-3"]["endpoints"][3:] == ["/v1/videos"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_video_jobs_with_the_sdk(proxy: Proxy, poe: FakePoe) -> None:
    poe.models = POE_MODELS
    media_bot(poe, "Veo-3", "clip.mp4", "video/mp4", MP4, wait_s=0.5)
    client = proxy.client()
    job = client.videos.create(model="Veo-3", prompt="waves at dusk", seconds="8", size="1280x720",
                               input_reference=("first.png", PNG, "image/png"))
    assert job.status in ("queued", "in_progress") and job.id.startswith("video_") and job.model == "Veo-3"
    assert (job.seconds, job.size, job.prompt) == ("8", "1280x720", "waves at dusk")
    seen = {job.status}
    deadline = time.monotonic() + 10
    while job.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = client.videos.retrieve(job.id)
        seen.add(job.status)
    assert job.status == "completed" and job.progress == 100 and "in_progress" in seen, job
    message = bot_queries(poe, "Veo-3")[-1]["query"][-1]
    assert message["content"] == "waves at dusk --aspect_ratio 16:9 --duration 8 --resolution 720p"
    assert message["attachments"][0]["name"] == "first.png" and poe.uploads[-1]["data"] == PNG
    content = client.videos.download_content(job.id)
    assert content.content == MP4 and content.response.headers["content-type"] == "video/mp4"
    assert [v.id for v in client.videos.list()] == [job.id]
    stranger = proxy.client(api_key="someone-elses-key")
    assert list(stranger.videos.list()) == []
    with pytest.raises(openai.NotFoundError):
        stranger.videos.retrieve(job.id)
    assert client.videos.delete(job.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(job.id)
    # A bot's error fails the job with the bot's words.
    poe.on("Veo-3", [sse("error", {"text": "Your prompt was flagged.", "error_type": "user_caused_error"})])
    job = client.videos.create(model="Veo-3", prompt="something", seconds="4")
    deadline = time.monotonic() + 10
    while job.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = client.videos.retrieve(job.id)
    assert job.status == "failed" and "Your prompt was flagged." in job.error.message
    with pytest.raises(openai.BadRequestError, match="4, 6, 8"):
        client.videos.create(model="Veo-3", prompt="x", seconds="12")


def test_video_jobs_are_bounded_in_number_and_age() -> None:
    now = [1000.0]
    jobs = p2o.VideoJobs(2, 60.0, clock=lambda: now[0])

    def job(name: str, owner: str = "a", status: str = "completed") -> p2o.VideoJob:
        return p2o.VideoJob(name, owner, "Veo-3", "p", "8", "", int(now[0]), status=status)
    jobs.add(job("one"))
    jobs.add(job("two", status="in_progress"))
    jobs.add(job("three"))           # full: the oldest finished job goes
    assert [j.id for j in jobs.owned("a")] == ["two", "three"]
    jobs.add(job("four"))
    busy = p2o.VideoJobs(1, 60.0, clock=lambda: now[0])
    busy.add(job("y", status="in_progress"))
    with pytest.raises(p2o.ProxyError) as info:   # all running: refused rather than forgetting one
        busy.add(job("z"))
    assert info.value.status == 429
    with pytest.raises(p2o.ProxyError):
        jobs.get("b", "four")        # another owner's job does not exist for them
    now[0] += 61
    assert jobs.owned("a") == [] and len(jobs) == 0
    assert "owner" not in repr(job("r", owner="secret-hash"))


# ----------------------------------------------------------------------------- the chat pipeline

def test_non_stream_chat_returns_poe_text_and_usage(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", text_events("Hello", ", ", "world", " — 世界 🎉"))
    result = proxy.client().chat.completions.create(
        model="GPT-4o", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        temperature=0.5, stop="END")
    assert result.choices[0].message.content == "Hello, world — 世界 🎉"
    assert result.choices[0].finish_reason == "stop" and result.model == "GPT-4o"
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert result.usage is not None and result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    sent = last_query(poe)
    assert sent["headers"]["authorization"] == f"Bearer {KEY}"        # the client's key goes to Poe
    assert sent["query"]["temperature"] == 0.5 and sent["query"]["stop_sequences"] == ["END"]
    assert [m["role"] for m in sent["query"]["query"]] == ["system", "user"]


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_stream_chat_exact_text(proxy: Proxy, poe: FakePoe, eol: str) -> None:
    poe.on("GPT-4o", text_events("Hel", "lo ", "wörld", eol=eol))
    stream = proxy.client().chat.completions.create(model="GPT-4o", stream=True,
                                                    messages=[{"role": "user", "content": "Hi"}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello wörld"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert len({c.id for c in chunks}) == 1 and all(c.usage is None for c in chunks)


def test_stream_include_usage_sends_one_usage_chunk_last(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", text_events("one ", "two"))
    status, lines = raw_sse(proxy, {"model": "GPT-4o", "stream": True, "stream_options": {"include_usage": True},
                                    "messages": [{"role": "user", "content": "count"}]})
    chunks = data_chunks(lines)
    assert status == 200 and chunks[-1] == "[DONE]"
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert not any("usage" in c for c in chunks[:-2])
    assert not any(line.startswith("event:") for line in lines)
    # the SDK sees the same
    stream = proxy.client().chat.completions.create(model="GPT-4o", stream=True,
                                                    stream_options={"include_usage": True},
                                                    messages=[{"role": "user", "content": "count"}])
    last = list(stream)[-1]
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens > 0


def test_stream_helper_accumulates(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", text_events("a", "b", "c"))
    with proxy.client().chat.completions.stream(model="GPT-4o", messages=[{"role": "user", "content": "x"}]) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.content == "abc" and final.choices[0].message.role == "assistant"


def test_replace_response_stream_and_non_stream(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("Img", [sse("text", {"text": "Generating"}), sse("replace_response", {"text": "Generating done"}),
                   sse("text", {"text": "!"}), sse("done", {})])
    assert both_ways(proxy, "Img") == ("Generating done!", "Generating done!")


def test_missing_key_is_401(proxy: Proxy) -> None:
    with httpx.Client() as http:
        r = http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("script, exc, status", [
    (Script(status=401, body=b'{"error": {"message": "Invalid API key"}}'), openai.AuthenticationError, 401),
    (Script([sse("error", {"text": "Invalid token", "allow_retry": False}), sse("done", {})]),
     openai.AuthenticationError, 401),
    (Script(status=404, body=b'{"detail": "Bot not found"}'), openai.NotFoundError, 404),
    (Script([sse("error", {"text": "Bot does not exist"})]), openai.NotFoundError, 404),
    (Script(status=429, body=b'{"error": "slow down"}'), openai.RateLimitError, 429),
    (Script([sse("error", {"text": "You do not have enough points.", "error_type": "insufficient_fund",
                           "allow_retry": False})]), openai.RateLimitError, 429),
    (Script(status=500, body=b"oops"), openai.InternalServerError, 502),
    (Script([sse("error", {"text": "too long", "error_type": "user_message_too_long"})]),
     openai.BadRequestError, 400),
])
@pytest.mark.parametrize("stream", [False, True])
def test_poe_failures_get_real_statuses(proxy: Proxy, poe: FakePoe, script: Script, exc: type, status: int,
                                        stream: bool) -> None:
    poe.scripts["Bot"] = script
    with pytest.raises(exc) as info:
        result = proxy.client().chat.completions.create(model="Bot", stream=stream,
                                                        messages=[{"role": "user", "content": "x"}])
        if stream:
            list(result)
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict) and info.value.body.get("message")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", ["chat", "messages", "responses"])
def test_every_429_says_when_to_retry(start: Callable[..., Proxy], poe: FakePoe, dialect: str, stream: bool) -> None:
    proxy = start()
    poe.on("Busy", status=429, body=b'{"error": "slow down"}', headers=[("Retry-After", "17")])
    poe.on("Limited", [sse("error", {"text": "Rate limit exceeded, try again later"})])
    poe.on("Broke", [sse("error", {"text": "You do not have enough points.", "error_type": "insufficient_fund",
                                   "allow_retry": False})])
    for model, retry_after in (("Busy", "17"), ("Limited", str(p2o.DEFAULT_RETRY_AFTER_S)),
                               ("Broke", str(p2o.DEFAULT_RETRY_AFTER_S))):
        err = ask_failing(proxy, dialect, model, stream)
        assert err.status_code == 429 and type(err).__name__ == "RateLimitError", model
        assert err.response.headers["retry-after"] == retry_after, model
        assert err.response.headers.get("x-should-retry") == ("false" if model == "Broke" else None), model
    gated = start(rate_limit_ms=60000, rate_limit_max_wait_seconds=1)
    gated.client().chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    err = ask_failing(gated, dialect, "GPT-4o", stream)   # would wait a minute for its turn: refused at once
    assert err.status_code == 429 and err.response.headers["retry-after"] in ("59", "60")


@pytest.mark.parametrize("stream", [False, True])
def test_poe_error_types_reach_claude_code_as_anthropic_errors(proxy: Proxy, poe: FakePoe, stream: bool) -> None:
    anthropic = pytest.importorskip("anthropic")
    poe.on("Long", [sse("error", {"text": "Message too long", "error_type": "user_message_too_long"})])
    poe.on("Private", [sse("error", {"text": "Not allowed here", "error_type": "privacy_authorization_error"})])
    poe.on("Odd", [sse("error", {"text": "Bad attachment", "error_type": "user_caused_error"})])
    poe.on("Gone", status=404, body=b'{"detail": "Bot not found"}')
    err = ask_failing(proxy, "messages", "Long", stream)
    assert isinstance(err, anthropic.BadRequestError)
    assert err.body["error"]["type"] == "invalid_request_error"
    assert err.body["error"]["message"].startswith("prompt is too long")   # what makes Claude Code compact
    for model, exc, kind in (("Private", anthropic.PermissionDeniedError, "permission_error"),
                             ("Odd", anthropic.BadRequestError, "invalid_request_error"),
                             ("Gone", anthropic.NotFoundError, "not_found_error")):
        err = ask_failing(proxy, "messages", model, stream)
        assert isinstance(err, exc) and err.body["type"] == "error" and err.body["error"]["type"] == kind, model
    err = ask_failing(proxy, "chat", "Long", stream)
    assert isinstance(err, openai.BadRequestError) and err.code == "context_length_exceeded"


def test_error_after_text_is_an_in_stream_error(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", [sse("text", {"text": "partial "}),
                      sse("error", {"text": "You do not have enough points.", "error_type": "insufficient_fund"}),
                      sse("done", {})])
    stream = proxy.client().chat.completions.create(model="GPT-4o", stream=True,
                                                    messages=[{"role": "user", "content": "x"}])
    seen = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert "partial " in seen and "points" in str(info.value.message)
    status, lines = raw_sse(proxy, {"model": "GPT-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    chunks = data_chunks(lines)
    assert status == 200 and chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == "insufficient_quota"
    assert not any(c != "[DONE]" and c.get("choices") and c["choices"][0]["finish_reason"] for c in chunks)


def test_mid_stream_disconnect(proxy: Proxy, poe: FakePoe) -> None:
    poe.on("GPT-4o", [sse("text", {"text": "Hel"}), DISCONNECT])
    client = proxy.client()
    with pytest.raises(openai.APIError) as info:
        list(client.chat.completions.create(model="GPT-4o", stream=True, messages=[{"role": "user", "content": "x"}]))
    assert "closed the connection" in info.value.message
    with pytest.raises(openai.InternalServerError) as info2:
        client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    assert info2.value.status_code == 502


def test_keepalive_comments_while_poe_is_silent(start: Callable[..., Proxy], poe: FakePoe) -> None:
    proxy = start(stream_hold_seconds=0.1, sse_keepalive_seconds=0.15)
    poe.on("Slow", [sse("meta", {}), 0.6, sse("text", {"text": "late"}), sse("done", {})])
    status, lines = raw_sse(proxy, {"model": "Slow", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and lines.count(": keep-alive") >= 2
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in data_chunks(lines)
                   if c != "[DONE]" and c["choices"]) == "late"


def leave_mid_answer(proxy: Proxy, poe: FakePoe, stream: bool) -> float:
    """Ask the slow bot, then hang up while Poe is still answering (after the first SSE bytes when
    streaming); returns when the client left (time.monotonic())."""
    poe.on("Slow", [sse("text", {"text": "thinking..."}), 5.0, sse("text", {"text": "never sent"}), sse("done", {})])
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    body = json.dumps({"model": "Slow", "stream": stream, "messages": [{"role": "user", "content": "x"}]}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    if stream:
        got = b""
        while b"thinking..." not in got:
            got += sock.recv(65536)
    else:
        time.sleep(0.3)
    left_at = time.monotonic()
    sock.close()
    return left_at


@pytest.mark.parametrize("stream", [True, False])
def test_upstream_is_let_go_once_finished_or_left(proxy: Proxy, poe: FakePoe, stream: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    let_go: list[str] = []
    finish, aclose = p2o.PoeEventStream.finish, p2o.PoeEventStream.aclose

    async def counted_finish(self: p2o.PoeEventStream, complete: bool, wait_s: float = 1.0) -> None:
        let_go.append(f"finish {complete}")
        await finish(self, complete, wait_s)

    async def counted_aclose(self: p2o.PoeEventStream) -> None:
        let_go.append("close")
        await aclose(self)

    monkeypatch.setattr(p2o.PoeEventStream, "finish", counted_finish)
    monkeypatch.setattr(p2o.PoeEventStream, "aclose", counted_aclose)
    client = proxy.client()
    messages = [{"role": "user", "content": "x"}]
    for _ in range(3):   # after `done`: finished, and the connection is reused
        if stream:
            answer = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="GPT-4o", stream=True, messages=messages) if c.choices)
        else:
            answer = client.chat.completions.create(model="GPT-4o", messages=messages).choices[0].message.content
        assert answer == "Hello from GPT-4o"
    assert let_go == ["finish True"] * 3 and poe.connections == 1
    let_go.clear()
    # The client leaves mid-answer: Poe's connection is closed, once, and a new one serves the next request.
    leave_mid_answer(proxy, poe, stream)
    deadline = time.monotonic() + 3
    while not poe.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    assert let_go == ["close"] and len(poe.disconnects) == 1
    assert client.chat.completions.create(model="GPT-4o", messages=messages)
    assert poe.connections == 2


def test_fixtures_from_real_clients(proxy: Proxy, poe: FakePoe) -> None:
    for name in ("cline-chat.json", "langchain-chat.json", "openwebui-chat.json"):
        body = json.loads((FIXTURES / name).read_text())
        poe.on(body["model"], text_events("ok"))
        if body.get("stream"):
            status, lines = raw_sse(proxy, body)
            chunks = data_chunks(lines)
            assert status == 200 and chunks[-1] == "[DONE]", name
            usage_chunks = [c for c in chunks[:-1] if c.get("usage")]
            assert len(usage_chunks) == (1 if body.get("stream_options", {}).get("include_usage") else 0), name
        query = last_query(poe)["query"]
        assert query["query"][-1]["role"] == "user", name


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_closes_the_poe_connection_at_once(proxy: Proxy, poe: FakePoe, stream: bool) -> None:
    left_at = leave_mid_answer(proxy, poe, stream)
    deadline = time.monotonic() + 3
    while not poe.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert poe.disconnects and poe.disconnects[0] - left_at < 1.0


@pytest.mark.parametrize("how", ["close", "half-close", "pipeline-then-half-close"])
def test_client_leaving_mid_stream_closes_poe_while_it_is_still_sending(proxy: Proxy, poe: FakePoe, how: str) -> None:
    poe.on("Trickle", [x for i in range(20) for x in (sse("text", {"text": f"piece{i} "}), 0.25)] + [sse("done", {})])
    body = json.dumps({"model": "Trickle", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"piece0" not in got:
            got += sock.recv(65536)
        if how.startswith("pipeline"):     # a next request already came: the leaving is noticed all the same
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.05)
        left_at = time.monotonic()
        if how.endswith("half-close"):     # the client still reads, so writes to it keep succeeding
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.close()
        deadline = time.monotonic() + 3
        while not poe.disconnects and time.monotonic() < deadline:
            time.sleep(0.02)
        assert poe.disconnects and poe.disconnects[0] - left_at < 1.0
        if how.endswith("half-close"):
            rest = b""
            while chunk := sock.recv(65536):
                rest += chunk
            assert b"piece19" not in rest and b"[DONE]" not in rest   # the answer was cut, not finished


def test_secrets_never_reach_the_logs(start: Callable[..., Proxy], poe: FakePoe,
                                      caplog: pytest.LogCaptureFixture) -> None:
    secret_key, secret_password = "poe-SECRET-KEY-1234567890", "admin-SECRET-PASSWORD"
    proxy = start(admin_password=secret_password)
    poe.on("Bad", [sse("error", {"text": "Invalid token"})])
    with caplog.at_level(logging.DEBUG):
        client = proxy.client(api_key=secret_key)
        client.chat.completions.create(model="GPT-4o", messages=[image_message(data_url(PNG_2X2 + b"log"))])
        list(client.chat.completions.create(model="GPT-4o", stream=True, messages=[{"role": "user", "content": "x"}]))
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="Bad", messages=[{"role": "user", "content": "x"}])
        with httpx.Client() as http:
            http.get(proxy.url + "/admin", auth=("admin", secret_password))
            http.get(proxy.url + "/admin", auth=("admin", secret_password + "x"))
        access_key, server_key = "access-SECRET-KEY-0123456789", "poe-SECRET-SERVER-KEY-42"
        shared = start(access_keys=f"team: {access_key}", poe_api_key=server_key)
        shared.client(api_key=access_key).chat.completions.create(model="GPT-4o", messages=[
            image_message(data_url(PNG_2X2 + b"shared log"))])
        shared.client(api_key=access_key).models.list()
        with pytest.raises(openai.AuthenticationError):
            shared.client(api_key=access_key + "-wrong").chat.completions.create(
                model="GPT-4o", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.AuthenticationError):
            shared.client(api_key=access_key).chat.completions.create(model="Bad", messages=[
                {"role": "user", "content": "x"}])
    assert "POST /v1/chat/completions" in caplog.text             # the access log is there...
    assert secret_key not in caplog.text and secret_password not in caplog.text   # ...the secrets are not
    assert "SECRET" not in caplog.text, caplog.text               # nor the access key or the server's Poe key


def test_a_key_no_poe_key_could_be_is_a_401_in_the_dialects_shape(proxy: Proxy) -> None:
    body = b'{"model":"GPT-4o","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    for path, header in (("/v1/chat/completions", "Authorization: Bearer caf\xc3\xa9".encode("latin-1")),
                         ("/v1/messages", b"X-Api-Key: \xe2\x98\x83snowman"),
                         ("/v1/responses", b"Authorization: Bearer key\x7fwith-delete")):
        out = raw_exchange(proxy, b"POST %s HTTP/1.1\r\nHost: x\r\n%s\r\nContent-Type: application/json\r\n"
                           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                           % (path.encode(), header, len(body), body))
        assert out.startswith(b"HTTP/1.1 401 "), out[:200]
        error = json.loads(out.split(b"\r\n\r\n", 1)[1])
        if path == "/v1/messages":
            assert error["type"] == "error" and error["error"]["type"] == "authentication_error"
        else:
            assert error["error"]["code"] == "invalid_api_key"


def test_requests_with_huge_names_and_urls_leave_nothing_behind(proxy: Proxy, poe: FakePoe) -> None:
    import tracemalloc

    def ask(i: int) -> int:
        with httpx.Client(timeout=20, verify=CLIENT_TLS) as http:
            return http.post(proxy.url + "/v1/chat/completions", headers={"Authorization": "Bearer stranger"}, json={
                "model": f"{i}-" + "m" * 1_000_000, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"https://example.com/{i}/" + "p" * 1_000_000}}]}]}
            ).status_code

    ask(0)   # the first request fills what is filled once (imports, pools)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        assert all(ask(i) >= 400 for i in range(1, 13))   # Poe cannot take such a bot name
        assert len(poe.uploads) == 13
        poe.requests.clear()   # what the fake Poe keeps is not the proxy's
        poe.uploads.clear()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4 * 1024 * 1024, grown   # 12 requests of 2 MB each: none of it is kept


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read memory use")
def test_soak_hundreds_of_concurrent_streams_with_bounded_memory(proxy: Proxy, poe: FakePoe,
                                                                 lt: LoopThread) -> None:
    poe.on("Soak", [x for i in range(10) for x in (sse("text", {"text": f"chunk {i} " * 5}), 0.01)]
           + [sse("done", {})])
    body = json.dumps({"model": "Soak", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
               b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
               % (len(body), body))

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(request)
        data = await reader.read()
        writer.close()
        ok = b"chunk 9 " * 5 in data and b"data: [DONE]" in data and data.endswith(b"0\r\n\r\n")
        return b"" if ok else data[:200] + b" ... " + data[-200:]   # what went wrong, for the report

    async def wave(n: int) -> list[bytes]:
        return await asyncio.gather(*(one() for _ in range(n)))

    assert [bad for bad in lt.run(wave(200), timeout=60) if bad] == []
    before = _rss_bytes()
    for _ in range(2):
        assert [bad for bad in lt.run(wave(200), timeout=60) if bad] == []
    assert _rss_bytes() - before < 30 * 1024 * 1024      # no growth from wave to wave


# ----------------------------------------------------------------------------- tool mode: native, xml, auto

@pytest.mark.parametrize("with_finish_chunk", [True, False])
def test_native_mode_end_to_end(start: Callable[..., Proxy], poe: FakePoe, tmp_path: Path,
                                with_finish_chunk: bool) -> None:
    (tmp_path / "models.yaml").write_text("models:\n  NativeBot: {tool_mode: native}\n")
    steps = [native_chunk({"role": "assistant", "content": None, "tool_calls": [
                 {"index": 0, "id": "call_abc123", "type": "function",
                  "function": {"name": "get_weather", "arguments": ""}}]}),
             native_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
             native_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})]
    if with_finish_chunk:
        steps.append(native_chunk({}, "tool_calls"))
    poe.on("NativeBot", steps + [sse("done", {})])
    client = proxy_client = start().client()
    result = client.chat.completions.create(model="NativeBot", tools=WEATHER_TOOLS,
                                            messages=[{"role": "user", "content": "weather in Paris?"}])
    call = result.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_abc123", "get_weather", {"city": "Paris"})
    assert result.choices[0].finish_reason == "tool_calls" and result.choices[0].message.content is None
    assert last_query(poe)["query"]["tools"][0]["function"]["name"] == "get_weather"
    with proxy_client.chat.completions.stream(model="NativeBot", tools=WEATHER_TOOLS,
                                              messages=[{"role": "user", "content": "weather?"}]) as stream:
        final = stream.get_final_completion()
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_tool_mode_auto_follows_the_catalogue(start: Callable[..., Proxy], poe: FakePoe, tmp_path: Path,
                                              fast_reload: float) -> None:
    poe.models = POE_MODELS
    (tmp_path / "models.yaml").write_text("models:\n  Grok-4: {tool_mode: xml}\n  deepseek-r1: {tool_mode: native}\n")
    client = start(tool_mode="auto").client()
    messages = [{"role": "user", "content": "weather?"}]
    sent = {}
    for model in ("GPT-4o", "Kimi-K2.5-FW", "Grok-4", "DeepSeek-R1", "Private-Bot"):
        client.chat.completions.create(model=model, tools=WEATHER_TOOLS, messages=messages)
        query = last_query(poe)["query"]
        sent[model] = ("tools" in query, "<tools>" in query["query"][-1]["content"])
    assert sent == {"GPT-4o": (True, False),          # Poe lists `tools` for it: Poe's native tool fields
                    "Kimi-K2.5-FW": (False, True),    # it lists none: the XML prompt
                    "Grok-4": (False, True),          # models.yaml's tool_mode wins over the setting...
                    "DeepSeek-R1": (True, False),     # ...either way
                    "Private-Bot": (False, True)}     # not in the catalogue: XML
    yaml_auto = start()                                # TOOL_MODE xml (the default), `auto` for one model
    (tmp_path / "models.yaml").write_text("models:\n  Claude-Sonnet-4.5: {tool_mode: auto}\n")
    wait_for_config(yaml_auto, lambda c: "Claude-Sonnet-4.5" in c["models"])   # the registry noticed the edit
    for model, native in (("Claude-Sonnet-4.5", True), ("GPT-4o", False)):
        yaml_auto.client().chat.completions.create(model=model, tools=WEATHER_TOOLS, messages=messages)
        assert ("tools" in last_query(poe)["query"]) is native, model


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("refusal", [
    Script([sse("error", {"text": "This bot does not support tool calling.", "error_type": "user_caused_error",
                          "allow_retry": False})]),
    Script([sse("meta", {"content_type": "text/markdown"}), sse("error", {"text": "tools are not supported"})]),
    Script(status=400, body=b'{"error": {"code": "unsupported_feature_for_model", "message": "Not supported"}}'),
], ids=["user_caused_error", "unclassified", "http_400"])
def test_tool_mode_auto_falls_back_to_xml_once_and_remembers(start: Callable[..., Proxy], poe: FakePoe,
                                                            refusal: Script, stream: bool) -> None:
    poe.models = POE_MODELS
    poe.when_native["Grok-4"] = refusal
    poe.on("Grok-4", xml_reply_steps(TOOL_REPLY))
    client = start(tool_mode="auto").client()

    def ask() -> list[tuple[str, Any]]:
        kw: dict[str, Any] = dict(model="Grok-4", tools=WEATHER_TOOLS, messages=[{"role": "user", "content": "?"}])
        if not stream:
            message = client.chat.completions.create(**kw).choices[0].message
        else:
            with client.chat.completions.stream(**kw) as events:
                message = events.get_final_completion().choices[0].message
        return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]

    assert ask() == EXPECTED_CALLS                                        # the client saw no refusal
    first, retry = bot_queries(poe, "Grok-4")
    assert "tools" in first and "tools" not in retry and "<tools>" in retry["query"][-1]["content"]
    assert ask() == EXPECTED_CALLS
    assert len(bot_queries(poe, "Grok-4")) == 3 and "tools" not in bot_queries(poe, "Grok-4")[-1]   # XML at once


@pytest.mark.parametrize("error, status", [
    ({"text": "You do not have enough points.", "error_type": "insufficient_fund", "allow_retry": False}, 429),
    ({"text": "Bad attachment", "error_type": "user_caused_error"}, 400),
    ({"text": "Message too long", "error_type": "user_message_too_long"}, 400),
])
def test_tool_mode_auto_retries_only_a_refusal_of_tools(start: Callable[..., Proxy], poe: FakePoe,
                                                       error: dict[str, Any], status: int) -> None:
    poe.models = POE_MODELS
    poe.when_native["Grok-4"] = Script([sse("error", error)])
    client = start(tool_mode="auto").client()
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="Grok-4", tools=WEATHER_TOOLS,
                                           messages=[{"role": "user", "content": "?"}])
        assert info.value.status_code == status
    assert [("tools" in q) for q in bot_queries(poe, "Grok-4")] == [True, True]   # no retry, and not remembered


def test_what_counts_as_a_refusal_of_native_tools() -> None:
    refuses = p2o.refuses_native_tools
    assert refuses(p2o.classify_poe_status(400, b'{"error": "unsupported_feature_for_model"}', "bot B"), True)
    assert refuses(p2o.classify_poe_error({"text": "Function calling is unavailable",
                                           "error_type": "user_caused_error"}), False)
    assert refuses(p2o.classify_poe_error({"text": "This model does not support tools"}), False)
    for status, body in ((401, b"nope"), (404, b"Bot not found"), (413, b"too big"), (429, b"slow"), (500, b"x"),
                         (400, b'{"error": "prompt is too long for the context window"}')):
        assert not refuses(p2o.classify_poe_status(status, body, "bot B"), True), status
    for data in ({"text": "Bad attachment", "error_type": "user_caused_error"},
                 {"text": "tools: you do not have enough points", "error_type": "insufficient_fund"},
                 {"text": "Too many tool calls, rate limit exceeded"},
                 {"text": "Internal server error"}):
        assert not refuses(p2o.classify_poe_error(data), False), data


# ----------------------------------------------------------------------------- access keys

def test_shared_proxy_runs_every_sdk_on_the_servers_key(start: Callable[..., Proxy], poe: FakePoe) -> None:
    proxy = start_shared(start)
    client = proxy.client(api_key=ALICE_KEY)
    assert [m.id for m in client.models.list().data] == ["GPT-4o", "Claude-Sonnet-4.5"]
    assert client.chat.completions.create(**CHAT).choices[0].message.content == "Hello from GPT-4o"
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**CHAT, stream=True)
                   if c.choices) == "Hello from GPT-4o"
    client.chat.completions.create(model="GPT-4o", messages=[image_message(data_url(PNG_2X2 + b"shared"))])
    assert client.responses.create(model="GPT-4o", input="hi").output_text == "Hello from GPT-4o"
    message = anthropic_client(proxy, api_key=BOB_KEY).messages.create(   # x-api-key
        model="Claude-Sonnet-4.5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from Claude-Sonnet-4.5"
    bearer = anthropic_client(proxy, api_key=None, auth_token=BOB_KEY)   # Authorization: Bearer
    assert bearer.messages.create(model="Claude-Sonnet-4.5", max_tokens=10,
                                  messages=[{"role": "user", "content": "hi"}]).content[0].text
    with httpx.Client() as http:   # Azure-style clients send api-key
        r = http.post(proxy.url + "/v1/chat/completions", json=CHAT, headers={"api-key": ALICE_KEY})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello from GPT-4o"
        assert http.get(proxy.url + "/healthz").status_code == 200   # health needs no key
    assert len(poe.uploads) == 1 and {r["path"] for r in poe.requests} >= {"/v1/models", "/bot/GPT-4o"}
    assert keys_poe_saw(poe) == {f"Bearer {SERVER_KEY}"}   # never an access key


def test_shared_proxy_refuses_wrong_and_missing_keys_in_each_dialects_shape(start: Callable[..., Proxy],
                                                                            poe: FakePoe) -> None:
    anthropic = pytest.importorskip("anthropic")
    proxy = start_shared(start)
    with pytest.raises(openai.AuthenticationError) as info:
        proxy.client(api_key=KEY).chat.completions.create(**CHAT)   # a Poe key is not an access key
    assert info.value.code == "invalid_api_key" and "access key" in info.value.message
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key=ALICE_KEY + "x").models.list()
    with pytest.raises(anthropic.AuthenticationError) as anthropic_info:
        anthropic_client(proxy, api_key="wrong-key-0123456789").messages.create(
            model="Claude-Sonnet-4.5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert anthropic_info.value.body["error"]["type"] == "authentication_error"
    with httpx.Client() as http:
        for method, path, body in (("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None),
                                   ("GET", "/models/GPT-4o", None), ("POST", "/v1/responses", {"model": "m"}),
                                   ("POST", "/v1/messages/count_tokens", {"messages": []})):
            r = http.request(method, proxy.url + path, json=body)
            assert r.status_code == 401, path
            shape = r.json()["error"]
            assert (shape["type"] == "authentication_error" if "messages" in path
                    else shape["code"] == "invalid_api_key"), (path, shape)
        preflight = http.options(proxy.url + "/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 204   # browsers send no key on a preflight
    assert not [r for r in poe.requests if r["path"].startswith("/bot/")] and not poe.uploads


def test_wrong_access_keys_back_off(start: Callable[..., Proxy], poe: FakePoe) -> None:
    proxy = start_shared(start)
    with httpx.Client() as http:
        assert http.post(proxy.url + "/v1/chat/completions", json=CHAT).status_code == 401   # no key: no failure
        statuses = [http.post(proxy.url + "/v1/chat/completions", json=CHAT,
                              headers={"Authorization": f"Bearer guess-{n}-0123456789abcdef"}).status_code
                    for n in range(6)]
        assert statuses == [401] * 5 + [429]
        locked = http.post(proxy.url + "/v1/messages", headers={"x-api-key": ALICE_KEY},
                           json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0   # even the right key waits
        assert locked.json()["error"]["type"] == "rate_limit_error"
        assert http.get(proxy.url + "/api/admin/config", auth=ADMIN).status_code == 200   # the admin's own table


def test_shared_proxy_refuses_a_keyless_body_from_its_head(start: Callable[..., Proxy]) -> None:
    proxy = start_shared(start)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n")   # no body yet
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 401 ") and b"this proxy is shared" in got
    assert b'"type":"error"' in got                                     # in the route's (Anthropic) shape


def test_usage_stats_per_access_key_label(start: Callable[..., Proxy], poe: FakePoe) -> None:
    proxy = start_shared(start)
    poe.on("Broken", status=500, body=b"x")
    alice, bob = proxy.client(api_key=ALICE_KEY), proxy.client(api_key=BOB_KEY)
    alice.chat.completions.create(**CHAT)
    list(alice.chat.completions.create(**CHAT, stream=True))
    with pytest.raises(openai.InternalServerError):
        bob.chat.completions.create(model="Broken", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key="nobody-0123456789abcdef").chat.completions.create(**CHAT)
    with httpx.Client(auth=ADMIN) as http:
        raw = http.get(proxy.url + "/api/admin/stats")
    stats = raw.json()
    by_key = {k["key"]: k for k in stats["keys"]}
    assert set(by_key) == {"alice", "bob"} and stats["access_keys"] == 2 and stats["version"] == p2o.__version__
    assert by_key["alice"]["requests"] == 2 and by_key["alice"]["errors"] == 0
    assert by_key["alice"]["completion_tokens"] > 0 and by_key["alice"]["prompt_tokens"] > 0
    assert (by_key["bob"]["requests"], by_key["bob"]["errors"]) == (1, 1)
    assert ALICE_KEY not in raw.text and BOB_KEY not in raw.text and SERVER_KEY not in raw.text


def test_pass_through_stats_count_under_own_key(proxy: Proxy) -> None:
    proxy.client().chat.completions.create(**CHAT)
    stats = httpx.get(proxy.url + "/api/admin/stats", auth=ADMIN).json()
    assert stats["access_keys"] == 0 and [(k["key"], k["requests"]) for k in stats["keys"]] == [("own key", 1)]


def test_access_key_file_is_read_and_reloaded_when_it_changes(start: Callable[..., Proxy], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(p2o, "KEY_FILE_CHECK_S", 0.0)
    path = tmp_path / "access-keys.txt"
    path.write_text(f"# who may use the proxy\n\nalice: {ALICE_KEY}   # laptop\n")
    proxy = start(access_keys=f"@{path}", poe_api_key=SERVER_KEY)
    assert proxy.client(api_key=ALICE_KEY).chat.completions.create(**CHAT).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key=BOB_KEY).chat.completions.create(**CHAT)
    path.write_text(f"bob: {BOB_KEY}\n")
    assert proxy.client(api_key=BOB_KEY).chat.completions.create(**CHAT).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key=ALICE_KEY).chat.completions.create(**CHAT)
    with caplog.at_level(logging.WARNING):
        path.write_text(f"bob: {BOB_KEY}\ncarol: short\n")   # a broken edit: the keys in force stay
        assert proxy.client(api_key=BOB_KEY).chat.completions.create(**CHAT).choices[0].message.content
    assert "not reloaded" in caplog.text and "line 2" in caplog.text
    labels = {k["key"] for k in httpx.get(proxy.url + "/api/admin/stats", auth=ADMIN).json()["keys"]}
    assert labels == {"alice", "bob"}


###############################################################################
# Inbound connections: framing, keep-alive, limits, hostile bytes
###############################################################################

def test_slow_clients_cannot_hold_every_connection(start: Callable[..., Proxy]) -> None:
    proxy = start(max_connections_per_client=5, header_timeout_seconds=1.0, body_timeout_seconds=1.0)
    slow_head = b"GET /healthz HTTP/1.1\r\nHost:"
    slow_body = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 99\r\n\r\n{"
    # 127.0.0.1 (the machine itself: a local reverse proxy, a benchmark) is not capped; 127.0.0.2 is as
    # any other client address is.
    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", proxy.port), timeout=5, source_address=("127.0.0.2", 0))

    held = []
    for i in range(5):
        sock = connect()
        sock.sendall(slow_head if i % 2 else slow_body)
        held.append(sock)
    time.sleep(0.1)
    started = time.monotonic()
    with connect() as sixth:                                            # a sixth: refused at once
        sixth.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        out = sixth.recv(65536)
    assert out.startswith(b"HTTP/1.1 429 ") and b"MAX_CONNECTIONS_PER_CLIENT" in out
    assert b"retry-after: 1" in out.lower() and time.monotonic() - started < 1.0
    with httpx.Client() as http:                                        # the machine itself still gets in
        assert http.get(proxy.url + "/healthz").status_code == 200
    try:
        for i, sock in enumerate(held):                                 # each trickle keeps it alive no longer
            sock.sendall(b" " if i % 2 else b"x")                       # than its total deadline
        answers = []
        for sock in held:
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
            answers.append(got)
        assert time.monotonic() - started < 3.0
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), [a[:40] for a in answers]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.1)
    with connect() as again:                                            # the slots are free again
        again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert again.recv(65536).startswith(b"HTTP/1.1 200 ")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def tcp_state(local_port: int, remote_port: int) -> str | None:
    """The kernel's state of the loopback socket local_port -> remote_port ("01" established), if any."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            local, remote, state = line.split()[1:4]
            if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
                return state
    return None


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_a_client_that_stops_reading_is_dropped_and_its_sockets_freed(start: Callable[..., Proxy],
                                                                     poe: FakePoe) -> None:
    proxy = start(write_timeout_seconds=0.5)   # the proxy runs in this process's loop thread: its fds are ours
    poe.on("Flood", text_events(*["z" * 16384] * 1500))
    with proxy.client() as client:                                      # the model list cached, pools warm
        assert client.chat.completions.create(model="GPT-4o", messages=[{"role": "user", "content": "x"}])
    time.sleep(0.2)
    baseline = open_fds()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)          # and then never reads
    sock.connect(("127.0.0.1", proxy.port))
    ours = sock.getsockname()[1]
    body = json.dumps({"model": "Flood", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        deadline = time.monotonic() + 10
        while tcp_state(proxy.port, ours) != "01" and time.monotonic() < deadline:
            time.sleep(0.02)                                            # the proxy accepted it ...
        while not (poe.disconnects and tcp_state(proxy.port, ours) is None) and time.monotonic() < deadline:
            time.sleep(0.05)                                            # ... and, stalled, let it go
        assert poe.disconnects, "Poe's side was never closed"
        assert tcp_state(proxy.port, ours) is None, "the proxy still holds the stalled client's socket"
        assert open_fds() <= baseline + 1                               # +1: ours, still open
    finally:
        sock.close()
    with httpx.Client() as http:
        assert http.get(proxy.url + "/healthz").status_code == 200


def test_refused_requests_are_answered_from_the_head_and_closed(start: Callable[..., Proxy]) -> None:
    proxy = start(max_request_size=1000)
    heads = {b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 900\r\n\r\n": 404,
             b"PUT /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 900\r\n\r\n": 405,
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: http://app\r\nContent-Length: 900\r\n\r\n": 401,
             b"POST /api/admin/config HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n": 401,
             b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\nContent-Length: 5000\r\n\r\n": 413}
    for head, status in heads.items():
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as sock:
            sock.sendall(head + b"{")                                    # the body is never sent
            got = b""
            while chunk := sock.recv(65536):                             # answered, then closed: not waiting
                got += chunk
        assert time.monotonic() - started < 1.0
        assert got.startswith(b"HTTP/1.1 %d " % status) and b"connection: close" in got.lower(), got[:200]
        if status == 401 and b"Origin" in head:
            assert b"access-control-allow-origin: *" in got.lower()     # a browser client can read why
    refused = raw_exchange(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                                  b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 400 ") and refused.count(b"HTTP/1.1") == 1


def test_control_characters_cannot_forge_access_log_lines(proxy: Proxy, poe: FakePoe,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="poe2openai.access")
    model = "GPT-4o\n2026-01-01 INFO poe2openai.access 6.6.6.6 GET /admin 200\x1b[2K" + "m" * 500
    with httpx.Client() as http:
        http.post(proxy.url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]},
                  headers={"Authorization": f"Bearer {KEY}"})
        http.get(proxy.url + "/v1/x%0d%0a1.2.3.4%20GET%20/fake\\n")
    deadline = time.monotonic() + 5   # the access line is written once the answer is out: wait for it
    while len(lines := [r.getMessage() for r in caplog.records if r.name == "poe2openai.access"]) < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(lines) == 2 and not any(ch in line for line in lines for ch in "\n\r\x1b")
    assert "GPT-4o\\n2026" in lines[0] and "\\x1b[2K" in lines[0] and "m" * 101 not in lines[0]   # cut short
    assert "/v1/x\\r\\n1.2.3.4 GET /fake\\\\n" in lines[1]             # a backslash cannot fake an escape


def test_keep_alive_serves_several_requests_on_one_connection(proxy: Proxy) -> None:
    req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    out = raw_exchange(proxy, req + req + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 ") == 3 and out.count(b'"status":"ok"') == 3


def test_http_10_client_gets_a_closed_response(proxy: Proxy) -> None:
    out = raw_exchange(proxy, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and b"connection: close" in out.lower()


def test_body_over_max_request_size_is_413_and_closes(start: Callable[..., Proxy]) -> None:
    proxy = start(max_request_size=100)
    body = b"x" * 1000
    out = raw_exchange(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                              b"Content-Length: 1000\r\n\r\n" + body)
    assert out.startswith(b"HTTP/1.1 413 ") and b"connection: close" in out.lower()
    assert b"payload_too_large" in out
    chunked = b"".join(b"%x\r\n%s\r\n" % (60, b"y" * 60) for _ in range(3)) + b"0\r\n\r\n"
    out = raw_exchange(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert out.startswith(b"HTTP/1.1 413 ")


def test_garbage_gets_400_and_the_server_lives_on(proxy: Proxy) -> None:
    out = raw_exchange(proxy, b"\x16\x03\x01 garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b'"error"' in out
    with httpx.Client() as http:
        assert http.get(proxy.url + "/healthz").status_code == 200


def test_slow_request_head_times_out_with_408(start: Callable[..., Proxy]) -> None:
    proxy = start(header_timeout_seconds=0.3)
    out = raw_exchange(proxy, b"GET /healthz HTTP/1.1\r\nHost:", timeout=3)
    assert out.startswith(b"HTTP/1.1 408 ")


POST_HI = (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 11\r\n\r\n" b'{"a": "hi"}')
GET_HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
GET_CLOSE = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def inbound(**kw: Any) -> p2o.InboundProtocol:
    return p2o.InboundProtocol(p2o.Settings(**kw), now=0.0, client="test")


def feed(protocol: p2o.InboundProtocol, data: bytes, cuts: list[int] | None = None, now: float = 0.0) -> list[Any]:
    """Feed data in pieces (cut at the given offsets) and collect every action."""
    bounds = [0, *(cuts or []), len(data)]
    actions: list[Any] = []
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            actions += protocol.receive_data(data[a:b], now)
    return actions


def answer(protocol: p2o.InboundProtocol, body: bytes = b"ok", now: float = 0.0) -> tuple[bytes, list[Any]]:
    out = protocol.respond(200, [("Content-Type", "text/plain")], body)
    return out, protocol.response_done(now)


def responses_of(data: bytes, count: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse bytes the way a client does (h11 as the peer): raises unless they are well-formed HTTP."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    out = []
    for _ in range(count):
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"incomplete response: {event}")
        out.append((status, headers, body))
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
    return out


@pytest.mark.parametrize("cuts", [[], list(range(1, len(POST_HI))), [POST_HI.index(b"\r\n\r\n") + 4], [5, 40, 90]],
                         ids=["whole", "byte-by-byte", "head-then-body", "odd"])
def test_inbound_protocol_any_chunking_gives_one_request(cuts: list[int]) -> None:
    protocol = inbound()
    actions = feed(protocol, POST_HI, cuts)
    assert [type(a) for a in actions] == [p2o.RequestReady]
    ready = actions[0]
    assert ready.error is None and protocol.busy and protocol.deadline() is None   # no read deadline while we answer
    request = ready.request
    assert (request.method, request.path, request.query, request.body) == ("POST", "/v1/chat/completions", "x=1",
                                                                           b'{"a": "hi"}')
    assert request.headers["content-type"] == "application/json" and request.request_id.startswith("req_")
    out, after = answer(protocol, b"hello")
    assert after == [] and not protocol.busy and not protocol.closed
    assert responses_of(out) == [(200, {"content-type": "text/plain", "content-length": "5"}, b"hello")]
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")


def test_inbound_protocol_pipelined_requests_one_at_a_time() -> None:
    protocol = inbound()
    actions = feed(protocol, GET_HEALTH + POST_HI + GET_CLOSE)
    assert [a.request.path for a in actions] == ["/healthz"]          # the rest waits for our answer
    assert protocol.receive_data(GET_HEALTH, 0.0) == []               # still held, not parsed
    wire = b""
    paths = []
    while not protocol.closed:
        out, actions = answer(protocol, b"x")
        wire += out
        paths += [a.request.path for a in actions if isinstance(a, p2o.RequestReady)]
        if any(isinstance(a, p2o.CloseConnection) for a in actions):
            break
    assert paths == ["/v1/chat/completions", "/last"]                 # "Connection: close" ended it
    assert protocol.closed and wire.count(b"HTTP/1.1 200 ") == 3
    assert [r[0] for r in responses_of(wire, 3)] == [200, 200, 200]


def test_inbound_protocol_keep_alive_reuse_and_its_idle_timeout() -> None:
    protocol = inbound(header_timeout_seconds=10, keepalive_timeout_seconds=30)
    assert protocol.deadline() == 10                               # a new connection owes us a head
    feed(protocol, GET_HEALTH, now=1.0)
    assert answer(protocol, now=2.0)[1] == []
    assert protocol.deadline() == 32                               # idle keep-alive
    assert protocol.handle_timer(31.9) == []
    assert [type(a) for a in feed(protocol, GET_HEALTH[:5], now=20.0)] == []
    assert protocol.deadline() == 30                               # a head began: the header deadline
    assert [type(a) for a in feed(protocol, GET_HEALTH[5:], now=21.0)] == [p2o.RequestReady]
    answer(protocol, now=22.0)
    assert protocol.handle_timer(52.0) == [p2o.CLOSE] and protocol.closed   # idle too long: closed silently


def test_inbound_protocol_slow_head_is_408_and_close() -> None:
    protocol = inbound(header_timeout_seconds=10)
    feed(protocol, b"GET /healthz HTTP/1.1\r\nHost:", now=1.0)
    assert protocol.handle_timer(9.0) == []
    out, close = protocol.handle_timer(10.0)
    assert close == p2o.CLOSE and protocol.closed
    status, headers, body = responses_of(out)[0]
    assert status == 408 and headers["connection"] == "close" and json.loads(body)["error"]["code"] == "request_timeout"
    assert inbound().handle_timer(10.0) == [p2o.CLOSE]              # nothing sent at all: just close


def test_inbound_protocol_slow_body_closes_and_names_the_request() -> None:
    protocol = inbound(read_timeout_seconds=5)
    feed(protocol, POST_HI[:-3], now=1.0)
    feed(protocol, POST_HI[-3:-1], now=4.0)
    assert protocol.deadline() == 9.0 and protocol.handle_timer(8.0) == []   # idle time, not total
    (close,) = protocol.handle_timer(9.0)
    assert close.abandoned.request.path == "/v1/chat/completions" and protocol.closed


@pytest.mark.parametrize("whole", [False, True])
def test_inbound_protocol_huge_head_is_431_and_close(whole: bool) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    protocol = inbound()
    actions = feed(protocol, head, [] if whole else list(range(1024, len(head), 1024)))
    if whole:   # h11 parsed it in one go: refused once we see its size, still answered through h11
        (ready,) = actions
        assert ready.error.status == 431
        out, after = answer(protocol)
        assert after == [p2o.CLOSE]
    else:
        out, close = actions
        assert close == p2o.CLOSE and protocol.closed
        status, headers, body = responses_of(out)[0]
        assert status == 431 and headers["connection"] == "close" and b"too large" in body
        assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_inbound_protocol_garbage_is_400_and_close() -> None:
    protocol = inbound()
    out, close = feed(protocol, b"\x16\x03\x01 garbage\r\n\r\n")
    assert close == p2o.CLOSE and protocol.closed
    status, headers, body = responses_of(out)[0]
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_http_request"


def test_inbound_protocol_body_over_the_limit_is_413_and_close() -> None:
    protocol = inbound(max_request_size=100)
    head = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
    (ready,) = feed(protocol, head)                                  # declared too big: no 100 Continue
    assert ready.error.status == 413 and ready.error.code == "payload_too_large"
    assert feed(protocol, b"x" * 1000) == [] and not protocol.wants_data   # the rest is dropped, not read
    # closed once answered, lingering: the client may still be sending what we refused
    assert answer(protocol)[1] == [p2o.CloseConnection(linger=True)] and protocol.closed

    protocol = inbound(max_request_size=100)
    chunked = b"".join(b"%x\r\n%s\r\n" % (60, b"y" * 60) for _ in range(3)) + b"0\r\n\r\n"
    actions = feed(protocol, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + chunked, list(range(10, 300, 10)))
    assert [a.error.status for a in actions] == [413]                # counted as it comes, refused once
    assert answer(protocol)[1] == [p2o.CLOSE]                        # (the cuts past its end fed an end of input)


def test_inbound_protocol_100_continue_only_when_the_body_is_read() -> None:
    expect = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
              b"Content-Length: 11\r\n\r\n")
    protocol = inbound()
    assert feed(protocol, expect) == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert [a.request.body for a in feed(protocol, b'{"a": "hi"}')] == [b'{"a": "hi"}']

    protocol = inbound()                                               # the same, pipelined behind a GET
    assert [type(a) for a in feed(protocol, GET_HEALTH + expect)] == [p2o.RequestReady]   # no 100 yet
    out, actions = answer(protocol)
    assert actions == [b"HTTP/1.1 100 Continue\r\n\r\n"]               # now we read its body
    assert [a.request.path for a in feed(protocol, b'{"a": "hi"}')] == ["/v1/chat/completions"]


def test_inbound_protocol_end_of_input() -> None:
    protocol = inbound()
    assert protocol.receive_data(b"", 0.0) == [p2o.CLOSE] and protocol.closed   # an idle client left
    assert protocol.receive_data(GET_HEALTH, 0.0) == []                 # bytes after the end are ignored

    protocol = inbound()                                                # in the middle of a head: 400
    out, close = feed(protocol, GET_HEALTH[:10]) + protocol.receive_data(b"", 0.0)
    assert responses_of(out)[0][0] == 400 and close == p2o.CLOSE

    protocol = inbound()                                                # in the middle of a body: refused
    (ready,) = feed(protocol, POST_HI[:-2]) + protocol.receive_data(b"", 0.0)
    assert ready.error.status == 400 and "Malformed request body" in ready.error.message

    protocol = inbound()                                                # while we answer: the client left
    feed(protocol, POST_HI)
    assert protocol.receive_data(b"", 0.0) == [p2o.DISCONNECTED] and protocol.closed
    assert protocol.receive_data(b"more", 0.0) == []

    protocol = inbound()                                                # a reset while we answer: the same
    feed(protocol, GET_HEALTH)
    assert protocol.connection_lost(0.0) == [p2o.DISCONNECTED]

    protocol = inbound(max_request_size=5)                              # an error answer still goes out
    feed(protocol, POST_HI)
    assert protocol.receive_data(b"", 0.0) == []
    assert answer(protocol)[1] == [p2o.CLOSE]


def test_inbound_protocol_holds_at_most_a_bounded_pipeline() -> None:
    protocol = inbound()
    feed(protocol, GET_HEALTH)
    assert protocol.wants_data                                          # watching for the client leaving
    size = p2o.PIPELINE_BUFFER_BYTES + 10
    feed(protocol, b"POST /next HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (size + 10) + b"p" * size)
    assert not protocol.wants_data                                      # enough held: stop reading
    assert answer(protocol)[1] == [] and protocol.busy                  # now reading that body...
    assert protocol.wants_data
    assert [a.request.path for a in feed(protocol, b"p" * 10)] == ["/next"]   # ...to its end


def test_inbound_protocol_http_10_and_head() -> None:
    protocol = inbound()
    feed(protocol, b"HEAD /healthz HTTP/1.0\r\n\r\n")
    out, after = answer(protocol, b"twelve bytes")
    assert out.endswith(b"\r\n\r\n") and b"Content-Length: 12" in out    # the length of the GET body, none of it
    assert b"connection: close" in out.lower() and after == [p2o.CLOSE]


def test_inbound_protocol_streams_frame_as_h11_would() -> None:
    # 1.1: chunked, each piece one chunk, then the last chunk; a client's parser gets the pieces back.
    protocol = inbound()
    feed(protocol, GET_HEALTH)
    out = protocol.start_stream(200, [("Content-Type", "text/event-stream")], b"data: 1\n\n")
    pieces = [protocol.send_data(b"data: " + b"x" * n + b"\n\n") for n in (1, 300, 70_000)]
    assert pieces[0] == b"9\r\ndata: x\n\n\r\n" and pieces[2].startswith(b"11178\r\n")
    out += b"".join(pieces) + protocol.end_stream()
    ((status, _, body),) = responses_of(out)
    assert status == 200 and body == b"data: 1\n\n" + b"".join(b"data: " + b"x" * n + b"\n\n" for n in (1, 300, 70_000))
    assert protocol.response_done(0.0) == [] and feed(protocol, GET_HEALTH)   # and the connection goes on
    # 1.0: no chunks, the body ends with the connection; HEAD: the head a GET would get, no body.
    for request, sent in ((b"GET /s HTTP/1.0\r\n\r\n", b"abc"), (b"HEAD /s HTTP/1.1\r\nHost: x\r\n\r\n", b"")):
        protocol = inbound()
        feed(protocol, request)
        head = protocol.start_stream(200, [], b"")
        assert (b"transfer-encoding" in head.lower()) == (sent == b"") and protocol.send_data(b"abc") == sent


def refuse_unknown(request: p2o.Request) -> p2o.ProxyError | None:
    return None if request.path == "/ok" else p2o.ProxyError(404, "no such path", "invalid_request_error", "not_found")


def test_inbound_protocol_precheck_refuses_from_the_head_before_any_body() -> None:
    protocol = p2o.InboundProtocol(p2o.Settings(), now=0.0, client="test", precheck=refuse_unknown)
    head = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
    (ready,) = feed(protocol, head)                                     # answered from the head: no 100 Continue
    assert ready.error.status == 404 and not protocol.wants_data        # and the body is not read
    assert feed(protocol, b"x" * 100_000) == []
    assert answer(protocol)[1] == [p2o.CloseConnection(linger=True)] and protocol.closed

    protocol = p2o.InboundProtocol(p2o.Settings(), now=0.0, client="test", precheck=refuse_unknown)
    expect = b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    assert feed(protocol, expect) == [b"HTTP/1.1 100 Continue\r\n\r\n"]  # what it admits is read as before
    (ready,) = feed(protocol, b"{}")
    assert ready.error is None and ready.request.body == b"{}"
    answer(protocol)
    (ready,) = feed(protocol, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")   # no body: left to the router
    assert ready.error is None and not protocol.closed


def test_inbound_protocol_refuses_content_length_with_transfer_encoding() -> None:
    protocol = inbound()
    smuggle = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
    (ready,) = feed(protocol, smuggle)
    assert ready.error.status == 400 and "Transfer-Encoding" in ready.error.message
    out, after = answer(protocol)
    assert len(after) == 1 and isinstance(after[0], p2o.CloseConnection) and protocol.closed   # nothing more is read


def test_inbound_protocol_body_has_a_total_deadline() -> None:
    protocol = inbound(read_timeout_seconds=5, body_timeout_seconds=10)
    feed(protocol, POST_HI[:-8], now=1.0)                               # head at 1: the body is owed by 11
    for i, now in enumerate((4.0, 7.0, 10.0)):                          # a byte every 3 s: never idle for 5 s
        assert protocol.handle_timer(now) == []
        feed(protocol, POST_HI[-8 + i:-7 + i], now=now)
    assert protocol.deadline() == 11.0
    out, close = protocol.handle_timer(11.0)
    status, headers, body = responses_of(out)[0]
    assert status == 408 and b"BODY_TIMEOUT_SECONDS" in body and headers["connection"] == "close"
    assert close.abandoned.request.path == "/v1/chat/completions" and protocol.closed


def test_inbound_protocol_bodies_share_one_memory_budget() -> None:
    budget = p2o.BodyBudget(100)
    first, second = (p2o.InboundProtocol(p2o.Settings(), now=0.0, budget=budget) for _ in range(2))
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 70\r\n\r\n"
    assert feed(first, head + b"a" * 60) == [] and budget.used == 60    # a body on its way holds its share
    (refused,) = feed(second, head + b"b" * 50)                          # together beyond the budget: 503
    assert refused.error.status == 503 and ("Retry-After", "2") in refused.error.headers and budget.used == 60
    (ready,) = feed(first, b"a" * 10)
    assert ready.error is None and budget.used == 70                     # held while it is answered ...
    answer(first)
    assert budget.used == 0                                              # ... and given back after
    answer(second)
    third = p2o.InboundProtocol(p2o.Settings(), now=0.0, budget=budget)
    feed(third, head + b"c" * 30)
    assert third.connection_lost(0.0) and budget.used == 0               # a client that left gives back too


def exchange_closing(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send bytes, half-close, and read whatever comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return out


VALID_REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 60\r\n\r\n"
                 b'{"model":"GPT-4o","messages":[{"role":"user","content":"hi"}]}')
hostile_bytes = st.one_of(
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=len(VALID_REQUEST)).map(lambda n: VALID_REQUEST[:n]),   # truncated
    st.binary(max_size=40).map(lambda junk: VALID_REQUEST.replace(b"Content-Length: 60", b"Content-Length: " + junk)),
    st.tuples(st.integers(1, 3), st.binary(max_size=30)).map(      # bad chunked framing
        lambda t: b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"zz\r\n" * t[0] + t[1]),
    st.integers(70, 200).map(lambda kib: b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (kib * 1024)
                             + b"\r\n\r\n"),                    # huge headers
    st.lists(st.sampled_from([b"GET ", b"/", b"healthz", b" HTTP/1.1", b"\r\n", b"\n", b"Host: x", b":", b"\x00",
                              b"Content-Length: 5", b"Transfer-Encoding: chunked", b"\r\n\r\n"]), max_size=20)
    .map(b"".join),
)


def test_hostile_bytes_never_take_the_server_down(start: Callable[..., Proxy]) -> None:
    proxy = start(header_timeout_seconds=0.5)

    @given(hostile_bytes)
    @hsettings(max_examples=150, deadline=None)
    def one(data: bytes) -> None:
        out = exchange_closing(proxy.port, data)
        assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:80]
        assert b"Traceback" not in out

    one()
    with httpx.Client() as http:
        assert http.get(proxy.url + "/healthz").status_code == 200


def test_huge_headers_get_431(proxy: Proxy) -> None:
    out = exchange_closing(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")


def test_connection_cap_answers_503(start: Callable[..., Proxy]) -> None:
    proxy = start(max_connections=2)
    held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(2)]
    time.sleep(0.1)
    try:
        out = raw_exchange(proxy, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2)
        assert out.startswith(b"HTTP/1.1 503 ") and b"MAX_CONNECTIONS" in out
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.1)
    with httpx.Client() as http:
        assert http.get(proxy.url + "/healthz").status_code == 200


def test_idle_keep_alive_connections_are_closed(start: Callable[..., Proxy]) -> None:
    proxy = start(keepalive_timeout_seconds=0.3)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        began = time.monotonic()
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        assert got.count(b"HTTP/1.1 200 ") == 1 and 0.25 < time.monotonic() - began < 2


###############################################################################
# Server lifecycle: shutdown, workers, packaging
###############################################################################


# ----------------------------------------------------------------------------- shutdown

def test_shutdown_is_quiet_and_prompt(start: Callable[..., Proxy], caplog: pytest.LogCaptureFixture) -> None:
    proxy = start()
    idle = socket.create_connection(("127.0.0.1", proxy.port))
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while b"uptime_s" not in got:
        got += idle.recv(65536)                     # now an idle keep-alive connection
    began = time.monotonic()
    with caplog.at_level(logging.ERROR):
        proxy.stop()
    assert time.monotonic() - began < 2
    assert idle.recv(65536) == b""                  # closed by the shutdown
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_graceful_shutdown_lets_running_streams_finish(start: Callable[..., Proxy], poe: FakePoe) -> None:
    proxy = start()
    poe.on("Slow", [sse("text", {"text": "one "}), 0.5, sse("text", {"text": "two"}), sse("done", {})])
    results: list[str] = []

    def consume() -> None:
        results.append("".join(c.choices[0].delta.content or "" for c in proxy.client().chat.completions.create(
            model="Slow", stream=True, messages=[{"role": "user", "content": "x"}]) if c.choices))

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 10              # the stream is running (the SDK can be slow to start)
    while not any(r["path"].endswith("/Slow") for r in poe.requests) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    stopper = threading.Thread(target=proxy.stop)
    stopper.start()
    time.sleep(0.1)
    with pytest.raises(OSError):                  # no new connections once stopping
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).recv(1)
    reader.join(5)
    stopper.join(5)
    assert results == ["one two"]


def start_slow_stream(proxy_port: int, poe: FakePoe) -> tuple[threading.Thread, list[str]]:
    """A chat stream whose answer takes a minute; returns once its first words arrived."""
    poe.on("Slow", [sse("text", {"text": "one "}), 60.0, sse("text", {"text": "two"}), sse("done", {})])
    got: list[str] = []
    started = threading.Event()

    def consume() -> None:
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{proxy_port}/v1/chat/completions", timeout=90,
                              headers={"Authorization": f"Bearer {KEY}"}, verify=CLIENT_TLS,
                              json={"model": "Slow", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
                for line in r.iter_lines():
                    got.append(line)
                    if "one " in line:
                        started.set()
        except httpx.HTTPError as exc:
            got.append(f"error: {exc}")
        started.set()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    assert started.wait(10) and any("one " in line for line in got), got
    return reader, got


def test_second_ctrl_c_during_the_grace_stops_at_once(poe: FakePoe, tmp_path: Path) -> None:
    server = ProxyProcess(["--config-dir", str(tmp_path), "--poe-base-url", f"http://127.0.0.1:{poe.port}"], tmp_path)
    try:
        reader, _ = start_slow_stream(server.port, poe)
        server.proc.send_signal(signal.SIGINT)
        line = server.wait_for_log("shutting down")
        assert "waiting up to 30 s for 1 running answer; press Ctrl-C again to stop now" in line
        time.sleep(0.5)
        assert server.proc.poll() is None             # the first Ctrl-C waits for the answer
        began = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(5) == 130 and time.monotonic() - began < 2
        reader.join(5)
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.stop()


# ----------------------------------------------------------------------------- workers

def test_workers_share_the_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(HERE / "poe2openai.py"), "--workers", "2", "--host", "127.0.0.1",
                             "--port", str(port), "--config-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pids = set()
        deadline = time.time() + 10
        while time.time() < deadline and len(pids) < 2:
            try:
                with httpx.Client(verify=CLIENT_TLS) as http:   # a new connection each time: the kernel spreads them
                    pids.add(http.get(f"http://127.0.0.1:{port}/healthz").json()["pid"])
            except httpx.HTTPError:
                time.sleep(0.05)
        assert len(pids) == 2 and proc.pid not in pids
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_workers_parent_passes_on_a_second_ctrl_c(poe: FakePoe, tmp_path: Path) -> None:
    server = ProxyProcess(["--workers", "2", "--config-dir", str(tmp_path),
                           "--poe-base-url", f"http://127.0.0.1:{poe.port}"], tmp_path)
    try:
        reader, _ = start_slow_stream(server.port, poe)
        os.killpg(server.proc.pid, signal.SIGINT)     # a terminal's Ctrl-C: the parent and the workers get it
        server.wait_for_log("press Ctrl-C again to stop now")
        server.wait_for_log("for 1 running answer")   # the worker serving the stream
        time.sleep(0.6)
        # The worker got the one Ctrl-C twice (directly and forwarded): still one press, still waiting.
        assert server.proc.poll() is None and "second signal" not in server.log(), server.log()
        began = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGINT)
        assert server.proc.wait(5) == 130 and time.monotonic() - began < 3
        reader.join(5)
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.stop()


# ----------------------------------------------------------------------------- packaging and embedding

def test_dockerfile_has_the_promised_properties() -> None:
    text = (HERE / "Dockerfile").read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    base = next(line for line in instructions if line.startswith("FROM "))
    assert re.fullmatch(r"FROM python:3\.\d+-(alpine|slim)(\d+(\.\d+)?)?", base), base     # slim official base
    installs = " ".join(line for line in instructions if "pip install" in line)
    assert re.search(r"h11==[\d.]+", installs) and re.search(r"PyYAML==[\d.]+", installs, re.I)   # pinned
    assert not re.search(r"\b(gcc|build-base|build-essential|musl-dev)\b", text)          # no build tools
    assert [w for w in re.findall(r"pip install[^&]*", installs)[0].split()
            if not w.startswith("-") and w not in ("pip", "install", "\\")] == ["h11==0.16.0", "PyYAML==6.0.3"]
    assert any(line.startswith("USER ") and "root" not in line for line in instructions)   # non-root
    assert "CONFIG_DIR=/data" in text and any(line.startswith("VOLUME /data") for line in instructions)
    assert "EXPOSE 8080" in instructions
    cmd = next(line for line in instructions if line.startswith("CMD "))
    assert json.loads(cmd[4:])[0] == "python"                                              # exec form
    health = text[text.index("HEALTHCHECK"):]
    assert "urllib.request" in health and "/healthz" in health and "curl" not in health    # stdlib only
    for name in ("poe2openai.py", "adminpage.html", "models.yaml"):
        assert name in text


SYSTEMD_UNIT = HERE / "deploy" / "poe2openai.service"


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}}: keys may repeat (Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"not a directive: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_has_the_promised_properties() -> None:
    text = SYSTEMD_UNIT.read_text()
    unit = unit_directives(text)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    command = service["ExecStart"].split()
    assert command[0] == "/usr/bin/python3" and (command[1:] == ["-m", "poe2openai"]
                                                 or command[1].endswith("/poe2openai.py")), command
    script_dir = os.path.dirname(command[1]) if command[1] != "-m" else service["WorkingDirectory"]
    install_lines = [line for line in text.splitlines() if line.startswith("#") and "install " in line]
    assert any(script_dir in line and "poe2openai.py" in line and "adminpage.html" in line for line in install_lines)
    assert service.get("DynamicUser") == "yes" or service.get("User", "root") not in ("root", "0")   # never root
    assert service["Restart"] == "on-failure"
    environment = dict(v.split("=", 1) for line in unit["Service"]["Environment"] for v in line.split())
    assert environment["CONFIG_DIR"] == "/var/lib/poe2openai" and service["StateDirectory"] == "poe2openai"
    assert "/var/lib/poe2openai" in service["ReadWritePaths"]
    assert service["EnvironmentFile"] == "-/etc/poe2openai.env"        # optional: the service starts without it
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("KillMode", "mixed")):
        assert service[key] == value, key
    assert float(service["TimeoutStopSec"]) > p2o.Settings.shutdown_grace_seconds   # the grace fits before SIGKILL
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not on this machine")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("the unit's ExecStart (/usr/bin/python3) is not on this machine; verify would fail on that")
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(SYSTEMD_UNIT.read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if SYSTEMD_UNIT.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


@pytest.mark.skipif(os.environ.get("POE2OPENAI_SKIP_VENV_TEST") == "1", reason="runs once per CI run")
def test_requirements_alone_run_the_proxy(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # The venv gets no pip of its own (ensurepip alone takes seconds): this pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "-r", str(HERE / "requirements.txt")], check=True, timeout=300,
                   capture_output=True)
    # What `pip list` would say, read from the venv's own site-packages (another pip run costs a second).
    site_packages = [str(path) for path in venv.glob("lib/python*/site-packages")]
    assert len(site_packages) == 1, site_packages
    installed = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions(path=site_packages)}
    assert installed - {"pip", "setuptools", "wheel"} == {"h11", "pyyaml"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(python), "-B", str(HERE / "poe2openai.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--config-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/healthz", verify=CLIENT_TLS).json()["status"] == "ok"
                break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_embedding_imports_quietly_and_serves_in_process(tmp_path: Path) -> None:
    # Importing starts nothing and writes nothing (byte-code caching is Python's, so -B). Hypothesis's
    # example folder may appear meanwhile: the other pytest-xdist worker makes it.
    def listing() -> list[str]:
        return sorted(set(os.listdir(HERE)) - {".hypothesis"})

    before = listing()
    code = ("import threading, poe2openai; assert threading.active_count() == 1; "
            "import logging; assert not logging.getLogger().handlers; print('ok')")
    result = subprocess.run([sys.executable, "-B", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=20, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert result.stdout.strip() == "ok", result.stderr
    assert listing() == before and os.listdir(tmp_path) == []

    async def embedded() -> int:
        stop = asyncio.Event()
        ports: list[int] = []
        server = asyncio.ensure_future(p2o.serve(p2o.Settings(host="127.0.0.1", port=0, config_dir=str(tmp_path)),
                                                 ready=ports.append, stop=stop))
        while not ports:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[0])
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        stop.set()
        await asyncio.wait_for(server, 5)
        return int(answer.split(b" ")[1])

    assert asyncio.run(embedded()) == 200
    assert os.listdir(tmp_path) == []      # not even models.yaml: nothing was saved


###############################################################################
# The admin page in a real browser (headless Chromium through playwright)
###############################################################################

# Debian's Chromium driven by the playwright package (its own browser download cannot work here).
# Without either, these tests skip, except under CI=true or REQUIRE_BROWSER=1, where they fail.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ADMIN_LOGIN = {"username": ADMIN[0], "password": ADMIN[1]}
UPSTREAM_MODELS = ["GPT-4o", "Claude-Sonnet-4.5", "Gemini-2.5-Pro", "Llama-3-70b", "Claude-Haiku-3"]
TIMEOUT_MS = 5000
_REQUIRED = os.environ.get("CI") == "true" or os.environ.get("REQUIRE_BROWSER") == "1"
try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
    expect.set_options(timeout=TIMEOUT_MS)
except ImportError:   # pragma: no cover - depends on the machine
    sync_playwright = None
    Browser = Page = Any   # type: ignore[misc,assignment]


@dataclass
class AdminProxy:
    """A proxy in front of the fake Poe, as the admin page tests see it."""

    url: str
    config_path: Path
    poe: FakePoe
    proxy: Proxy

    def chat(self, model: str) -> str:
        """One chat request for `model`; returns the Poe bot that received it."""
        result = self.proxy.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        bot = last_query(self.poe)["path"][len("/bot/"):]
        assert result.choices[0].message.content == f"Hello from {bot}"
        return bot


@pytest.fixture()
def admin_proxy(start: Callable[..., Proxy], poe: FakePoe, tmp_path: Path) -> AdminProxy:
    poe.models = {"object": "list", "data": [{"id": m, "object": "model", "created": 1715644800, "owned_by": "poe"}
                                             for m in UPSTREAM_MODELS]}
    proxy = start()
    return AdminProxy(proxy.url, tmp_path / "models.yaml", poe, proxy)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if os.environ.get("POE2OPENAI_SKIP_BROWSER") == "1":
        pytest.skip("browser tests run once per CI run, on the main Python")
    missing = ("the playwright package (pip install playwright)" if sync_playwright is None
               else f"{CHROMIUM} (apt-get install -y chromium)" if not os.path.exists(CHROMIUM) else None)
    if missing:
        (pytest.fail if _REQUIRED else pytest.skip)(f"browser tests need {missing}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _watch(page: Page) -> Page:
    """Collect script errors, anything the Content-Security-Policy blocked and alert() calls in
    page.errors (close_page asserts there are none). A beforeunload prompt met while the harness itself
    leaves a page (page.leaving) is accepted: the next test's page must load whatever this one left."""
    page.errors = []   # type: ignore[attr-defined]
    page.leaving = False   # type: ignore[attr-defined]
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))   # type: ignore[attr-defined]
    page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" and (   # type: ignore
        "Content Security Policy" in msg.text or "Failed to fetch" in msg.text) else None)

    def dialog(d: Any) -> None:
        if d.type == "beforeunload" and page.leaving:   # type: ignore[attr-defined]
            d.accept()
            return
        page.errors.append(f"{d.type}: {d.message}")   # type: ignore[attr-defined]
        d.dismiss()
    page.on("dialog", dialog)
    return page


def _shared_tab(browser: Browser) -> Page:
    """One tab per browser, logged in as the admin, that the tests take turns in. A new context and
    tab per test costs a renderer process each (about half a second); a tab that goes from one test's
    proxy to the next starts from nothing all the same: each proxy has a port, so an origin, of its own
    (and close_page empties the origin's storage anyway)."""
    tab = getattr(browser, "admin_tab", None)
    if tab is None or tab.is_closed():
        tab = _watch(browser.new_context(http_credentials=ADMIN_LOGIN).new_page())
        browser.admin_tab = tab   # type: ignore[attr-defined]
    return tab


def open_admin(browser: Browser, proxy: Any, *, width: int = 1280, height: int = 900, color_scheme: str = "light",
               credentials: dict[str, str] | None = ADMIN_LOGIN, url: str | None = None,
               fake_clock: bool = False) -> Page:
    """The admin page loaded and its cards drawn, in a tab with empty storage for its origin. With other
    credentials, or with `fake_clock` (playwright's clock, installed before the page loads, so that a
    test moves the page's timers on instead of waiting for them), in a context of its own."""
    if credentials is ADMIN_LOGIN and not fake_clock:
        page = _shared_tab(browser)
        page.unroute_all(behavior="ignoreErrors")   # whatever a failed test left behind
        page.set_viewport_size({"width": width, "height": height})
        page.emulate_media(color_scheme=color_scheme)   # type: ignore[arg-type]
    else:
        context = browser.new_context(viewport={"width": width, "height": height},
                                      color_scheme=color_scheme,   # type: ignore[arg-type]
                                      http_credentials=credentials)   # type: ignore[arg-type]
        page = _watch(context.new_page())
        if fake_clock:
            page.clock.install()
    page.errors.clear()   # type: ignore[attr-defined]
    page.leaving = True   # type: ignore[attr-defined]
    page.goto(url or proxy.url + "/admin")
    page.leaving = False   # type: ignore[attr-defined]
    expect(page.get_by_test_id("cards")).to_be_visible()
    return page


def close_page(page: Page) -> None:
    errors = list(page.errors)   # type: ignore[attr-defined]
    if page is getattr(page.context.browser, "admin_tab", None):
        page.leaving = True   # type: ignore[attr-defined]
        page.evaluate("localStorage.clear(); sessionStorage.clear()")
        page.goto("about:blank")   # stops the page's timers and requests before its proxy goes
        page.leaving = False   # type: ignore[attr-defined]
    else:
        page.context.close()
    assert not errors, errors


def admin_api(proxy: Any, path: str, body: Any = None) -> Any:
    """GET (or POST `body` to) an admin API path with the admin credentials."""
    with httpx.Client(auth=ADMIN, timeout=10, verify=CLIENT_TLS) as http:
        response = http.get(proxy.url + path) if body is None else http.post(proxy.url + path, json=body)
    response.raise_for_status()
    return response.json()


def seed_config(proxy: Any, **config: Any) -> None:
    base = {"enable": True, "models": {}, "custom_models": [], "api_token": None, "use_v1_api": True}
    assert admin_api(proxy, "/api/admin/config", {**base, **config}) == {"status": "success"}


def public_ids(proxy: Any) -> list[str]:
    return [m["id"] for m in httpx.get(proxy.url + "/v1/models", timeout=10, verify=CLIENT_TLS).json()["data"]]


def card_ids(page: Page) -> list[str]:
    return page.locator('[data-testid^="card-"]').evaluate_all(
        "els => els.map(e => e.getAttribute('data-testid').slice(5))")


def test_admin_wrong_credentials_get_401(admin_proxy: Any, browser: Browser) -> None:
    context = browser.new_context(http_credentials={"username": "admin", "password": "wrong"})
    page = context.new_page()
    response = page.goto(admin_proxy.url + "/admin")
    assert response is not None and response.status == 401
    assert response.headers["www-authenticate"].startswith("Basic")
    assert page.get_by_test_id("cards").count() == 0
    for path in ("/api/admin/config", "/api/admin/stats", "/api/models"):
        assert page.request.get(admin_proxy.url + path).status == 401, path
    context.close()


def test_admin_edit_save_reload_and_effect(admin_proxy: Any, browser: Browser) -> None:
    seed_config(admin_proxy, custom_models=[{"id": "Old-Custom", "owned_by": "me"}])
    page = open_admin(browser, admin_proxy)
    for model in UPSTREAM_MODELS + ["Old-Custom"]:
        expect(page.get_by_test_id(f"card-{model}")).to_be_visible()
    assert sorted(card_ids(page)) == sorted(UPSTREAM_MODELS + ["Old-Custom"])
    expect(page.get_by_test_id("stat-total")).to_contain_text("6")
    expect(page.get_by_test_id("tag-Old-Custom")).to_be_visible()
    expect(page.get_by_test_id("dirty")).to_be_hidden()

    # Rename GPT-4o through the modal (Enter saves the name), disable Llama-3-70b: both wait for Save.
    page.get_by_test_id("rename-GPT-4o").click()
    dialog = page.get_by_test_id("rename-dialog")
    expect(dialog).to_be_visible()
    page.get_by_test_id("rename-input").fill("gpt-4o-poe")
    page.get_by_test_id("rename-input").press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.get_by_test_id("rename-GPT-4o")).to_be_focused()      # focus goes back to the opener
    expect(page.get_by_test_id("mapping-GPT-4o")).to_have_text("gpt-4o-poe")
    expect(page.get_by_test_id("orig-GPT-4o")).to_have_text("GPT-4o")  # struck through (<s>)
    state = page.get_by_test_id("state-Llama-3-70b")
    state.click()
    expect(state).to_have_attribute("data-state", "R")
    state.click()
    expect(state).to_have_attribute("data-state", "X")
    page.get_by_test_id("state-Claude-Haiku-3").click()
    expect(page.get_by_test_id("state-Claude-Haiku-3")).to_have_attribute("data-state", "R")
    expect(page.get_by_test_id("tool-Claude-Sonnet-4.5")).to_have_value("")   # left to TOOL_MODE
    page.get_by_test_id("tool-Claude-Sonnet-4.5").select_option("native")
    page.get_by_test_id("tool-GPT-4o").select_option("auto")
    expect(page.get_by_test_id("dirty")).to_be_visible()

    # Adding and deleting custom models is saved at once, and leaves the unsaved edits alone.
    page.get_by_test_id("add-custom").click()
    page.get_by_test_id("custom-id").fill("gpt-4O")                    # already listed (case-insensitive)
    page.get_by_test_id("custom-id").press("Enter")
    expect(page.get_by_test_id("custom-dialog")).to_contain_text("already listed")
    page.get_by_test_id("custom-id").fill("My-Private-Bot")
    page.get_by_test_id("custom-owner").fill("me")
    page.get_by_test_id("custom-submit").click()
    expect(page.get_by_test_id("custom-dialog")).to_be_hidden()
    expect(page.get_by_test_id("card-My-Private-Bot")).to_be_visible()
    expect(page.get_by_test_id("tag-My-Private-Bot")).to_be_visible()
    page.get_by_test_id("delete-Old-Custom").click()
    page.get_by_test_id("confirm-ok").click()
    expect(page.get_by_test_id("card-Old-Custom")).to_have_count(0)
    on_disk = yaml.safe_load(admin_proxy.config_path.read_text())
    assert [c["id"] for c in on_disk["custom_models"]] == ["My-Private-Bot"]
    assert on_disk["custom_models"][0]["owned_by"] == "me" and isinstance(on_disk["custom_models"][0]["created"], int)
    assert on_disk["models"] == {}                                       # the rename is not saved yet
    expect(page.get_by_test_id("dirty")).to_be_visible()

    page.get_by_test_id("save").click()
    expect(page.get_by_test_id("dirty")).to_be_hidden()
    on_disk = yaml.safe_load(admin_proxy.config_path.read_text())
    assert on_disk["enable"] is True
    assert on_disk["models"] == {"GPT-4o": {"mapping": "gpt-4o-poe", "tool_mode": "auto"}, "Llama-3-70b": {"enable": False},
                                 "Claude-Haiku-3": {"replace_response": True},
                                 "Claude-Sonnet-4.5": {"tool_mode": "native"}}
    assert [c["id"] for c in on_disk["custom_models"]] == ["My-Private-Bot"]

    # A reload shows the saved state.
    page.reload()
    expect(page.get_by_test_id("mapping-GPT-4o")).to_have_text("gpt-4o-poe")
    expect(page.get_by_test_id("state-Llama-3-70b")).to_have_attribute("data-state", "X")
    expect(page.get_by_test_id("card-My-Private-Bot")).to_be_visible()
    expect(page.get_by_test_id("card-Old-Custom")).to_have_count(0)
    expect(page.get_by_test_id("tool-Claude-Sonnet-4.5")).to_have_value("native")
    expect(page.get_by_test_id("tool-GPT-4o")).to_have_value("auto")
    expect(page.get_by_test_id("dirty")).to_be_hidden()
    for name, count in (("total", 6), ("custom", 1), ("mapped", 1), ("replace", 1), ("disabled", 1)):
        expect(page.get_by_test_id(f"stat-{name}")).to_contain_text(str(count))

    # Search matches the original name and the mapping, case-insensitively.
    search = page.get_by_test_id("search")
    search.fill("POE")
    expect(page.locator('[data-testid^="card-"]')).to_have_count(1)
    assert card_ids(page) == ["GPT-4o"]
    search.fill("claude")
    expect(page.locator('[data-testid^="card-"]')).to_have_count(2)
    search.fill("nothing-like-this")
    expect(page.get_by_test_id("empty")).to_be_visible()
    search.fill("")
    # Filters.
    expectations = {"custom": ["My-Private-Bot"], "mapped": ["GPT-4o"], "disabled": ["Llama-3-70b"],
                    "replace": ["Claude-Haiku-3"]}
    for value, ids in expectations.items():
        page.get_by_test_id("filter").select_option(value)
        expect(page.locator('[data-testid^="card-"]')).to_have_count(len(ids))
        assert card_ids(page) == ids, value
    page.get_by_test_id("filter").select_option("all")
    expect(page.locator('[data-testid^="card-"]')).to_have_count(6)
    page.get_by_test_id("hide-disabled").click()
    expect(page.locator('[data-testid^="card-"]')).to_have_count(5)
    expect(page.get_by_test_id("card-Llama-3-70b")).to_have_count(0)
    close_page(page)

    # The proxy serves the new configuration.
    ids = public_ids(admin_proxy)
    assert "gpt-4o-poe" in ids and "My-Private-Bot" in ids
    assert "GPT-4o" not in ids and "Llama-3-70b" not in ids and "Old-Custom" not in ids
    assert admin_proxy.chat("gpt-4o-poe") == "GPT-4o"


def test_admin_switches_and_token_are_saved_at_once(admin_proxy: Any, browser: Browser) -> None:
    seed_config(admin_proxy, enable=False, use_v1_api=True)
    page = open_admin(browser, admin_proxy, fake_clock=True)
    # The page's time stands still from here on, a second ahead (pause_at cannot go back, and the page's
    # next timer is 10 s off), until moved on: its toasts stay until then. Seconds in playwright's Python API.
    page.clock.pause_at((page.evaluate("Date.now()") + 1000) / 1000)
    master = page.get_by_test_id("master")
    expect(master).to_have_attribute("aria-checked", "false")
    expect(page.get_by_test_id("master-note")).to_be_visible()
    master.click()
    expect(master).to_have_attribute("aria-checked", "true")
    expect(page.get_by_test_id("master-note")).to_be_hidden()
    expect(page.get_by_test_id("v1")).to_have_count(0)      # use_v1_api does nothing: no switch for it
    page.get_by_test_id("token").click()
    token = page.get_by_test_id("token-input")
    expect(token).to_be_focused()
    assert token.get_attribute("type") == "password"
    expect(page.get_by_test_id("token-help")).to_contain_text("never used for a client's chats")
    token.fill("secret-poe-key")
    token.press("Enter")
    expect(page.get_by_test_id("token-dialog")).to_be_hidden()
    expect(page.get_by_test_id("toast").last).to_be_visible()
    on_disk = yaml.safe_load(admin_proxy.config_path.read_text())
    # use_v1_api is kept as the file had it (the Rust original's schema), whatever the page saves.
    assert (on_disk["enable"], on_disk["use_v1_api"], on_disk["api_token"]) == (True, True, "secret-poe-key")
    page.get_by_test_id("token").click()
    page.get_by_test_id("token-input").fill("")
    page.get_by_test_id("token-input").press("Enter")
    expect(page.get_by_test_id("token-dialog")).to_be_hidden()
    assert yaml.safe_load(admin_proxy.config_path.read_text())["api_token"] is None
    # Toasts go away after 3 s.
    toasts = page.get_by_test_id("toast")
    expect(toasts).to_have_count(3)                      # the switch and both token saves
    page.clock.run_for(2900)
    expect(toasts).to_have_count(3)
    page.clock.run_for(100)
    expect(toasts).to_have_count(0)
    close_page(page)


def test_admin_modals_close_on_escape_and_backdrop(admin_proxy: Any, browser: Browser) -> None:
    page = open_admin(browser, admin_proxy)
    help_button = page.get_by_test_id("help")
    help_button.click()
    expect(page.get_by_test_id("help-dialog")).to_be_visible()
    expect(page.get_by_test_id("help-dialog")).to_contain_text("native")
    page.keyboard.press("Escape")
    expect(page.get_by_test_id("help-dialog")).to_be_hidden()
    expect(help_button).to_be_focused()
    page.get_by_test_id("rename-Gemini-2.5-Pro").click()
    for _ in range(6):   # Tab stays inside the dialog
        page.keyboard.press("Tab")
        assert page.evaluate("document.getElementById('rename-modal').contains(document.activeElement)")
    page.mouse.click(5, 5)   # the backdrop
    expect(page.get_by_test_id("rename-dialog")).to_be_hidden()
    expect(page.get_by_test_id("mapping-Gemini-2.5-Pro")).to_have_count(0)
    # Rename by keyboard alone, then undo.
    page.get_by_test_id("rename-Gemini-2.5-Pro").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("rename-input")).to_be_focused()
    page.keyboard.type("gemini")
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("mapping-Gemini-2.5-Pro")).to_have_text("gemini")
    expect(page.get_by_test_id("dirty")).to_be_visible()
    page.get_by_test_id("undo-Gemini-2.5-Pro").click()
    expect(page.get_by_test_id("mapping-Gemini-2.5-Pro")).to_have_count(0)
    expect(page.get_by_test_id("dirty")).to_be_hidden()
    close_page(page)


def test_admin_grouping_and_pagination(admin_proxy: Any, browser: Browser) -> None:
    seed_config(admin_proxy, custom_models=[{"id": f"Bulk-{i:03d}", "owned_by": "me"} for i in range(70)])
    page = open_admin(browser, admin_proxy)
    expect(page.get_by_test_id("stat-total")).to_contain_text("75")
    expect(page.locator('[data-testid^="card-"]')).to_have_count(60)
    expect(page.get_by_test_id("range")).to_contain_text("1–60 of 75")
    page.get_by_test_id("page-next").click()
    expect(page.locator('[data-testid^="card-"]')).to_have_count(15)
    expect(page.get_by_test_id("page-2")).to_have_attribute("aria-current", "page")
    page.get_by_test_id("search").fill("gpt")   # a search goes back to page 1
    expect(page.get_by_test_id("page-1")).to_have_count(0)
    assert card_ids(page) == ["GPT-4o"]
    page.get_by_test_id("search").fill("")
    page.get_by_test_id("group").click()
    headers = page.locator('[data-testid^="group-"]')
    testids = "els => els.map(e => e.getAttribute('data-testid'))"
    expect(headers).to_have_count(1)
    expect(page.get_by_test_id("group-bulk")).to_contain_text("BULK")
    expect(page.get_by_test_id("group-bulk")).to_contain_text("70")
    page.reload()   # grouping is remembered
    expect(page.get_by_test_id("group")).to_have_attribute("aria-checked", "true")
    page.get_by_test_id("page-2").click()
    expect(headers).to_have_count(3)
    assert headers.evaluate_all(testids) == ["group-bulk", "group-claude", "group-other"]   # sorted, Other last
    expect(page.get_by_test_id("group-claude")).to_contain_text("CLAUDE")
    expect(page.get_by_test_id("group-claude")).to_contain_text("2")
    expect(page.get_by_test_id("group-other")).to_contain_text("3")   # Gemini, GPT, Llama: one each
    assert card_ids(page)[-3:] == ["Gemini-2.5-Pro", "GPT-4o", "Llama-3-70b"]
    close_page(page)


def test_admin_language_switch_is_remembered(admin_proxy: Any, browser: Browser) -> None:
    page = open_admin(browser, admin_proxy)
    save = page.get_by_test_id("save")
    expect(save).to_have_text("Save")
    page.get_by_test_id("lang").select_option("zh-Hant")
    expect(save).to_have_text("儲存")
    expect(page.get_by_test_id("add-custom")).to_have_text("新增自訂模型")
    assert page.evaluate("document.documentElement.lang") == "zh-Hant"
    page.get_by_test_id("lang").select_option("zh-Hans")
    expect(save).to_have_text("保存")
    page.reload()
    expect(page.get_by_test_id("save")).to_have_text("保存")
    expect(page.get_by_test_id("reload")).to_have_text("重新加载配置")
    close_page(page)


def test_admin_dark_mode_follows_the_system_and_is_remembered(admin_proxy: Any, browser: Browser) -> None:
    page = open_admin(browser, admin_proxy, color_scheme="dark")
    theme = "document.documentElement.getAttribute('data-theme')"
    assert page.evaluate(theme) == "dark"
    expect(page.get_by_test_id("dark")).to_have_attribute("aria-checked", "true")
    page.get_by_test_id("dark").click()
    assert page.evaluate(theme) == "light"
    page.reload()
    expect(page.get_by_test_id("dark")).to_have_attribute("aria-checked", "false")
    assert page.evaluate(theme) == "light"
    close_page(page)


def test_admin_phone_width_has_no_horizontal_overflow(admin_proxy: Any, browser: Browser, tmp_path: Path) -> None:
    seed_config(admin_proxy, models={"GPT-4o": {"mapping": "a-rather-long-public-model-name-for-a-phone"}},
         custom_models=[{"id": "An-Extremely-Long-Custom-Model-Identifier-That-Must-Wrap"}])
    admin_proxy.chat("Claude-Haiku-3")   # something for the usage panel
    page = open_admin(browser, admin_proxy, width=375, height=800)
    expect(page.get_by_test_id("stats-table")).to_be_visible()
    page.screenshot(path=str(tmp_path / "admin-375.png"), full_page=True)
    assert (tmp_path / "admin-375.png").stat().st_size > 0
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.get_by_test_id("rename-GPT-4o").click()    # a dialog fits too
    expect(page.get_by_test_id("rename-dialog")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    box = page.get_by_test_id("rename-dialog").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375
    close_page(page)


def test_admin_usage_panel(admin_proxy: Any, browser: Browser) -> None:
    for _ in range(2):
        assert admin_proxy.chat("GPT-4o") == "GPT-4o"
    page = open_admin(browser, admin_proxy)
    panel = page.get_by_test_id("stats-panel")
    expect(panel.get_by_test_id("stats-row-GPT-4o")).to_be_visible()
    expect(panel.get_by_test_id("stats-row-GPT-4o").locator("td").first).to_have_text("2")
    expect(panel.get_by_test_id("stats-total-requests")).to_contain_text("2")
    assert panel.get_by_test_id("stats-chart").locator("svg rect").count() == 2   # requests and tokens bars
    expect(panel.locator("th", has_text="p95")).to_have_count(1)
    admin_proxy.chat("Claude-Sonnet-4.5")
    page.get_by_test_id("stats-refresh").click()
    expect(panel.get_by_test_id("stats-row-Claude-Sonnet-4.5")).to_be_visible()
    close_page(page)


def test_admin_usage_panel_per_access_key(start: Callable[..., Proxy], poe: FakePoe, browser: Browser) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    proxy = start(access_keys=f"alice: {ALICE_KEY}, {hostile}: {BOB_KEY}", poe_api_key=SERVER_KEY)
    for key in (ALICE_KEY, ALICE_KEY, BOB_KEY):
        proxy.client(api_key=key).chat.completions.create(**CHAT)
    page = open_admin(browser, proxy)
    expect(page.get_by_test_id("version")).to_have_text(f"version {p2o.__version__}")
    panel = page.get_by_test_id("stats-panel")
    table = panel.get_by_test_id("keys-table")
    expect(table.get_by_test_id("key-row-alice").locator("th")).to_have_text("alice")
    expect(table.get_by_test_id("key-row-alice").locator("td").first).to_have_text("2")
    expect(table.get_by_test_id(f"key-row-{hostile}").locator("th")).to_have_text(hostile)   # text, not markup
    expect(table.locator("img")).to_have_count(0)
    expect(panel.get_by_test_id("keys-mode")).to_contain_text("Access keys: 2")
    assert ALICE_KEY not in page.content() and BOB_KEY not in page.content()
    for lang, heading, version in (("zh-Hant", "金鑰（標籤）", "版本"), ("zh-Hans", "密钥（标签）", "版本"),
                                   ("en", "Key (label)", "version")):
        page.get_by_test_id("lang").select_option(lang)
        expect(table.locator("thead th").first).to_have_text(heading)
        expect(page.get_by_test_id("version")).to_have_text(f"{version} {p2o.__version__}")
    close_page(page)


def test_admin_usage_panel_in_pass_through_mode(admin_proxy: Any, browser: Browser) -> None:
    admin_proxy.chat("GPT-4o")
    page = open_admin(browser, admin_proxy)
    panel = page.get_by_test_id("stats-panel")
    expect(panel.get_by_test_id("key-row-own key").locator("th")).to_have_text("own key (each client's Poe key)")
    expect(panel.get_by_test_id("keys-mode")).to_contain_text("Access keys are off")
    close_page(page)


def test_admin_page_opened_with_credentials_in_the_url(admin_proxy: Any, browser: Browser) -> None:
    # http://user:pass@host/admin: the browser logs in from the URL. Browsers that keep the user:pass@
    # in the page's URL make fetch() refuse any URL built from it (relative ones too), so the page
    # builds its API URLs from location.origin, which never has them.
    page_text = (HERE / "adminpage.html").read_text()
    assert page_text.count("fetch(") == page_text.count("fetch(apiUrl(") == 1 and "new Request(" not in page_text
    url = admin_proxy.url.replace("http://", f"http://{ADMIN[0]}:{ADMIN[1]}@") + "/admin"
    requested: list[str] = []
    page = open_admin(browser, admin_proxy, credentials=None, url=url)
    page.on("request", lambda request: requested.append(request.url))
    for model in UPSTREAM_MODELS:                             # /api/models answered
        expect(page.get_by_test_id(f"card-{model}")).to_be_visible()
    expect(page.get_by_test_id("stats-panel").get_by_test_id("stats-totals")).to_be_visible()   # /api/admin/stats
    page.get_by_test_id("rename-GPT-4o").click()
    page.get_by_test_id("rename-input").fill("via-url-login")
    page.get_by_test_id("rename-input").press("Enter")
    page.get_by_test_id("save").click()                       # POST /api/admin/config
    expect(page.get_by_test_id("dirty")).to_be_hidden()
    assert yaml.safe_load(admin_proxy.config_path.read_text())["models"] == {"GPT-4o": {"mapping": "via-url-login"}}
    page.get_by_test_id("stats-refresh").click()
    expect(page.get_by_test_id("stats-refresh")).to_be_enabled()
    assert requested and all(r.startswith(admin_proxy.url + "/api/") and "@" not in r for r in requested), requested
    close_page(page)


HOSTILE = '<img src=x onerror=alert(1)>'


def test_admin_hostile_model_names_render_as_text(admin_proxy: Any, browser: Browser) -> None:
    admin_proxy.poe.models["data"].append({"id": HOSTILE, "object": "model", "created": 1715644800,
                                           "owned_by": '<b onmouseover=alert(2)>poe</b>',
                                           "description": '<script>alert(3)</script>'})
    seed_config(admin_proxy, custom_models=[{"id": '"><svg onload=alert(4)>', "owned_by": "<i>me</i>"}],
                models={HOSTILE: {"mapping": '<iframe src="javascript:alert(5)">'}})
    page = open_admin(browser, admin_proxy)
    card = page.get_by_test_id(f"card-{HOSTILE}")
    expect(card).to_be_visible()
    expect(page.get_by_test_id(f"orig-{HOSTILE}")).to_have_text(HOSTILE)
    expect(page.get_by_test_id(f"mapping-{HOSTILE}")).to_have_text('<iframe src="javascript:alert(5)">')
    expect(card).to_contain_text("<b onmouseover=alert(2)>poe</b>")
    custom = page.get_by_test_id('card-"><svg onload=alert(4)>')
    expect(custom).to_contain_text('"><svg onload=alert(4)>')
    expect(custom).to_contain_text("<i>me</i>")
    grid = page.get_by_test_id("cards")
    for tag in ("img", "b", "i", "iframe", "script"):         # nothing the names spell became an element
        assert grid.locator(tag).count() == 0, tag
    assert grid.locator("svg").count() == grid.locator("svg.icon").count()
    page.get_by_test_id(f"rename-{HOSTILE}").click()          # the dialog title names it too
    expect(page.get_by_test_id("rename-dialog").locator("h2")).to_contain_text(HOSTILE)
    page.keyboard.press("Escape")
    page.get_by_test_id(f"card-{HOSTILE}").hover()
    close_page(page)                                          # and no alert() ran


def test_admin_cards_show_which_media_apis_a_bot_serves(admin_proxy: Any, browser: Browser) -> None:
    admin_proxy.poe.models = POE_MODELS
    page = open_admin(browser, admin_proxy)
    page.get_by_test_id("search").fill("veo")
    badge = page.get_by_test_id("ep-videos-Veo-3")
    expect(badge).to_have_text("video")
    assert "/v1/videos" in (badge.get_attribute("title") or "")
    page.get_by_test_id("lang").select_option("zh-Hant")
    expect(page.get_by_test_id("ep-videos-Veo-3")).to_have_text("影片")
    page.get_by_test_id("lang").select_option("zh-Hans")
    expect(page.get_by_test_id("ep-videos-Veo-3")).to_have_text("视频")
    page.get_by_test_id("search").fill("gpt-image")
    expect(page.get_by_test_id("ep-images-GPT-Image-1")).to_have_text("图像")
    page.get_by_test_id("search").fill("claude-sonnet")
    expect(page.get_by_test_id("card-Claude-Sonnet-4.5")).to_be_visible()
    assert page.get_by_test_id("card-Claude-Sonnet-4.5").locator(".ep").count() == 0   # a chat bot: no badge
    close_page(page)


def test_admin_page_runs_under_its_content_security_policy(admin_proxy: Any, browser: Browser) -> None:
    admin_proxy.chat("GPT-4o")   # a usage chart to draw (its bars were inline styles once)
    page = open_admin(browser, admin_proxy)
    response = page.request.get(admin_proxy.url + "/admin")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    expect(page.get_by_test_id("stats-chart").locator("svg rect")).to_have_count(2)
    fill = page.get_by_test_id("stats-chart").locator("svg rect").first.evaluate("e => getComputedStyle(e).fill")
    assert fill not in ("", "none", "rgb(0, 0, 0)"), fill     # coloured by the stylesheet
    # What the policy is for: script the page did not ship does not run.
    page.evaluate("""() => { const s = document.createElement('script'); s.textContent = 'window.injected = 1';
                              document.body.appendChild(s); }""")
    assert page.evaluate("window.injected") is None
    errors = page.errors   # type: ignore[attr-defined]
    assert any("Content Security Policy" in e for e in errors)  # the browser says it refused that one ...
    errors.clear()                                               # ... and nothing of the page's own
    page.get_by_test_id("help").click()
    expect(page.get_by_test_id("help-dialog")).to_contain_text("API token")
    page.keyboard.press("Escape")
    close_page(page)


def test_admin_shows_load_error_and_failed_loads(fast_reload: float, admin_proxy: Any, browser: Browser) -> None:
    seed_config(admin_proxy, models={"GPT-4o": {"mapping": "kept"}})
    time.sleep(0.01)
    admin_proxy.config_path.write_text("enable: true\nmodels: [broken\n")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and not admin_api(admin_proxy, "/api/admin/config")["load_error"]:
        time.sleep(0.02)   # the proxy looks at the file every 50 ms here (fast_reload)
    page = open_admin(browser, admin_proxy)
    expect(page.get_by_test_id("load-error")).to_be_visible()
    expect(page.get_by_test_id("load-error")).to_contain_text("models.yaml")
    expect(page.get_by_test_id("mapping-GPT-4o")).to_have_text("kept")   # the last good configuration
    # A failed load shows the error panel; Retry loads again.
    page.route("**/api/models", lambda route: route.fulfill(status=502, content_type="application/json",
               body='{"error": {"message": "Poe is down", "type": "upstream_error"}}'))
    page.get_by_test_id("fetch-models").click()
    expect(page.get_by_test_id("error-panel")).to_contain_text("Poe is down")
    page.unroute("**/api/models")
    page.get_by_test_id("retry").click()
    expect(page.get_by_test_id("error-panel")).to_be_hidden()
    close_page(page)


def test_admin_cards_show_catalogue_facts_and_the_points_panel(admin_proxy: Any, browser: Browser) -> None:
    admin_proxy.poe.models = POE_MODELS
    page = open_admin(browser, admin_proxy)
    expect(page.get_by_test_id("points-no-token")).to_contain_text("api_token")   # says how to set it
    close_page(page)
    now_s = time.time()
    admin_proxy.poe.balance = 123456
    admin_proxy.poe.points = [points_entry(1, "Claude-Sonnet-4.5", 1, 250, now_s),
                              points_entry(2, "<img src=x onerror=alert(1)>", 24 * 10, 40, now_s)]
    seed_config(admin_proxy, api_token="admin-token")
    page = open_admin(browser, admin_proxy)
    page.get_by_test_id("search").fill("claude-sonnet")
    expect(page.get_by_test_id("ctx-Claude-Sonnet-4.5")).to_have_text("983k ctx")
    expect(page.get_by_test_id("feat-tools-Claude-Sonnet-4.5")).to_have_text("tools")
    expect(page.get_by_test_id("feat-web_search-Claude-Sonnet-4.5")).to_have_text("web search")
    expect(page.get_by_test_id("mods-Claude-Sonnet-4.5")).to_have_text("text+image → text")
    params = page.get_by_test_id("params-Claude-Sonnet-4.5")
    expect(params.locator("summary")).to_have_text("2 parameters")
    params.locator("summary").click()
    expect(params.locator("li code")).to_have_text(["thinking_budget", "web_search"])
    page.get_by_test_id("search").fill("kimi")   # nothing known of its window: nothing shown
    expect(page.get_by_test_id("card-Kimi-K2.5-FW")).to_be_visible()
    assert page.get_by_test_id("ctx-Kimi-K2.5-FW").count() == 0
    expect(page.get_by_test_id("points-balance")).to_contain_text("123,456")
    expect(page.get_by_test_id("points-row-Claude-Sonnet-4.5")).to_contain_text("250")
    hostile = page.get_by_test_id("points-row-<img src=x onerror=alert(1)>")
    expect(hostile.locator("th")).to_have_text("<img src=x onerror=alert(1)>")   # text, not markup
    expect(hostile.locator("td").first).to_have_text("0")        # spent 10 days ago: not in the last 7
    page.get_by_test_id("lang").select_option("zh-Hant")
    expect(page.get_by_test_id("points-balance")).to_contain_text("餘額")
    page.get_by_test_id("search").fill("claude-sonnet")
    expect(page.get_by_test_id("feat-web_search-Claude-Sonnet-4.5")).to_have_text("網路搜尋")
    close_page(page)   # no script errors, nothing the CSP refused
    admin_proxy.poe.usage_status = 401
    seed_config(admin_proxy, api_token="revoked-token")
    page = open_admin(browser, admin_proxy)
    expect(page.get_by_test_id("points-error")).to_have_text("api_token rejected by Poe: check the API token.")
    close_page(page)
