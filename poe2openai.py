#!/usr/bin/env python3
"""poe2openai: use every Poe bot through the OpenAI Chat Completions, Anthropic Messages and OpenAI
Responses APIs.

A single-file asyncio proxy built on h11 (the HTTP state machine) and pyyaml, nothing else. It serves
the OpenAI API to your tools and speaks Poe's bot protocol (server-sent events) upstream, doing both
HTTP directions itself over asyncio streams, TLS included.

Run it::

    pip install h11 pyyaml
    python poe2openai.py                    # listens on 0.0.0.0:8080
    python poe2openai.py --help             # every setting, with its environment variable

Then point any OpenAI client at ``http://HOST:8080/v1`` and use your Poe API key as the API key.

Endpoints: ``POST /v1/chat/completions`` (and ``/chat/completions``), ``GET /v1/models`` (and
``/models``, ``/v1/models/{id}``), ``POST /v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic),
``POST /v1/responses`` (OpenAI Responses), ``POST /v1/images/generations`` and ``/v1/images/edits``,
``POST /v1/audio/speech``, ``POST``/``GET /v1/videos`` and ``GET``/``DELETE /v1/videos/{id}`` (and
``/content``) over Poe's image, speech and video bots,
``GET /healthz``, ``GET /admin`` with ``/api/admin/config``, ``/api/admin/stats`` and
``/api/models`` behind Basic auth.

Settings (environment variable, or the command-line flag of the same name in lower case with dashes;
a flag wins over the environment; ``--help`` lists them with their defaults):

    HOST, PORT                      bind address (0.0.0.0, 8080)
    ADMIN_USERNAME, ADMIN_PASSWORD  Basic-auth credentials of /admin (admin, 123456: change them)
    MAX_REQUEST_SIZE                largest request body in bytes (67108864 = 64 MiB)
    MAX_ANSWER_SIZE                 largest non-streamed answer in bytes; beyond, 502 (67108864)
    LOG_LEVEL                       debug, info, warning, error, critical (info)
    CONFIG_DIR                      folder of models.yaml (./)
    RATE_LIMIT_MS                   minimum spacing of chat request starts, 0 = off (100)
    URL_CACHE_TTL_SECONDS           upload cache lifetime (259200)
    URL_CACHE_SIZE_MB               upload cache budget (100)
    POE_BASE_URL                    Poe API base (https://api.poe.com)
    POE_FILE_UPLOAD_URL             Poe upload endpoint
    CONNECT_TIMEOUT_SECONDS         connecting to Poe, TLS included (10)
    READ_TIMEOUT_SECONDS            longest silence accepted from Poe; an idle timeout, never a total (120)
    STREAM_HOLD_SECONDS             how long a streaming answer waits for Poe's first event so that
                                    errors still get a real HTTP status (5)
    SSE_KEEPALIVE_SECONDS           interval of ``: keep-alive`` comments during silence (15)
    MODELS_CACHE_TTL_SECONDS        lifetime of the cached Poe model list (600)
    HEADER_TIMEOUT_SECONDS          total time a client gets to send its request head (10)
    BODY_TIMEOUT_SECONDS            total time a client gets to send its request body (120)
    WRITE_TIMEOUT_SECONDS           a client that reads nothing of its answer this long is dropped (30)
    KEEPALIVE_TIMEOUT_SECONDS       idle keep-alive connections are closed after this (30)
    MAX_CONNECTIONS                 open client connections; beyond, 503 (4096)
    MAX_CONNECTIONS_PER_CLIENT      open connections per client address; beyond, 429; 0 = off (64)
    MAX_BODY_MEMORY_MB              request bodies held at once, all clients together; beyond, 503 (1024)
    TRUST_FORWARDED_FOR             behind a reverse proxy: the client address is the last hop of
                                    X-Forwarded-For (off)
    RATE_LIMIT_MAX_WAIT_SECONDS     longest queueing in the rate gate; beyond, 429 + Retry-After (30)
    CORS_ALLOW_ORIGINS              *, or a comma-separated list of origins (never with credentials)
    SHUTDOWN_GRACE_SECONDS          on SIGTERM, time running answers get to finish (30)
    WORKERS                         processes sharing the port with SO_REUSEPORT (1)
    TOOL_MODE                       xml, native or auto: how tools reach a bot whose models.yaml entry
                                    sets no tool_mode; auto is native for bots Poe lists with tools (xml)
    VIDEO_JOBS_MAX                  video jobs kept in memory (lost on restart) (100)
    VIDEO_JOBS_TTL_SECONDS          how long a video job is kept (86400)
    ACCESS_KEYS                     share the proxy: `label: key` entries, comma-separated or @FILE; clients
                                    must send one, and every call to Poe uses POE_API_KEY (off)
    POE_API_KEY                     the server's own Poe key, required with ACCESS_KEYS
    HTTPS_PROXY, HTTP_PROXY, NO_PROXY   outbound proxy (CONNECT for https), standard meaning

What it does beyond passing text through: tool calls emulated with an XML prompt and parsed from the
streamed answer (or Poe's native tool fields: per model, or ``auto`` for the bots Poe lists with tools);
images and files uploaded to Poe through an LRU cache, and files Poe sends made visible; "Thinking..."
blocks moved to ``reasoning_content``; client controls (web search, reasoning, max_tokens, any declared
parameter) turned into each bot's own parameters from Poe's model list; prompts beyond a bot's context
window refused before Poe is asked; usage estimated with a built-in o200k_base approximation.
Policy choices (where we differ from the Rust original on purpose) and known gaps are in README.md.

Sections, each depending only on those above it: Settings; Errors; Pure helpers (ids, JSON, SSE,
files, tokens); Small machines (rate gate, stats, LRU cache); Converters (request -> Poe query; Poe
events -> neutral deltas -> OpenAI chunks or body; the Anthropic and Responses dialects); Model
registry; HTTP plumbing; Poe client;
Handlers (the Dialect records; the App wiring a Router, the admin API, the model list and the chat
pipeline); Inbound connections; Server lifecycle; main().

A dialect (OpenAI chat, Anthropic messages, OpenAI responses) is a ``Dialect`` record: its request
converter to an OpenAI chat request, its id prefixes, its stream encoder and fold, its error body.
The chat pipeline answers every dialect the same way through it.

Importing this module starts nothing and writes nothing; ``serve(settings)`` runs the server.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 10):   # say so plainly instead of failing on newer syntax further down
    raise SystemExit("poe2openai needs Python 3.10 or newer")

import argparse
import asyncio
import base64
import codecs
import contextlib
import contextvars
import dataclasses
import errno
import gc
import http
import json
import logging
import math
import os
import re
import signal
import socket
import ssl
import tempfile
import time
import urllib.parse
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import h11

__version__ = "0.2.1"
__all__ = ["Settings", "ProxyError", "SSEDecoder", "serve", "main"]

log = logging.getLogger("poe2openai")


###############################################################################
###############################################################################
# Settings
###############################################################################

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the flag or variable it came from."""


def _int_setting(name: str, raw: str, low: int, high: int | None = None) -> int:
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise SettingsError(f"{name}={raw!r} must be {span}")
    return value


def _float_setting(name: str, raw: str, low: float) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < low:
        raise SettingsError(f"{name}={raw!r} must be a number of at least {low:g}")
    return value


def _bool_setting(name: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} must be on or off (1/0, true/false, yes/no)")


def _url_setting(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{name}={raw!r} must be an http:// or https:// URL")
    return value


def _log_level_setting(name: str, raw: str) -> str:
    # The Rust original takes an EnvFilter directive ("info,hyper=warn"); its first word is the level.
    first = raw.split(",")[0].strip().lower()
    first = {"warn": "warning", "trace": "debug"}.get(first, first)
    if first not in LOG_LEVELS:
        raise SettingsError(f"{name}={raw!r} must be one of {', '.join(LOG_LEVELS)}")
    return first


def _origins_setting(name: str, raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise SettingsError(f"{name}: {origin!r} must be '*' or an origin like https://app.example.com")
    return origins or ("*",)


def _tool_mode_setting(raw: str) -> str:
    value = raw.strip().lower()
    if value not in TOOL_MODES:
        raise SettingsError(f"TOOL_MODE={raw!r} must be one of {', '.join(TOOL_MODES)}")
    return value


# ----------------------------------------------------------------------------- outbound proxy environment
# Here, not with the other helpers: Settings reads these variables once at start-up.

def _redact_url(url: str) -> str:
    """A URL fit for logs and error messages: user and password removed."""
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def proxies_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY (lower-case names win, as curl and urllib have it) ->
    {"https": url, "http": url, "no": list}. REQUEST_METHOD set means we run under CGI: HTTP_PROXY is
    then a client-sent header, never trusted (httpoxy)."""
    found: dict[str, str] = {}
    for scheme in ("https", "http", "no"):
        if scheme == "http" and "REQUEST_METHOD" in env:
            continue
        value = env.get(f"{scheme}_proxy") or env.get(f"{scheme.upper()}_PROXY")
        if value and value.strip():
            found[scheme] = value.strip()
    return found


def bypasses_proxy(host: str, port: int, no_proxy: str) -> bool:
    """NO_PROXY matching: `*`, exact hosts or IPs, `host:port`, and domain suffixes (`.corp`, `corp`)."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


# ----------------------------------------------------------------------------- access keys
# Here, not with the handlers: Settings checks ACCESS_KEYS at start-up, so a typo stops the proxy there.

ACCESS_KEY_MIN_LENGTH = 16
ACCESS_LABEL_MAX_LENGTH = 64
_ACCESS_KEY_RE = re.compile(r"[^\s,:#]+")      # what a key may be made of: no separator we parse on
_ACCESS_LABEL_BAD_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class AccessKey:
    label: str
    digest: bytes = field(repr=False)   # sha256 of the key: every comparison is of equal length


def parse_access_keys(text: str, where: str, separator: str = "\n") -> tuple[AccessKey, ...]:
    """Access keys from a list: entries split by `separator` (lines of a file, commas in the variable),
    each `label: key` or a bare `key` (labelled `key N`, N its place among the keys). `#` starts a
    comment; blank entries are skipped. Raises SettingsError naming the entry, never quoting a key."""
    import hashlib   # here, not at the top: only a proxy with access keys needs it
    keys: list[AccessKey] = []
    seen: dict[bytes, str] = {}
    place = "line" if separator == "\n" else "entry"
    for number, raw in enumerate(text.split(separator), 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        label, colon, key = entry.rpartition(":")
        label, key = label.strip(), key.strip()
        if colon and not label:
            raise SettingsError(f"{where}, {place} {number}: the label before ':' is empty")
        if not _ACCESS_KEY_RE.fullmatch(key):
            raise SettingsError(f"{where}, {place} {number}: a key is one word without spaces, ',', ':' or '#' "
                                "(write 'label: key')")
        if len(key) < ACCESS_KEY_MIN_LENGTH:
            raise SettingsError(f"{where}, {place} {number}: the key is shorter than {ACCESS_KEY_MIN_LENGTH} "
                                "characters; make one with: python -c \"import secrets; print(secrets.token_urlsafe(24))\"")
        if len(label) > ACCESS_LABEL_MAX_LENGTH or _ACCESS_LABEL_BAD_RE.search(label):
            raise SettingsError(f"{where}, {place} {number}: a label is at most {ACCESS_LABEL_MAX_LENGTH} "
                                "printable characters")
        label = label or f"key {len(keys) + 1}"
        digest = hashlib.sha256(key.encode()).digest()
        if digest in seen:
            raise SettingsError(f"{where}, {place} {number}: the same key is listed twice ({seen[digest]!r} "
                                f"and {label!r})")
        seen[digest] = label
        keys.append(AccessKey(label, digest))
    if not keys:
        raise SettingsError(f"{where} lists no keys")
    return tuple(keys)


def load_access_keys(name: str, spec: str) -> tuple[AccessKey, ...]:
    """ACCESS_KEYS as written: `@/path/to/file` (one entry a line) or comma-separated entries."""
    if not spec.startswith("@"):
        return parse_access_keys(spec, name, ",")
    path = spec[1:].strip()
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise SettingsError(f"{name}: cannot read the key file {path!r}: {reason}") from None
    return parse_access_keys(text, f"{name} file {path}")


def _access_keys_setting(name: str, raw: str) -> str:
    spec = raw.strip()
    load_access_keys(name, spec)   # read now, so a bad entry or a missing file stops the start
    return spec


@dataclass(frozen=True)
class Settings:
    """Everything configurable, read once at start-up and passed down; never re-read from os.environ."""

    host: str = "0.0.0.0"
    port: int = 8080
    admin_username: str = "admin"
    admin_password: str = "123456"
    max_request_size: int = 64 * 1024 * 1024  # bytes: a chat with several big images fits
    max_answer_size: int = 64 * 1024 * 1024  # bytes of a gathered (non-streamed) answer
    log_level: str = "info"
    config_dir: str = "./"
    rate_limit_ms: int = 100
    url_cache_ttl_seconds: int = 259200
    url_cache_size_mb: int = 100
    poe_base_url: str = "https://api.poe.com"
    poe_file_upload_url: str = "https://www.quora.com/poe_api/file_upload_3RD_PARTY_POST"
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 120.0
    stream_hold_seconds: float = 5.0
    sse_keepalive_seconds: float = 15.0
    models_cache_ttl_seconds: float = 600.0
    header_timeout_seconds: float = 10.0   # total, from the head's first byte (or the connection's start)
    body_timeout_seconds: float = 120.0    # total, from the head to the body's last byte
    write_timeout_seconds: float = 30.0    # a client that takes none of its answer for this long is dropped
    keepalive_timeout_seconds: float = 30.0
    max_connections: int = 4096
    max_connections_per_client: int = 64   # per client IP address; 0 = no limit
    max_body_memory_mb: int = 1024         # request bodies held at once, all connections together
    trust_forwarded_for: bool = False      # behind a reverse proxy: the client is X-Forwarded-For's last hop
    rate_limit_max_wait_seconds: float = 30.0
    cors_allow_origins: tuple[str, ...] = ("*",)
    shutdown_grace_seconds: float = 30.0
    workers: int = 1
    tool_mode: str = "xml"   # xml | native | auto, for models whose models.yaml entry sets none
    video_jobs_max: int = 100             # video jobs kept in memory; the oldest finished go first
    video_jobs_ttl_seconds: float = 86400.0   # a video job (and its file's address) is forgotten after this
    # Off (""): each client's Bearer key is its own Poe key. Set: clients present one of these keys and
    # the proxy calls Poe with poe_api_key. Both kept out of repr(), which may end up in a log.
    access_keys: str = field(default="", repr=False)
    poe_api_key: str = field(default="", repr=False)
    # Outbound proxy variables (lower-case keys: "https", "http", "no"), captured at start-up.
    proxies: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.access_keys and not self.poe_api_key:
            raise SettingsError("ACCESS_KEYS is set but POE_API_KEY is not: with access keys, clients send an "
                                "access key and the proxy calls Poe with its own key; set POE_API_KEY to it")

    @property
    def models_path(self) -> str:
        return os.path.join(self.config_dir, "models.yaml")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 argv: Sequence[str] | None = None) -> Settings:
        """Build settings from the environment and command-line flags (flags win).

        Raises SettingsError with a one-line message naming what the user typed: the flag (--port)
        when the value came from one, else the environment variable (PORT).
        """
        env = dict(os.environ if environ is None else environ)
        flags = vars(build_arg_parser().parse_args([] if argv is None else list(argv)))
        values: dict[str, Any] = {}
        for name, convert, _ in SETTINGS_SPEC:
            raw, source = flags.get(name.lower()), _flag_of(name)
            if raw is None:
                raw, source = env.get(name), name
            if raw is not None and raw.strip() != "":
                values[name.lower()] = convert(source, str(raw))
        proxies = proxies_from_env(env)
        for scheme, url in proxies.items():
            if scheme != "no" and urllib.parse.urlsplit(url if "://" in url else "http://" + url).scheme != "http":
                raise SettingsError(f"{scheme.upper()}_PROXY={_redact_url(url)!r} must be an http:// proxy URL "
                                    "(TLS to the proxy itself is not supported)")
        return cls(**values, proxies=tuple(sorted(proxies.items())))


def _text(name: str, raw: str) -> str:
    return raw.strip()


def _whole(low: int, high: int | None = None) -> Callable[[str, str], int]:
    return lambda name, raw: _int_setting(name, raw, low, high)


def _number(low: float) -> Callable[[str, str], float]:
    return lambda name, raw: _float_setting(name, raw, low)


# Every setting: (environment variable = flag name, parser, help), in the order --help lists them.
# The dataclass field is the variable's name in lower case.
SETTINGS_SPEC: tuple[tuple[str, Callable[[str, str], Any], str], ...] = (
    ("HOST", _text, "bind address (default 0.0.0.0)"),
    ("PORT", _whole(0, 65535), "bind port (default 8080; 0 picks a free port)"),
    ("ADMIN_USERNAME", lambda n, v: v, "admin page user (default admin)"),
    ("ADMIN_PASSWORD", lambda n, v: v, "admin page password (default 123456; change it)"),
    ("MAX_REQUEST_SIZE", _whole(1), "largest request body in bytes (default 67108864, 64 MiB)"),
    ("MAX_ANSWER_SIZE", _whole(1),
     "largest answer in bytes gathered for a non-streamed reply; beyond it 502 (default 67108864)"),
    ("LOG_LEVEL", _log_level_setting, "debug, info, warning, error or critical (default info)"),
    ("CONFIG_DIR", lambda n, v: v, "folder holding models.yaml (default ./)"),
    ("RATE_LIMIT_MS", _whole(0), "minimum milliseconds between chat request starts, 0 = off (default 100)"),
    ("URL_CACHE_TTL_SECONDS", _whole(0), "upload cache lifetime in seconds (default 259200)"),
    ("URL_CACHE_SIZE_MB", _whole(0), "upload cache budget in MB (default 100)"),
    ("POE_BASE_URL", _url_setting, "Poe API base URL (default https://api.poe.com)"),
    ("POE_FILE_UPLOAD_URL", _url_setting, "Poe file upload URL"),
    ("CONNECT_TIMEOUT_SECONDS", _number(0.001), "deadline for connecting to Poe, TLS included (default 10)"),
    ("READ_TIMEOUT_SECONDS", _number(0.001), "longest silence accepted from Poe while it answers (default 120)"),
    ("STREAM_HOLD_SECONDS", _number(0),
     "streaming: wait this long for Poe's first event so errors keep real statuses (default 5)"),
    ("SSE_KEEPALIVE_SECONDS", _number(0.001), "interval of SSE keep-alive comments during silence (default 15)"),
    ("MODELS_CACHE_TTL_SECONDS", _number(0), "lifetime of the cached model list (default 600)"),
    ("HEADER_TIMEOUT_SECONDS", _number(0.001), "total time a client gets to send its request head (default 10)"),
    ("BODY_TIMEOUT_SECONDS", _number(0.001), "total time a client gets to send its request body (default 120)"),
    ("WRITE_TIMEOUT_SECONDS", _number(0.001),
     "a client that takes none of its answer for this long is disconnected (default 30)"),
    ("KEEPALIVE_TIMEOUT_SECONDS", _number(0.001), "idle keep-alive connections close after this (default 30)"),
    ("MAX_CONNECTIONS", _whole(1), "open client connections allowed; more get 503 (default 4096)"),
    ("MAX_CONNECTIONS_PER_CLIENT", _whole(0),
     "open connections allowed per client address; more get 429; 0 = no limit (default 64)"),
    ("MAX_BODY_MEMORY_MB", _whole(1),
     "MB of request bodies held at once by all connections together; beyond, 503 (default 1024)"),
    ("TRUST_FORWARDED_FOR", _bool_setting,
     "behind a reverse proxy: take the client address from the last hop of X-Forwarded-For (default off)"),
    ("RATE_LIMIT_MAX_WAIT_SECONDS", _number(0),
     "longest wait in the rate gate; beyond it 429 with Retry-After (default 30)"),
    ("CORS_ALLOW_ORIGINS", _origins_setting,
     "comma-separated origins allowed by CORS, or * (default *; never with credentials)"),
    ("SHUTDOWN_GRACE_SECONDS", _number(0), "on SIGTERM, how long running answers may take to finish (default 30)"),
    ("WORKERS", _whole(1, 256), "worker processes sharing the port with SO_REUSEPORT (default 1)"),
    ("TOOL_MODE", lambda n, v: _tool_mode_setting(v),
     "xml, native or auto: how tools reach bots whose models.yaml entry sets no tool_mode (default xml)"),
    ("VIDEO_JOBS_MAX", _whole(1), "video jobs (POST /v1/videos) kept in memory, lost on restart (default 100)"),
    ("VIDEO_JOBS_TTL_SECONDS", _number(1), "how long a video job is kept after it was created (default 86400)"),
    ("ACCESS_KEYS", _access_keys_setting,
     "share the proxy: keys clients must send, as 'label: key' entries, comma-separated or @FILE with one a "
     "line; needs POE_API_KEY (default: off, each client sends its own Poe key)"),
    ("POE_API_KEY", _text, "the Poe API key every request uses when ACCESS_KEYS is set (prefer the variable: "
                           "flags show in ps)"),
)


def _flag_of(name: str) -> str:
    return "--" + name.lower().replace("_", "-")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poe2openai",
        description="OpenAI-compatible proxy for Poe bots. Every flag can also be set by the "
                    "environment variable named in brackets; a flag wins.")
    for name, _, help_text in SETTINGS_SPEC:
        parser.add_argument(_flag_of(name), dest=name.lower(), metavar="VALUE",
                            default=None, help=f"{help_text} [{name}]")
    parser.add_argument("--version", action="version", version=f"poe2openai {__version__}")
    parser.epilog = ("Outbound proxy: HTTPS_PROXY, HTTP_PROXY and NO_PROXY (environment only) are honoured for "
                     "the calls to Poe; HTTPS goes through a CONNECT tunnel.")
    return parser


###############################################################################
###############################################################################
# Errors
###############################################################################

ERROR_BODY_QUOTE_BYTES = 4096   # how much of an error body Poe sent is looked at for its message
# The wait a 429 suggests when nobody said how long: Poe's `error` events carry no header, and Poe's
# rate limit counts requests per minute, so a few seconds lets a retry land in a quieter moment.
DEFAULT_RETRY_AFTER_S = 5


class ProxyError(Exception):
    """The one error type: an HTTP status plus an OpenAI error object. Caught in one place."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = list(headers)
        if status == 429 and not any(name.lower() == "retry-after" for name, _ in self.headers):
            # Every 429 says how long to wait: without it the SDKs and Claude Code retry at once and in
            # quick succession, hitting the same limit again and again.
            self.headers.append(("Retry-After", str(DEFAULT_RETRY_AFTER_S)))

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.message!r}, {self.type!r}, {self.code!r})"


def shown(name: str, limit: int = 100) -> str:
    """A client's string (a model name, say) as an error message quotes it: cut, so that a 5 MiB name
    does not come back as a 10 MiB error body."""
    return name if len(name) <= limit else name[:limit] + "…"


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ProxyError:
    return ProxyError(400, message, "invalid_request_error", code, param)


def upstream_error(message: str, status: int = 502, code: str = "upstream_error") -> ProxyError:
    return ProxyError(status, message, "upstream_error", code)


# Poe's `error_type` values (fastapi_poe's Literal) first; the texts after them are what the real
# service sends without an error_type. Order matters: the first rule that matches wins.
_POE_ERROR_TYPES: dict[str, tuple[int, str, str]] = {
    "insufficient_fund": (429, "insufficient_quota", "insufficient_quota"),
    "user_message_too_long": (400, "invalid_request_error", "context_length_exceeded"),
    "user_caused_error": (400, "invalid_request_error", "bad_request"),
    "privacy_authorization_error": (403, "permission_error", "permission_denied"),
}
# A context-length error makes clients shorten the conversation (Claude Code compacts it), so only texts
# about the size of the input count: "took too long" is a timeout and is matched before.
_CONTEXT_TOO_LONG = re.compile(r"too long|(request|message|prompt|input|conversation)s? (is |are )?too large"
                               r"|context (length|window)|too many (input )?tokens|token limit"
                               r"|maximum (context|number of tokens)", re.I)
_POE_ERROR_TEXTS: tuple[tuple[re.Pattern[str], int, str, str], ...] = (
    (re.compile(r"\bpoints\b|quota|insufficient fund|subscription", re.I), 429, "insufficient_quota",
     "insufficient_quota"),
    (re.compile(r"rate.?limit|too many requests", re.I), 429, "rate_limit_error", "rate_limit_exceeded"),
    (re.compile(r"invalid (api )?(token|key)|unauthori[sz]ed|invalid access key|not authenticated", re.I),
     401, "authentication_error", "invalid_api_key"),
    (re.compile(r"access denied|forbidden|permission|privacy", re.I), 403, "permission_error", "permission_denied"),
    (re.compile(r"bot does not exist|does not exist|not found|unknown bot|no such bot", re.I),
     404, "invalid_request_error", "model_not_found"),
    (re.compile(r"timed out|time-?out|(took|taking|waited|waiting) too long", re.I), 504, "upstream_error",
     "upstream_timeout"),
    (_CONTEXT_TOO_LONG, 400, "invalid_request_error", "context_length_exceeded"),
)


def classify_poe_error(data: Mapping[str, Any]) -> ProxyError:
    """Turn the data of a Poe `error` event into a ProxyError: error_type first, then the text."""
    text = data.get("text")
    message = text.strip() if isinstance(text, str) and text.strip() else "Poe reported an error without a message"
    error_type = data.get("error_type")
    no_retry = data.get("allow_retry") is False
    headers = [("x-should-retry", "false")] if no_retry else []
    if isinstance(error_type, str) and error_type in _POE_ERROR_TYPES:
        status, type_, code = _POE_ERROR_TYPES[error_type]
    else:
        for pattern, status, type_, code in _POE_ERROR_TEXTS:
            if pattern.search(message):
                break
        else:
            # Nothing we recognise: the bot failed on Poe's side; a gateway error is the honest status.
            status, type_, code = 502, "upstream_error", "bot_error"
    if code == "insufficient_quota":
        headers = [("x-should-retry", "false")]  # retrying an empty account only burns time
    return ProxyError(status, message, type_, code, headers=headers)


_HTTP_DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")


def retry_after_of(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Poe's own Retry-After (seconds or an HTTP date) and retry-after-ms, passed on when well-formed."""
    found = []
    value = headers.get("retry-after", "").strip()
    if value.isdigit() or _HTTP_DATE.fullmatch(value):
        found.append(("Retry-After", value))
    value_ms = headers.get("retry-after-ms", "").strip()
    if value_ms.isdigit():
        found.append(("retry-after-ms", value_ms))
    return found


def classify_poe_status(status: int, body: bytes, what: str, headers: Mapping[str, str] | None = None) -> ProxyError:
    """Map a non-2xx HTTP answer from Poe to our error, keeping Poe's own message (and its Retry-After)."""
    detail = _error_text_from_body(body)
    message = f"{what}: Poe answered HTTP {status}" + (f": {detail}" if detail else "")
    retry = retry_after_of(headers or {})
    if status in (401, 403):
        return ProxyError(401 if status == 401 else 403, message,
                          "authentication_error" if status == 401 else "permission_error",
                          "invalid_api_key" if status == 401 else "permission_denied")
    if status == 404:
        return ProxyError(404, message, "invalid_request_error", "model_not_found")
    if status == 402:
        return ProxyError(429, message, "insufficient_quota", "insufficient_quota",
                          headers=[("x-should-retry", "false"), *retry])
    if status == 429:
        return ProxyError(429, message, "rate_limit_error", "rate_limit_exceeded", headers=retry)
    if status == 413 or (status in (400, 422) and _CONTEXT_TOO_LONG.search(detail)):
        # Poe's documented 413 is "more tokens than the context window", not a byte limit.
        return ProxyError(400, message, "invalid_request_error", "context_length_exceeded")
    if status in (400, 422):
        return ProxyError(400, message, "invalid_request_error", "bad_request")
    if status in (408, 504):
        return ProxyError(504, message, "upstream_error", "upstream_timeout", headers=retry)
    if status in (502, 503):
        return ProxyError(502, message, "upstream_error", "upstream_error", headers=retry)
    return upstream_error(message)


def _error_text_from_body(body: bytes) -> str:
    text = body[:ERROR_BODY_QUOTE_BYTES].decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err.get("text")
        if isinstance(err, str):
            return err[:300]
    return text[:300]


###############################################################################
###############################################################################
# Pure helpers: ids, JSON, SSE, files, tokens
###############################################################################

URL_UNCACHED_CHARS = 4096          # a URL longer than this is dropped from urlsplit's cache once parsed
TOKEN_TALLY_SEGMENT_CHARS = 16 * 1024   # a streamed answer is estimated in pieces about this long


def new_id(prefix: str) -> str:
    """A random id such as chatcmpl-3f9a...; hex only, so safe in any client's id field."""
    return prefix + os.urandom(12).hex()


_json_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_json_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def dump_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON. Lone surrogates (legal in JSON input) fall back to \\u escapes."""
    text = _json_compact(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _json_ascii(obj).encode("ascii")


def dump_json_string(text: str) -> bytes:
    """dump_json for one string, without the encoder's dispatch: the hot path of every streamed piece."""
    try:
        return _json_string(text).encode("utf-8")
    except UnicodeEncodeError:
        return _json_string_ascii(text).encode("ascii")


_json_string = json.encoder.encode_basestring            # what the encoders above use for a str
_json_string_ascii = json.encoder.encode_basestring_ascii


_json_scan = json.JSONDecoder().scan_once   # json.loads' C scanner, without its three Python frames


def load_event_json(text: str) -> Any:
    """json.loads(text), or {} for blank text: an event's data, the hot path of every streamed piece.
    A text that is exactly one JSON value (Poe's are) is scanned directly; anything else (blank, a
    BOM, white space around it, trailing data, no value at all) takes json.loads' own way and errors."""
    try:
        value, end = _json_scan(text, 0)
    except StopIteration:
        pass
    else:
        if end == len(text):
            return value
    return json.loads(text) if text.strip() else {}


@dataclass(slots=True)
class SSEEvent:
    event: str
    data: str


_LINE_END = re.compile(rb"\r\n?|\n")
_LINE_SPLIT = re.compile(r"[\r\n]")   # after CRLF became LF: each CR or LF ends a line
# What one event from Poe may carry. Big enough for a whole `file` or `text` event in one piece; past
# it the stream is refused (a 502), in time linear in what arrived.
MAX_SSE_EVENT_BYTES = 16 * 1024 * 1024
MAX_SSE_DATA_LINES = 100_000


class SSEDecoder:
    """Incremental server-sent-events parser: bytes in, complete events out.

    Handles LF, CRLF and CR line ends (also a CRLF split across reads), UTF-8 characters split across
    reads, comments, `data:` with or without the space, and multi-line data. Pure: no I/O.

    Each byte is looked at a bounded number of times, however the line is chunked, and a line or event
    larger than `max_event_bytes` (or with more than `max_data_lines` data lines) raises ValueError
    as soon as it is seen to be, so hostile input costs linear time and bounded memory.
    """

    def __init__(self, max_event_bytes: int | None = None, max_data_lines: int | None = None) -> None:
        self._buf = bytearray()     # bytes after the last line end
        self._scanned = 0           # how much of _buf is known to hold no line end
        self._after_cr = False      # the previous bytes ended in CR: a leading LF belongs to it
        self._event = ""
        self._data: list[str] = []
        self._data_chars = 0
        # Read here, not as default values, so a test (or an embedder) can lower the module's caps.
        self._max_bytes = MAX_SSE_EVENT_BYTES if max_event_bytes is None else max_event_bytes
        self._max_lines = MAX_SSE_DATA_LINES if max_data_lines is None else max_data_lines

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if self._after_cr and chunk:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not chunk:
            return events
        buf = self._buf
        if buf:
            buf += chunk
            data: bytes | bytearray = buf
        else:
            data = chunk   # the usual case, a read of whole events: no copy into the buffer
        # Only the last line end is looked for (from the end, never before what earlier reads left):
        # everything before it is whole lines, decoded and split in one go rather than line by line.
        scanned = self._scanned
        last = data.rfind(b"\n", scanned)
        last = max(last, data.rfind(b"\r", last + 1 if last >= 0 else scanned))
        if last < 0:
            if data is chunk:
                buf += chunk
            self._scanned = len(buf)
            if len(buf) > self._max_bytes:
                raise ValueError(f"an SSE line is larger than {self._max_bytes} bytes")
            return events
        stop = last + 1
        if stop > self._max_bytes:
            self._lines_capped(data, stop, events)   # one of these lines may be over the cap
        else:
            text = (data if stop == len(data) else data[:stop]).decode("utf-8", "replace")
            if "\r" in text:   # CRLF (Poe's own) becomes LF first: splitting on one character is cheaper
                text = text.replace("\r\n", "\n")
            # What CR is left is a line end of its own, even one that the replace put before an LF
            # ("\r\r\n" is two line ends): so one character at a time, never CRLF as one.
            lines = _LINE_SPLIT.split(text) if "\r" in text else text.split("\n")
            lines.pop()   # the empty string after the last line end
            line = self._line
            for one in lines:
                line(one, events)
        self._after_cr = stop == len(data) and data[last] == 13   # a CR last: an LF next is its pair
        if data is chunk:
            if stop < len(chunk):
                buf += chunk[stop:]
        else:
            del buf[:stop]
        self._scanned = len(buf)
        if len(buf) > self._max_bytes:
            raise ValueError(f"an SSE line is larger than {self._max_bytes} bytes")
        return events

    def _lines_capped(self, data: bytes | bytearray, stop: int, events: list[SSEEvent]) -> None:
        """The lines in data[:stop], each checked against the cap in bytes before it is decoded."""
        start = 0
        for match in _LINE_END.finditer(data, 0, stop):
            end = match.start()
            if end - start > self._max_bytes:
                raise ValueError(f"an SSE line is larger than {self._max_bytes} bytes")
            self._line(data[start:end].decode("utf-8", "replace"), events)
            start = match.end()

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a last line without a line end and a last event without a blank line."""
        events: list[SSEEvent] = []
        if self._buf:
            self._line(self._buf.decode("utf-8", "replace"), events)
            self._buf = bytearray()
            self._scanned = 0
        self._dispatch(events)
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            return  # comment (keep-alive ping)
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data_chars += len(value) + 1
            if self._data_chars > self._max_bytes:
                raise ValueError(f"an SSE event is larger than {self._max_bytes} bytes")
            if len(self._data) >= self._max_lines:
                raise ValueError(f"an SSE event has more than {self._max_lines} data lines")
            self._data.append(value)
        elif name == "event":
            self._event = value
        # `id` and `retry` mean nothing to a one-shot bot answer; unknown fields are ignored by the spec.

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data or self._event:
            events.append(SSEEvent(self._event or "message", "\n".join(self._data)))
        self._event = ""
        self._data = []
        self._data_chars = 0


def sse_data(obj: Any) -> bytes:
    return b"data: " + dump_json(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"


# ----------------------------------------------------------------------------- files: data URLs, MIME, multipart

POE_CDN_HOSTS = ("poecdn.net",)
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp",
               "image/svg+xml": "svg", "image/bmp": "bmp", "image/tiff": "tiff", "image/heic": "heic",
               "application/pdf": "pdf", "text/plain": "txt", "text/csv": "csv", "text/markdown": "md",
               "text/html": "html", "application/json": "json", "application/xml": "xml", "text/xml": "xml",
               "application/zip": "zip", "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/wav": "wav",
               "audio/x-wav": "wav", "audio/ogg": "ogg", "audio/flac": "flac", "audio/webm": "webm",
               "audio/mp4": "m4a", "video/mp4": "mp4", "video/webm": "webm", "video/quicktime": "mov"}
_TYPES_BY_EXTENSION = {ext: mime for mime, ext in reversed(list(_EXTENSIONS.items()))}
_TYPES_BY_EXTENSION.update({"jpeg": "image/jpeg", "jpg": "image/jpeg", "htm": "text/html", "py": "text/x-python",
                            "js": "text/javascript", "ts": "text/plain", "yaml": "text/yaml", "yml": "text/yaml",
                            "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                            "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                            "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation"})
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"%PDF-", "application/pdf"), (b"RIFF", "audio/wav"), (b"ID3", "audio/mpeg"),
          (b"PK\x03\x04", "application/zip"))


def split_url(url: str) -> urllib.parse.SplitResult:
    """urllib.parse.urlsplit for URLs a client may have made megabytes long (an image URL, a model name
    in a bot URL): urlsplit remembers what it parsed (CPython caches 128 URLs), so a long one is
    dropped from that cache at once."""
    parts = urllib.parse.urlsplit(url)
    if len(url) > URL_UNCACHED_CHARS:
        urllib.parse.clear_cache()   # type: ignore[attr-defined]  # CPython 3.10-3.13 have it, undocumented
    return parts


def extension_for(content_type: str) -> str:
    return _EXTENSIONS.get(content_type.split(";")[0].strip().lower(), "bin")


def guess_content_type(name: str = "", data: bytes = b"") -> str:
    """A MIME type from a file name's extension, else from the first bytes, else a neutral default."""
    base = split_url(name).path if "://" in name else name
    ext = base.rsplit(".", 1)[-1].lower() if "." in base.rsplit("/", 1)[-1] else ""
    if ext in _TYPES_BY_EXTENSION:
        return _TYPES_BY_EXTENSION[ext]
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return "image/webp" if mime == "audio/wav" and data[8:12] == b"WEBP" else mime
    return "application/octet-stream"


_CLEAN_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
BASE64_PIECE_CHARS = 1 << 20   # decoded a piece at a time: the text is never copied whole


def decode_base64(text: str, start: int = 0) -> bytes:
    """Standard or URL-safe base64 from text[start:], padding optional, whitespace ignored. Raises
    ValueError. Plain base64 (what clients send) is decoded in pieces straight into the result, so an
    image costs its text (which the caller holds anyway) and its bytes, never a copy of the text."""
    if _CLEAN_BASE64.fullmatch(text, start) is None:   # whitespace or URL-safe letters: the rare slow way
        compact = "".join(text[start:].split())
        compact += "=" * (-len(compact) % 4)
        if "-" in compact or "_" in compact:
            compact = compact.replace("-", "+").replace("_", "/")
        return base64.b64decode(compact, validate=True)
    import binascii
    end = len(text)
    while end > start and text[end - 1] == "=":
        end -= 1
    if (end - start) % 4 == 1:
        raise ValueError("base64 text cannot be one character more than a multiple of four")
    out = bytearray((end - start) * 3 // 4)
    filled = 0
    for piece_start in range(start, end, BASE64_PIECE_CHARS):   # a multiple of 4: pieces decode on their own
        piece = text[piece_start:min(piece_start + BASE64_PIECE_CHARS, end)]
        decoded = binascii.a2b_base64(piece + "=" * (-len(piece) % 4))
        out[filled:filled + len(decoded)] = decoded
        filled += len(decoded)
    return out   # type: ignore[return-value]  # a bytearray: as good as bytes to every reader, no copy


def decode_data_url(url: str) -> tuple[str, bytes]:
    """`data:[type][;base64],payload` -> (content type, bytes). Raises ValueError."""
    comma = url.find(",", 0, 1024)   # the head is short; the payload is not copied out of the URL
    if not url[:5].lower() == "data:" or comma < 0:
        raise ValueError("not a data: URL")
    params = url[5:comma].split(";")
    content_type = params[0].strip().lower() or "text/plain"
    if any(p.strip().lower() == "base64" for p in params[1:]):
        return content_type, decode_base64(url, comma + 1)
    return content_type, urllib.parse.unquote_to_bytes(url[comma + 1:])


def is_poe_cdn(url: str) -> bool:
    host = (split_url(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in POE_CDN_HOSTS)


def multipart_pieces(fields: Sequence[tuple[str, str]], files: Sequence[tuple[str, str, str, bytes]],
                     boundary: str | None = None) -> tuple[str, list[bytes]]:
    """multipart/form-data as (Content-Type header value, the body's pieces in order): each file's data is
    a piece of its own, the very object given, so an upload is written without copying it."""
    boundary = boundary or "poe2openai-" + os.urandom(16).hex()
    out: list[bytes] = []
    for name, value in fields:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote_param(name)}"\r\n\r\n'
                   .encode() + value.encode() + b"\r\n")
    for name, filename, content_type, data in files:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote_param(name)}"; '
                   f'filename="{_quote_param(filename)}"\r\nContent-Type: {content_type}\r\n\r\n'.encode())
        out += (data, b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out


def encode_multipart(fields: Sequence[tuple[str, str]], files: Sequence[tuple[str, str, str, bytes]],
                     boundary: str | None = None) -> tuple[str, bytes]:
    """multipart/form-data: (Content-Type header value, body). files are (field, filename, type, data)."""
    content_type, pieces = multipart_pieces(fields, files, boundary)
    return content_type, b"".join(pieces)


def _quote_param(value: str) -> str:
    # Header parameters cannot carry CR, LF or quotes; file names from clients are not trusted.
    return "".join("_" if ch in '"\\\r\n' else ch for ch in value)


@dataclass(frozen=True)
class FormPart:
    """One part of a multipart/form-data body: a field (filename None) or a file."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str = ""

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


MULTIPART_MAX_PARTS = 256
MULTIPART_MAX_HEAD_BYTES = 16 * 1024
_DISPOSITION_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def _disposition(value: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="a"; filename="b"` -> ("form-data", {name: a, filename: b}); RFC 5987 `filename*`
    wins over `filename`. Quoted values may escape with a backslash (RFC 7578 leaves quotes to senders)."""
    kind, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _DISPOSITION_PARAM.finditer(";" + rest):
        key, quoted, bare = match.group(1).lower(), match.group(2), match.group(3)
        params[key] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare or ""
    star = params.pop("filename*", None)
    if star is not None and "''" in star:
        charset, _, encoded = star.partition("''")
        try:
            params["filename"] = urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):
            pass
    return kind.strip().lower(), params


def parse_multipart(content_type: str, body: bytes) -> list[FormPart]:
    """A multipart/form-data body -> its parts, in order. Strict and linear: every search starts where the
    last one ended, so the work is proportional to the body. Raises a 400 that names the part at fault."""
    kind, params = _disposition(content_type)
    boundary = params.get("boundary", "")
    if kind != "multipart/form-data" or not boundary or len(boundary) > 200:
        raise bad_request("Expected Content-Type: multipart/form-data with a boundary.", None, "invalid_multipart")
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:   # a preamble (allowed, and ignored) ends with a line end before the first delimiter
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise bad_request("The multipart body has no part (its boundary never occurs).", None, "invalid_multipart")
        pos = found + 2 + len(delimiter)
    parts: list[FormPart] = []
    while True:
        where = f"part {len(parts) + 1}"
        if body.startswith(b"--", pos):
            return parts            # the close delimiter; an epilogue after it is ignored
        if not body.startswith(b"\r\n", pos):
            raise bad_request(f"The multipart body's {where} does not start on a new line after its boundary.",
                              None, "invalid_multipart")
        if len(parts) >= MULTIPART_MAX_PARTS:
            raise bad_request(f"The multipart body has more than {MULTIPART_MAX_PARTS} parts.", None,
                              "invalid_multipart")
        head_start = pos + 2
        head_end = body.find(b"\r\n\r\n", head_start, head_start + MULTIPART_MAX_HEAD_BYTES)
        if head_end < 0 and body.startswith(b"\r\n", head_start):
            head_end = head_start - 2   # no headers at all: refused below for want of a name
        if head_end < 0:
            raise bad_request(f"The multipart body's {where} has no complete header block.", None,
                              "invalid_multipart")
        headers: dict[str, str] = {}
        for line in body[head_start:head_end].split(b"\r\n") if head_end > head_start else []:
            name, sep, value = line.partition(b":")
            if not sep or not name.strip():
                raise bad_request(f"The multipart body's {where} has a malformed header line.", None,
                                  "invalid_multipart")
            try:
                text = value.decode("utf-8").strip()
            except UnicodeDecodeError:
                text = value.decode("latin-1").strip()
            headers[name.decode("latin-1").strip().lower()] = text
        data_start = head_end + 4
        end = body.find(b"\r\n" + delimiter, data_start)
        if end < 0:
            raise bad_request(f"The multipart body ends inside its {where} (no closing boundary).", None,
                              "invalid_multipart")
        disposition, fields = _disposition(headers.get("content-disposition", ""))
        field_name = fields.get("name", "")
        if disposition != "form-data" or not field_name:
            raise bad_request(f"The multipart body's {where} has no Content-Disposition: form-data with a name.",
                              None, "invalid_multipart")
        parts.append(FormPart(field_name, body[data_start:end], fields.get("filename"),
                              headers.get("content-type", "").split(";")[0].strip().lower()))
        pos = end + 2 + len(delimiter)


def form_fields(parts: Sequence[FormPart]) -> tuple[dict[str, Any], dict[str, list[FormPart]]]:
    """Multipart parts -> (the fields as a JSON-like body, the files by field name). `key[]` collects a
    list and `key[sub]` an object, as the openai SDK writes arrays and objects; a file is any part with a
    filename. A field sent twice without brackets keeps its last value."""
    body: dict[str, Any] = {}
    files: dict[str, list[FormPart]] = {}
    for part in parts:
        if part.filename is not None:
            files.setdefault(part.name, []).append(part)
            continue
        name, bracket, sub = part.name.partition("[")
        if bracket and sub == "]":
            listed = body.setdefault(name, [])
            if isinstance(listed, list):
                listed.append(part.text)
        elif bracket and sub.endswith("]") and "[" not in sub:
            nested = body.setdefault(name, {})
            if isinstance(nested, dict):
                nested[sub[:-1]] = part.text
        else:
            body[part.name] = part.text
    return body, files


# ----------------------------------------------------------------------------- token estimator

# Estimate OpenAI o200k_base token counts without its vocabulary (stdlib only).
#
# o200k first splits text into pieces with a regex (a word with at most one
# leading space or punctuation char, 1-3 digit groups, punctuation runs, line
# break runs, space runs); BPE then merges bytes inside each piece.  Nearly
# every piece is one token, so we count the pieces and add per-class
# corrections for pieces that BPE usually splits further (long or all-caps
# words, long punctuation runs, CJK, emoji, other scripts; CJK also by its
# common words, emoji by their UTF-8 block).  No per-character
# Python loop: the UTF-8 bytes are mapped to one class byte per character with
# bytes.translate, and pieces are counted with bytes.count() on class bigrams
# plus a few regexes that start with a literal (fast to scan).


def _token_byte_classes() -> bytes:
    """bytes.translate table: UTF-8 byte -> class byte ("~": continuation, deleted).

    ASCII: a/A lower/upper letter, 0 digit, " " space/tab, \\n line break,
    "." punctuation (o200k counts "_" as punctuation, not as a word char).
    Other chars by UTF-8 lead byte, i.e. by code point block: o Latin-1 letters,
    Latin Extended, Cyrillic; g Greek, Hebrew, Arabic, Indic, Thai...;
    s symbols (U+0080-00BF, U+2000-2FFF, private use); k U+3000-3FFF (kana,
    CJK punctuation); c Han; h Hangul; f U+F000-FFFF (fullwidth forms,
    variation selectors); e astral (emoji).
    """
    table = bytearray()
    for b in range(256):
        ch = chr(b)
        if b < 128:
            cls = ("\n" if ch in "\n\r" else " " if ch in " \t\x0b\x0c" else "A" if ch.isupper()
                   else "a" if ch.isalpha() else "0" if ch.isdigit() else ".")
        elif b < 0xC2 or b > 0xF4:
            cls = "~"
        else:
            cls = ("s" if b == 0xC2 else "o" if b <= 0xCD or 0xD0 <= b <= 0xD4 else "g" if b <= 0xE1
                   else "s" if b == 0xE2 else "k" if b == 0xE3 else "c" if b <= 0xE9 else "h" if b <= 0xED
                   else "s" if b == 0xEE else "f" if b == 0xEF else "e")
        table += cls.encode()
    return bytes(table)


_TOKEN_CLASSES = _token_byte_classes()
_TOKEN_CONTINUATION = bytes(range(0x80, 0xC0))
# Views of the class bytes, each keeping only the distinctions its counts need.
_TOKEN_PIECE_VIEW = bytes.maketrans(b"Aog\nsckhfe", b"aaa0      ")  # letter, digit/\n, punct, rest
_TOKEN_LETTER_VIEW = bytes.maketrans(b"Aog0\n.sckhfe", b"aaa         ")  # letter, rest
_TOKEN_PUNCT_VIEW = bytes.maketrans(b"aAog0\nsckhfe", b"            ")  # punct, rest
_TOKEN_SPACE_VIEW = bytes.maketrans(b"aAog0sckhfe", b"xxxxxxxxxxx")  # space, \n, punct, rest
_TOKEN_WORD_VIEW = bytes.maketrans(b"og0\nsckhfe", b"a ...    .")  # lower, upper, space/CJK, rest
_TOKEN_DIGIT_GROUP = re.compile(rb"00?0?")
# Letters past the point where BPE usually splits a word: after a space, common
# words stay whole up to ~7 letters; glued to punctuation, a digit or a line
# start they split sooner; all-caps runs split often.
_TOKEN_LONG_SPACED = re.compile(rb" (?:Aa{6}|a{7})(a+)")
_TOKEN_LONG_GLUED = re.compile(rb"\.(?:Aa{2}|a{3})(a+)")
_TOKEN_LONG_CAPS = re.compile(rb"\.AA(A+)(?!a)")
_TOKEN_PUNCT_RUN = re.compile(rb"\.\.\.\.+")
_TOKEN_REPEAT = re.compile(r"(.)\1+")  # "-----" merges (but ~1 token per 40 chars)
# "don't", "it's": o200k keeps the contraction in the word piece.
_TOKEN_CONTRACTION = re.compile(r"'(?<=[A-Za-z]')(?:[sStTdDmM]|re|ve|ll)\b")
# Long base64-like runs (mixed case and digits) cost ~1 token per 1.45 chars.
_TOKEN_BLOB = re.compile(r"[A-Za-z0-9+/]{32,}")
_TOKEN_HAS_DIGIT = re.compile(r"\d")
_TOKEN_BLOB_CHARS_PER_TOKEN = 1.45
# Very common Han forms used only in Traditional Chinese (not in Simplified or
# Japanese): Traditional text splits into more tokens per Han char.
_TOKEN_TRADITIONAL = re.compile("[們這說會對學國發與從當體點數實應麼來裡讓關]")
# CJK has no spaces, so BPE merges decide the count: o200k has tokens for the
# frequent words, grammatical endings and particles, and a Han or Hangul char
# outside them often costs more than one token.  A short list of such words
# (all single o200k tokens) tells text full of common words (chat, docs) from
# text with rarer characters (recipes, literature).  Only the first two chars
# of each word are kept: the count of these bigrams in CJK runs is the feature.
_TOKEN_CJK_WORDS = (
    "的时候 一个 我们 他们 可以 没有 什么 这个 那个 这些 那些 因为 所以 但是 如果 已经 自己 "
    "现在 时候 需要 进行 使用 通过 问题 数据 系统 用户 服务 这样 怎么 为什么 就是 还是 或者 "
    "然后 一些 一下 一起 一样 一直 一定 一种 不是 不会 不要 不能 可能 应该 知道 觉得 认为 "
    "喜欢 希望 开始 以后 以前 之后 之前 之间 其中 其他 其实 所有 很多 非常 比较 特别 还有 "
    "只是 只有 也是 都是 的话 来说 起来 出来 下来 中国 工作 生活 时间 地方 东西 朋友 孩子 "
    "学生 老师 公司 市场 经济 发展 社会 国家 政府 世界 今天 昨天 今年 去年 方法 情况 部分 "
    "内容 信息 网络 技术 功能 支持 设置 文件 程序 代码 管理 设计 实现 提供 包括 影响 主要 "
    "重要 简单 直接 同时 能够 成为 表示 根据 关于 对于 由于 虽然 不过 然而 因此 例如 比如 "
    "以及 当然 真的 谢谢 您好 大家 这里 那里 哪里 一点 这么 那么 多少 怎样 如何 结果 目前 "
    "建议 注意 确认 选择 操作 安装 更新 错误 无法 成功 失败 打开 关闭 删除 修改 保存 输入 "
    "输出 创建 运行 执行 状态 版本 项目 测试 性能 安全 服务器 数据库 应用 模型 接口 参数 "
    "函数 类型 变量 对象 配置 环境 页面 图片 视频 手机 电脑 价格 产品 质量 客户 订单 这是 "
    "我的 你的 他的 不知道 我們 沒有 問題 現在 開始 學生 時間 資料 設定 比較 推薦 报道 记者 "
    "发布 宣布 正式 建设 计划 预计 超过 达到 增加 减少 提高 降低 加强 推动 促进 合作 企业 "
    "行业 产业 城市 地区 全国 国际 美国 北京 上海 广州 深圳 香港 台湾 人民 群众 领导 主席 "
    "总统 部门 机构 组织 单位 中心 银行 资金 投资 销售 消费 生产 制造 交通 铁路 高速 运输 "
    "旅游 教育 医疗 健康 医院 学校 大学 研究 科学 专家 人员 员工 负责 负责人 相关 有关 方面 "
    "原因 目的 意义 作用 条件 标准 要求 规定 政策 法律 水平 能力 经验 知识 文化 历史 传统 "
    "现代 未来 过去 最近 最后 首先 其次 另外 此外 总体 整体 基本 一般 通常 必须 继续 保持 "
    "发生 出现 存在 发现 解决 处理 实际 具体 明显 不同 各种 任何 这种 感觉 感谢 欢迎 开心 "
    "准备 决定 参加 回来 下午 晚上 小时 分钟 每天 后来 马上 立即 正在 左右 附近 里面 下面 "
    "东方 天气 颜色 声音 身体 电话 电视 音乐 电影 照片 故事 新闻 消息 报告 会议 活动 比赛 "
    "事情 办法 机会 时代 年轻 老人 女人 男人 妈妈 爸爸 老板 先生 女士 小姐 "
    "です ます ました ません でした ください ございます いただ します しました して した する "
    "という について ので から まで より なので ただ また ここ そこ これ それ この その こと "
    "もの ところ ため よう そう ない ある あり いる いた います なる でき として お願い "
    "よろしく ありがとう 今日 昨日 日本 東京 会社 仕事 情報 確認 必要 場合 利用 対応 サービス "
    "コード ページ メール ネット ログ イン ング ション された でしょう だった ですが そして "
    "しかし つまり さらに なお まず 今回 以上 以下 結果 理由 電話 もう まだ 予定 説明 変更 "
    "追加 入力 "
    "습니다 니다 합니다 입니다 했습니다 됩니다 하는 하고 하여 하게 하지 하면 했다 했던 한다 "
    "이다 이고 이며 에서 으로 에게 에는 까지 부터 처럼 보다 하세요 세요 주세요 있는 없는 "
    "대한 우리 그리고 하지만 제가 오늘 시간 사용 정보 서비스 방법 회사 학교 한국 서울 경제 "
    "정부 시장 기업 지역 이번 있습니다 없습니다 있다 있고 있어 없다 같은 같이 대해 위해 통해 "
    "때문 경우 사람 그러나 그래서 또한 이런 그런 저는 정말 너무 많이 조금 다시 함께 지금 "
    "모든 가장 데이터 시스템 문제 확인 설정 기능 생각 감사 감사합니다 좋은 좋아 친구 결과 "
    "이후 이상 다음 처음 마지막 먼저 그냥 아직 계속 하였다 된다 되는 되어 되고 되지 됐다 "
    "보고 이라고 라고 다고 다는 라는 이나 에도 가격 교육 학생 환경 문화 사회 세계 현재 최근 "
    "이미 아이 가지 번째 파일 있었다 보면 싶은 않은 않는 않고 않아 것이다 것은 것을 것이 "
    "것으로 수도 국내 국가 대통령 정책 투자 성장 산업 기술 개발 연구 대학 건강 부산 미국 "
    "중국 일본 여러 다른 새로운 중요한 다양한 가능한 필요한 올해 시작 마음 이야기 사랑 행복 "
    "가족 이유 때문에 대해서 그런데 아니라 그렇게 이렇게 어떻게 무엇 누구 어디 언제 정도 하나 "
    "사용자 프로그램 서버 설치 업데이트 오류"
)
_TOKEN_CJK_BIGRAMS = frozenset(word[:2] for word in _TOKEN_CJK_WORDS.split())
# Candidate bigrams (first char from a word start, second from a second char),
# found overlapping by a zero-width match in C; the set then keeps the real ones.
_TOKEN_CJK_PAIR = re.compile("(?=([%s][%s]))" % ("".join(sorted({w[0] for w in _TOKEN_CJK_BIGRAMS})),
                                                  "".join(sorted({w[1] for w in _TOKEN_CJK_BIGRAMS}))))
# Emoji by UTF-8 bytes: BPE keeps the first three bytes of the frequent emoji
# blocks (U+1F300-1F53F, U+1F600-1F6BF, U+1F900-1F97F) as one token, so those
# cost ~2 tokens and the other astral blocks ~3.  Flag letters cost 2 each.
_TOKEN_EMOJI_COMMON = re.compile(rb"\xf0\x9f[\x8c-\x94\x98-\x9b\xa4\xa5]")
_TOKEN_EMOJI_FLAG = re.compile(rb"\xf0\x9f\x87[\xa6-\xbf]")
# Views for the start of a CJK run (Han, kana) and of a Hangul word.
_TOKEN_CJK_VIEW = bytes.maketrans(b"aAog0\n.sckhfe", b"        cc   ")
_TOKEN_HANGUL_VIEW = bytes.maketrans(b"aAog0\n.sckhfe", b"          h  ")
# Weights of the counts after the piece count in _token_features(), fitted
# against o200k_base on tokens/corpus.jsonl and checked on held-out text.
_TOKEN_WEIGHTS = (0.1, 0.15, 0.28, 1.0, 0.65,  # long words, caps, glued acronyms, punctuation runs
                  0.96, 1.08, 0.27, 0.96, 0.78, -1.48, 0.59, 2.35,  # Han, kana, common words, Hangul words
                  0.4, 0.74, 0.11, 0.22, 1.17, 1.0, 0.87, 1.81, 3.0, 2.0)  # other scripts, symbols, emoji


def _token_features(text: str, s: bytes) -> tuple[float, ...]:
    """Piece count, then the counts weighted by _TOKEN_WEIGHTS (s: class bytes of text)."""
    s = b"\n" + s  # the text start acts like a line start
    v = s.translate(_TOKEN_PIECE_VIEW)
    w = s.translate(_TOKEN_SPACE_VIEW)
    p = s.translate(_TOKEN_WORD_VIEW)
    # Pieces: word starts (incl. camelCase humps) and punctuation runs, minus a
    # single punctuation char glued to the next word (".get", "_name"); line
    # breaks not glued to punctuation; runs of 2+ spaces (the last space joins
    # the next piece); a space before a digit; digits in groups of up to 3.
    pieces = s.translate(_TOKEN_LETTER_VIEW).count(b" a") + s.count(b"aA")
    pieces += s.translate(_TOKEN_PUNCT_VIEW).count(b" .") - v.count(b"a.a") - v.count(b"0.a")
    pieces += w.count(b"x\n") + w.count(b" \n") + w.count(b"  x") + w.count(b"  .")
    pieces += s.count(b" 0") + len(_TOKEN_DIGIT_GROUP.findall(s)) - len(_TOKEN_CONTRACTION.findall(text))
    punct_extra = 0
    for m in _TOKEN_PUNCT_RUN.finditer(v):  # runs of 4+ punctuation chars are rare
        run = text[m.start() - 1:m.end() - 1]
        punct_extra += max(0, len(_TOKEN_REPEAT.sub("x", run)) - 3) + len(run) // 40
    f = (
        pieces,
        sum(map(len, _TOKEN_LONG_SPACED.findall(p))),
        sum(map(len, _TOKEN_LONG_GLUED.findall(p))),
        sum(map(len, _TOKEN_LONG_CAPS.findall(p))),
        s.count(b"AAa"),  # "IOError", "HTTPServer": an acronym glued to a word
        punct_extra,
    )
    if text.isascii():
        return f + (0,) * 18
    han = s.count(b"c")
    trad = min(han, 60 * len(_TOKEN_TRADITIONAL.findall(text)))  # Traditional at ~1.7% indicators
    u = text.encode("utf-8", "surrogatepass")
    # By the first two UTF-8 bytes: U+3000-303F ideographic punctuation, U+3040-30BF
    # mostly hiragana, U+30C0-30FF katakana, U+FF00-FF7F fullwidth forms.
    cjk_punct = u.count(b"\xe3\x80") + u.count(b"\xef\xbc") + u.count(b"\xef\xbd")
    cjk = (0, 0, 0, 0, 0, 0, 0, 0)
    if han or b"k" in s or b"h" in s:
        bigrams = sum(map(_TOKEN_CJK_BIGRAMS.__contains__, _TOKEN_CJK_PAIR.findall(text)))
        kana = (u.count(b"\xe3\x81") + u.count(b"\xe3\x82"), u.count(b"\xe3\x83"))
        # The trailing 1: a short CJK text costs ~2 tokens more than its chars suggest.
        cjk = (han - trad, trad, s.translate(_TOKEN_CJK_VIEW).count(b" c")) + kana + (
            bigrams, s.translate(_TOKEN_HANGUL_VIEW).count(b" h"), 1)
    emoji = (0, 0, 0)
    if b"e" in s:
        common, flags = len(_TOKEN_EMOJI_COMMON.findall(u)), len(_TOKEN_EMOJI_FLAG.findall(u))
        emoji = (common, s.count(b"e") - common - flags, flags)
    zwj = u.count(b"\xe2\x80\x8d")
    return f + cjk + (cjk_punct, s.count(b"h"), s.count(b"o"), s.count(b"g"), s.count(b"s") - zwj, zwj,
                      u.count(b"\xef\xb8\x8f")) + emoji


def estimate_tokens(text: str) -> int:
    """Estimate the o200k_base token count of text (median error ~3%, worst ~10% on tokens/corpus.jsonl)."""
    return max(1, round(_token_sum(text))) if text else 0


def _token_sum(text: str) -> float:
    """The unrounded estimate of a non-empty text; estimates of consecutive pieces add up."""
    n = 0.0
    s = text.encode("utf-8", "surrogatepass").translate(_TOKEN_CLASSES, _TOKEN_CONTINUATION)
    # Cheap pre-check (16 letters/digits/CJK in a row) before the slower blob regex.
    if b"xxxxxxxxxxxxxxxx" in s.translate(_TOKEN_SPACE_VIEW) and _TOKEN_BLOB.search(text):

        def blob(m: "re.Match[str]") -> str:
            nonlocal n
            b = m.group()
            if b.islower() or b.isupper() or not _TOKEN_HAS_DIGIT.search(b):
                return b  # a long word or a hex hash: the normal rules handle it
            n += len(b) / _TOKEN_BLOB_CHARS_PER_TOKEN
            return ""

        text = _TOKEN_BLOB.sub(blob, text)
        s = text.encode("utf-8", "surrogatepass").translate(_TOKEN_CLASSES, _TOKEN_CONTINUATION)
    f = _token_features(text, s)
    return n + f[0] + sum(x * y for x, y in zip(f[1:], _TOKEN_WEIGHTS))


class TokenTally:
    """estimate_tokens() of a text that arrives in pieces, without keeping the text: the pending tail
    is estimated once it passes `segment_chars`, cut after its last line break (or space), so each
    segment starts where the whole text would start a piece too and the sum stays within a fraction
    of a percent of the whole estimate. Without any blank, the tail is cut where it is: memory stays
    bounded (about 4 x segment_chars) whatever the text."""

    def __init__(self, segment_chars: int = TOKEN_TALLY_SEGMENT_CHARS) -> None:
        self._segment = segment_chars
        self._pending: list[str] = []
        self._pending_chars = 0
        self._sum = 0.0
        self.chars = 0

    def add(self, piece: str) -> None:
        if not piece:
            return
        self._pending.append(piece)
        self._pending_chars += len(piece)
        self.chars += len(piece)
        if self._pending_chars >= self._segment:
            self._settle()

    def _settle(self) -> None:
        text = "".join(self._pending)
        floor = self._segment // 2   # blanks near the start would leave most of the tail pending
        cut = text.rfind("\n", floor) + 1 or text.rfind(" ", floor) + 1
        if not cut and len(text) >= 4 * self._segment:
            cut = len(text)
        if cut:
            self._sum += _token_sum(text[:cut])
            text = text[cut:]
        self._pending, self._pending_chars = [text] if text else [], len(text)

    def tokens(self) -> int:
        if not self.chars:
            return 0
        rest = "".join(self._pending)
        return max(1, round(self._sum + (_token_sum(rest) if rest else 0.0)))

    @property
    def held_chars(self) -> int:
        """Characters not yet estimated (bounded, whatever was added)."""
        return self._pending_chars


class TextDigest:
    """Remembers a growing text by its length and checksum only: enough to tell whether a later text
    extends it, without keeping it."""

    def __init__(self) -> None:
        self.chars = 0
        self._crc = 0

    def add(self, piece: str) -> None:
        self.chars += len(piece)
        self._crc = zlib.crc32(piece.encode("utf-8", "surrogatepass"), self._crc)

    def reset(self, text: str = "") -> None:
        self.chars, self._crc = 0, 0
        self.add(text)

    def unseen(self, text: str) -> str | None:
        """What `text` adds to the remembered text when it starts with it, else None."""
        if len(text) < self.chars or zlib.crc32(text[:self.chars].encode("utf-8", "surrogatepass")) != self._crc:
            return None
        return text[self.chars:]


###############################################################################
###############################################################################
# Small machines: the rate gate, usage stats, the LRU cache
###############################################################################

STATS_LATENCY_SAMPLES_COUNT = 1000   # latencies kept per model for the percentiles (the latest ones)
STATS_MAX_ROWS_COUNT = 1000          # rows per table (models, keys): names come from clients, so capped
LOGIN_ADDRESSES_MAX = 10000          # addresses a LoginBackoff remembers: bounded memory under a spray of them
LOGIN_GLOBAL_WINDOW_DEFAULT_S = 60.0   # the global budget's window when a LoginBackoff is not given one


class RateGate:
    """Spaces request starts at least `interval_s` apart, first come first served (monotonic clock).

    Waiters queue in arrival order; one that leaves (its client hung up) leaves the queue and those
    behind it move up. A request that would wait longer than `max_wait_s` is refused at once with 429
    and Retry-After. Only starts are spaced: answers already streaming are never touched.
    """

    def __init__(self, interval_s: float, max_wait_s: float = math.inf,
                 clock: Callable[[], float] = time.monotonic,
                 call_later: Callable[[float, Callable[[], None]], object] | None = None) -> None:
        self.interval_s = interval_s
        self.max_wait_s = max_wait_s
        self._clock = clock
        # How the gate wakes itself up (the running loop's call_later unless given): a test that brings
        # its own clock brings this too, and moves both on without waiting.
        self._call_later = call_later
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._last_start_s = -math.inf   # the first request never waits
        self._timer: object | None = None

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def expected_wait_s(self) -> float:
        """How long a request arriving now would wait for its turn."""
        return max(0.0, self._last_start_s + self.interval_s * (self.queued + 1) - self._clock())

    async def wait(self) -> None:
        if self.interval_s <= 0:
            return
        if not self.queued and self._clock() - self._last_start_s >= self.interval_s:
            self._last_start_s = self._clock()
            return
        wait_s = self.expected_wait_s()
        if wait_s > self.max_wait_s:
            raise ProxyError(429, f"Too many requests are queued to start (about {wait_s:.0f} s of waiting); "
                             "try again shortly.", "rate_limit_error", "rate_limit_exceeded",
                             headers=[("Retry-After", str(max(1, math.ceil(wait_s))))])
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        self._arm()
        try:
            await turn
        except asyncio.CancelledError:
            if turn in self._waiters:
                self._waiters.remove(turn)
            raise

    def _arm(self) -> None:
        if self._timer is None and self._waiters:
            delay_s = max(0.0, self._last_start_s + self.interval_s - self._clock())
            self._timer = (self._call_later or asyncio.get_running_loop().call_later)(delay_s, self._next)

    def _next(self) -> None:
        self._timer = None
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():        # skip those that left while waiting
                turn.set_result(None)
                self._last_start_s = self._clock()
                break
        self._arm()


LOOPBACK_CLIENTS = ("127.0.0.1", "::1", "::ffff:127.0.0.1")   # the machine itself (an SSH tunnel lands here)


class LoginBackoff:
    """Failed logins per client address: once `max_failures` fail within `window_s` of the first, every
    attempt from that address (the right credentials too) is refused with 429 and Retry-After until the
    window ends. The table is bounded: past `max_addresses` the oldest entries are forgotten.

    Forgetting lets a spray of addresses start afresh, so a global budget caps what the spray gains:
    past `global_max` failures (from all addresses together) within `global_window_s`, every attempt is
    refused until the oldest of them leaves the window, except from the machine itself, which keeps
    only its per-address limit: the owner can always get in through an SSH tunnel. 0 = no budget."""

    def __init__(self, max_failures: int, window_s: float, message: str, code: str = "too_many_login_failures",
                 clock: Callable[[], float] = time.monotonic, max_addresses: int = LOGIN_ADDRESSES_MAX,
                 global_max: int = 0, global_window_s: float = LOGIN_GLOBAL_WINDOW_DEFAULT_S) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._message = message
        self._code = code
        self._clock = clock
        self._max_addresses = max_addresses
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()   # address -> (failures, first at)
        self.global_max = global_max
        self.global_window_s = global_window_s
        self._recent: deque[float] = deque(maxlen=global_max or 1)   # the last global_max failures, any address

    def _current(self, address: str) -> tuple[int, float]:
        failures, first_s = self._failures.get(address, (0, 0.0))
        return (0, 0.0) if self._clock() - first_s > self.window_s else (failures, first_s)

    def check(self, address: str) -> None:
        """Raises the 429 while the address is locked out, or every address is."""
        now = self._clock()
        failures, first_s = self._current(address)
        if failures >= self.max_failures:
            retry_s = max(1, math.ceil(first_s + self.window_s - now))
            raise ProxyError(429, self._message, "rate_limit_error", self._code,
                             headers=[("Retry-After", str(retry_s))])
        recent = self._recent
        if (self.global_max and len(recent) >= self.global_max and now - recent[0] <= self.global_window_s
                and address not in LOOPBACK_CLIENTS):
            retry_s = max(1, math.ceil(recent[0] + self.global_window_s - now))
            raise ProxyError(429, "Too many failed logins from everywhere at once; logins are paused for everyone "
                             "for a moment (from the proxy's own machine they still work).", "rate_limit_error",
                             self._code, headers=[("Retry-After", str(retry_s))])

    def failed(self, address: str) -> None:
        failures, first_s = self._current(address)
        table = self._failures
        table[address] = (failures + 1, first_s if failures else self._clock())
        table.move_to_end(address)
        while len(table) > self._max_addresses:
            table.popitem(last=False)   # the longest untouched first: active attackers stay remembered
        if self.global_max:
            self._recent.append(self._clock())

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


STATS_KEY_CHARS = 100
STATS_FAILURE_ROWS = 100   # rows a failure without any answer may open; later ones share "(refused)"
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class UsageStats:
    """Requests, errors, tokens and latency percentiles per model, and the same counts per access key
    label, since start (bounded memory). The label is never the key itself."""

    def __init__(self, max_samples: int = STATS_LATENCY_SAMPLES_COUNT) -> None:
        self.since_s = time.time()
        self._max_samples = max_samples
        self._models: dict[str, dict[str, Any]] = {}
        self._failure_rows = 0
        self._keys: dict[str, dict[str, int]] = {}

    def record(self, model: str, *, ok: bool, latency_s: float, prompt_tokens: int = 0,
               completion_tokens: int = 0, key: str | None = None, refused: bool = False) -> None:
        """`key`: the label of the request's access key; by default the one its key check set (KEY_LABEL).
        `refused=True`: the request never reached a model, so it goes to the one "(refused)" row,
        whatever model string it named."""
        model = self._bounded_key(model, refused, failed=not ok and not prompt_tokens and not completion_tokens)
        entry = self._models.get(model)
        if entry is None:
            if len(self._models) >= STATS_MAX_ROWS_COUNT:   # model names come from clients: cap the table
                model = "(other)"
                entry = self._models.get(model)
            if entry is None:
                entry = self._models[model] = {"requests": 0, "errors": 0, "prompt_tokens": 0,
                                               "completion_tokens": 0, "latency": deque(maxlen=self._max_samples)}
        entry["requests"] += 1
        entry["errors"] += 0 if ok else 1
        entry["prompt_tokens"] += prompt_tokens
        entry["completion_tokens"] += completion_tokens
        entry["latency"].append(latency_s * 1000.0)
        label = KEY_LABEL.get() if key is None else key
        counts = self._keys.get(label)
        if counts is None:
            if len(self._keys) >= STATS_MAX_ROWS_COUNT:     # labels come from the key file, but edits add up over time
                label = "(other)"
            counts = self._keys.setdefault(label, {"requests": 0, "errors": 0, "prompt_tokens": 0,
                                                   "completion_tokens": 0})
        counts["requests"] += 1
        counts["errors"] += 0 if ok else 1
        counts["prompt_tokens"] += prompt_tokens
        counts["completion_tokens"] += completion_tokens

    def _bounded_key(self, model: str, refused: bool, failed: bool) -> str:
        """Model strings come from clients, and anyone can send one (Poe judges the key): a row's name
        is short and printable, and failures that never got an answer may open only a few rows of
        their own, so strangers cannot crowd the models in use out of the table."""
        if refused:
            return "(refused)"
        name = _CONTROL_CHARS.sub("", str(model)[:400]).strip()[:STATS_KEY_CHARS] or "(unnamed)"
        if failed and name not in self._models:
            if self._failure_rows >= STATS_FAILURE_ROWS:
                return "(refused)"
            self._failure_rows += 1
        return name

    def snapshot(self) -> dict[str, Any]:
        models = []
        for name, entry in sorted(self._models.items()):
            samples = sorted(entry["latency"])
            models.append({"model": name, **{k: entry[k] for k in ("requests", "errors", "prompt_tokens",
                                                                 "completion_tokens")},
                           "latency_ms": {f"p{q}": round(_percentile(samples, q / 100), 1) for q in (50, 95, 99)}})
        totals = {k: sum(m[k] for m in models) for k in ("requests", "errors", "prompt_tokens", "completion_tokens")}
        keys = [{"key": label, **counts} for label, counts in sorted(self._keys.items())]
        return {"since": int(self.since_s), "uptime_s": round(time.time() - self.since_s, 1), "totals": totals,
                "models": models, "keys": keys}


def _percentile(sorted_samples: Sequence[float], q: float) -> float:
    if not sorted_samples:
        return 0.0
    return sorted_samples[min(len(sorted_samples) - 1, round(q * (len(sorted_samples) - 1)))]


class LRUCache:
    """An OrderedDict LRU with a time-to-live and a byte budget; entries cost their real size.

    Time comes from an injectable monotonic clock, so tests step it instead of sleeping.
    """

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Any, int, float]] = OrderedDict()   # key -> (value, bytes, expiry)
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[2] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: Any, size_bytes: int) -> None:
        if key in self._entries:
            self._drop(key)
        if size_bytes > self.max_bytes or self.ttl_s <= 0:
            return   # would not fit even alone (or caching is off)
        self._entries[key] = (value, size_bytes, self._clock() + self.ttl_s)
        self.total_bytes += size_bytes
        now = self._clock()
        for old in [k for k, (_, _, expiry) in self._entries.items() if expiry <= now]:
            self._drop(old)
        while self.total_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, size, _ = self._entries.pop(key)
        self.total_bytes -= size


###############################################################################
###############################################################################
# Poe's bot catalogue (pure): what each bot is, declares and accepts
###############################################################################

@dataclass(frozen=True)
class BotParameter:
    """One of a bot's own controls, as Poe's /v1/models declares it (set by `--name value`)."""

    name: str
    schema: Mapping[str, Any] = field(default_factory=dict)   # JSON schema: type / enum / minimum / maximum
    default: Any = None
    has_default: bool = False
    description: str = ""


@dataclass(frozen=True)
class BotReasoning:
    budget_min: int | None = None
    budget_max: int | None = None
    supports_effort: bool | None = None
    required: bool | None = None


@dataclass(frozen=True)
class BotInfo:
    """One bot of the catalogue. Every field but the names may be unknown (None): Poe leaves any of them
    out or null for some bot, and custom models in models.yaml declare only what their owner knows."""

    id: str                                    # Poe's id (lower case in today's list)
    name: str                                  # metadata.display_name (the cased name), else the id
    created: int = 0                           # seconds
    owned_by: str = "poe"
    description: str = ""
    context_length: int | None = None
    max_output_tokens: int | None = None
    input_modalities: tuple[str, ...] | None = None
    output_modalities: tuple[str, ...] | None = None
    features: tuple[str, ...] | None = None    # supported_features: tools, web_search
    parameters: tuple[BotParameter, ...] | None = None   # None: not declared, so nothing is known
    reasoning: BotReasoning | None = None
    pricing: Mapping[str, str] | None = None   # USD per token as decimal strings

    def parameter(self, name: str) -> BotParameter | None:
        return next((p for p in self.parameters or () if p.name == name), None)


def _whole_number(value: Any) -> int | None:
    """A positive whole number of tokens, or None for anything else (null, strings, booleans, <= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if value == int(value) and value > 0 else None


def _strings(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        return None
    return tuple(v for v in value if isinstance(v, str) and v)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _bot_parameters(value: Any) -> tuple[BotParameter, ...] | None:
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"].strip():
            description = item.get("description")
            out.append(BotParameter(item["name"].strip(), _dict(item.get("schema")), item.get("default_value"),
                                    "default_value" in item, description if isinstance(description, str) else ""))
    return tuple(out)


def _bot_reasoning(value: Any) -> BotReasoning | None:
    if not isinstance(value, dict):
        return None
    budget = _dict(value.get("budget"))
    low = budget.get("min_tokens")
    flags = {k: value[k] if isinstance(value.get(k), bool) else None for k in ("supports_reasoning_effort", "required")}
    return BotReasoning(0 if low == 0 else _whole_number(low), _whole_number(budget.get("max_tokens")),
                        flags["supports_reasoning_effort"], flags["required"])


def bot_info_from_poe(entry: Any) -> BotInfo | None:
    """One entry of Poe's /v1/models -> BotInfo; None when it has no usable id. Any other field may be
    missing, null or of the wrong type: it is then unknown, never an error."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"].strip():
        return None
    bot_id = entry["id"].strip()
    display = _dict(entry.get("metadata")).get("display_name")
    window = _dict(entry.get("context_window"))
    architecture = _dict(entry.get("architecture"))
    created: Any = entry.get("created")
    pricing = entry.get("pricing")
    description = entry.get("description")
    return BotInfo(
        id=bot_id, name=display.strip() if isinstance(display, str) and display.strip() else bot_id,
        created=_seconds(created) if _is_number(created) and created > 0 else 0,
        owned_by=entry["owned_by"] if isinstance(entry.get("owned_by"), str) and entry["owned_by"] else "poe",
        description=description if isinstance(description, str) else "",
        context_length=_whole_number(window.get("context_length")) or _whole_number(entry.get("context_length")),
        max_output_tokens=_whole_number(window.get("max_output_tokens")),
        input_modalities=_strings(architecture.get("input_modalities")),
        output_modalities=_strings(architecture.get("output_modalities")),
        features=_strings(entry.get("supported_features")),
        parameters=_bot_parameters(entry.get("parameters")),
        reasoning=_bot_reasoning(entry.get("reasoning")),
        pricing={str(k): str(v) for k, v in pricing.items() if isinstance(v, str) or _is_number(v)}
        if isinstance(pricing, dict) else None)


class Catalogue:
    """The known bots, found by Poe id or display name, case-insensitively (an exact spelling wins)."""

    def __init__(self, bots: Iterable[BotInfo] = ()) -> None:
        self.bots = tuple(bots)
        self._exact: dict[str, BotInfo] = {}
        self._folded: dict[str, BotInfo] = {}
        for bot in self.bots:   # the first bot of a name wins, in Poe's order
            for name in (bot.name, bot.id):
                self._exact.setdefault(name, bot)
                self._folded.setdefault(name.casefold(), bot)

    def __len__(self) -> int:
        return len(self.bots)

    def find(self, name: str) -> BotInfo | None:
        name = name.strip()
        return self._exact.get(name) or self._folded.get(name.casefold())


def catalogue_from_poe(payload: Any) -> Catalogue:
    """Poe's /v1/models answer -> the catalogue. Entries without an id are skipped."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise upstream_error("Poe's model list has no `data` array")
    return Catalogue(info for info in map(bot_info_from_poe, data) if info is not None)


# ----------------------------------------------------------------------------- client controls -> bot parameters

# Effort words on one scale, so that a client's word maps to the nearest word a bot accepts.
EFFORT_SCALE = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# An effort for a bot that only takes a thinking budget: this share of its largest budget.
EFFORT_BUDGET_SHARE = {"none": 0.0, "minimal": 0.1, "low": 0.2, "medium": 0.5, "high": 0.8, "xhigh": 1.0, "max": 1.0}
# Request keys (of all three dialects) that travel in Poe's own query fields, shape the prompt or are read
# above: never also sent as bot flags, whatever a bot declares.
PROTOCOL_KEYS = frozenset({"model", "messages", "stream", "stream_options", "stop", "logit_bias", "tools",
                           "tool_choice", "parallel_tool_calls", "response_format", "n", "user", "metadata", "store",
                           "extra_body", "web_search_options", "reasoning_effort", "reasoning", "thinking",
                           "output_config", "google", "max_completion_tokens", "max_output_tokens", "system",
                           "stop_sequences", "input", "instructions", "text", "include", "previous_response_id",
                           "prompt_cache_key", "truncation", "service_tier"})
REASONING_PARAMETERS = frozenset({"reasoning_effort", "output_effort", "thinking_budget", "enable_thinking"})
# Numeric controls a client sends by habit: brought into the bot's range rather than refused.
CLAMPED_PARAMETERS = frozenset({"temperature", "max_tokens", "max_output_tokens", "thinking_budget"})


def _effort_word(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in EFFORT_SCALE:
        raise bad_request(f"'{field_name}' must be one of {', '.join(EFFORT_SCALE)}.", field_name)
    return value.strip().lower()


def _budget(value: Any, field_name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise bad_request(f"'{field_name}' must be a whole number of tokens.", field_name)
    return value


def _nearest_effort(word: str, allowed: Sequence[Any]) -> Any:
    """The allowed value nearest to `word` on EFFORT_SCALE; on a tie the stronger one (the client asked for
    at least that much). None when the bot's values are not effort words at all."""
    rank = EFFORT_SCALE.index(word)
    known = [(EFFORT_SCALE.index(v.lower()), v) for v in allowed if isinstance(v, str) and v.lower() in EFFORT_SCALE]
    if not known:
        return None
    return min(known, key=lambda rv: (abs(rv[0] - rank), -rv[0]))[1]


def _effort_from_budget(budget: int) -> str:
    return "none" if budget == 0 else "low" if 0 < budget < 4096 else "medium" if 0 < budget < 16384 else "high"


def _allowed_text(param: BotParameter) -> str:
    schema = param.schema
    if isinstance(schema.get("enum"), list):
        return "one of " + ", ".join(str(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "boolean":
        return "true or false"
    if kind in ("number", "integer"):
        low, high = schema.get("minimum"), schema.get("maximum")
        what = "a whole number" if kind == "integer" else "a number"
        if _is_number(low) and _is_number(high):
            return f"{what} from {low:g} to {high:g}"
        if _is_number(low):
            return f"{what} of at least {low:g}"
        return f"{what} of at most {high:g}" if _is_number(high) else what
    return "a string" if kind == "string" else "a number, a string or true/false"


def parameter_value(param: BotParameter, value: Any, bot: str, field_name: str = "", clamp: bool = False) -> Any:
    """`value` checked against the bot's declared schema (with the obvious conversions: 8 for "8", "true"
    for true). Numbers outside the range are clamped when `clamp`, refused otherwise. Raises a 400 that
    names the parameter and what it allows."""
    field_name = field_name or param.name
    schema = param.schema

    def refuse() -> ProxyError:
        return bad_request(f"'{field_name}' must be {_allowed_text(param)} for {bot} (its parameter "
                           f"'{param.name}'); got {json.dumps(value)[:80]}.", field_name)

    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        for candidate in enum:
            if candidate == value and type(candidate) is type(value):
                return candidate
        if isinstance(value, (str, bool)) or _is_number(value):   # 8 for "8", "High" for "high"
            text = _flag_text(value).casefold()
            for candidate in enum:
                if _flag_text(candidate).casefold() == text:
                    return candidate
        raise refuse()
    kind = schema.get("type")
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise refuse()
    if kind in ("number", "integer"):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise refuse() from None
        if not _is_number(number) or (kind == "integer" and number != int(number)):
            raise refuse()
        low, high = schema.get("minimum"), schema.get("maximum")
        if (_is_number(low) and number < low) or (_is_number(high) and number > high):
            if not clamp:
                raise refuse()
            number = min(max(number, low if _is_number(low) else number), high if _is_number(high) else number)
        return int(number) if number == int(number) else number
    if kind == "string":
        if isinstance(value, str):
            return value
        if _is_number(value):
            return _flag_text(value)
        raise refuse()
    if isinstance(value, (str, bool)) or _is_number(value):
        return value
    raise refuse()


def _flag_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    # One line: a newline or a "--" in a value would end the flag or start another.
    return re.sub(r"(^|\s)--+", r"\1-", re.sub(r"\s+", " ", str(value)).strip())


def _declared(info: BotInfo) -> dict[str, BotParameter]:
    """The bot's parameters, plus what its `reasoning` metadata implies but no parameter declares."""
    declared = {p.name: p for p in info.parameters or ()}
    reasoning = info.reasoning
    if reasoning is not None:
        if reasoning.supports_effort and "reasoning_effort" not in declared and "output_effort" not in declared:
            declared["reasoning_effort"] = BotParameter("reasoning_effort", {"enum": ["low", "medium", "high"]})
        if reasoning.budget_max is not None and "thinking_budget" not in declared:
            declared["thinking_budget"] = BotParameter("thinking_budget", {
                "type": "number", "minimum": reasoning.budget_min or 0, "maximum": reasoning.budget_max})
    return declared


def bot_controls(body: Mapping[str, Any], info: BotInfo | None) -> tuple[list[str], list[str]]:
    """The client's controls in an OpenAI-shaped chat body -> the bot's own parameters as `--name value`
    flags (for the end of the last user turn), and the names of the controls the bot does not declare
    (they send nothing). A value outside a declared schema is a 400 naming the parameter.

    Read: web search (`web_search_options`, `web_search*` tools, `web_search` / `enable_web_search`),
    reasoning (`reasoning_effort`, `reasoning.{effort,max_tokens,enabled}`, `output_config.effort`,
    `thinking`, Gemini's `thinking_config`), `max_tokens`, and any other key, top-level or in `extra_body`,
    named like a declared parameter. A bot whose parameters are not known (not in the catalogue, or a
    custom model that declares none) gets what reasoning_flags() gives, as before the catalogue.
    """
    if info is None or info.parameters is None:
        return list(reasoning_flags(body)), []
    declared = _declared(info)
    extra = _dict(body.get("extra_body"))
    chosen: dict[str, Any] = {}
    ignored: list[str] = []

    def setting(names: Sequence[str], value: Any, source: str, effort: bool = False, clamp: bool = False) -> bool:
        """Give `value` to the first of `names` the bot declares and nothing has set yet."""
        for name in names:
            param = declared.get(name)
            if param is None or name in chosen:
                continue
            if effort:
                enum = param.schema.get("enum")
                nearest = _nearest_effort(value, enum) if isinstance(enum, list) else None
                chosen[name] = parameter_value(param, value if nearest is None else nearest, info.name, source)
            else:
                chosen[name] = parameter_value(param, value, info.name, source, clamp)
            return True
        return False

    def effort(word: str, names: Sequence[str], source: str) -> None:
        done = setting(names, word, source, effort=True)
        budget = declared.get("thinking_budget")
        high: Any = budget.schema.get("maximum") if budget is not None else None
        if not done and _is_number(high):
            done = setting(["thinking_budget"], round(EFFORT_BUDGET_SHARE[word] * high), source, clamp=True)
        done = setting(["enable_thinking"], word != "none", source) or done
        if not done and not REASONING_PARAMETERS & chosen.keys():   # not when another control set it already
            ignored.append(source)

    def budget_tokens(tokens: int, source: str) -> None:
        """-1 (Gemini's "let the model decide") switches thinking on without a budget."""
        done = tokens >= 0 and setting(["thinking_budget"], tokens, source, clamp=True)
        if not done and tokens >= 0 and not any(n in chosen for n in ("reasoning_effort", "output_effort")):
            done = setting(["reasoning_effort", "output_effort"], _effort_from_budget(tokens), source, effort=True)
        done = setting(["enable_thinking"], tokens != 0, source) or done
        if not done and not REASONING_PARAMETERS & chosen.keys():
            ignored.append(source)

    # Web search, from every dialect's way of asking for it.
    searches: list[tuple[str, Any]] = []
    if body.get("web_search_options") is not None:
        searches.append(("web_search_options", True))
    hosted = [t.get("type") for t in body.get("tools") or [] if isinstance(t, dict)
              and isinstance(t.get("type"), str) and t["type"].startswith("web_search")]
    if hosted:
        searches.append((f"tools[type={hosted[0]}]", True))
    for where, source in ((body, ""), (extra, "extra_body.")):
        for key in ("web_search", "enable_web_search"):
            if key in where and where[key] is not None:
                searches.append((source + key, where[key]))
    for source, value in searches:
        names = ["web_search", "enable_web_search"]
        if source.endswith("enable_web_search"):
            names.reverse()
        if not setting(names, value, source) and not any(n in chosen for n in names):
            ignored.append(source)

    # Reasoning: Anthropic's output effort, then OpenAI's / OpenRouter's effort, then thinking budgets.
    output_config = _dict(body.get("output_config"))
    if output_config.get("effort") is not None:
        effort(_effort_word(output_config["effort"], "output_config.effort"), ["output_effort", "reasoning_effort"],
               "output_config.effort")
    reasoning = _dict(body.get("reasoning"))
    for value, source in ((body.get("reasoning_effort"), "reasoning_effort"),
                          (reasoning.get("effort"), "reasoning.effort"),
                          (extra.get("reasoning_effort"), "extra_body.reasoning_effort")):
        if value is not None:
            effort(_effort_word(value, source), ["reasoning_effort", "output_effort"], source)
            break
    google = _dict(extra.get("google", body.get("google")))
    gemini = _dict(google.get("thinking_config"))
    thinking = body.get("thinking")
    if isinstance(thinking, dict):
        kind = thinking.get("type")
        if kind == "disabled":
            budget_tokens(0, "thinking")
        elif thinking.get("budget_tokens") is not None:
            budget_tokens(_budget(thinking["budget_tokens"], "thinking.budget_tokens"), "thinking.budget_tokens")
        elif kind in ("enabled", "adaptive"):
            budget_tokens(-1, "thinking")
    elif reasoning.get("max_tokens") is not None:
        budget_tokens(_budget(reasoning["max_tokens"], "reasoning.max_tokens"), "reasoning.max_tokens")
    elif gemini.get("thinking_budget") is not None:
        field_name = "extra_body.google.thinking_config.thinking_budget"
        budget_tokens(_budget(gemini["thinking_budget"], field_name), field_name)
    if isinstance(reasoning.get("enabled"), bool) and "enable_thinking" not in chosen:
        if not setting(["enable_thinking"], reasoning["enabled"], "reasoning.enabled"):
            ignored.append("reasoning.enabled")
    if isinstance(gemini.get("thinking_level"), str):
        effort(_effort_word(gemini["thinking_level"], "thinking_config.thinking_level"),
               ["reasoning_effort", "output_effort"], "extra_body.google.thinking_config.thinking_level")

    # The answer's length, for bots that take it as a parameter of their own.
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if _is_number(body.get(key)):
            setting(["max_output_tokens", "max_tokens"], body[key], key, clamp=True)
            break

    # Anything else named like one of the bot's parameters: `aspect_ratio`, `seed`, `negative_prompt` ...
    for where, source in ((body, ""), (extra, "extra_body.")):
        for key, value in where.items():
            if key in chosen or value is None or (not source and key in PROTOCOL_KEYS):
                continue
            if key in declared:
                setting([key], value, source + key, clamp=key in CLAMPED_PARAMETERS)
            elif source and key not in ("google", "web_search", "enable_web_search", "reasoning_effort"):
                ignored.append(source + key)

    order = [p.name for p in info.parameters or ()] + [n for n in declared if info.parameter(n) is None]
    flags = [f"--{name} {_flag_text(chosen[name])}" for name in order if name in chosen]
    return flags, ignored


def check_context(prompt_tokens: int, max_tokens: int | None, info: BotInfo | None) -> int | None:
    """Refuse a prompt that cannot fit the bot's context window (estimate more than 10 % over it: the
    estimate is not the bot's tokenizer), before Poe is asked and bills for it; clamp `max_tokens` to the
    bot's largest answer. Returns the max_tokens to use (None: the client set none)."""
    if info is not None and info.context_length is not None and prompt_tokens > info.context_length * 1.1:
        raise ProxyError(400, f"prompt is too long: {prompt_tokens} tokens > {info.context_length} maximum",
                         "invalid_request_error", "context_length_exceeded", "messages")
    if max_tokens is not None and info is not None and info.max_output_tokens is not None:
        return min(max_tokens, info.max_output_tokens)
    return max_tokens


###############################################################################
###############################################################################
# Converters: OpenAI chat request -> Poe query (pure)
###############################################################################

POE_PROTOCOL_VERSION = "1.2"
# OpenAI role -> Poe role. Poe knows system/user/bot/tool; `developer` is OpenAI's newer name for system.
ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "bot",
            "tool": "user", "function": "user"}
EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]   # a JSON schema, kept as the client sent it


@dataclass(frozen=True)
class ToolSpec:
    """The tools of a request after `tool_choice` and `parallel_tool_calls` were applied."""

    tools: tuple[Tool, ...] = ()     # offered to the bot
    flags: tuple[str, ...] = ()      # description-less "tools": sent as Poe bot flags (--name)
    choice: str = "auto"             # auto | none | required | function
    forced: str | None = None        # the tool `tool_choice` names
    parallel: bool = True

    def find(self, name: str) -> Tool | None:
        """The tool of that name: exactly, or else case-insensitively. A namespaced tool (offered as
        `ns__tool`, see the Responses dialect) is also found as `ns.tool` or, when no other tool ends the
        same way, by its bare name `tool`: bots call it the way its namespace reads to them."""
        name = name.strip()
        folded = name.casefold()
        exact = [t for t in self.tools if t.name == name]
        if exact:
            return exact[0]
        found = next((t for t in self.tools if t.name.casefold() == folded), None)
        if found is not None or not name:
            return found
        dotted = folded.replace(".", "__")
        found = next((t for t in self.tools if t.name.casefold() == dotted), None)
        if found is not None:
            return found
        suffixed = [t for t in self.tools if t.name.casefold().endswith("__" + folded)]
        return suffixed[0] if len(suffixed) == 1 else None


@dataclass(frozen=True)
class ChatRequest:
    """The parts of an OpenAI chat request we act on, validated. Unknown fields are ignored."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    stop: list[str] | None = None
    logit_bias: dict[str, float] | None = None
    tools: ToolSpec | None = None
    flags: tuple[str, ...] = ()      # Poe reasoning flags for the end of the last user turn
    json_instruction: str = ""       # response_format as words for the bot ("" = free text)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_chat_request(body: Any, controls: bool = True) -> ChatRequest:
    """Validate an OpenAI chat body leniently: refuse only what OpenAI itself would refuse. Without
    `controls` the reasoning flags are left to the caller (the chat pipeline maps them per bot with
    bot_controls, which knows values such as effort `max` that reasoning_flags refuses)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required: the name of a Poe bot, e.g. 'GPT-4o'.", "model",
                          "missing_required_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", "messages", "missing_required_parameter")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object.", f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}].role must be a string.", f"messages[{i}].role")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list, dict)):
            raise bad_request(f"messages[{i}].content must be a string or an array of parts.",
                              f"messages[{i}].content")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, (bool, int)):
        raise bad_request("'stream' must be a boolean.", "stream")
    options = body.get("stream_options")
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    temperature = body.get("temperature")
    if temperature is not None and not _is_number(temperature):
        raise bad_request("'temperature' must be a number.", "temperature")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or an array of strings.", "stop")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not (isinstance(logit_bias, dict)
                                       and all(_is_number(v) for v in logit_bias.values())):
        raise bad_request("'logit_bias' must map token ids to numbers.", "logit_bias")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise bad_request("'n' must be a positive integer.", "n")
    if n is not None and n > 1:
        raise bad_request("'n' greater than 1 is not supported: a Poe bot gives one answer per request.", "n",
                          "unsupported_value")
    return ChatRequest(model=model.strip(), messages=messages, stream=bool(stream), include_usage=include_usage,
                       temperature=float(temperature) if temperature is not None else None,
                       stop=stop or None,
                       logit_bias={str(k): float(v) for k, v in logit_bias.items()} if logit_bias else None,
                       tools=parse_tools(body), flags=reasoning_flags(body) if controls else (),
                       json_instruction=json_instruction(body.get("response_format")))


def json_instruction(response_format: Any) -> str:
    """`response_format` has no field in Poe's protocol: say it in words at the end of the last user turn
    (JSON mode and structured outputs then work with any bot; the answer's code fences are removed)."""
    if not isinstance(response_format, dict):
        return ""
    kind = response_format.get("type")
    if kind == "json_object":
        return "Answer with one valid JSON object and nothing else: no prose, no code fences."
    if kind == "json_schema":
        spec = response_format.get("json_schema") if isinstance(response_format.get("json_schema"), dict) else {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object.",
                              "response_format.json_schema.schema")
        return ("Answer with one valid JSON value and nothing else (no prose, no code fences) that conforms to "
                f"this JSON schema:\n{_json_compact(schema)}")
    return ""   # "text", or a kind we do not know: nothing to ask


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def reasoning_flags(body: Mapping[str, Any]) -> tuple[str, ...]:
    """Reasoning controls of the OpenAI, Anthropic and Gemini dialects -> Poe's bot flags.

    `thinking.budget_tokens` (or, without `thinking`, Gemini's `thinking_config.thinking_budget`, also
    inside `extra_body`) gives `--thinking_budget N`; `reasoning_effort` or `reasoning.effort` gives
    `--reasoning_effort X`. Bad values are a 400 naming the field.
    """
    flags: list[str] = []
    budget, field = None, ""
    thinking = body.get("thinking")
    if isinstance(thinking, dict):
        if thinking.get("type") != "disabled" and "budget_tokens" in thinking:
            budget, field = thinking.get("budget_tokens"), "thinking.budget_tokens"
    else:
        extra = body.get("extra_body") if isinstance(body.get("extra_body"), dict) else {}
        google = extra.get("google", body.get("google"))
        config = google.get("thinking_config") if isinstance(google, dict) else None
        if isinstance(config, dict) and "thinking_budget" in config:
            budget, field = config.get("thinking_budget"), "extra_body.google.thinking_config.thinking_budget"
    if field:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < -1:
            raise bad_request(f"'{field}' must be a whole number of tokens.", field)
        if budget >= 0:   # Gemini's -1 means "let the model decide": no flag
            flags.append(f"--thinking_budget {budget}")
    effort, field = body.get("reasoning_effort"), "reasoning_effort"
    if effort is None and isinstance(body.get("reasoning"), dict):
        effort, field = body["reasoning"].get("effort"), "reasoning.effort"
    if effort is not None:
        if not isinstance(effort, str) or effort.lower() not in REASONING_EFFORTS:
            raise bad_request(f"'{field}' must be one of {', '.join(REASONING_EFFORTS)}.", field)
        flags.append(f"--reasoning_effort {effort.lower()}")
    return tuple(flags)


def parse_tools(body: Mapping[str, Any]) -> ToolSpec | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` -> ToolSpec (None when there are no tools).

    Schemas are taken as they come (no `required`, `strict`, `$defs`, `additionalProperties` needed).
    A tool with neither a description nor parameters is a Poe bot flag, as in the Rust original:
    `{"name": "web_search"}` appends ` --web_search` to the last user message. A tool with a parameter
    schema stays a tool without a description (LangChain and openai-agents send `""` or nothing).
    A hosted search tool (`{"type": "web_search"}`, `web_search_preview`, Anthropic's `web_search_2025…`)
    is the web-search control, named or not: the flag `web_search` (bot_controls maps it per bot).
    """
    raw_tools = body.get("tools")
    if raw_tools is None or raw_tools == []:
        return None
    if not isinstance(raw_tools, list):
        raise bad_request("'tools' must be an array.", "tools")
    tools: list[Tool] = []
    flags: list[str] = []
    for i, item in enumerate(raw_tools):
        if not isinstance(item, dict):
            raise bad_request(f"tools[{i}] must be an object.", f"tools[{i}]")
        kind = item.get("type")
        if isinstance(kind, str) and kind.startswith("web_search") and not isinstance(item.get("function"), dict):
            if "web_search" not in flags:
                flags.append("web_search")
            continue
        fn = item.get("function") if isinstance(item.get("function"), dict) else item   # nested or flat form
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise bad_request(f"tools[{i}].function.name is required.", f"tools[{i}].function.name",
                              "missing_required_parameter")
        description = fn.get("description") if isinstance(fn.get("description"), str) else ""
        parameters = fn.get("parameters", fn.get("input_schema"))
        if not description.strip() and _is_bare_schema(parameters):
            flags.append(name.strip())
            continue
        tools.append(Tool(name.strip(), description.strip(),
                          parameters if isinstance(parameters, dict) and parameters else dict(EMPTY_SCHEMA)))
    choice, forced = "auto", None
    raw_choice = body.get("tool_choice")
    if isinstance(raw_choice, str):
        choice = {"none": "none", "required": "required", "any": "required"}.get(raw_choice, "auto")
    elif isinstance(raw_choice, dict):
        fn = raw_choice.get("function") if isinstance(raw_choice.get("function"), dict) else raw_choice
        name = fn.get("name")
        if raw_choice.get("type") in ("none",):
            choice = "none"
        elif raw_choice.get("type") in ("required", "any"):
            choice = "required"
        elif isinstance(name, str) and name:
            known = next((t for t in tools if t.name.casefold() == name.casefold()), None)
            flag = next((f for f in flags if f.casefold() == name.strip().casefold()), None)
            if known is None and flag is not None:   # a client that forces a call wants a call back
                known = Tool(flag, "", dict(EMPTY_SCHEMA))
                flags.remove(flag)
            if known is None:
                raise bad_request(f"tool_choice names the function {shown(name)!r}, which is not in 'tools'.",
                                  "tool_choice")
            choice, forced = "function", known.name
            tools = [known]   # forcing one function: offer only that one
    if choice == "none":
        tools = []
    parallel = body.get("parallel_tool_calls")
    return ToolSpec(tuple(tools), tuple(flags), choice, forced, parallel is not False)


def _is_bare_schema(schema: Any) -> bool:
    """No parameters worth the name: none, `{}`, or `{"type": "object", "properties": {}}` and nothing more.
    A schema with anything else (`required`, `additionalProperties`, `title`) was made from a function."""
    if not isinstance(schema, dict) or not schema:
        return True
    return not set(schema) - {"type", "properties"} and schema.get("type", "object") == "object" \
        and not schema.get("properties")


def content_text(content: Any) -> str:
    """The text of an OpenAI message content: a string, or the text parts of an array joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts: list[str] = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            text = part.get("text")
            if kind in ("text", "input_text", "output_text", None) and isinstance(text, str):
                texts.append(text)
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
    return "\n".join(texts)


# ----------------------------------------------------------------------------- images and files in

TEXT_PART_TYPES = {"text", "input_text", "output_text", "refusal", None}
MEDIA_PART_TYPES = {"image_url", "input_image", "image", "file", "input_file", "document", "input_audio"}
MEDIA_URL_KEY_MAX_CHARS = 2048   # a URL up to this long is its own cache key; a longer one is keyed by its hash
SKIPPED_PARTS_LOGGED_COUNT = 3   # skipped parts named in the warning; the rest are only counted
URL_FILE_NAME_MAX_CHARS = 200    # a URL's last segment longer than this is no file name worth keeping


@dataclass(frozen=True)
class Media:
    """An image, file or sound a message carries: inline bytes or a URL for Poe to fetch."""

    where: str             # "messages[1].content[2]", for error messages
    message_index: int
    content_type: str
    name: str
    data: bytes | None = None
    url: str | None = None

    @property
    def cache_key(self) -> str:
        # The whole decoded content is hashed: two files never share a key by accident.
        import hashlib   # here, not at the top: the OpenSSL bindings cost memory a text-only proxy never uses
        if self.data is not None:
            return "sha256:" + hashlib.sha256(self.data).hexdigest()
        url = str(self.url)   # a long URL by its hash: the cache must not keep megabytes of key
        if len(url) <= MEDIA_URL_KEY_MAX_CHARS:
            return "url:" + url
        return "url-sha256:" + hashlib.sha256(url.encode("utf-8", "replace")).hexdigest()


def collect_media(messages: Sequence[Mapping[str, Any]]) -> list[Media]:
    """Every image, file and audio part of the messages, decoded and checked (400 naming the part if
    it cannot be). Unknown part types are skipped with a warning, never refused."""
    found: list[Media] = []
    skipped: list[str] = []   # said in one warning per request: a request of many odd parts is not a log flood
    for i, message in enumerate(messages):
        content = message.get("content")
        parts = content if isinstance(content, list) else [content] if isinstance(content, dict) else []
        for j, part in enumerate(parts):
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            where = f"messages[{i}].content[{j}]"
            if kind in TEXT_PART_TYPES and kind is not None or (kind is None and "text" in part):
                continue
            if kind not in MEDIA_PART_TYPES:
                skipped.append(f"{where}: a content part of unknown type {str(kind)[:40]!r}")
                continue
            media = _media_of(part, kind, where, i, skipped)
            if media is not None:
                found.append(media)
    if skipped:
        log.warning("skipping %d content part(s) this proxy cannot pass on: %s", len(skipped),
                    "; ".join(skipped[:SKIPPED_PARTS_LOGGED_COUNT])
                    + ("; …" if len(skipped) > SKIPPED_PARTS_LOGGED_COUNT else ""))
    return found


def _media_of(part: Mapping[str, Any], kind: str, where: str, index: int,
              skipped: list[str] | None = None) -> Media | None:
    if kind in ("image_url", "input_image"):
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) and isinstance(part.get("file_data"), str):
            url = part["file_data"]
        if not isinstance(url, str) or not url.strip():
            if part.get("file_id"):
                _skip(skipped, where, "a file_id reference, which this proxy cannot resolve")
                return None
            raise bad_request(f"{where}: image_url.url is required.", where)
        mime = value.get("mime_type") if isinstance(value, dict) and isinstance(value.get("mime_type"), str) else ""
        return _media_from_url(url.strip(), where, index, "image", mime)
    if kind in ("image", "document"):   # Anthropic-style blocks: {"source": {"type": "base64"|"url", …}}
        source = part.get("source") if isinstance(part.get("source"), dict) else {}
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return _media_from_url(source["url"], where, index, kind, "")
        data = _decode_part_base64(source.get("data"), where)
        mime = str(source.get("media_type") or guess_content_type("", data))
        return Media(where, index, mime, f"{kind if kind == 'image' else 'document'}.{extension_for(mime)}", data=data)
    if kind == "input_audio":
        audio = part.get("input_audio") if isinstance(part.get("input_audio"), dict) else {}
        fmt = str(audio.get("format") or "wav").lower()
        data = _decode_part_base64(audio.get("data"), where)
        mime = {"mp3": "audio/mpeg", "wav": "audio/wav"}.get(fmt, f"audio/{fmt}")
        return Media(where, index, mime, f"audio.{fmt}", data=data)
    # file / input_file: {"file": {"file_data", "filename"}} or the same keys on the part itself
    spec = part.get("file") if isinstance(part.get("file"), dict) else part
    filename = str(spec.get("filename") or "")
    file_data, file_url = spec.get("file_data"), spec.get("file_url")
    if isinstance(file_data, str) and file_data.strip():
        if file_data.startswith("data:"):
            media = _media_from_url(file_data, where, index, "file", "")
            return dataclasses.replace(media, name=filename or media.name,
                                       content_type=media.content_type if media.content_type not in
                                       ("", "application/octet-stream") else guess_content_type(filename, media.data
                                                                                               or b""))
        data = _decode_part_base64(file_data, where)
        return Media(where, index, guess_content_type(filename, data), filename or "file.bin", data=data)
    if isinstance(file_url, str) and file_url.strip():
        return _media_from_url(file_url.strip(), where, index, "file", "", filename)
    if spec.get("file_id"):
        _skip(skipped, where, "a file_id reference, which this proxy cannot resolve")
        return None
    raise bad_request(f"{where}: the file part has no file_data.", where)


def _skip(skipped: list[str] | None, where: str, why: str) -> None:
    if skipped is None:
        log.warning("%s: skipping %s", where, why)
    else:
        skipped.append(f"{where}: {why}")


def _decode_part_base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{where}: the base64 data is missing.", where)
    try:
        return decode_base64(value)
    except ValueError:
        raise bad_request(f"{where}: the data is not valid base64.", where) from None


def _media_from_url(url: str, where: str, index: int, kind: str, mime: str, filename: str = "") -> Media:
    if url.lower().startswith("data:"):
        try:
            content_type, data = decode_data_url(url)
        except ValueError:
            raise bad_request(f"{where}: the data: URL cannot be decoded (expected data:TYPE;base64,DATA).",
                              where) from None
        content_type = mime or content_type
        return Media(where, index, content_type, filename or f"{kind}.{extension_for(content_type)}", data=data)
    scheme = split_url(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise bad_request(f"{where}: only http(s) and data: URLs are supported.", where)
    name = filename or _name_from_url(url)
    return Media(where, index, mime or guess_content_type(name), name, url=url)


def _name_from_url(url: str) -> str:
    segment = urllib.parse.unquote(split_url(url).path.rsplit("/", 1)[-1])
    if "." in segment and len(segment) <= URL_FILE_NAME_MAX_CHARS:
        return segment
    return "image.jpg" if "/image/" in url else (segment or "file")


_URL_IN_TEXT = re.compile(r"https?://[^\s()<>\[\]\"'`]+")


def carry_over_images(messages: Sequence[Mapping[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """Follow-up edits: the Poe CDN images of the assistant turn just before the last user turn,
    as attachments for that user turn (so "make it blue" can see the picture). (-1, []) if none."""
    last_user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), -1)
    previous = next((i for i in range(last_user - 1, -1, -1) if messages[i].get("role") == "assistant"), -1)
    if last_user < 0 or previous < 0:
        return -1, []
    content = messages[previous].get("content")
    urls = _URL_IN_TEXT.findall(content_text(content))
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and part.get("type") in ("image_url", "input_image"):
            value = part.get("image_url")
            url = value.get("url") if isinstance(value, dict) else value
            if isinstance(url, str):
                urls.append(url)
    found: list[dict[str, Any]] = []
    for url in urls:
        url = url.rstrip(".,;:!?")
        mime = guess_content_type(url)
        if is_poe_cdn(url) and (mime.startswith("image/") or "/image/" in url) \
                and url not in [a["url"] for a in found]:
            found.append({"url": url, "content_type": mime if mime.startswith("image/") else "image/jpeg",
                          "name": _name_from_url(url)})
    return last_user, found


def poe_message(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "content": content, "content_type": "text/markdown"}


# ----------------------------------------------------------------------------- tool calls as text

TOOL_PROMPT = """\
# Tools

You can call the tools listed in <tools> below. To call a tool, write a block in exactly this form:

<tool_call>
<invoke name="TOOL_NAME">
<parameter name="PARAMETER_NAME">value</parameter>
</invoke>
</tool_call>

Rules:
- Use only the tool names and parameter names defined below, with every required parameter.
- Write string values as plain text, exactly as they should be, with no quotes or escaping. Write numbers and
  booleans as they are (42, true), and objects or arrays as JSON. Only a value that itself contains the text
  </parameter> goes inside <![CDATA[ and ]]>.
- Write the block as plain text, not inside a code block.
- {parallel}
- Put any explanation before the tool calls. After your last tool call, stop: the results will be sent to you in
  the next message. Never write a tool result yourself.
- When no tool is needed, answer normally without any <tool_call>.{choice}
"""


def tool_prompt(spec: ToolSpec) -> str:
    """The instruction block and tool catalogue appended to the last user turn (XML tool mode)."""
    parallel = ("To call several tools at once, write one <tool_call> block per call, one after another."
                if spec.parallel else "Call at most one tool per reply.")
    choice = ""
    if spec.choice == "required":
        choice = "\n\nIn this reply you must call at least one tool."
    elif spec.choice == "function" and spec.forced:
        choice = f"\n\nIn this reply you must call the tool {spec.forced}."
    lines = [TOOL_PROMPT.format(parallel=parallel, choice=choice), "<tools>"]
    for tool in spec.tools:
        lines.append(f'<tool name="{_xml_attr(tool.name)}">')
        if tool.description:
            lines.append(f"<description>{tool.description}</description>")
        lines.append(f"<parameters>{_json_compact(tool.parameters)}</parameters>")
        lines.append("</tool>")
    lines.append("</tools>")
    return "\n".join(lines)


def _xml_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _arguments_dict(arguments: Any) -> dict[str, Any] | None:
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            return None
        return value if isinstance(value, dict) else None
    return None


def tool_call_xml(name: str, arguments: Any) -> str:
    """An earlier assistant tool call, written the way the bot is asked to write calls."""
    args = _arguments_dict(arguments)
    if args is None:   # not a JSON object: keep it whole rather than lose it
        params = [("arguments", str(arguments))]
    else:
        params = [(k, v if isinstance(v, str) else _json_compact(v)) for k, v in args.items()]
    body = "".join(f'<parameter name="{_xml_attr(str(k))}">{v}</parameter>\n' for k, v in params)
    return f'<tool_call>\n<invoke name="{_xml_attr(name)}">\n{body}</invoke>\n</tool_call>'


def _call_parts(call: Any) -> tuple[str, str, Any]:
    """(id, name, arguments) of an OpenAI tool call, tolerating odd shapes."""
    if not isinstance(call, dict):
        return "", "", ""
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    return str(call.get("id") or ""), str(fn.get("name") or ""), fn.get("arguments", "")


def _tool_result_text(message: Mapping[str, Any], names: Mapping[str, str], xml: bool) -> str:
    call_id = str(message.get("tool_call_id") or "")
    name = str(message.get("name") or names.get(call_id, ""))
    content = content_text(message.get("content"))
    if xml:
        attrs = f' tool_call_id="{_xml_attr(call_id)}"' if call_id else ""
        attrs += f' name="{_xml_attr(name)}"' if name else ""
        return f"<tool_result{attrs}>\n{content}\n</tool_result>"
    return f"[Result of tool {name or 'call'} {call_id}]\n{content}".rstrip()


def to_poe_messages(messages: list[dict[str, Any]], system_as_user: bool = False, xml_tools: bool = True,
                    attachments: Mapping[int, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """OpenAI messages -> Poe `query` messages, in order; `attachments` by OpenAI message index.

    Assistant tool calls become text in the bot's message, and tool results a user message (several
    results in a row share one), so that every call and every result reaches Poe exactly once.
    """
    query: list[dict[str, Any]] = []
    names: dict[str, str] = {}       # tool_call_id -> function name, from earlier assistant turns
    pending_results: list[str] = []
    pending_files: list[dict[str, Any]] = []
    attachments = attachments or {}

    def flush_results() -> None:
        if pending_results:
            query.append(poe_message("user", "\n\n".join(pending_results)))
            if pending_files:
                query[-1]["attachments"] = list(pending_files)
            pending_results.clear()
            pending_files.clear()

    for i, message in enumerate(messages):
        role = message["role"]
        if role in ("tool", "function"):
            pending_results.append(_tool_result_text(message, names, xml_tools))
            pending_files.extend(attachments.get(i, ()))
            continue
        flush_results()
        poe_role = ROLE_MAP.get(role, "user")
        if poe_role == "system" and system_as_user:
            poe_role = "user"  # replace_response bots take no system prompt
        text = content_text(message.get("content"))
        calls = message.get("tool_calls") if role == "assistant" else None
        if role == "assistant" and not calls and isinstance(message.get("function_call"), dict):
            calls = [{"id": "", "type": "function", "function": message["function_call"]}]   # the legacy form
        if isinstance(calls, list) and calls:
            rendered = []
            for call in calls:
                call_id, name, arguments = _call_parts(call)
                names[call_id] = name
                rendered.append(tool_call_xml(name, arguments) if xml_tools else
                                f"[Called tool {name} {call_id} with arguments {arguments}]")
            text = "\n\n".join(t for t in (text, *rendered) if t)
        query.append(poe_message(poe_role, text))
        if attachments.get(i):
            query[-1]["attachments"] = list(attachments[i])
    flush_results()
    return query


def _native_round(messages: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """Native tool mode: if the conversation ends with an assistant tool-call turn and its results, return
    (where that round starts, Poe `tool_calls`, Poe `tool_results`); else (len(messages), [], [])."""
    end = len(messages)
    start = end
    while start > 0 and messages[start - 1]["role"] == "tool":
        start -= 1
    if start == end or start == 0 or not messages[start - 1].get("tool_calls") \
            or messages[start - 1]["role"] != "assistant":
        return end, [], []
    calls, names = [], {}
    for call in messages[start - 1]["tool_calls"]:
        call_id, name, arguments = _call_parts(call)
        names[call_id] = name
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": name, "arguments": arguments if isinstance(arguments, str)
                                   else _json_compact(arguments)}})
    results = [{"role": "tool", "tool_call_id": str(m.get("tool_call_id") or ""),
                "name": str(m.get("name") or names.get(str(m.get("tool_call_id") or ""), "")),
                "content": content_text(m.get("content"))} for m in messages[start:]]
    return start - 1, calls, results


def _poe_parameters(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Poe's native `tools` need `type` and `properties` (and `required` a list, if any); schemas that
    leave them out are otherwise kept as the client wrote them."""
    out = {**schema, "type": schema.get("type") if isinstance(schema.get("type"), str) else "object",
           "properties": schema.get("properties") if isinstance(schema.get("properties"), dict) else {}}
    if "required" in out and not isinstance(out["required"], list):
        del out["required"]
    return out


def _fold_trailing_system(query: list[dict[str, Any]]) -> None:
    """System messages after the last user turn (Claude Code ends with one) join that user turn: a Poe
    bot answers the last user message, and a query ending in a system message leaves it nothing to answer."""
    trailing: list[dict[str, Any]] = []
    while query and query[-1]["role"] == "system" and any(m["role"] == "user" for m in query[:-1]):
        trailing.insert(0, query.pop())
    if trailing:
        _append_to_last_user(query, "".join("\n\n" + m["content"] for m in trailing if m["content"]))


def _append_to_last_user(query: list[dict[str, Any]], text: str) -> None:
    for message in reversed(query):
        if message["role"] == "user":
            message["content"] = f"{message['content']}{text}" if message["content"] else text.lstrip()
            return
    query.append(poe_message("user", text.lstrip()))


def build_poe_query(chat: ChatRequest, system_as_user: bool = False, tool_mode: str = "xml",
                    attachments: Mapping[int, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The body of a Poe bot `query` request for this chat request (a fastapi_poe QueryRequest).
    `attachments` are the uploaded files by message index (see collect_media)."""
    spec = chat.tools
    native = tool_mode == "native"
    messages = chat.messages
    files = {i: list(found) for i, found in (attachments or {}).items()}
    target, carried = carry_over_images(messages)
    if carried:
        have = {a["url"] for a in files.get(target, ())}
        files.setdefault(target, []).extend(a for a in carried if a["url"] not in have)
    tool_calls: list[dict[str, Any]] = []
    tool_results: list[dict[str, Any]] = []
    carried_files: list[dict[str, Any]] = []
    if native:
        cut, tool_calls, tool_results = _native_round(messages)
        if tool_calls:
            last_text = content_text(messages[cut].get("content"))
            # Poe's tool_results field holds text only: the round's images go with the last user turn.
            carried_files = [a for i in range(cut, len(messages)) for a in files.pop(i, [])]
            messages = messages[:cut] + ([{"role": "assistant", "content": last_text}] if last_text else [])
    query_messages = to_poe_messages(messages, system_as_user, xml_tools=not native, attachments=files)
    _fold_trailing_system(query_messages)
    if carried_files:
        last_user = next((m for m in reversed(query_messages) if m["role"] == "user"), None)
        if last_user is not None:
            last_user.setdefault("attachments", []).extend(carried_files)
    if spec and spec.tools and not native:
        _append_to_last_user(query_messages, "\n\n" + tool_prompt(spec))
    if chat.json_instruction:
        _append_to_last_user(query_messages, "\n\n" + chat.json_instruction)
    # Bot flags go at the very end of the last user turn, after any tool block, where Poe reads them.
    flags = [f"--{flag}" for flag in (spec.flags if spec else ())] + list(chat.flags)
    if flags:
        _append_to_last_user(query_messages, "".join(" " + flag for flag in flags))
    query: dict[str, Any] = {
        "version": POE_PROTOCOL_VERSION,
        "type": "query",
        "query": query_messages,
        "user_id": "",
        "conversation_id": "",
        "message_id": "",
    }
    if spec and spec.tools and native:
        query["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                             "parameters": _poe_parameters(t.parameters)}}
                          for t in spec.tools]
    if tool_calls:
        query["tool_calls"] = tool_calls
        query["tool_results"] = tool_results
    if chat.temperature is not None:
        query["temperature"] = chat.temperature
    if chat.logit_bias:
        query["logit_bias"] = chat.logit_bias
    if chat.stop:
        query["stop_sequences"] = chat.stop
    return query


ATTACHMENT_TOKENS = 765   # what OpenAI bills a typical high-detail 1024x1024 image; Poe reports nothing
MESSAGE_OVERHEAD_TOKENS = 4   # OpenAI's count for each message's framing (role, separators)
REPLY_PRIMING_TOKENS = 2      # ... and for the start of the answer, once per prompt


TOKEN_MEMO_MIN_CHARS = 1024   # shorter texts are counted faster than they are looked up
TOKEN_MEMO_ENTRIES = 4096     # remembered counts; a key and a count, no text, so ~150 bytes each


class TokenMemo:
    """Token counts of long texts already counted, keyed by (length, hash) and kept in LRU order.

    A coding agent sends its whole system prompt and history again with every turn, and estimating
    100 KB of text takes ~15 ms here, so each turn would pay for all the turns before it. No text is
    kept: two texts of one length whose 64-bit hashes collide would share an estimate, which is still
    an estimate (Python's str hash is keyed per process). Counts are kept per `scope` (the caller's
    key): how fast a text is counted must not tell one user whether another has sent it."""

    def __init__(self, max_entries: int = TOKEN_MEMO_ENTRIES) -> None:
        self.max_entries = max_entries
        self._counts: OrderedDict[tuple[int, int], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def estimate(self, text: str, scope: str = "") -> int:
        if len(text) < TOKEN_MEMO_MIN_CHARS:
            return estimate_tokens(text)
        key = (len(text), hash((scope, text)))
        counts = self._counts
        tokens = counts.get(key)
        if tokens is None:
            tokens = counts[key] = estimate_tokens(text)
            if len(counts) > self.max_entries:
                counts.popitem(last=False)
        else:
            counts.move_to_end(key)
        return tokens


def count_prompt_tokens(query: Mapping[str, Any], memo: TokenMemo | None = None, scope: str = "") -> int:
    """Prompt tokens of a Poe query: message texts, native tool fields, and OpenAI's per-message overhead.
    With a memo, long texts counted before in the same scope are not counted again."""
    estimate = estimate_tokens if memo is None else lambda text: memo.estimate(text, scope)
    total = sum(MESSAGE_OVERHEAD_TOKENS + estimate(m.get("content", ""))
                + ATTACHMENT_TOKENS * len(m.get("attachments") or ())
                for m in query.get("query", ())) + REPLY_PRIMING_TOKENS
    for key in ("tools", "tool_calls", "tool_results"):
        if query.get(key):
            total += estimate(_json_compact(query[key]))
    return total


###############################################################################
###############################################################################
# Converters: Poe events -> neutral deltas -> OpenAI chunks / body (pure)
###############################################################################

# Delta kinds. One translator produces them; the stream encoder and the non-stream fold render them,
# so streaming and non-streaming answers cannot drift apart.
TEXT, REASONING, REPLACE, TOOL_START, TOOL_ARGS, FINISH, ERROR = (
    "text", "reasoning", "replace", "tool_start", "tool_args", "finish", "error")


@dataclass(slots=True)
class Delta:
    kind: str
    text: str = ""                   # text, reasoning, replacement, argument piece, or finish reason
    error: ProxyError | None = None
    index: int = 0                   # tool calls: position in this answer, from 0
    call_id: str = ""
    name: str = ""


# ----------------------------------------------------------------------------- reasoning ("Thinking...")

_THINK_MARKERS = ("*Thinking...*", "Thinking...", "*Thinking…*", "Thinking…")
_THINK_TAG, _THINK_END = "<think>", "</think>"


class ThinkingSplitter:
    """Splits a reasoning bot's thoughts from its answer, exactly, however the text is chunked.

    Poe's reasoning bots open with `*Thinking...*` (or `Thinking...`) alone on a line, then quote their
    thoughts as `> ` lines, then a blank line and the answer; others wrap thoughts in `<think>…</think>`.
    Only the very start of an answer is looked at: "Thinking..." later in ordinary text is left alone.
    feed() returns (reasoning, content) text released so far; nothing is held longer than needed to
    decide (a line's first characters, a possible marker or closing tag).
    """

    def __init__(self) -> None:
        self._state = "start"    # start | quote | tag | answer
        self._buf = ""
        self._line = "begin"     # in quote state: begin (at a line start) | reason (inside a > line)
        self._strip_lead = False  # answer after </think>: drop the blank lines that separate it
        self._tag_lead = False    # right after <think>: drop leading blank space

    def feed(self, text: str) -> tuple[str, str]:
        if self._state == "answer" and not self._strip_lead:
            return "", text
        self._buf += text
        return self._run(final=False)

    def end(self) -> tuple[str, str]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            state = self._state
            if state == "start":
                if not self._start(final):
                    break
            elif state == "quote":
                if not self._quote(final, reasoning):
                    break
            elif state == "tag":
                if not self._tag(final, reasoning):
                    break
            else:
                if self._strip_lead:
                    body = self._buf.lstrip()
                    if not body and not final:
                        break   # still only blank: the answer has not begun
                    lead = self._buf[:len(self._buf) - len(body)]
                    cut = max(lead.rfind("\n"), lead.rfind("\r"))
                    self._buf = self._buf[cut + 1:] if body else ""
                    self._strip_lead = False
                content.append(self._buf)
                self._buf = ""
                break
        return "".join(reasoning), "".join(content)

    def _start(self, final: bool) -> bool:
        """Decide whether the answer opens with thoughts. False = wait for more text."""
        body = self._buf.lstrip()
        if body.startswith(_THINK_TAG):
            self._buf = body[len(_THINK_TAG):]
            self._state, self._strip_lead, self._tag_lead = "tag", True, True
            return True
        for marker in _THINK_MARKERS:
            if body.startswith(marker):
                rest = body[len(marker):]
                line_end = min((i for i in (rest.find("\n"), rest.find("\r")) if i != -1), default=-1)
                if line_end == -1:
                    if rest.strip() or final:
                        break          # text on the marker's line: an ordinary answer
                    return False       # the line is not complete yet
                if rest[:line_end].strip():
                    break
                self._buf = rest[line_end + 1:]
                self._state, self._line = "quote", "begin"
                return True
        else:
            if not final and any(m.startswith(body) for m in (*_THINK_MARKERS, _THINK_TAG)):
                return False           # could still become a marker
        self._state = "answer"
        return True

    def _quote(self, final: bool, reasoning: list[str]) -> bool:
        """Inside `> ` thoughts: quoted lines are reasoning; the first other line starts the answer."""
        while self._buf:
            if self._line == "reason":
                cut = _first_line_end(self._buf)
                if cut == -1:
                    reasoning.append(self._buf)
                    self._buf = ""
                    break
                reasoning.append(self._buf[:cut] + "\n")
                self._buf = self._buf[_after_line_end(self._buf, cut):]
                self._line = "begin"
                continue
            body = self._buf.lstrip(" \t")
            if not body:
                break                  # only indentation so far
            if body[0] in "\r\n":      # a blank line: a separator, dropped
                self._buf = body[_after_line_end(body, 0):]
                continue
            if body[0] == ">":
                if len(body) == 1 and not final:
                    break              # is a space after the `>`? wait and see
                self._buf = body[2:] if body[1:2] == " " else body[1:]
                self._line = "reason"
                continue
            self._state = "answer"     # the first unquoted line: the answer, from here on
            return True
        if final:
            self._state = "answer"
            self._buf = "" if not self._buf.strip() else self._buf
            return True
        return False

    def _tag(self, final: bool, reasoning: list[str]) -> bool:
        """Inside <think>…</think>: hold only a possible closing tag and trailing blank space."""
        if self._tag_lead:   # the blank space right after <think> is layout
            self._buf = self._buf.lstrip()
            if not self._buf and not final:
                return False
            self._tag_lead = False
        close = self._buf.find(_THINK_END)
        if close != -1:
            reasoning.append(self._buf[:close].rstrip() if self._buf[:close].strip() else "")
            self._buf = self._buf[close + len(_THINK_END):]
            self._state = "answer"
            return True
        if final:
            reasoning.append(self._buf.rstrip())
            self._buf = ""
            self._state = "answer"
            return True
        keep = 0
        for size in range(min(len(_THINK_END) - 1, len(self._buf)), 0, -1):
            if _THINK_END.startswith(self._buf[-size:]):
                keep = size            # maybe the start of </think>
                break
        head = self._buf[:len(self._buf) - keep]
        keep += len(head) - len(head.rstrip())   # and blank space before it, dropped if the close follows
        release = self._buf[:len(self._buf) - keep]
        if release:
            reasoning.append(release)
        self._buf = self._buf[len(release):]
        return False


def _first_line_end(text: str) -> int:
    positions = [i for i in (text.find("\n"), text.find("\r")) if i != -1]
    return min(positions) if positions else -1


def _after_line_end(text: str, cut: int) -> int:
    return cut + 2 if text[cut:cut + 2] == "\r\n" else cut + 1


# ----------------------------------------------------------------------------- JSON answers

_JSON_OUTSIDE = re.compile(r'[{}\[\]"]')   # what changes the nesting outside a string
_JSON_INSIDE = re.compile(r'["\\]')        # what ends a string, or escapes its next character
_JSON_START = re.compile(r"[{\[]")
_FENCE_TAIL_CHARS = re.compile(r"[\s`]*\Z")
_FENCED_BLOCK = re.compile(r"```[^\n`]*\n(.*?)```", re.S)
MAX_JSON_SEARCH_CHARS = 1024 * 1024   # a longer prose answer is given as it is
MAX_JSON_SEARCH_TRIES = 200           # `{` and `[` in prose tried as the start of a value


def _json_text(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def extract_json(text: str) -> str:
    """The JSON value in a bot's answer: all of it if it parses; else the one fenced block that holds an
    object or array; else the one object (or the one value) in the prose. Unchanged if there is none."""
    body = text.strip()
    if not body or len(body) > MAX_JSON_SEARCH_CHARS:
        return text
    if _json_text(body):
        return body
    fenced = [inner.strip() for inner in _FENCED_BLOCK.findall(body)]
    fenced = [inner for inner in fenced if inner[:1] in ("{", "[") and _json_text(inner)]
    if len(fenced) == 1:
        return fenced[0]
    decoder = json.JSONDecoder()
    found: list[tuple[int, int]] = []
    for tries, match in enumerate(_JSON_START.finditer(body)):
        if tries >= MAX_JSON_SEARCH_TRIES:
            return text
        if found and match.start() < found[-1][1]:
            continue   # inside a value already found
        try:
            _, end = decoder.raw_decode(body, match.start())
        except (ValueError, RecursionError):
            continue
        found.append((match.start(), end))
    objects = [span for span in found if body[span[0]] == "{"]
    span = objects[0] if len(objects) == 1 else found[0] if len(found) == 1 else None
    return body[span[0]:span[1]] if span else text


class JSONAnswer:
    """For JSON answers (response_format, Anthropic's output_config.format): the client gets the JSON
    value, also when the bot fences it or wraps it in prose, the same however the text is chunked.

    An answer that starts as JSON (after an optional ```json line) streams as it comes; what follows the
    end of the value (the closing fence, a remark) is held, and dropped if the value parses. Any other
    answer is held to the end, where extract_json() takes the value out of it."""

    def __init__(self) -> None:
        self._state = "start"     # start | value | after | hold
        self._buf = ""            # start: the opening so far
        self._parts: list[str] = []   # after: what followed the value; hold: the whole answer
        self._fenced = False
        self._value: list[str] = []   # the value's text, as read
        self._held = ""           # fenced: blanks and backticks at the end, maybe the closing fence
        self._depth = 0
        self._in_string = False
        self._escape = False      # a string's backslash ended the last piece

    def feed(self, text: str) -> str:
        if self._state == "value":
            return self._scan(text)
        if self._state != "start":
            self._parts.append(text)
            return ""
        self._buf += text
        body = self._buf.lstrip()
        if body.startswith("```"):
            line_end = body.find("\n")
            rest = body[line_end + 1:].lstrip() if line_end != -1 else ""
            if not rest:
                return ""                            # the fence line, or what follows it, is not there yet
            if rest[0] in "{[":
                self._state, self._fenced, self._buf = "value", True, ""
                return self._scan(rest)
        elif body[:1] in ("{", "["):
            self._state, self._buf = "value", ""
            return self._scan(body)
        elif not body or "```".startswith(body):
            return ""                                # only blanks or a partial fence so far
        self._state, self._parts, self._buf = "hold", [self._buf], ""
        return ""

    def end(self) -> str:
        state, self._state = self._state, "done"
        if state == "value":   # it never closed: out already, but for a closing fence
            stripped = self._held.rstrip()
            return stripped[:-3].rstrip() if stripped.endswith("```") else self._held
        if state == "after":
            tail = "".join(self._parts)
            if _json_text("".join(self._value)):
                return ""
            stripped = tail.rstrip()
            return stripped[:-3].rstrip() if self._fenced and stripped.endswith("```") else tail
        if state in ("start", "hold"):
            return extract_json(self._buf + "".join(self._parts))
        return ""

    def _scan(self, text: str) -> str:
        """Release text up to the end of the value: brackets counted outside strings."""
        pos = 0
        while True:
            if self._escape:
                if pos >= len(text):
                    break
                pos, self._escape = pos + 1, False
            match = (_JSON_INSIDE if self._in_string else _JSON_OUTSIDE).search(text, pos)
            if match is None:
                break
            char, pos = match.group(), match.end()
            if self._in_string:
                if char == "\\":
                    self._escape = True
                else:
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth <= 0:
                    self._state, self._parts = "after", [text[pos:]]
                    self._value.append(text[:pos])
                    out, self._held = self._held + text[:pos], ""
                    return out
        self._value.append(text)
        if not self._fenced:
            return text
        out = self._held + text
        cut = _FENCE_TAIL_CHARS.search(out)
        self._held = out[cut.start():] if cut else ""
        return out[:len(out) - len(self._held)]


# ----------------------------------------------------------------------------- XML tool calls

# Where a call may begin: one of the known start tags, or a fence line (```xml / ```json) right before one.
_NS = r"(?:antml:)?"                                    # Anthropic's namespaced spelling of the same tags
_XML_OPENER = re.compile(rf"<{_NS}(?:tool_call|function_calls|invoke)(?=[\s>/])|<function=")
_CANDIDATE = re.compile(_XML_OPENER.pattern + r"|(?m:^)[ \t]*```")
_OPENER_NAME = re.compile(rf"<{_NS}(tool_call|function_calls|invoke)")
_OPENER_PREFIXES = ("<tool_call", "<function_calls", "<invoke", "<function=",
                    "<antml:function_calls", "<antml:invoke")
_FENCE_LINE = re.compile(r"[ \t]*```+([\w+.\-]*)[ \t]*\r?\n")
_FENCE_LINE_PART = re.compile(r"[ \t]*```+[\w+.\-]*[ \t]*\r?")   # may still become the above
_LINE_START_PART = re.compile(r"[ \t]*`{0,2}")                    # may still become a fence line
_WHITESPACE = re.compile(r"\s*")
_WORD = re.compile(r"[\w.\-]+")
HEAD_LIMIT = 512        # an opening tag not decided within this many characters is prose
MAX_TOOL_BLOCK_CHARS = 4 * 1024 * 1024   # a block that never closes is released as text past this

# The end of a block is found by these tokens, per state, never inside CDATA or a parameter's value.
_CLOSE = {"tool_call": "</tool_call>", "function_calls": f"</{_NS}function_calls>", "invoke": f"</{_NS}invoke>",
          "function": "</function>", "fence": r"\n[ \t]{0,3}```"}
_VALUE_OPENERS = rf"<!\[CDATA\[|<{_NS}parameter\s|<parameter=|<arg_value>"
_TOKENS: dict[str, dict[str, re.Pattern[str]]] = {
    kind: {"tags": re.compile(closer if kind == "fence" else f"{_VALUE_OPENERS}|{closer}"),
           "json": re.compile(closer),
           "value": re.compile(rf"<!\[CDATA\[|</{_NS}parameter>"),          # <parameter name="k">…
           "qvalue": re.compile(r"<!\[CDATA\[|</parameter>|</function>"),  # Qwen's <parameter=k>…
           "avalue": re.compile(r"<!\[CDATA\[|</arg_value>"),              # GLM's <arg_value>…
           "cdata": re.compile(r"\]\]>")}
    for kind, closer in _CLOSE.items()}
_CARRY = 24             # longer than any token: what a search keeps for a token split across events

_INVOKE_TAG = re.compile(rf"""<{_NS}invoke\s+name\s*=\s*["']([^"'<>]+)["'][^<>]*>""")
_PARAM_TAG = re.compile(rf"""<{_NS}parameter\s+name\s*=\s*["']([^"'<>]+)["'][^<>]*>""")
_PARAM_OR_INVOKE_END = re.compile(_PARAM_TAG.pattern + rf"|</{_NS}invoke>|(?=<{_NS}invoke\s)")   # or the next
_PARAM_END = re.compile(rf"<!\[CDATA\[|</{_NS}parameter>")
_FUNCTION_TAG = re.compile(r"<function=([^<>\n]+?)\s*>")
_QPARAM_TAG = re.compile(r"<parameter=([^<>\n]+?)\s*>")
_QPARAM_OR_FUNCTION_END = re.compile(_QPARAM_TAG.pattern + r"|</function>|(?=<function=)")
_QPARAM_END = re.compile(r"<!\[CDATA\[|</parameter>|(?=<parameter=|</function>)")
_ARG_VALUE_END = re.compile(r"<!\[CDATA\[|</arg_value>")
_GLM_PAIR = re.compile(r"\s*<arg_key>\s*(.*?)\s*</arg_key>\s*<arg_value>")
_CHILD = re.compile(r"<([A-Za-z_][\w.\-]*)>(.*?)</\1>", re.S)
_LAYOUT = re.compile(r"(?:\s|</?[A-Za-z_:][\w:.\-]*\s*>)*")    # blanks and bare tags: not prose
_ENTITY = re.compile(r"&(lt|gt|amp|quot|apos|#\d+|#x[0-9a-fA-F]+);")
_JSON_KEY = re.compile(r'\[?\s*\{\s*"([^"\\]{0,40})"\s*:')
_JSON_KEY_PART = re.compile(r'\[?\s*(?:\{\s*(?:"[^"\\]{0,40}(?:"\s*)?)?)?')
_JSON_STRING = re.compile(r'\s*"([^"\\]{0,200})"')
_JSON_STRING_PART = re.compile(r'\s*(?:"[^"\\]{0,200})?')
_JSON_CALL_KEYS = ("name", "type", "function", "arguments", "parameters")


def _clean_value(raw: str) -> str:
    """A parameter value as the model meant it: CDATA unwrapped, layout newlines around it removed, and
    XML entities decoded only when the model clearly escaped (no raw `<` and every `&` an entity)."""
    stripped = raw.strip()
    if stripped.startswith("<![CDATA[") and stripped.endswith("]]>"):
        return stripped[9:-3]
    if "\n" not in stripped:
        value = stripped
    else:   # multi-line: keep inner layout, drop the newline after the tag and the indent before the close
        value = raw[1:] if raw.startswith("\n") else raw
        value = re.sub(r"\n[ \t]*\Z", "", value)
    if "&" in value and "<" not in value and value.count("&") == len(_ENTITY.findall(value)):
        value = _ENTITY.sub(lambda m: _decode_entity(m.group(1)), value)
    return value


def _decode_entity(name: str) -> str:
    try:
        if name.startswith("#x"):
            return chr(int(name[2:], 16))
        if name.startswith("#"):
            return chr(int(name[1:]))
    except (ValueError, OverflowError):
        return f"&{name};"   # not a character: keep the text as the bot wrote it
    return {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}[name]


def _schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    types: list[str] = []
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or []:
            types += [t for t in _schema_types(sub) if t not in types]
    if not types and "properties" in schema:
        return ["object"]
    if not types and "items" in schema:
        return ["array"]
    return types


def coerce_argument(value: str, schema: Any) -> Any:
    """Type a parameter value by its JSON schema; anything that does not fit stays the string it was."""
    try:
        return _coerce(value, _schema_types(schema))
    except (ValueError, OverflowError, RecursionError):   # absurd digits or nesting: keep the text
        return value


def _coerce(value: str, types: list[str]) -> Any:
    text = value.strip()
    for kind in [t for t in types if t != "string"]:
        if kind == "integer" and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if kind == "number":
            if re.fullmatch(r"[+-]?\d+", text):
                return int(text)
            try:
                number = float(text)
                if math.isfinite(number):
                    return number
            except ValueError:
                pass
        if kind == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind == "null" and text.lower() in ("null", "none", ""):
            return None
        if kind in ("object", "array"):
            try:
                parsed = json.loads(text)
            except (ValueError, RecursionError):
                continue
            if isinstance(parsed, dict if kind == "object" else list):
                return parsed
    return value


def _typed_arguments(raw_args: Mapping[str, str], tool: Tool) -> dict[str, Any]:
    properties = tool.parameters.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    spelled = {str(k).casefold(): k for k in properties}
    # A parameter written in another case ("Path" for "path") takes the schema's spelling and type.
    raw_args = {(k if k in properties else spelled.get(k.casefold(), k)): v for k, v in raw_args.items()}
    return {key: coerce_argument(value, properties.get(key)) if key in properties else value
            for key, value in raw_args.items()}


def _typed_json_arguments(args: Mapping[str, Any], tool: Tool) -> dict[str, Any]:
    """JSON arguments keep their JSON types; only a string where the schema wants another type is typed."""
    properties = tool.parameters.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    spelled = {str(k).casefold(): k for k in properties}
    out: dict[str, Any] = {}
    for key, value in args.items():
        key = key if key in properties else spelled.get(str(key).casefold(), key)
        out[key] = coerce_argument(value, properties[key]) if isinstance(value, str) and key in properties else value
    return out


def _value_end(text: str, pos: int, ends: re.Pattern[str]) -> tuple[int, int]:
    """Where a value that starts at `pos` ends and where its closing tag ends, skipping CDATA; -1s if open."""
    while True:
        match = ends.search(text, pos)
        if match is None:
            return -1, -1
        if match.group() != "<![CDATA[":
            return match.start(), match.end()
        close = text.find("]]>", match.end())
        if close == -1:
            return -1, -1
        pos = close + 3


def _is_layout(text: str) -> bool:
    return _LAYOUT.fullmatch(text) is not None


class _Block:
    """A block that may be a call, from its start up to its end tag, which it finds incrementally: each new
    piece is searched once (with a few characters carried over for a tag split across pieces), and the
    pieces are joined only once the block is complete."""

    __slots__ = ("kind", "skip", "give", "fence", "origin", "parts", "size", "carry", "state", "back")

    def __init__(self, kind: str, state: str, skip: int, give: int, fence: bool, origin: int) -> None:
        self.kind = kind        # tool_call | function_calls | invoke | function | fence (a ```json block)
        self.skip = skip        # characters before the call itself: a ``` line around it
        self.give = give        # characters released as text if the block is no call after all
        self.fence = fence      # it starts with a ``` line (released, it opens a code block)
        self.origin = origin    # where it starts in the whole answer
        self.parts: list[str] = []
        self.size = 0
        self.carry = ""
        self.state = state      # tags | json | value | qvalue | avalue | cdata
        self.back = state       # the state CDATA returns to

    def feed(self, text: str) -> int:
        """Take a piece; where in it the block ends (just past its end tag), or -1."""
        tokens = _TOKENS[self.kind]
        window = self.carry + text
        base = len(self.carry)
        pos = 0
        while True:
            match = tokens[self.state].search(window, pos)
            if match is None:
                break
            token, pos = match.group(), match.end()
            if self.state == "cdata":
                self.state = self.back
            elif token == "<![CDATA[":
                self.back, self.state = self.state, "cdata"
            elif self.state in ("tags", "json"):
                if token.startswith("</") or self.kind == "fence":
                    end = pos - base
                    self.parts.append(text[:end])
                    self.size += end
                    return end
                self.state = "qvalue" if token == "<parameter=" else "avalue" if token == "<arg_value>" else "value"
            elif token == "</function>":   # Qwen left out </parameter>: the function's end ends the value
                self.state, pos = "tags", match.start()
            else:
                self.state = "tags"
        self.carry = window[max(pos, len(window) - _CARRY):]
        self.parts.append(text)
        self.size += len(text)
        return -1

    def text(self) -> str:
        whole = "".join(self.parts)
        self.parts = [whole]
        return whole


_Call = tuple[Tool, dict[str, Any]]


class XMLToolParser:
    """Finds tool calls in streamed text and turns them into tool-call deltas.

    Our format is `<tool_call><invoke name=…><parameter name=…>…`; what models write instead of it is
    recovered too: the same in a code fence or missing its last end tags, Hermes/Qwen JSON in
    <tool_call>, Anthropic's <function_calls>, Qwen3-Coder's <function=…>, GLM's <arg_key>/<arg_value>
    and a JSON call object in a ```json fence. Only calls to offered tools are made.

    Text before a call goes out at once. Only a tail that could still be the start of a call is held
    back, and text that merely mentions a tag is released as soon as it cannot be a call, so the
    stream never stalls. Splitting the input differently never changes the output. Each character is
    searched a bounded number of times, so the cost is linear in the text.
    """

    def __init__(self, spec: ToolSpec, make_id: Callable[[], str] = lambda: new_id("call_")) -> None:
        self._spec = spec
        self._make_id = make_id
        self._buf = ""                      # text not yet released, nor part of a block
        self._block: _Block | None = None   # a block that may be a call, being read
        self._last = ""                     # the last character released (or dropped)
        self._consumed = 0                  # characters released, dropped or made into calls so far
        self._dead: dict[str, int] = {}     # kind -> where the last block of that kind that was no call ends
        self._in_code = False               # released text is inside a ``` code block
        self.calls = 0
        self.stopped = False                # parallel_tool_calls=false and a call was made

    def feed(self, text: str) -> list[Delta]:
        return [] if self.stopped else self._push(text, final=False)

    def end(self) -> list[Delta]:
        return [] if self.stopped else self._push("", final=True)

    # -- driving

    def _push(self, text: str, final: bool) -> list[Delta]:
        out: list[Delta] = []
        pending: str | None = text
        while not self.stopped:
            block = self._block
            if block is not None:
                end = block.feed(pending or "")
                if end == -1 and not final and block.size <= MAX_TOOL_BLOCK_CHARS:
                    break
                self._block = None
                rest = (pending or "")[end:] if end != -1 else ""
                self._buf = self._close(block, end != -1, out) + rest
            else:
                self._buf += pending or ""
            pending = self._scan(final, out)
            if pending is None:
                break
        return _merge_text(out)

    def _release(self, text: str, out: list[Delta]) -> None:
        if not text:
            return
        self._last = text[-1]
        self._consumed += len(text)
        if self.calls:   # prose after a call is the model talking past its turn: drop it
            if text.strip():
                log.debug("dropping %d characters the bot wrote after its tool calls", len(text))
            return
        out.append(Delta(TEXT, text))

    def _scan(self, final: bool, out: list[Delta]) -> str | None:
        """Release the buffer up to the next possible call. Returns the text of a block that begins
        there (now `_block`), or None once the buffer is released or waits for more text."""
        buf, pos = self._buf, 0
        while True:
            match = _CANDIDATE.search(buf, pos)
            if match is None:
                hold = len(buf) if final else self._holdback(buf, pos)
                self._release(buf[pos:hold], out)
                self._buf = buf[hold:]
                return None
            start = match.start()
            self._release(buf[pos:start], out)
            in_code = self._in_code and not self.calls
            tag = buf[start] == "<"
            if tag:
                if in_code or self._last == "`":   # a mention: `<tool_call>`, or code being shown
                    verdict = "text"
                else:
                    verdict, kind, state = self._head(buf, start, final)
            elif start == 0 and self._last not in ("", "\n"):
                verdict = "prose"                  # ``` in the middle of a line
            elif in_code:
                self._in_code = False              # the end of a code block
                verdict = "prose"
            else:
                verdict, kind, state, skip = self._fence_head(buf, start, final)
            if verdict == "commit" and self._consumed < self._dead.get(kind, -1):
                # Inside a block of the same kind that was no call: it was read as a whole already, and
                # reading each nested opener to the same end again would cost quadratic time.
                verdict = "text"
            if verdict == "more":
                self._buf = buf[start:]
                return None
            if verdict in ("text", "prose"):
                give = 1 if tag else match.end() - start
                if verdict == "text" and not tag:
                    self._in_code = True           # an ordinary code block opens
                self._release(buf[start:start + give], out)
                pos = start + give
                continue
            give = 1 if tag else match.end() - start
            self._block = _Block(kind, state, 0 if tag else skip, give, not tag, self._consumed)
            self._buf = ""
            return buf[start:]

    def _holdback(self, buf: str, pos: int) -> int:
        """Where the tail that might still become a call (or the fence line before one) begins."""
        hold = len(buf)
        line = buf.rfind("\n", pos) + 1
        if (line or self._last in ("", "\n")) and _LINE_START_PART.fullmatch(buf, max(line, pos)):
            hold = max(line, pos)
        if self._in_code and not self.calls:
            return hold
        cut = buf.rfind("<", max(pos, len(buf) - 22))
        if cut != -1 and (buf[cut - 1] if cut > pos else self._last) != "`":
            tail = buf[cut:]
            if any(name.startswith(tail) for name in _OPENER_PREFIXES):
                hold = min(hold, cut)
        return hold

    # -- is this the start of a call?

    def _head(self, buf: str, start: int, final: bool) -> tuple[str, str, str]:
        """For an opening tag at `start`: "more" (cannot tell yet), "text" or "commit", the block kind and
        the state to read it in. Decided within HEAD_LIMIT characters, so mentions never stall."""
        undecided = ("text" if final or len(buf) - start > HEAD_LIMIT else "more", "", "")
        limit = start + HEAD_LIMIT
        gt = buf.find(">", start, limit)
        if gt == -1:
            return ("text", "", "") if buf.find("<", start + 1, limit) != -1 else undecided
        tag = buf[start:gt + 1]
        if "<" in tag[1:]:
            return "text", "", ""
        if tag.startswith("<function="):
            kind, name = "function", tag[10:-1]
        else:
            kind = _OPENER_NAME.match(tag).group(1)   # type: ignore[union-attr]
            invoke = _INVOKE_TAG.fullmatch(tag)
            name = invoke.group(1) if invoke else ""
            if kind == "invoke" and not invoke:
                return "text", "", ""
        if kind in ("invoke", "function") and self._find(name) is None:
            return "text", "", ""              # never a call to a tool that was not offered
        rest = _WHITESPACE.match(buf, gt + 1, limit).end()   # type: ignore[union-attr]
        if rest >= min(len(buf), limit):
            return undecided
        first = buf[rest]
        if first == "<":
            if kind in ("invoke", "function"):   # a parameter, or the end tag: a call without arguments
                if rest + 1 == len(buf):
                    return undecided
                char = buf[rest + 1]
                return ("commit", kind, "tags") if char.isalpha() or char == "/" else ("text", "", "")
            # A wrapper holds one of the known elements, not just any markup.
            inner = buf[rest + 1:rest + 1 + 64].casefold()
            known = ["invoke", "antml:invoke"] + ([] if kind == "function_calls" else
                                                  ["function=", "name>", *(t.name.casefold() + ">"
                                                                           for t in self._spec.tools)])
            if any(inner.startswith(element) for element in known):
                return "commit", kind, "tags"
            if any(element.startswith(inner) for element in known):
                return undecided
            return "text", "", ""
        if kind != "tool_call":
            return "text", "", ""
        if first in "{[":
            return "commit", kind, "json"          # Hermes / Qwen: JSON in <tool_call>
        word = _WORD.match(buf, rest, limit)
        if word is None:
            return "text", "", ""
        if word.end() >= min(len(buf), limit):                 # GLM: the tool's name, perhaps not whole yet
            folded = word.group().casefold()
            if not any(t.name.casefold().startswith(folded) for t in self._spec.tools):
                return "text", "", ""
            return ("commit", kind, "tags") if final and self._find(word.group()) else undecided
        if self._find(word.group()) is None:
            return "text", "", ""
        after = _WHITESPACE.match(buf, word.end(), limit).end()   # type: ignore[union-attr]
        if after >= min(len(buf), limit):
            return ("commit", kind, "tags") if final else undecided
        return ("commit", kind, "tags") if buf[after] == "<" else ("text", "", "")

    def _fence_head(self, buf: str, start: int, final: bool) -> tuple[str, str, str, int]:
        """For a ``` line at `start` (not in a code block): is a call inside it? Also gives the length of
        what comes before the call (the fence line and blanks)."""
        undecided = ("text" if final or len(buf) - start > HEAD_LIMIT else "more", "", "", 0)
        line = _FENCE_LINE.match(buf, start)
        if line is None:
            return undecided if _FENCE_LINE_PART.fullmatch(buf, start) else ("text", "", "", 0)
        after = _WHITESPACE.match(buf, line.end(), start + HEAD_LIMIT).end()   # type: ignore[union-attr]
        if after >= min(len(buf), start + HEAD_LIMIT):
            return undecided
        if _XML_OPENER.match(buf, after):
            verdict, kind, state = self._head(buf, after, final)
            return verdict, kind, state, after - start
        if buf[after] == "<" and not final and any(n.startswith(buf[after:after + 22]) for n in _OPENER_PREFIXES):
            return undecided
        if buf[after] in "{[" and line.group(1).lower() in ("json", ""):
            verdict = self._json_head(buf, after, final)
            return verdict, "fence", "tags", line.end() - start
        return "text", "", "", 0

    def _json_head(self, buf: str, start: int, final: bool) -> str:
        """Does the JSON at `start` begin like a call object ({"name": an offered tool, …})?"""
        undecided = "text" if final or len(buf) - start > HEAD_LIMIT else "more"
        key = _JSON_KEY.match(buf, start)
        if key is None:
            return undecided if _JSON_KEY_PART.fullmatch(buf, start) else "text"
        if key.group(1) not in _JSON_CALL_KEYS:
            return "text"
        if key.group(1) not in ("name", "type"):
            return "commit"
        value = _JSON_STRING.match(buf, key.end())
        if value is None:
            return undecided if _JSON_STRING_PART.fullmatch(buf, key.end()) else "text"
        if key.group(1) == "type":
            return "commit" if value.group(1) == "function" else "text"
        return "commit" if self._find(value.group(1)) is not None else "text"

    def _find(self, name: str) -> Tool | None:
        tool = self._spec.find(name)
        if tool is None and name.strip().startswith("functions."):   # OpenAI's namespace for tools
            tool = self._spec.find(name.strip()[10:])
        return tool

    # -- a block is complete (or the answer ended inside it)

    def _close(self, block: _Block, closed: bool, out: list[Delta]) -> str:
        """Make the block's calls, or give it back as text; returns the text to scan on."""
        text = block.text()
        calls = None if block.size > MAX_TOOL_BLOCK_CHARS else self._recognise(block, text, closed)
        if calls:
            self._last = text[-1]
            self._consumed += len(text)
            for tool, arguments in calls:
                if self.stopped:
                    break
                index = self.calls
                self.calls += 1
                out.append(Delta(TOOL_START, index=index, call_id=self._make_id(), name=tool.name))
                out.append(Delta(TOOL_ARGS, _json_compact(arguments), index=index))
                if not self._spec.parallel:
                    self.stopped = True
            return ""
        # Not a call after all: release its first characters (a fence opens a code block) and scan on.
        if block.fence:
            self._in_code = True
        self._dead[block.kind] = block.origin + len(text)
        self._release(text[:block.give], out)
        return text[block.give:]

    def _recognise(self, block: _Block, text: str, closed: bool) -> list[_Call] | None:
        """The calls in a block. One the answer ended inside counts only if nothing in it reads as prose
        (a bot cut off after its last parameter), never a sentence that happens to contain a tag."""
        body = text[block.skip:]
        if block.kind == "fence":
            inner = body[:body.rfind("\n")] if closed else body.rstrip().rstrip("`")
            return self._json_calls(inner)
        if block.kind in ("invoke", "function"):
            inner, head = body, ""
        else:
            gt = body.find(">")
            head, inner = body[:gt + 1], body[gt + 1:]
            if closed:
                inner = inner[:inner.rfind("</")]
        calls, clean = self._xml_calls(block.kind, inner)
        return calls if calls and (closed or clean) else None

    def _xml_calls(self, kind: str, inner: str) -> tuple[list[_Call], bool]:
        if kind == "tool_call":
            stripped = inner.strip()
            if stripped[:1] in ("{", "["):
                calls = self._json_calls(stripped)
                return calls or [], True
            if "<function=" in inner and not _INVOKE_TAG.search(inner):
                return self._qwen_calls(inner)
            if _INVOKE_TAG.search(inner) is None:
                glm = self._glm_call(inner)
                if glm[0]:
                    return glm
                legacy = self._legacy(stripped)
                return ([legacy], False) if legacy else ([], False)
        if kind == "function":
            return self._qwen_calls(inner)
        return self._invoke_calls(inner)

    def _invoke_calls(self, text: str) -> tuple[list[_Call], bool]:
        """<invoke name="X"><parameter name="k">v</parameter>…</invoke>, any number of them."""
        calls: list[_Call] = []
        clean, pos = True, 0
        while (invoke := _INVOKE_TAG.search(text, pos)) is not None:
            clean = clean and _is_layout(text[pos:invoke.start()])
            params: dict[str, str] = {}
            pos, closed = invoke.end(), False
            while (found := _PARAM_OR_INVOKE_END.search(text, pos)) is not None:
                clean = clean and _is_layout(text[pos:found.start()])
                if found.group(1) is None:                  # </invoke>, or the next one begins
                    pos, closed = found.end(), bool(found.group())
                    break
                end, after = _value_end(text, found.end(), _PARAM_END)
                if end == -1:                               # cut off inside a value
                    clean, pos = False, len(text)
                    break
                params[found.group(1).strip()] = _clean_value(text[found.end():end])
                pos = after
            else:
                clean = clean and _is_layout(text[pos:])
                pos = len(text)
            tool = self._find(invoke.group(1))
            if tool is None:
                continue
            if not params:   # the older <invoke name="X"><k>v</k></invoke>
                body = text[invoke.end():pos]
                params = {m.group(1): _clean_value(m.group(2)) for m in _CHILD.finditer(body)}
            calls.append((tool, _typed_arguments(params, tool)))
        return calls, clean and _is_layout(text[pos:])

    def _qwen_calls(self, text: str) -> tuple[list[_Call], bool]:
        """Qwen3-Coder: <function=X><parameter=k>v</parameter>…</function>, `</parameter>` optional."""
        calls: list[_Call] = []
        clean, pos = True, 0
        while (function := _FUNCTION_TAG.search(text, pos)) is not None:
            clean = clean and _is_layout(text[pos:function.start()])
            params: dict[str, str] = {}
            pos = function.end()
            while (found := _QPARAM_OR_FUNCTION_END.search(text, pos)) is not None:
                clean = clean and _is_layout(text[pos:found.start()])
                if found.group(1) is None:                  # </function>, or the next one begins
                    pos = found.end()
                    break
                end, after = _value_end(text, found.end(), _QPARAM_END)
                if end == -1:
                    clean, pos = False, len(text)
                    break
                params[found.group(1).strip()] = _clean_value(text[found.end():end])
                pos = after
            else:
                clean = clean and _is_layout(text[pos:])
                pos = len(text)
            tool = self._find(function.group(1))
            if tool is not None:
                calls.append((tool, _typed_arguments(params, tool)))
        return calls, clean and _is_layout(text[pos:])

    def _glm_call(self, text: str) -> tuple[list[_Call], bool]:
        """GLM-4.5/4.6: NAME<arg_key>k</arg_key><arg_value>v</arg_value>…"""
        name = _WORD.match(text, _WHITESPACE.match(text).end())   # type: ignore[union-attr]
        tool = self._find(name.group()) if name else None
        if name is None or tool is None:
            return [], False
        params: dict[str, str] = {}
        pos, clean = name.end(), True
        while (pair := _GLM_PAIR.match(text, pos)) is not None:
            end, after = _value_end(text, pair.end(), _ARG_VALUE_END)
            if end == -1:
                clean, pos = False, len(text)
                break
            params[pair.group(1)] = _clean_value(text[pair.end():end])
            pos = after
        rest = text[pos:]
        if rest.strip() and not _is_layout(rest):
            return [], False   # something else after the name: not GLM's form
        return [(tool, _typed_arguments(params, tool))], clean

    def _json_calls(self, text: str) -> list[_Call] | None:
        """{"name": …, "arguments": {…}} (or "parameters", or OpenAI's {"type": "function", "function": …}),
        or a list of them; all must name offered tools."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return None
        calls = [self._json_call(item) for item in (data if isinstance(data, list) else [data])]
        return calls if calls and all(calls) else None   # type: ignore[return-value]

    def _json_call(self, data: Any) -> _Call | None:
        if isinstance(data, dict) and isinstance(data.get("function"), dict):
            data = data["function"]
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        tool = self._find(data["name"])
        args = _arguments_dict(data.get("arguments", data.get("parameters", {})))
        return (tool, _typed_json_arguments(args, tool)) if tool and args is not None else None

    def _legacy(self, inner: str) -> _Call | None:
        named = re.search(r"<name>\s*(.*?)\s*</name>", inner, re.S)
        if named:   # <name>X</name><arguments>{…}</arguments>
            tool = self._find(named.group(1))
            raw = re.search(r"<arguments>(.*?)</arguments>", inner, re.S)
            if tool is None:
                return None
            args = _arguments_dict(raw.group(1).strip()) if raw else {}
            if args is None:
                args = _typed_arguments({m.group(1): _clean_value(m.group(2))
                                         for m in _CHILD.finditer(raw.group(1))}, tool) if raw else {}
            return tool, args
        bare = re.fullmatch(r"<([A-Za-z_][\w.\-]*)>(.*)</\1>", inner, re.S)   # <toolname><k>v</k></toolname>
        if bare and (tool := self._find(bare.group(1))) is not None:
            return tool, _typed_arguments({m.group(1): _clean_value(m.group(2))
                                           for m in _CHILD.finditer(bare.group(2))}, tool)
        return None


def _merge_text(deltas: list[Delta]) -> list[Delta]:
    """Adjacent text deltas of one feed as one."""
    out: list[Delta] = []
    run: list[str] = []
    for delta in [*deltas, Delta(FINISH)]:
        if delta.kind == TEXT:
            run.append(delta.text)
            continue
        if run:
            out.append(Delta(TEXT, "".join(run)))
            run = []
        out.append(delta)
    return out[:-1]


# ----------------------------------------------------------------------------- files out

_REF_LINK = re.compile(r"\]\[([^\[\]\s]{1,200})\]")
_REF_TAIL = re.compile(r"\](?:\[[^\[\]\s]{0,200})?\Z")
MAX_HELD_REF_CHARS = 4096
_IMAGE_ALT = re.compile(r"!\[[^\[\]\n]{0,200}\Z")


def _is_image_ref(text: str, bracket: int) -> bool:
    """Whether the `][ref]` at `bracket` closes an image reference `![alt][ref]`. Only those wait for
    their file: `[text][1]` or `m[0][1]` are ordinary text and must never hold up the stream."""
    return _IMAGE_ALT.search(text, max(0, bracket - 202), bracket) is not None


class FileRefs:
    """Every file Poe sends reaches the client. Reference-style links to them (`![cat][ref]`) become
    inline links (`![cat](url)`), also when the text names the file before its `file` event arrives
    (that text is held back, at most MAX_HELD_REF_CHARS); files never referenced are appended as links
    at the end, images as images."""

    def __init__(self) -> None:
        self._files: dict[str, str] = {}             # inline_ref -> url
        self._all: list[tuple[str, str, str, str]] = []   # (ref, url, name, content type), in arrival order
        self._used: set[str] = set()
        self._held = ""
        self._tail = ""                              # the end of what was released

    def feed(self, text: str) -> str:
        if not self._held and "]" not in text:   # no reference can start or end here: most pieces
            return self._remember(text)
        held, self._held = self._held, ""
        return self._release(held + text, final=False)

    def replace(self, text: str) -> str:
        self._held = self._tail = ""
        return self._release(text, final=False)

    def add(self, data: Mapping[str, Any]) -> str:
        url = data.get("url")
        if not isinstance(url, str) or not url:
            return ""
        ref = data.get("inline_ref") if isinstance(data.get("inline_ref"), str) else ""
        name = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else "file"
        self._all.append((ref, url, name, str(data.get("content_type") or guess_content_type(name))))
        if ref:
            self._files[ref] = url
        return self.feed("") if self._held else ""

    def flush(self) -> str:
        """The end of the answer: text still waiting for a file is released as it is."""
        held, self._held = self._held, ""
        return self._release(held, final=True)

    def links(self) -> str:
        """Links to the files the text never named, images as images."""
        out = ""
        for ref, url, name, content_type in self._all:
            if ref not in self._used:
                bang = "!" if content_type.startswith("image/") else ""
                out += f"\n\n{bang}[{name}]({url})"
        return out

    def _release(self, text: str, final: bool) -> str:
        out: list[str] = []
        pos = 0
        for match in _REF_LINK.finditer(text):
            ref = match.group(1)
            if ref in self._files:
                out.append(text[pos:match.start()] + f"]({self._files[ref]})")
                self._used.add(ref)
                pos = match.end()
            elif (not final and len(text) - match.start() <= MAX_HELD_REF_CHARS
                  and _is_image_ref(self._tail + text, len(self._tail) + match.start())):
                out.append(text[pos:match.start()])    # an image whose file may still come: wait for it
                self._held = text[match.start():]
                return self._remember("".join(out))
        rest = text[pos:]
        tail = None if final else _REF_TAIL.search(rest)
        if tail is not None:   # a `]` that may become `][ref]`
            self._held = rest[tail.start():]
            rest = rest[:tail.start()]
        out.append(rest)
        return self._remember("".join(out))

    def _remember(self, released: str) -> str:
        self._tail = (self._tail + released)[-210:]   # enough to see the `![alt` of a reference later
        return released


# The largest answer a non-streamed request gathers (bytes of text, reasoning and tool arguments):
# the MAX_ANSWER_SIZE setting, in force for the request being handled (the app sets it per request).
MAX_ANSWER_SIZE = 64 * 1024 * 1024
answer_limit: contextvars.ContextVar[int] = contextvars.ContextVar("answer_limit", default=MAX_ANSWER_SIZE)


def answer_too_large(limit: int) -> ProxyError:
    return upstream_error(f"The bot's answer is larger than MAX_ANSWER_SIZE ({limit} bytes); ask for a shorter "
                          "answer or stream it.", 502, "answer_too_large")


# ----------------------------------------------------------------------------- the translator

class _NativeCall:
    """A native tool call gathered from Poe's `json` deltas until it can be given out (it has a name, or,
    for dialects that take calls whole, the answer ended). Its arguments are kept as pieces and bounded
    by MAX_ANSWER_SIZE: a bot streaming a large file into a call must not grow memory without end."""

    __slots__ = ("id", "name", "index", "pieces", "size", "_limit")

    def __init__(self, limit_bytes: int) -> None:
        self.id = ""
        self.name = ""
        self.index = -1          # ours, once given out
        self.pieces: list[str] = []
        self.size = 0
        self._limit = limit_bytes

    def add(self, piece: str) -> None:
        self.size += len(piece)
        if self.size > self._limit:
            self.pieces = []
            raise answer_too_large(self._limit)
        self.pieces.append(piece)

    def arguments(self) -> str:
        return "".join(self.pieces)


class PoeTranslator:
    """Turns Poe SSE events into neutral deltas; `finished` once `done` or `error` was seen.

    Text runs through the thinking splitter, file references, the tool-call parser (XML mode) and, for
    JSON answers, JSONAnswer; `replace_response` goes the same way. Native tool calls arrive as `json`
    events and are taken in either tool mode whenever the request offered tools, numbered with the
    XML calls.
    """

    def __init__(self, tools: ToolSpec | None = None, native_tools: bool = False,
                 make_id: Callable[[], str] = lambda: new_id("call_"), json_answer: bool = False,
                 whole_calls: bool = False) -> None:
        self.finished = False
        self.saw_done = False
        self.tool_calls = 0
        self._make_id = make_id
        self._spec = tools
        self._offered = tools is not None and bool(tools.tools)
        self._xml = XMLToolParser(tools, make_id) if self._offered and not native_tools and tools else None
        self._xml_index: dict[int, int | None] = {}          # the parser's call index -> ours (None: dropped)
        self._parallel = tools.parallel if tools is not None else True
        self._claimed = 0                                    # calls taken, given out yet or not
        self._native_calls: dict[int, _NativeCall] = {}      # by Poe's tool-call index
        self._whole_calls = whole_calls                      # give native calls out whole, at the end
        # Read now, while the request is handled: a stream's later events are read outside its context.
        self._limit = answer_limit.get()
        # The answer's text after thoughts, for replace_response: remembered by its digest, not kept.
        self._seen = TextDigest()
        self._refs = FileRefs()
        self._think = ThinkingSplitter()
        self._shape = JSONAnswer() if json_answer else None

    def feed(self, event: SSEEvent) -> list[Delta]:
        if self.finished:
            return []
        name = event.event
        if name not in ("text", "replace_response", "error", "done", "file", "json"):
            return []  # meta, suggested_reply, data, ping: nothing for the client
        try:
            data = load_event_json(event.data)
        except (ValueError, RecursionError):
            log.warning("Poe sent a %s event whose data is not JSON; ignored", name)
            return []
        if not isinstance(data, dict):
            data = {}
        if name == "text":
            text = data.get("text")
            return self._answer(text) if isinstance(text, str) and text else []
        if name == "replace_response":
            text = data.get("text")
            reasoning, content = self._think.end()   # a replacement is the answer itself: stop looking for thoughts
            out = [Delta(REASONING, reasoning)] if reasoning else []
            if content:
                out += self._content(content)
            return out if self.finished else out + self._replace(text if isinstance(text, str) else "")
        if name == "file":
            return self._text(self._refs.add(data))
        if name == "json":
            return self._json(data)
        if name == "done":
            self.saw_done = True
            return self._finish()
        self.finished = True
        return [Delta(ERROR, error=classify_poe_error(data))]

    def end(self) -> list[Delta]:
        """Poe's body ended cleanly. Without `done` we still finish: what we got is the answer."""
        if self.finished:
            return []
        log.warning("Poe ended the answer without a `done` event; finishing it here")
        return self._finish()

    def _answer(self, text: str, final: bool = False) -> list[Delta]:
        """Bot text: thoughts split off first, then the answer goes on."""
        reasoning, content = self._think.end() if final else self._think.feed(text)
        out = [Delta(REASONING, reasoning)] if reasoning else []
        return out + self._content(content) if content else out

    def _content(self, content: str) -> list[Delta]:
        self._seen.add(content)
        return self._text(self._refs.feed(content))

    def _finish(self) -> list[Delta]:
        if self.finished:
            return []
        self.finished = True   # first: the stages flushed below may end the answer themselves
        out = self._answer("", final=True)
        out += self._text(self._refs.flush())
        if self._xml is not None:
            out += self._shaped(self._numbered(self._xml.end()))
        if self._shape is not None:
            held = self._shape.end()
            if held:
                out.append(Delta(TEXT, held))
        out += self._native_deltas()
        links = self._refs.links()   # files the text never named: links at the very end, after any calls
        if links:
            out.append(Delta(TEXT, links))
        out.append(Delta(FINISH, "tool_calls" if self.tool_calls else "stop"))
        return out

    def _text(self, text: str) -> list[Delta]:
        """Answer text with file links in place: tool calls taken out, then shaped as JSON if asked."""
        if not text:
            return []
        if self._xml is None:
            return self._shaped([Delta(TEXT, text)])
        out = self._shaped(self._numbered(self._xml.feed(text)))
        if self._xml.stopped and not self.finished:   # parallel_tool_calls=false: one call is the whole answer
            out += self._finish()
        return out

    def _shaped(self, deltas: list[Delta]) -> list[Delta]:
        if self._shape is None:
            return deltas
        out: list[Delta] = []
        for delta in deltas:
            if delta.kind == TEXT:
                delta.text = self._shape.feed(delta.text)
                if not delta.text:
                    continue
            out.append(delta)
        return out

    def _numbered(self, deltas: list[Delta]) -> list[Delta]:
        """The parser's calls in the answer's numbering (shared with native calls); with
        parallel_tool_calls=false, a call after the first is dropped."""
        out: list[Delta] = []
        for delta in deltas:
            if delta.kind == TOOL_START:
                if not self._parallel and self._claimed:
                    self._xml_index[delta.index] = None
                    continue
                self._xml_index[delta.index] = self.tool_calls
                delta.index = self.tool_calls
                self.tool_calls += 1
                self._claimed += 1
            elif delta.kind == TOOL_ARGS:
                index = self._xml_index.get(delta.index)
                if index is None:
                    continue
                delta.index = index
            out.append(delta)
        return out

    def _replace(self, text: str) -> list[Delta]:
        tail = self._seen.unseen(text)
        if tail is not None:
            return self._content(tail) if tail else []
        # A different answer: the stages start over on it. Its first text is a REPLACE delta, so a fold
        # keeps exactly the new answer and a stream shows what it can (see the encoders).
        self._seen.reset(text)
        if self._xml is not None and self._spec is not None:
            self._xml, self._xml_index = XMLToolParser(self._spec, self._make_id), {}
        if self._shape is not None:
            self._shape = JSONAnswer()
        deltas = self._text(self._refs.replace(text))
        lead = next((i for i, d in enumerate(deltas) if d.kind != TEXT), len(deltas))
        return [Delta(REPLACE, "".join(d.text for d in deltas[:lead]))] + deltas[lead:]

    def _json(self, data: Mapping[str, Any]) -> list[Delta]:
        """A native tool-call chunk (an OpenAI chat.completion.chunk inside a Poe `json` event)."""
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []
        delta = choices[0].get("delta")
        if not isinstance(delta, dict):
            return []
        out: list[Delta] = []
        if isinstance(delta.get("content"), str) and delta["content"]:
            out += self._answer(delta["content"])
        # Chat completions stream native calls as they come (deltas carry the call's index, so pieces of
        # several calls may interleave). Anthropic and Responses streams cannot express interleaving:
        # for them calls are gathered by Poe's index and given out whole when the answer ends.
        # A bot may call natively even when asked for XML: the call is taken all the same.
        for call in (delta.get("tool_calls") or []) if self._offered and not self.finished else []:
            if not isinstance(call, dict):
                continue
            poe_index = call.get("index") if isinstance(call.get("index"), int) else 0
            fn = call.get("function") if isinstance(call.get("function"), dict) else {}
            entry = self._native_calls.get(poe_index)
            if entry is None:
                if not self._parallel and self._claimed:   # a second call: the first was the whole answer
                    return out + self._finish()
                entry = self._native_calls[poe_index] = _NativeCall(self._limit)
                self._claimed += 1
            if isinstance(call.get("id"), str) and call["id"] and not entry.id:
                entry.id = call["id"]
            if isinstance(fn.get("name"), str) and fn["name"] and not entry.name:
                known = self._spec.find(fn["name"]) if self._spec is not None else None
                entry.name = known.name if known is not None else fn["name"]
            piece = fn.get("arguments") if isinstance(fn.get("arguments"), str) else ""
            if entry.index >= 0:   # streamed already: its pieces go straight out
                if piece:
                    out.append(Delta(TOOL_ARGS, piece, index=entry.index))
                continue
            if piece:
                entry.add(piece)
            if self._whole_calls or not entry.name:
                continue
            # Its first delta with a name: the name first, then what arrived so far.
            entry.index = self.tool_calls
            self.tool_calls += 1
            out.append(Delta(TOOL_START, index=entry.index, call_id=entry.id or self._make_id(), name=entry.name))
            if entry.pieces:
                out.append(Delta(TOOL_ARGS, entry.arguments(), index=entry.index))
        return out

    def _native_deltas(self) -> list[Delta]:
        out: list[Delta] = []
        for entry in self._native_calls.values():
            if not entry.name or entry.index >= 0:
                continue   # nameless (Poe never completed it), or already streamed
            index = self.tool_calls
            self.tool_calls += 1
            out.append(Delta(TOOL_START, index=index, call_id=entry.id or self._make_id(), name=entry.name))
            out.append(Delta(TOOL_ARGS, entry.arguments() or "{}", index=index))
        self._native_calls.clear()
        return out


# ----------------------------------------------------------------------------- OpenAI renderings

def openai_usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


class SaidText:
    """One kind of text an answer says (content, reasoning or tool arguments): its tokens counted as it
    comes, the text itself kept only when `keep` (a fold renders it at the end; a stream has sent it
    and needs only a digest, to tell whether a replacement extends what the client has)."""

    def __init__(self, keep: bool = False, digest: bool = False) -> None:
        self._keep = keep
        self._pieces: list[str] = []
        self._tally = TokenTally()
        # Only a content text that is not kept needs a digest for unseen(); a kept one compares itself.
        self._digest = TextDigest() if digest and not keep else None
        self.size = 0   # UTF-8 bytes said

    def __bool__(self) -> bool:
        return self._tally.chars > 0

    def append(self, piece: str) -> None:
        if not piece:
            return
        self._tally.add(piece)
        if self._digest is not None:
            self._digest.add(piece)
        self.size += len(piece) if piece.isascii() else len(piece.encode("utf-8", "surrogatepass"))
        if self._keep:
            self._pieces.append(piece)

    def replace(self, text: str) -> None:
        """The answer is now exactly `text` (Poe's replace_response)."""
        self._pieces, self._tally, self.size = [], TokenTally(), 0
        if self._digest is not None:
            self._digest.reset()
        self.append(text)

    def unseen(self, text: str) -> str | None:
        """What `text` adds to what was said when it starts with it, else None."""
        if self._digest is not None:
            return self._digest.unseen(text)
        if not self._keep:
            raise RuntimeError("this answer text keeps no digest")
        said = self.text()
        return text[len(said):] if text.startswith(said) else None

    def text(self) -> str:
        """The whole text; only a kept one has it."""
        if not self._keep:
            raise RuntimeError("this answer text was counted, not kept")
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def tokens(self) -> int:
        return self._tally.tokens()


class AnswerText:
    """What an answer has said so far, for usage counts: content, reasoning and tool arguments, each
    counted as it comes. With `keep` (folds), content and reasoning are kept for the body too."""

    def __init__(self, keep: bool = False) -> None:
        self.content = SaidText(keep, digest=True)
        self.reasoning = SaidText(keep)
        self.arguments = SaidText()

    @property
    def size(self) -> int:
        """UTF-8 bytes said so far, all kinds together."""
        return self.content.size + self.reasoning.size + self.arguments.size

    def replace(self, text: str) -> str:
        """Poe replaced the answer's text (a REPLACE delta): from now on the content is `text`. Returns
        what a stream still has to send, since it cannot take back what it sent: only the new tail when
        the replacement extends the content, else the whole replacement after a blank line. The one
        place this is decided: every encoder and fold goes through here."""
        tail = self.content.unseen(text)
        new = tail if tail is not None else ("\n\n" if self.content else "") + text
        self.content.replace(text)
        return new

    def usage(self, prompt_tokens: int) -> dict[str, Any]:
        reasoning = self.reasoning.tokens()
        completion = self.content.tokens() + reasoning + self.arguments.tokens()
        return openai_usage(prompt_tokens, completion, reasoning)


_OPENAI_TAIL = b'},"logprobs":null,"finish_reason":null}]}\n\n'


class OpenAIStreamEncoder:
    """Renders deltas as `chat.completion.chunk` SSE lines (never an `event:` line)."""

    def __init__(self, completion_id: str, created_s: int, model: str, include_usage: bool) -> None:
        # Every chunk shares this head; building it once keeps per-chunk work to one small dumps().
        self._head = (b'data: {"id":' + dump_json(completion_id) + b',"object":"chat.completion.chunk","created":'
                      + str(created_s).encode() + b',"model":' + dump_json(model) + b',"choices":[')
        self._include_usage = include_usage
        self.said = AnswerText()

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._head + dump_json(choice) + b"]}\n\n"

    def start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def encode(self, delta: Delta) -> bytes:
        kind = delta.kind
        # Text and reasoning are spelled out: the same bytes as _chunk's, built without a dict.
        if kind == TEXT:
            self.said.content.append(delta.text)
            return self._head + b'{"index":0,"delta":{"content":' + dump_json_string(delta.text) + _OPENAI_TAIL
        if kind == REASONING:
            self.said.reasoning.append(delta.text)
            text = dump_json_string(delta.text)
            return (self._head + b'{"index":0,"delta":{"reasoning_content":' + text + b',"reasoning":' + text
                    + _OPENAI_TAIL)
        if kind == TOOL_START:
            return self._chunk({"tool_calls": [{"index": delta.index, "id": delta.call_id, "type": "function",
                                                "function": {"name": delta.name, "arguments": ""}}]})
        if kind == TOOL_ARGS:
            self.said.arguments.append(delta.text)
            return self._chunk({"tool_calls": [{"index": delta.index, "function": {"arguments": delta.text}}]})
        if kind == REPLACE:
            new = self.said.replace(delta.text)
            return self._chunk({"content": new}) if new else b""
        raise ValueError(f"not a content delta: {kind}")

    def finish(self, reason: str, prompt_tokens: int) -> bytes:
        out = self._chunk({}, reason)
        if self._include_usage:
            out += self._head[:-1] + b'[],"usage":' + dump_json(self.said.usage(prompt_tokens)) + b"}\n\n"
        return out + SSE_DONE

    @staticmethod
    def error(err: ProxyError) -> bytes:
        return sse_data(err.openai_body()) + SSE_DONE


class ChatFold:
    """Folds deltas into a non-streaming `chat.completion` body: the same deltas a stream would carry."""

    def __init__(self, max_answer_size: int | None = None) -> None:
        self.said = AnswerText(keep=True)
        self._calls: list[dict[str, Any]] = []
        self._arguments: list[list[str]] = []   # each call's pieces: += on a growing str copies it every time
        self.finish_reason = "stop"
        self._limit = answer_limit.get() if max_answer_size is None else max_answer_size

    def add(self, delta: Delta) -> None:
        """Take one delta. Raises ProxyError (502 answer_too_large) once the answer passes MAX_ANSWER_SIZE."""
        kind = delta.kind
        if kind == TEXT:
            self.said.content.append(delta.text)
        elif kind == REPLACE:
            self.said.replace(delta.text)   # non-stream answers carry exactly Poe's final text
        elif kind == REASONING:
            self.said.reasoning.append(delta.text)
        elif kind == TOOL_START:
            self._calls.append({"id": delta.call_id, "type": "function",
                                "function": {"name": delta.name, "arguments": ""}})
            self._arguments.append([])
        elif kind == TOOL_ARGS:
            self.said.arguments.append(delta.text)
            self._arguments[delta.index].append(delta.text)
        elif kind == FINISH:
            self.finish_reason = delta.text
        if self.said.size > self._limit:
            self.said = AnswerText()   # what was gathered goes now, not when the request ends
            self._calls, self._arguments = [], []
            raise answer_too_large(self._limit)

    @property
    def content(self) -> str:
        return self.said.content.text()

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The tool calls in chat-completions shape, their arguments joined."""
        for call, pieces in zip(self._calls, self._arguments):
            if len(pieces) > 1:
                pieces[:] = ["".join(pieces)]
            call["function"]["arguments"] = pieces[0] if pieces else ""
        return self._calls

    def body(self, completion_id: str, created_s: int, model: str, prompt_tokens: int) -> dict[str, Any]:
        content = self.content
        calls = self.calls
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None,
                                   "refusal": None}
        if calls:
            message["tool_calls"] = calls
        if self.said.reasoning:
            message["reasoning_content"] = message["reasoning"] = self.said.reasoning.text()
        return {"id": completion_id, "object": "chat.completion", "created": created_s, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": self.finish_reason}],
                "usage": self.said.usage(prompt_tokens), "system_fingerprint": None}


###############################################################################
###############################################################################
# Converters: the Anthropic Messages dialect (pure)
###############################################################################

# Anthropic model ids as Claude Code sends them -> Poe bot names, unless models.yaml maps them.
_CLAUDE_NEW = re.compile(r"claude-(opus|sonnet|haiku)-(\d+)(?:-(\d))?(?:-\d{8})?(?:-latest)?", re.I)
_CLAUDE_OLD = re.compile(r"claude-(\d)(?:-(\d))?-(opus|sonnet|haiku)(?:-\d{8})?(?:-latest)?", re.I)
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                         403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                         429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
THINKING_SIGNATURE = base64.b64encode(b"poe2openai:no-signature").decode()   # opaque; clients echo it back


def claude_alias(model: str) -> str:
    """`claude-sonnet-4-5-20250929` -> `Claude-Sonnet-4.5`, `claude-3-5-haiku-latest` -> `Claude-Haiku-3.5`;
    any other name is returned unchanged."""
    match = _CLAUDE_NEW.fullmatch(model.strip())
    if match:
        family, major, minor = match.group(1), match.group(2), match.group(3)
    else:
        match = _CLAUDE_OLD.fullmatch(model.strip())
        if not match:
            return model
        major, minor, family = match.group(1), match.group(2), match.group(3)
    return f"Claude-{family.capitalize()}-{major}" + (f".{minor}" if minor and minor != "0" else "")


def anthropic_to_openai(body: Any) -> dict[str, Any]:
    """An Anthropic Messages request -> the equivalent OpenAI chat request, so that one pipeline serves
    both dialects. Thinking blocks from earlier turns and server tools are dropped (Poe cannot use them)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    messages: list[dict[str, Any]] = []
    system = _without_billing_header(body.get("system"))
    if isinstance(system, (str, list)) and content_text(system):
        messages.append({"role": "system", "content": content_text(system)})
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise bad_request("'messages' must be a non-empty array.", "messages", "missing_required_parameter")
    for i, message in enumerate(raw_messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
            raise bad_request(f"messages[{i}].role must be user, assistant or system.", f"messages[{i}].role")
        messages.extend(_anthropic_message(message))
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": bool(body.get("stream"))}
    for source, target in (("temperature", "temperature"), ("stop_sequences", "stop"), ("thinking", "thinking")):
        if body.get(source) is not None:
            out[target] = body[source]
    config = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
    effort = config.get("effort")
    if isinstance(effort, str):
        out["reasoning_effort"] = "high" if effort == "max" else effort
    fmt, where = config.get("format"), "output_config.format"
    if fmt is None:
        fmt, where = body.get("output_format"), "output_format"   # the structured-outputs beta's older field
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request(f"{where}.schema must be a JSON schema object.", f"{where}.schema")
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    raw_tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    tools = [t for t in raw_tools if isinstance(t, dict) and "input_schema" in t]
    # Web search is a control, not a tool: the pipeline turns it into the bot's own parameter (bot_controls).
    server = [str(t.get("type") or t.get("name")) for t in raw_tools if isinstance(t, dict) and "input_schema" not in t
              and not str(t.get("type") or "").startswith("web_search")]
    if server:   # bash_20250124, code_execution …: Anthropic runs them, a Poe bot cannot
        log.warning("leaving out tools a Poe bot cannot run: %s", ", ".join(server))
    if tools:
        out["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description"), "parameters": t.get("input_schema")}}
            for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind, "auto") if kind != "tool" \
            else {"type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    return out


BILLING_HEADER = "x-anthropic-billing-header:"


def _without_billing_header(system: Any) -> Any:
    """Claude Code's first system block is its billing line (`x-anthropic-billing-header: cc_version=…`):
    bookkeeping for Anthropic that changes every call, so it never goes to the bot."""
    if isinstance(system, str):
        if not system.lstrip().startswith(BILLING_HEADER):
            return system
        return system.lstrip().split("\n", 1)[1] if "\n" in system.lstrip() else ""   # the line, not the rest
    if isinstance(system, list):
        return [b for b in system if not (isinstance(b, dict) and isinstance(b.get("text"), str)
                                          and b["text"].lstrip().startswith(BILLING_HEADER))]
    return system


def _anthropic_message(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    role, content = message["role"], message.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else \
        [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type")
        if kind in ("text", "image", "document", "search_result"):
            parts.extend(_anthropic_part(block))
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": str(block.get("id") or ""), "type": "function", "function": {
                "name": str(block.get("name") or ""), "arguments": _json_compact(block.get("input") or {})}})
        elif kind == "tool_result":
            value = block.get("content")
            inner = [{"type": "text", "text": value}] if isinstance(value, str) else \
                [p for b in value if isinstance(b, dict) for p in _anthropic_part(b)] if isinstance(value, list) else []
            if block.get("is_error"):
                inner.insert(0, {"type": "text", "text": "Error:"})
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""), "content": inner})
        # thinking, redacted_thinking and server-tool blocks: nothing Poe can use
    out: list[dict[str, Any]] = list(results)
    if role == "assistant":
        if parts or calls:
            out.append({"role": "assistant", "content": parts or None, **({"tool_calls": calls} if calls else {})})
    elif parts or not results:
        out.append({"role": role, "content": parts})
    return out


def _anthropic_part(block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic content block -> OpenAI-style parts: text as text (plain-text documents and search
    results too), images and base64/URL documents as they are (collect_media reads them)."""
    kind = block.get("type")
    if kind == "text":
        return [{"type": "text", "text": block["text"]}] if isinstance(block.get("text"), str) else []
    if kind == "search_result":
        texts = [c.get("text") for c in block.get("content") or [] if isinstance(c, dict)]
        title = block.get("title") if isinstance(block.get("title"), str) else ""
        return [{"type": "text", "text": "\n".join(t for t in (title, *texts) if isinstance(t, str) and t)}]
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        return [{"type": "text", "text": source["data"]}]   # a plain-text document
    if source.get("type") == "content":                      # a document given as blocks
        return [p for b in source.get("content") or [] if isinstance(b, dict) for p in _anthropic_part(b)]
    if source.get("type") in ("base64", "url"):
        return [dict(block)]
    log.warning("skipping a %s block whose source is %r (only base64, url and text are supported)", kind,
                source.get("type"))
    return []


def anthropic_error_body(err: ProxyError, request_id: str = "") -> dict[str, Any]:
    kind = ANTHROPIC_ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    message = err.message
    if err.code == "context_length_exceeded" and not message.lower().startswith("prompt is too long"):
        # Anthropic's own wording: Claude Code compacts the conversation when a 400 message starts so.
        message = f"prompt is too long: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}


def _stop_reason(finish: str) -> str:
    return {"tool_calls": "tool_use", "length": "max_tokens"}.get(finish, "end_turn")


def _anthropic_usage(said: AnswerText, prompt_tokens: int) -> dict[str, int]:
    usage = said.usage(prompt_tokens)
    return {"input_tokens": prompt_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": usage["completion_tokens"]}


def _anthropic_event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dump_json(data) + b"\n\n"


class AnthropicStreamEncoder:
    """Renders deltas as Anthropic Messages SSE: message_start, one content block at a time (thinking,
    text or tool_use), message_delta with the stop reason and usage, message_stop."""

    def __init__(self, message_id: str, model: str, prompt_tokens: int) -> None:
        self._message_id, self._model, self._prompt_tokens = message_id, model, prompt_tokens
        self.said = AnswerText()
        self._open: str | None = None     # the type of the open block
        self._index = -1
        self._tool_index = -1             # our tool-call index of the open tool_use block

    def start(self) -> bytes:
        return _anthropic_event("message_start", {"type": "message_start", "message": {
            "id": self._message_id, "type": "message", "role": "assistant", "model": self._model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self._prompt_tokens, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 1}}})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":
            out += _anthropic_event("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                            "delta": {"type": "signature_delta",
                                                                      "signature": THINKING_SIGNATURE}})
        self._open = None
        return out + _anthropic_event("content_block_stop", {"type": "content_block_stop", "index": self._index})

    def _begin(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._index += 1
        self._open = kind
        return out + _anthropic_event("content_block_start", {"type": "content_block_start", "index": self._index,
                                                              "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _anthropic_event("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                        "delta": delta})

    def encode(self, delta: Delta) -> bytes:
        kind = delta.kind
        if kind == REPLACE:   # as in the OpenAI stream: only what the client has not seen
            text = self.said.replace(delta.text)
            if not text:
                return b""
            out = b"" if self._open == "text" else self._begin("text", {"type": "text", "text": ""})
            return out + self._delta({"type": "text_delta", "text": text})
        if kind == TEXT:
            self.said.content.append(delta.text)
            out = b"" if self._open == "text" else self._begin("text", {"type": "text", "text": ""})
            # _delta's bytes, spelled out: the hot path of a streamed answer
            return (out + b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                    + str(self._index).encode() + b',"delta":{"type":"text_delta","text":'
                    + dump_json_string(delta.text) + b"}}\n\n")
        if kind == REASONING:
            self.said.reasoning.append(delta.text)
            out = b"" if self._open == "thinking" else self._begin("thinking", {"type": "thinking", "thinking": "",
                                                                                "signature": ""})
            return out + self._delta({"type": "thinking_delta", "thinking": delta.text})
        if kind == TOOL_START:
            self._tool_index = delta.index
            return self._begin("tool_use", {"type": "tool_use", "id": delta.call_id, "name": delta.name, "input": {}})
        if kind == TOOL_ARGS:
            self.said.arguments.append(delta.text)
            return self._delta({"type": "input_json_delta", "partial_json": delta.text})
        raise ValueError(f"not a content delta: {kind}")

    def finish(self, reason: str, prompt_tokens: int) -> bytes:
        usage = _anthropic_usage(self.said, prompt_tokens)
        return (self._close()
                + _anthropic_event("message_delta", {"type": "message_delta", "delta": {
                    "stop_reason": _stop_reason(reason), "stop_sequence": None}, "usage": usage})
                + _anthropic_event("message_stop", {"type": "message_stop"}))

    @staticmethod
    def error(err: ProxyError) -> bytes:
        return _anthropic_event("error", anthropic_error_body(err))


class AnthropicFold(ChatFold):
    """Folds deltas into a non-streaming Anthropic `message`: the same folding as chat completions,
    rendered as Anthropic content blocks."""

    def body(self, message_id: str, created_s: int, model: str, prompt_tokens: int) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if self.said.reasoning:
            content.append({"type": "thinking", "thinking": self.said.reasoning.text(),
                            "signature": THINKING_SIGNATURE})
        if self.said.content:
            content.append({"type": "text", "text": self.said.content.text()})
        for call in self.calls:
            arguments = _arguments_dict(call["function"]["arguments"])
            content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                            "input": arguments if arguments is not None else {}})
        return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": _stop_reason(self.finish_reason), "stop_sequence": None,
                "usage": _anthropic_usage(self.said, prompt_tokens)}


###############################################################################
###############################################################################
# Converters: the OpenAI Responses dialect (pure)
###############################################################################

CUSTOM_TOOL_SCHEMA = {"type": "object", "properties": {"input": {"type": "string", "description": "The raw input"}},
                      "required": ["input"]}


def responses_to_openai(body: Any) -> dict[str, Any]:
    """An OpenAI Responses request (Codex, the SDKs' client.responses) -> the equivalent chat request.
    Reasoning items from earlier turns are dropped (Poe cannot use them); there is no server-side store."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    if body.get("previous_response_id"):
        raise bad_request("previous_response_id is not supported: this proxy keeps no responses; send the whole "
                          "conversation in 'input' (store: false).", "previous_response_id", "unsupported_value")
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str) and body["instructions"].strip():
        messages.append({"role": "system", "content": body["instructions"]})
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise bad_request(f"input[{i}] must be an object.", f"input[{i}]")
            _responses_item(item, messages)
    else:
        raise bad_request("'input' must be a string or an array of items.", "input", "missing_required_parameter")
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": bool(body.get("stream"))}
    if body.get("temperature") is not None:
        out["temperature"] = body["temperature"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        out["reasoning_effort"] = "xhigh" if reasoning["effort"] == "max" else reasoning["effort"]
    tools, left_out = _responses_tools(body.get("tools"))
    # Hosted web search is a control the pipeline maps to the bot's own parameter (bot_controls), not a loss.
    left_out = [kind for kind in left_out if not kind.startswith("web_search")]
    if left_out:   # hosted tools (local_shell, image_generation …) and kinds we do not know: said once, not hidden
        log.warning("leaving out tools a Poe bot cannot run: %s", ", ".join(left_out))
    if tools:
        out["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        out["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        name = str(choice.get("name") or "")
        if isinstance(choice.get("namespace"), str) and choice["namespace"]:
            name = namespaced_name(choice["namespace"], name)
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        out["tool_choice"] = "required" if choice.get("mode") == "required" else "auto"
    if isinstance(body.get("parallel_tool_calls"), bool):
        out["parallel_tool_calls"] = body["parallel_tool_calls"]
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) and isinstance(text.get("format"), dict) else None
    if fmt and fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif fmt and fmt.get("type") == "json_schema":
        out["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
    return out


def namespaced_name(namespace: str, name: str) -> str:
    """The name a bot sees for a tool inside a Responses `namespace` tool: `<namespace>__<tool>`, kept to
    the characters every function-calling API accepts."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{namespace}__{name}")


def responses_namespaced(tools: Any) -> dict[str, tuple[str, str, str]]:
    """The tools inside `namespace` tools (Codex's sub-agents and MCP servers): offered name ->
    (namespace, the tool's own name, function | custom), so a call comes back as the client named it."""
    found: dict[str, tuple[str, str, str]] = {}
    for group in tools if isinstance(tools, list) else []:
        if not isinstance(group, dict) or group.get("type") != "namespace" or not isinstance(group.get("name"), str):
            continue
        for t in group.get("tools") if isinstance(group.get("tools"), list) else []:
            if isinstance(t, dict) and t.get("type", "function") in ("function", "custom") and t.get("name"):
                found.setdefault(namespaced_name(group["name"], str(t["name"])),
                                 (group["name"], str(t["name"]), t.get("type", "function")))
    return found


def _responses_tools(raw: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Responses tools -> chat tools, and the names of those left out (hosted or unknown kinds)."""
    tools: list[dict[str, Any]] = []
    left_out: list[str] = []
    for t in raw if isinstance(raw, list) else []:
        if not isinstance(t, dict):
            continue
        kind = t.get("type", "function")
        if kind == "namespace" and isinstance(t.get("name"), str) and isinstance(t.get("tools"), list):
            about = t.get("description") if isinstance(t.get("description"), str) else ""
            for inner in t["tools"]:
                if not isinstance(inner, dict) or inner.get("type", "function") not in ("function", "custom") \
                        or not inner.get("name"):
                    left_out.append(f"{t['name']}.{inner.get('type') if isinstance(inner, dict) else inner}")
                    continue
                own = inner.get("description") if isinstance(inner.get("description"), str) else ""
                # Never a bare name: a namespaced tool is always a tool, never a Poe bot flag.
                part_of = f"({t['name']}: {about.strip()})" if about.strip() else f"(part of {t['name']})"
                description = f"{own.strip()} {part_of}".lstrip()
                tools.append(_responses_function(namespaced_name(t["name"], str(inner["name"])), description,
                                                 inner))
        elif kind in ("function", "custom") and t.get("name"):
            tools.append(_responses_function(str(t["name"]), t.get("description"), t))
        else:
            left_out.append(str(kind if kind != "function" else t.get("name") or "a nameless function"))
    return tools, left_out


def _responses_function(name: str, description: Any, tool: Mapping[str, Any]) -> dict[str, Any]:
    # Free-form (custom) tools such as Codex's apply_patch take one string of input.
    parameters = CUSTOM_TOOL_SCHEMA if tool.get("type") == "custom" else tool.get("parameters")
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _responses_item(item: Mapping[str, Any], messages: list[dict[str, Any]]) -> None:
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        content = item.get("content")
        parts = content if isinstance(content, str) else [p for p in content if isinstance(p, dict)] \
            if isinstance(content, list) else []
        messages.append({"role": role if role in ("user", "assistant", "system", "developer") else "user",
                         "content": parts})
    elif kind in ("function_call", "custom_tool_call"):
        arguments = item.get("arguments") if kind == "function_call" else _json_compact({"input": item.get("input")})
        if not isinstance(arguments, str):
            arguments = _json_compact(arguments)
        name = str(item.get("name") or "")
        if isinstance(item.get("namespace"), str) and item["namespace"]:
            name = namespaced_name(item["namespace"], name)   # the name it was offered under
        call = {"id": str(item.get("call_id") or ""), "type": "function",
                "function": {"name": name, "arguments": arguments or "{}"}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":   # several calls of one turn: one assistant message
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                         "content": output if isinstance(output, (str, list)) else _json_compact(output)})
    # reasoning, item_reference, web_search_call, compaction …: nothing Poe can use


class ResponsesStreamEncoder:
    """Renders deltas as Responses API events: response.created, one output item at a time (reasoning,
    message or function_call, each with its added/delta/done chain), then response.completed."""

    def __init__(self, response: dict[str, Any]) -> None:
        self._response = response            # the envelope, echoed by every lifecycle event
        self._custom = {t.get("name") for t in response.get("tools", ()) if t.get("type") == "custom"}
        self._namespaced = responses_namespaced(response.get("tools"))
        self.said = AnswerText()
        self._sequence = 0
        self._output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text: list[str] = []
        # The done events and response.completed repeat the whole answer, so even a stream keeps it:
        # MAX_ANSWER_SIZE bounds it as for a whole answer.
        self._limit = answer_limit.get()

    def _event(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **data}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + dump_json(payload) + b"\n\n"

    def _lifecycle(self, kind: str, status: str, **extra: Any) -> bytes:
        return self._event(kind, response={**self._response, "status": status, "output": list(self._output),
                                           **extra})

    def start(self) -> bytes:
        return (self._lifecycle("response.created", "in_progress", usage=None)
                + self._lifecycle("response.in_progress", "in_progress", usage=None))

    def _add(self, item: dict[str, Any]) -> bytes:
        out = self._close()
        self._open, self._text = item, []
        out += self._event("response.output_item.added", output_index=len(self._output), item=item)
        where = {"item_id": item["id"], "output_index": len(self._output)}
        if item["type"] == "reasoning":
            out += self._event("response.reasoning_summary_part.added", **where, summary_index=0,
                               part={"type": "summary_text", "text": ""})
        elif item["type"] == "message":
            out += self._event("response.content_part.added", **where, content_index=0,
                               part={"type": "output_text", "text": "", "annotations": []})
        return out

    def _close(self) -> bytes:
        item = self._open
        if item is None:
            return b""
        self._open = None
        text = "".join(self._text)
        where = {"item_id": item["id"], "output_index": len(self._output)}
        out = b""
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            out += self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=text)
            out += self._event("response.reasoning_summary_part.done", **where, summary_index=0, part=part)
            done = {**item, "summary": [part], "status": "completed"}
        elif item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            out += self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            out += self._event("response.content_part.done", **where, content_index=0, part=part)
            done = {**item, "content": [part], "status": "completed"}
        elif item["type"] == "custom_tool_call":
            arguments = _arguments_dict(text) or {}
            raw = arguments.get("input", text)
            done = {**item, "input": raw if isinstance(raw, str) else _json_compact(raw), "status": "completed"}
        else:
            out += self._event("response.function_call_arguments.done", **where, arguments=text)
            done = {**item, "arguments": text, "status": "completed"}
        self._output.append(done)
        return out + self._event("response.output_item.done", output_index=len(self._output) - 1, item=done)

    def encode(self, delta: Delta) -> bytes:
        """Render one delta. Raises ProxyError (502 answer_too_large) once the answer passes MAX_ANSWER_SIZE."""
        out = self._render(delta)
        self.check_size()
        return out

    def check_size(self) -> None:
        if self.said.size > self._limit:
            self._open, self._text, self._output = None, [], []   # dropped now; the error event needs none
            self.said = AnswerText()
            raise answer_too_large(self._limit)

    def _render(self, delta: Delta) -> bytes:
        kind = delta.kind
        if kind in (TEXT, REPLACE):
            if kind == REPLACE:
                text = self.said.replace(delta.text)
            else:
                text = delta.text
                self.said.content.append(text)
            if not text:
                return b""
            out = b"" if self._open and self._open["type"] == "message" else self._add(
                {"type": "message", "id": new_id("msg_"), "role": "assistant", "status": "in_progress",
                 "content": []})
            self._text.append(text)
            # _event's bytes, spelled out: the hot path of a streamed answer
            sequence, self._sequence = self._sequence, self._sequence + 1
            return (out + b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                    b'"sequence_number":' + str(sequence).encode() + b',"item_id":'
                    + dump_json_string(self._open["id"]) + b',"output_index":'  # type: ignore[index]
                    + str(len(self._output)).encode() + b',"content_index":0,"delta":' + dump_json_string(text)
                    + b',"logprobs":[]}\n\n')
        if kind == REASONING:
            self.said.reasoning.append(delta.text)
            out = b"" if self._open and self._open["type"] == "reasoning" else self._add(
                {"type": "reasoning", "id": new_id("rs_"), "summary": [], "status": "in_progress"})
            self._text.append(delta.text)
            item_id = self._open["id"]   # type: ignore[index]
            return out + self._event("response.reasoning_summary_text.delta", item_id=item_id,
                                     output_index=len(self._output), summary_index=0, delta=delta.text)
        if kind == TOOL_START:
            name, where, tool_kind = delta.name, {}, "custom" if delta.name in self._custom else "function"
            if delta.name in self._namespaced:   # back to the client's own names: the tool and its namespace
                namespace, name, tool_kind = self._namespaced[delta.name]
                where = {"namespace": namespace}
            if tool_kind == "custom":
                return self._add({"type": "custom_tool_call", "id": new_id("ctc_"), "call_id": delta.call_id,
                                  "name": name, **where, "input": "", "status": "in_progress"})
            return self._add({"type": "function_call", "id": new_id("fc_"), "call_id": delta.call_id,
                              "name": name, **where, "arguments": "", "status": "in_progress"})
        if kind == TOOL_ARGS:
            self.said.arguments.append(delta.text)
            self._text.append(delta.text)
            if self._open is not None and self._open["type"] == "custom_tool_call":
                return b""   # its input is one string, given whole when the item is done
            item_id = self._open["id"]   # type: ignore[index]
            return self._event("response.function_call_arguments.delta", item_id=item_id,
                               output_index=len(self._output), delta=delta.text)
        raise ValueError(f"not a content delta: {kind}")

    def finish(self, reason: str, prompt_tokens: int) -> bytes:
        out = self._close()
        return out + self._lifecycle("response.completed", "completed",
                                     usage=_responses_usage(self.said, prompt_tokens))

    def error(self, err: ProxyError) -> bytes:
        out = self._close()
        return out + self._lifecycle("response.failed", "failed", usage=None,
                                     error={"code": err.code or "server_error", "message": err.message})


def _responses_usage(said: AnswerText, prompt_tokens: int) -> dict[str, Any]:
    usage = said.usage(prompt_tokens)
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": usage["total_tokens"]}


def responses_envelope(response_id: str, created_s: int, model: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every Responses object carries, echoing the request where it said something."""
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    return {"id": response_id, "object": "response", "created_at": created_s, "status": "in_progress",
            "error": None, "incomplete_details": None,
            "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
            "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False, "previous_response_id": None,
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "store": False, "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "text": {"format": text.get("format") or {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": [t for t in body.get("tools") or [] if isinstance(t, dict)], "truncation": "disabled",
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {}, "usage": None}


class ResponsesFold:
    """The non-streaming Responses object: the same events a stream would carry, folded."""

    def __init__(self, envelope: dict[str, Any]) -> None:
        self._encoder = ResponsesStreamEncoder(envelope)
        self.finish_reason = "stop"

    @property
    def said(self) -> AnswerText:
        return self._encoder.said

    def add(self, delta: Delta) -> None:
        encoder = self._encoder
        if delta.kind == FINISH:
            self.finish_reason = delta.text
        elif delta.kind == REPLACE:
            # A whole answer carries exactly Poe's final text: the message items said before (also those a
            # tool call closed) give way to the replacement, which becomes the answer's one message.
            encoder._output = [item for item in encoder._output if item["type"] != "message"]
            if encoder._open is not None and encoder._open["type"] == "message":
                encoder._text = [delta.text]
                encoder.said.replace(delta.text)
            else:
                encoder.said.replace("")
                if delta.text:
                    encoder.encode(Delta(TEXT, delta.text))
            encoder.check_size()
        else:
            encoder.encode(delta)

    def body(self, response_id: str, created_s: int, model: str, prompt_tokens: int) -> dict[str, Any]:
        self._encoder._close()
        return {**self._encoder._response, "status": "completed", "output": list(self._encoder._output),
                "usage": _responses_usage(self.said, prompt_tokens)}


###############################################################################
###############################################################################
# Converters: OpenAI's media APIs (images, speech, videos) <-> Poe's media bots (pure)
###############################################################################

# What a bot serves, from what it outputs. Every bot can be chatted with (files come as links).
CHAT_ENDPOINTS = ("/v1/chat/completions", "/v1/messages", "/v1/responses")
IMAGE_ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
SPEECH_ENDPOINT = "/v1/audio/speech"
VIDEO_ENDPOINT = "/v1/videos"
MEDIA_MAX_IMAGES = 4            # n: each image is one query, billed by Poe
MEDIA_CONCURRENCY = 2           # queries of one request running at a time
# Request keys the media converters read themselves: never also forwarded by name to the bot.
MEDIA_KEYS = frozenset({"model", "prompt", "input", "n", "size", "response_format", "user", "moderation", "stream",
                        "partial_images", "output_compression", "voice", "instructions", "stream_format",
                        "seconds", "input_reference", "image", "image[]", "mask", "input_fidelity"})
SIZE_PARAMETERS = ("aspect_ratio", "aspect", "image_size", "resolution", "size")
DURATION_PARAMETERS = ("duration", "seconds", "duration_seconds", "length")
VOICE_PARAMETERS = ("voice", "voice_1", "voice_id", "speaker")
# OpenAI's own voices: every TTS client sends one. A bot with other voices then keeps its default.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
                           "verse", "marin", "cedar"})
SPEECH_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                "wav": "audio/wav", "pcm": "audio/pcm"}
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[:/x]\s*(\d+(?:\.\d+)?)\s*$")
_DIMENSIONS = re.compile(r"^\s*(\d{2,5})\s*[x×*]\s*(\d{2,5})\s*$", re.I)
_K_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*k\s*$", re.I)
_P_SIZE = re.compile(r"^\s*(\d{3,4})\s*p\s*$", re.I)
ASPECT_TOLERANCE = 0.06        # |log| of the ratio between the asked shape and the bot's: about 6 %
NO_MEDIA_QUOTE_CHARS = 2000    # of a bot's words quoted in the 502 when it made no file: its reason, not an essay
_MARKDOWN_FILE = re.compile(r"(!?)\[([^\[\]\n]{0,200})\]\((https?://[^\s()]{1,2000})\)")


def bot_endpoints(info: BotInfo) -> list[str]:
    """The proxy's endpoints that serve this bot, from its output modalities (unknown: text)."""
    outputs = info.output_modalities or ("text",)
    out = list(CHAT_ENDPOINTS)
    if "image" in outputs:
        out.append(IMAGE_ENDPOINTS[0])
        if info.input_modalities is None or "image" in info.input_modalities:
            out.append(IMAGE_ENDPOINTS[1])
    if "audio" in outputs:
        out.append(SPEECH_ENDPOINT)
    if "video" in outputs:
        out.append(VIDEO_ENDPOINT)
    return out


@dataclass(frozen=True)
class MediaRequest:
    """A media request checked and turned into what a Poe query needs: the prompt and the bot's flags."""

    kind: str                        # the output asked for: image, audio or video
    model: str
    prompt: str
    flags: tuple[str, ...] = ()
    n: int = 1
    response_format: str = "url"     # images: url or b64_json; speech: the audio format asked for
    size: str = ""                   # as the client sent it (a video echoes it)
    seconds: str = ""


def _required_text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"'{key}' is required and must be a non-empty string.", key,
                          "missing_required_parameter" if value is None else "invalid_type")
    return value


def _parameters_of(info: BotInfo | None) -> dict[str, BotParameter]:
    return {p.name: p for p in (info.parameters or ())} if info is not None else {}


def check_media_bot(kind: str, info: BotInfo | None, model: str) -> None:
    """Refuse a bot the catalogue says cannot make `kind` (400 with what it makes). A bot the catalogue
    does not know (a private one) is asked anyway: its answer decides."""
    if info is None or info.output_modalities is None or kind in info.output_modalities:
        return
    what = {"image": "images", "audio": "speech", "video": "videos"}[kind]
    makes = ", ".join(info.output_modalities) or "nothing"
    raise bad_request(f"'{model}' does not make {what}: Poe lists its output as {makes}. GET /v1/models shows "
                      f"which bots serve this endpoint (their `endpoints`).", "model", "model_not_supported")


def _ratio_of(value: Any) -> float | None:
    match = _RATIO.match(str(value))
    if match is None or float(match.group(2)) == 0 or float(match.group(1)) == 0:
        return None
    return float(match.group(1)) / float(match.group(2))


def _nearest_by_log(target: float, candidates: Sequence[tuple[Any, float]]) -> tuple[Any, float] | None:
    if not candidates or target <= 0:
        return None
    value, number = min(candidates, key=lambda c: abs(math.log(c[1] / target)))
    return value, abs(math.log(number / target))


def size_settings(size: Any, info: BotInfo | None, bot: str, field_name: str = "size") -> dict[str, Any]:
    """OpenAI's `size` (`WIDTHxHEIGHT`, or a value the bot takes as it is: `16:9`, `2K`, `1080p`) -> the
    bot's own aspect / resolution parameters. A bot that declares none picks its own size (nothing sent);
    a size none of its values comes near is a 400 listing what it accepts."""
    if size is None or (isinstance(size, str) and size.strip().lower() in ("", "auto")):
        return {}
    if not isinstance(size, str):
        raise bad_request(f"'{field_name}' must be a string such as 1024x1024.", field_name, "invalid_type")
    declared = _parameters_of(info)
    present = [declared[name] for name in SIZE_PARAMETERS if name in declared]
    if not present:
        return {}
    for param in present:   # a value the bot knows by name
        for value in param.schema.get("enum") or ():
            if isinstance(value, (str, int, float)) and str(value).strip().casefold() == size.strip().casefold():
                return {param.name: value}
    out: dict[str, Any] = {}
    dims = _DIMENSIONS.match(size)
    if dims is not None:
        width, height = int(dims.group(1)), int(dims.group(2))
        for param in present:
            enum = param.schema.get("enum")
            if not isinstance(enum, list):
                if param.schema.get("type") == "string" and param.name in ("size", "image_size", "resolution"):
                    out[param.name] = f"{width}x{height}"
                continue
            if param.name in ("aspect_ratio", "aspect"):
                best = _nearest_by_log(width / height, [(v, r) for v in enum if (r := _ratio_of(v)) is not None])
                if best is None or best[1] > ASPECT_TOLERANCE:
                    raise _refuse_size(size, present, bot, field_name)
                out[param.name] = best[0]
            elif param.name in ("image_size", "size", "resolution"):
                # 1K / 2K / 4K name the longer side in thousands; 720p / 1080p the shorter side.
                scaled = [(v, float(m.group(1)) * 1024) for v in enum if (m := _K_SIZE.match(str(v)))]
                lines = [(v, float(m.group(1))) for v in enum if (m := _P_SIZE.match(str(v)))]
                best = _nearest_by_log(max(width, height), scaled) or _nearest_by_log(min(width, height), lines)
                if best is None and _ratio_of(enum[0] if enum else "") is not None:   # `size` holding ratios
                    best = _nearest_by_log(width / height, [(v, r) for v in enum if (r := _ratio_of(v)) is not None])
                    if best is not None and best[1] > ASPECT_TOLERANCE:
                        raise _refuse_size(size, present, bot, field_name)
                if best is not None:
                    out[param.name] = best[0]
    if not out:
        raise _refuse_size(size, present, bot, field_name)
    return out


def _refuse_size(size: str, present: Sequence[BotParameter], bot: str, field_name: str) -> ProxyError:
    accepts = "; ".join(f"{p.name}: {_allowed_text(p).removeprefix('one of ')}" for p in present)
    return bad_request(f"'{field_name}' {size!r} cannot be mapped to a size {bot} makes; it accepts {accepts}. Send "
                       f"one of these values as '{field_name}', or a WIDTHxHEIGHT of one of these shapes.",
                       field_name, "unsupported_size")


def _media_flags(body: Mapping[str, Any], mapped: Mapping[str, Any], info: BotInfo | None) -> tuple[str, ...]:
    """The bot's flags: the mapped parameters, then any other request key named like one of its declared
    parameters (quality, style, background, output_format, seed, negative_prompt …), checked by
    bot_controls against the declared schema."""
    rest = {k: v for k, v in body.items() if k not in MEDIA_KEYS and not (isinstance(v, str) and v == "auto")}
    if info is not None and isinstance(rest.get("quality"), str):
        quality = info.parameter("quality")
        enum = quality.schema.get("enum") if quality is not None else None
        word = {"hd": "high", "standard": "medium"}.get(rest["quality"].lower())
        if isinstance(enum, list) and word is not None and rest["quality"] not in enum and word in enum:
            rest["quality"] = word   # DALL-E's words for GPT-Image's scale
    if info is None or info.parameters is None:
        return ()
    flags, _ = bot_controls({**rest, **mapped}, info)
    return tuple(flags)


def _size_text(body: Mapping[str, Any]) -> str:
    size = body.get("size")
    return size if isinstance(size, str) else ""


def _count(body: Mapping[str, Any]) -> int:
    n = body.get("n", 1)
    if isinstance(n, str) and n.strip().isdigit():
        n = int(n)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MEDIA_MAX_IMAGES:
        raise bad_request(f"'n' must be a whole number from 1 to {MEDIA_MAX_IMAGES}.", "n")
    return n


def parse_image_request(body: Any, info: BotInfo | None, *, has_mask: bool = False) -> MediaRequest:
    """POST /v1/images/generations and /edits (fields already taken out of a multipart body)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    model, prompt = _required_text(body, "model"), _required_text(body, "prompt")
    check_media_bot("image", info, model)
    if body.get("stream") is True or str(body.get("stream")).lower() == "true":
        raise bad_request("Streaming images (partial images) is not supported: Poe's bots send the finished "
                          "image only. Leave 'stream' out.", "stream", "unsupported_parameter")
    fmt = body.get("response_format") or "url"
    if fmt not in ("url", "b64_json"):
        raise bad_request("'response_format' must be url or b64_json.", "response_format")
    bot = info.name if info is not None else model
    mapped = size_settings(body.get("size"), info, bot)
    if has_mask and info is not None and info.parameter("use_mask") is not None:
        mapped["use_mask"] = True     # the mask goes last among the images, where such bots look for it
    return MediaRequest("image", model, prompt, _media_flags(body, mapped, info), _count(body), fmt,
                        _size_text(body))


def parse_speech_request(body: Any, info: BotInfo | None) -> MediaRequest:
    """POST /v1/audio/speech: `input` is what the bot reads; `voice` goes to the bot's voice parameter
    when it has that voice (OpenAI's voice names leave the bot's default)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    model, text = _required_text(body, "model"), _required_text(body, "input")
    check_media_bot("audio", info, model)
    fmt = body.get("response_format") or "mp3"
    if fmt not in SPEECH_TYPES:
        raise bad_request(f"'response_format' must be one of {', '.join(SPEECH_TYPES)}.", "response_format")
    speed = body.get("speed")
    if speed is not None and (not _is_number(speed) or not 0.25 <= speed <= 4.0):
        raise bad_request("'speed' must be a number from 0.25 to 4.0.", "speed")
    voice = body.get("voice")
    if isinstance(voice, dict):
        voice = voice.get("id")
    mapped: dict[str, Any] = {}
    declared = _parameters_of(info)
    param = next((declared[n] for n in VOICE_PARAMETERS if n in declared), None)
    if isinstance(voice, str) and voice.strip() and param is not None:
        try:
            mapped[param.name] = parameter_value(param, voice.strip(), info.name if info else model, "voice")
        except ProxyError:
            if voice.strip().lower() not in OPENAI_VOICES:
                raise
    elif voice is not None and not isinstance(voice, str):
        raise bad_request("'voice' must be a voice name or {\"id\": name}.", "voice", "invalid_type")
    # `instructions` are not sent: a speech bot reads its whole message aloud.
    return MediaRequest("audio", model, text, _media_flags(body, mapped, info), 1, fmt)


def parse_video_request(body: Any, info: BotInfo | None) -> MediaRequest:
    """POST /v1/videos: `seconds` to the bot's duration parameter, `size` to its aspect / resolution."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    model, prompt = _required_text(body, "model"), _required_text(body, "prompt")
    check_media_bot("video", info, model)
    bot = info.name if info is not None else model
    mapped = size_settings(body.get("size"), info, bot)
    seconds = body.get("seconds")
    if seconds is not None and not (isinstance(seconds, str) and seconds.strip().isdigit()) \
            and not (isinstance(seconds, int) and not isinstance(seconds, bool) and seconds > 0):
        raise bad_request("'seconds' must be a whole number of seconds, such as \"8\".", "seconds")
    declared = _parameters_of(info)
    duration = next((declared[n] for n in DURATION_PARAMETERS if n in declared), None)
    if seconds is not None and duration is not None:
        mapped[duration.name] = parameter_value(duration, str(seconds).strip(), bot, "seconds")
    return MediaRequest("video", model, prompt, _media_flags(body, mapped, info), 1, "",
                        _size_text(body),
                        str(seconds).strip() if seconds is not None else "")


def media_query(request: MediaRequest, attachments: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The Poe query of a media request (a fastapi_poe QueryRequest): the prompt as the one user message,
    the bot's flags at its end, the client's images as its attachments."""
    message = poe_message("user", request.prompt + "".join(" " + flag for flag in request.flags))
    if attachments:
        message["attachments"] = [dict(a) for a in attachments]
    return {"version": POE_PROTOCOL_VERSION, "type": "query", "query": [message], "user_id": "",
            "conversation_id": "", "message_id": ""}


@dataclass
class MediaFile:
    url: str
    content_type: str
    name: str


class MediaAnswer:
    """A media bot's answer from its events: the files it sent (`file` events; failing those, Markdown
    links to files in its text) and its words. `error` holds Poe's error, classified as in chat."""

    def __init__(self) -> None:
        self.files: list[MediaFile] = []
        self._text: list[str] = []
        self.done = False
        self.error: ProxyError | None = None

    @property
    def finished(self) -> bool:
        return self.done or self.error is not None

    def feed(self, event: SSEEvent) -> None:
        if self.finished or event.event not in ("text", "replace_response", "file", "error", "done"):
            return
        try:
            data = json.loads(event.data) if event.data.strip() else {}
        except (ValueError, RecursionError):
            data = {}
        data = data if isinstance(data, dict) else {}
        if event.event == "done":
            self.done = True
        elif event.event == "error":
            self.error = classify_poe_error(data)
        elif event.event == "file":
            url = data.get("url")
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                given = data.get("name")
                name = given if isinstance(given, str) and given else "file"
                content_type = data.get("content_type")
                self.files.append(MediaFile(url, content_type if isinstance(content_type, str) and content_type
                                            else guess_content_type(name), name))
        elif isinstance(data.get("text"), str):
            if event.event == "replace_response":
                self._text = []
            self._text.append(data["text"])

    def of_kind(self, kind: str) -> list[MediaFile]:
        """The files of the kind asked for (image, audio, video): those Poe sent, else those linked in the text."""
        def fits(f: MediaFile) -> bool:
            mime = f.content_type.lower()
            return mime.startswith(kind + "/") or (mime in ("", "application/octet-stream")
                                                   and guess_content_type(f.name or f.url).startswith(kind + "/"))
        found = [f for f in self.files if fits(f)]
        if found:
            return found
        linked = [MediaFile(url, guess_content_type(url), alt or "file")
                  for _, alt, url in _MARKDOWN_FILE.findall("".join(self._text))]
        return [f for f in linked if fits(f) or (kind == "image" and f.content_type == "application/octet-stream"
                                                  and "![" in "".join(self._text))]

    @property
    def words(self) -> str:
        """The bot's text without references and links to its files (a revised prompt, or why it failed)."""
        text = re.sub(r"!?\[[^\[\]\n]{0,200}\]\[[^\[\]\s]{1,200}\]", "", "".join(self._text))
        return _MARKDOWN_FILE.sub("", text).strip()


def no_media_error(kind: str, bot: str, answer: MediaAnswer) -> ProxyError:
    """A bot that answered without the file asked for: a 502 in the bot's own words."""
    what = {"image": "an image", "audio": "audio", "video": "a video"}[kind]
    words = answer.words
    said = f" It said: {words[:NO_MEDIA_QUOTE_CHARS]}" if words else " It sent no text either."
    return upstream_error(f"{bot} answered without {what}.{said}", 502, "no_media")


def image_usage(prompt_tokens: int, input_images: int, images: int, text_tokens: int) -> dict[str, Any]:
    """Estimated as for chats: the prompt by the estimator, each image as ATTACHMENT_TOKENS."""
    inputs = prompt_tokens + input_images * ATTACHMENT_TOKENS
    outputs = images * ATTACHMENT_TOKENS + text_tokens
    return {"input_tokens": inputs, "input_tokens_details": {"text_tokens": prompt_tokens,
                                                             "image_tokens": input_images * ATTACHMENT_TOKENS},
            "output_tokens": outputs, "output_tokens_details": {"image_tokens": images * ATTACHMENT_TOKENS,
                                                                "text_tokens": text_tokens},
            "total_tokens": inputs + outputs}


def images_body(created_s: int, items: Sequence[Mapping[str, Any]], usage: Mapping[str, Any],
                request: MediaRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"created": created_s, "data": [dict(item) for item in items], "usage": dict(usage)}
    if request.size and _DIMENSIONS.match(request.size):
        body["size"] = request.size
    return body


@dataclass
class VideoJob:
    """A video being made: OpenAI's video object, plus where its file is. `owner` is a hash, never a key."""

    id: str
    owner: str = field(repr=False)
    model: str
    prompt: str
    seconds: str
    size: str
    created_at: int
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict[str, Any] | None = None
    file: MediaFile | None = None

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "object": "video", "model": self.model, "status": self.status,
                "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "prompt": self.prompt, "seconds": self.seconds or "",
                "size": self.size or "", "remixed_from_video_id": None, "error": self.error}


def video_list_body(jobs: Sequence[VideoJob], after: str | None, limit: int, order: str) -> dict[str, Any]:
    """GET /v1/videos: the cursor page the SDKs read (`data`, `has_more`, `last_id`)."""
    ordered = sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=order != "asc")
    if after:
        ids = [j.id for j in ordered]
        ordered = ordered[ids.index(after) + 1:] if after in ids else []
    page = ordered[:limit]
    return {"object": "list", "data": [j.public() for j in page], "has_more": len(ordered) > len(page),
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


###############################################################################
###############################################################################
# Model registry: models.yaml (hot reload) and the model-list cache
###############################################################################

TOOL_MODES = ("xml", "native", "auto")   # auto: native for bots Poe lists with `tools`, else xml
# Far beyond any real configuration (some 5000 models); parsing costs about a second per 256 KiB.
MODELS_YAML_MAX_BYTES = 256 * 1024
MODELS_YAML_CHECK_S = 2.0   # how often models.yaml is looked at for hand edits (tests shorten it)
TEMP_FILE_STALE_S = 60.0    # a save's temporary file older than this was left by an interrupted one
# What an entry may say; other keys are dropped (with one warning), so nothing else is kept or echoed.
MODEL_ENTRY_KEYS = ("mapping", "enable", "replace_response", "tool_mode")
CUSTOM_MODEL_KEYS = ("id", "created", "owned_by", "description", "context_length", "max_output_tokens",
                     "input_modalities", "output_modalities", "supported_features", "parameters")


@dataclass(frozen=True)
class ModelConfig:
    """models.yaml, in the Rust original's schema. `enable` is the master switch for renaming,
    hiding and custom models."""

    enable: bool = False
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    custom_models: list[dict[str, Any]] = field(default_factory=list)
    api_token: str | None = None
    use_v1_api: bool = False

    @classmethod
    def from_yaml(cls, text: str) -> ModelConfig:
        """Parse models.yaml. Aliases (`*name`) are refused: a few lines of them can expand to gigabytes.
        Slow for a big file: callers on the event loop run it in a thread."""
        with _gc_paused():
            data = _load_yaml(text)
        return cls() if data is None else cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        """Validate a configuration (from the file or the admin API). Raises ValueError saying what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("the top level must be a mapping")
        models = data.get("models") or {}
        if not isinstance(models, dict):
            raise ValueError("`models` must be a mapping of bot name to settings")
        clean: dict[str, dict[str, Any]] = {}
        dropped: set[str] = set()
        for name, entry in models.items():
            if entry is not None and not isinstance(entry, dict):
                raise ValueError(f"models.{name} must be a mapping")
            if entry and entry.get("tool_mode") not in (None, *TOOL_MODES):
                raise ValueError(f"models.{name}.tool_mode must be one of {', '.join(TOOL_MODES)}")
            if entry and entry.get("mapping") is not None and not isinstance(entry.get("mapping"), str):
                raise ValueError(f"models.{name}.mapping must be a string")
            for flag in ("enable", "replace_response"):
                if entry and entry.get(flag) is not None and not isinstance(entry.get(flag), bool):
                    raise ValueError(f"models.{name}.{flag} must be true or false")
            clean[str(name)] = _known_keys(entry or {}, MODEL_ENTRY_KEYS, dropped)
        custom = data.get("custom_models") or []
        if not isinstance(custom, list) or not all(isinstance(c, dict) and c.get("id") for c in custom):
            raise ValueError("`custom_models` must be a list of entries with an `id`")
        custom = [_known_keys(entry, CUSTOM_MODEL_KEYS, dropped) for entry in custom]
        for entry in custom:
            _check_custom_model(entry)
        if dropped:
            names = sorted(dropped)
            log.warning("models.yaml: unknown keys ignored: %s", ", ".join(
                repr(n[:40]) for n in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else ""))
        token = data.get("api_token")
        return cls(enable=bool(data.get("enable")), models=clean, custom_models=custom,
                   api_token=str(token) if token else None, use_v1_api=bool(data.get("use_v1_api")))

    def to_dict(self) -> dict[str, Any]:
        """The configuration in the file's schema; settings left unset are left out."""
        models = {name: {k: v for k, v in entry.items() if v is not None and v != ""}
                  for name, entry in self.models.items()}
        return {"enable": self.enable, "models": {k: v for k, v in models.items() if v},
                "custom_models": [dict(c) for c in self.custom_models], "api_token": self.api_token,
                "use_v1_api": self.use_v1_api}

    def entry(self, name: str) -> dict[str, Any] | None:
        """The models entry for a bot name, compared case-insensitively (exact match preferred)."""
        if name in self.models:
            return self.models[name]
        folded = name.casefold()
        for key, entry in self.models.items():
            if key.casefold() == folded:
                return entry
        return None


def _known_keys(entry: Mapping[Any, Any], known: Sequence[str], dropped: set[str]) -> dict[str, Any]:
    kept = {k: v for k, v in entry.items() if k in known}
    if len(kept) < len(entry):
        dropped.update(str(k) for k in entry if k not in known)
    return kept


def _check_custom_model(entry: Mapping[str, Any]) -> None:
    """What a custom model may declare about itself, in the names of Poe's model list."""
    where = f"custom_models[{entry['id']}]"
    for key in ("context_length", "max_output_tokens"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{where}.{key} must be a positive whole number of tokens")
    for key in ("input_modalities", "output_modalities", "supported_features"):
        value = entry.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            raise ValueError(f"{where}.{key} must be a list of names, e.g. [text, image]")
    parameters = entry.get("parameters")
    if parameters is None:
        return
    if not isinstance(parameters, list):
        raise ValueError(f"{where}.parameters must be a list of {{name, schema, default_value}} entries")
    for i, parameter in enumerate(parameters):
        if not isinstance(parameter, dict) or not isinstance(parameter.get("name"), str) \
                or not parameter["name"].strip():
            raise ValueError(f"{where}.parameters[{i}] must be a mapping with a `name`")
        schema = parameter.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise ValueError(f"{where}.parameters[{i}].schema must be a JSON schema mapping, e.g. {{type: boolean}}")
        enum = (schema or {}).get("enum")
        if enum is not None and not (isinstance(enum, list) and enum):
            raise ValueError(f"{where}.parameters[{i}].schema.enum must be a non-empty list")


def custom_bot_info(custom: Mapping[str, Any]) -> BotInfo:
    """A custom model of models.yaml as a catalogue entry: only what its owner declared is known."""
    cid = str(custom["id"])
    info = bot_info_from_poe({
        "id": cid, "created": custom.get("created"), "owned_by": str(custom.get("owned_by") or "custom"),
        "description": custom.get("description"),
        "context_window": {"context_length": custom.get("context_length"),
                           "max_output_tokens": custom.get("max_output_tokens")},
        "architecture": {"input_modalities": custom.get("input_modalities"),
                         "output_modalities": custom.get("output_modalities")},
        "supported_features": custom.get("supported_features"), "parameters": custom.get("parameters")})
    assert info is not None
    return info if info.created else dataclasses.replace(info, created=int(time.time()))


@dataclass(frozen=True)
class ModelRoute:
    bot: str                  # the Poe bot name used in /bot/{name}
    display: str              # the name echoed to the client
    replace_response: bool = False
    tool_mode: str = "xml"    # xml: tools as prompt text, calls parsed from the answer; native: Poe's fields;
                              # auto: native when the catalogue lists `tools` for the bot (decided per chat)


class ModelRegistry:
    """Reads models.yaml, notices hand edits within `check_interval_s`, and keeps the last good
    configuration in force when an edit does not parse."""

    def __init__(self, path: str, check_interval_s: float = MODELS_YAML_CHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = os.path.abspath(path)
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._config = ModelConfig()
        self._stamp: tuple[int, int] | None = None
        self._checked_at = -math.inf
        self._refreshing: asyncio.Future[None] | None = None
        self.last_error: str | None = None

    def config(self) -> ModelConfig:
        """The configuration in force. In an event loop this never blocks: `refresh()` reads a changed
        file in a thread (and is started here when a check is due); elsewhere (scripts, tests) the
        file is checked and read right here."""
        if self._clock() - self._checked_at >= self._check_interval_s:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                self._checked_at = self._clock()
                self._apply(self._read_if_changed(self._stamp))
            else:
                self._start_refresh()
        return self._config

    async def refresh(self) -> None:
        """Take a changed models.yaml into use, reading and parsing it in a thread; every caller
        waits for the same read. Cheap when no check is due."""
        if self._refreshing is None and self._clock() - self._checked_at < self._check_interval_s:
            return
        await asyncio.shield(self._start_refresh())

    def _start_refresh(self) -> asyncio.Future[None]:
        if self._refreshing is None:
            self._checked_at = self._clock()
            self._refreshing = asyncio.ensure_future(self._refresh_now())
            self._refreshing.add_done_callback(lambda task: task.cancelled() or task.exception())
        return self._refreshing

    async def _refresh_now(self) -> None:
        try:
            stamp = self._stamp
            loaded = await asyncio.get_running_loop().run_in_executor(None, self._read_if_changed, stamp)
            if self._stamp == stamp:   # a save while we read wins: it is newer
                self._apply(loaded)
        finally:
            self._refreshing = None

    def _read_if_changed(self, known: tuple[int, int] | None) -> tuple[Any, ...] | None:
        """Blocking (file I/O and parsing): None when the file is as `known`, else (stamp, config or
        None, error or None, message to log)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None if known is None else (None, ModelConfig(), None, "gone")
        except OSError as exc:
            return (known, None, f"cannot read {self.path}: {exc}", "")
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == known:
            return None
        yaml = _yaml()
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(MODELS_YAML_MAX_BYTES + 1)
            if len(raw) > MODELS_YAML_MAX_BYTES:
                raise ValueError(f"the file is larger than {MODELS_YAML_MAX_BYTES // 1024} KiB")
            return (stamp, ModelConfig.from_yaml(raw.decode("utf-8")), None, "loaded")
        except (OSError, ValueError, yaml.YAMLError) as exc:
            # Keep the last good configuration; never fall back to defaults and never rewrite the file.
            return (stamp, None, f"{self.path} is not valid, keeping the previous configuration: "
                                 f"{_yaml_problem(exc)}", "")

    def _apply(self, loaded: tuple[Any, ...] | None) -> None:
        if loaded is None:
            return
        stamp, config, error, event = loaded
        if event == "gone":
            log.warning("%s is gone; using the default model configuration", self.path)
        self._stamp = stamp
        if config is not None:
            self._config, self.last_error = config, None
            if event == "loaded":
                log.info("loaded model configuration from %s", self.path)
        else:
            self.last_error = error
            log.error("%s", str(error).replace("\n", " "))

    def save(self, config: ModelConfig) -> None:
        """Write the configuration atomically (temporary file + rename, both in CONFIG_DIR), keeping the
        previous file as models.yaml.bak, and take it into use at once. Raises OSError."""
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        header = ("# models.yaml for poe2openai, written by the admin page. Hand edits are welcome and take\n"
                  "# effect within seconds; comments are not kept when the admin page saves.\n")
        text = header + _dump_yaml(config.to_dict())
        try:
            mode = os.stat(self.path).st_mode & 0o777
            with open(self.path, "rb") as fh:
                _atomic_write(self.path + ".bak", fh.read(), mode)
        except FileNotFoundError:
            mode = 0o600   # it may hold api_token: private by default
        try:
            _atomic_write(self.path, text.encode("utf-8"), mode)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.EXDEV):
                raise
            # models.yaml is a single bind-mounted file (Docker -v file:file): it cannot be replaced,
            # only rewritten in place. The backup above keeps the previous content safe.
            with open(self.path, "r+b") as fh:
                fh.truncate(0)
                fh.write(text.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
        self._config, self.last_error = config, None
        st = os.stat(self.path)
        self._stamp = (st.st_mtime_ns, st.st_size)
        log.info("saved the model configuration to %s", self.path)

    def resolve(self, requested: str, catalogue: Catalogue | None = None, tool_mode: str = "xml") -> ModelRoute:
        """Map the client's model name to a Poe bot. Refuses disabled models with 404. With the catalogue,
        a known bot is asked for by its display name, whichever of its names the client or models.yaml used.
        `tool_mode` (the TOOL_MODE setting) applies when the bot's models.yaml entry sets none."""
        cfg = self.config()
        bot = requested
        if cfg.enable:
            folded = requested.casefold()
            for key, entry in cfg.models.items():  # file order: deterministic when names collide
                mapping = entry.get("mapping")
                if isinstance(mapping, str) and mapping.casefold() == folded:
                    bot = key
                    break
        info = catalogue.find(bot) if catalogue is not None else None
        if info is not None:
            bot = info.name
        entry = self._entry_of(cfg, bot, info)
        if cfg.enable and entry is not None and entry.get("enable") is False:
            raise ProxyError(404, f"The model '{shown(requested)}' is disabled on this proxy.",
                             "invalid_request_error", "model_not_found", "model")
        entry = entry or {}
        return ModelRoute(bot=bot, display=requested, replace_response=bool(entry.get("replace_response")),
                          tool_mode=entry.get("tool_mode") or tool_mode)

    @staticmethod
    def _entry_of(cfg: ModelConfig, name: str, info: BotInfo | None = None) -> dict[str, Any] | None:
        """The models.yaml entry of a bot, keyed by its display name or by Poe's id."""
        entry = cfg.entry(name)
        if entry is None and info is not None:
            entry = cfg.entry(info.name) or cfg.entry(info.id)
        return entry

    def bot_info(self, bot: str, catalogue: Catalogue | None) -> BotInfo | None:
        """What is known of a bot: a custom model's own declarations, else the catalogue's entry."""
        cfg = self.config()
        if cfg.enable:
            for custom in cfg.custom_models:
                if str(custom["id"]).casefold() == bot.casefold():
                    return custom_bot_info(custom)
        return catalogue.find(bot) if catalogue is not None else None

    def public_list(self, catalogue: Catalogue) -> list[BotInfo]:
        """The catalogue with this configuration applied: hidden, renamed and custom models. A bot's public
        id is its display name (the cased name users type), or its models.yaml mapping."""
        cfg = self.config()
        if not cfg.enable:
            return list(catalogue.bots)
        out: list[BotInfo] = []
        seen: set[str] = set()
        for info in catalogue.bots:
            entry = self._entry_of(cfg, info.name, info)
            if entry is not None and entry.get("enable") is False:
                continue
            mapping = entry.get("mapping") if entry else None
            item = dataclasses.replace(info, name=mapping) if isinstance(mapping, str) and mapping else info
            if item.name.casefold() not in seen:
                seen.add(item.name.casefold())
                out.append(item)
        for custom in cfg.custom_models:
            info = custom_bot_info(custom)
            entry = cfg.entry(info.name)
            if entry is not None and entry.get("enable") is False:
                continue
            mapping = entry.get("mapping") if entry else None
            if isinstance(mapping, str) and mapping:
                info = dataclasses.replace(info, name=mapping)
            if info.name.casefold() in seen:
                continue
            seen.add(info.name.casefold())
            out.append(info)
        return out


def _yaml() -> Any:
    """PyYAML, imported on first use: a proxy that never reads models.yaml never pays for the parser."""
    import yaml
    return yaml


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing or writing YAML in a thread makes objects by the hundred thousand, and the collections
    that triggers would run in that thread with the GIL held, stalling the event loop for as long.
    Paused meanwhile (a few seconds at most; nothing else in the proxy pauses it)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_yaml(text: str) -> Any:
    """safe_load without aliases: libyaml's parser when PyYAML has it (several times faster), its
    events checked for aliases first; else the pure-Python loader that refuses them as it goes."""
    yaml = _yaml()
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is None:
        return yaml.load(text, Loader=_no_alias_loader())
    for event in yaml.parse(text, Loader=fast):
        if isinstance(event, yaml.AliasEvent):
            raise _alias_error(event.start_mark)
    return yaml.load(text, Loader=fast)


def _alias_error(mark: Any) -> Exception:
    return _yaml().composer.ComposerError(None, None, "aliases (*name) are not allowed in models.yaml", mark)


def _dump_yaml(data: Any) -> str:
    yaml = _yaml()
    with _gc_paused():
        return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                         allow_unicode=True)


_YAML_LOADER: Any = None


def _no_alias_loader() -> Any:
    """PyYAML's safe loader, refusing aliases (the "billion laughs" expansion) with the line they are on."""
    global _YAML_LOADER
    if _YAML_LOADER is None:
        yaml = _yaml()

        class NoAliasLoader(yaml.SafeLoader):   # type: ignore[misc,name-defined]
            def compose_node(self, parent: Any, index: Any) -> Any:
                if self.check_event(yaml.AliasEvent):
                    raise _alias_error(self.peek_event().start_mark)
                return super().compose_node(parent, index)

        _YAML_LOADER = NoAliasLoader
    return _YAML_LOADER


_TEMP_NAME = re.compile(r"\.models\.yaml\.(?:bak\.)?[A-Za-z0-9_]{8}")   # what _atomic_write leaves if killed


def remove_stale_temp_files(folder: str, older_than_s: float = TEMP_FILE_STALE_S) -> int:
    """Delete temporary files an interrupted save left in CONFIG_DIR (only our own names, only old
    ones: a save in progress in another worker is never touched). Returns how many went."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not _TEMP_NAME.fullmatch(name):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path) and time.time() - os.stat(path).st_mtime > older_than_s:
                os.unlink(path)
                removed += 1
        except OSError:
            pass
    return removed


def _atomic_write(path: str, data: bytes, mode: int) -> None:
    """Readers see the old file or the new one, never half of either."""
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def _yaml_problem(exc: BaseException) -> str:
    """What is wrong with a YAML file, without quoting its lines (they may hold api_token)."""
    if isinstance(exc, _yaml().MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem or exc.context or 'syntax error'}{where}"
    return str(exc)


def _seconds(stamp: float) -> int:
    """Poe's /v1/models gives `created` in milliseconds; OpenAI clients expect seconds."""
    return int(stamp // 1000) if stamp > 100_000_000_000 else int(stamp)


def supported_parameters(info: BotInfo) -> list[str]:
    """The request fields that do something for this bot through the proxy, in OpenRouter's names, then
    the bot's own parameters (a request key of that name is forwarded to it)."""
    declared = _declared(info)
    text_out = info.output_modalities is None or "text" in info.output_modalities
    names = ["max_tokens", "temperature", "stop"]
    if text_out:
        names += ["tools", "tool_choice", "response_format", "structured_outputs"]
    if REASONING_PARAMETERS & declared.keys() or info.reasoning is not None:
        names += ["reasoning", "include_reasoning"]
    if {"web_search", "enable_web_search"} & declared.keys():
        names.append("web_search_options")
    return list(dict.fromkeys(names + list(declared)))


def openai_model(info: BotInfo) -> dict[str, Any]:
    """A bot in /v1/models: OpenAI's fields, plus what it can do in the names OpenRouter uses (which Open
    WebUI, Cline, Roo Code, Cherry Studio and LiteLLM read) and in Poe's own names. Unknown facts are left
    out rather than guessed."""
    out: dict[str, Any] = {"id": info.name, "object": "model", "created": info.created, "owned_by": info.owned_by,
                           "root": info.id, "name": info.name}
    if info.description:
        out["description"] = info.description
    if info.context_length is not None:
        out["context_length"] = info.context_length
    if info.max_output_tokens is not None:
        out["max_output_tokens"] = info.max_output_tokens
    if info.context_length is not None or info.max_output_tokens is not None:
        out["context_window"] = {"context_length": info.context_length, "max_output_tokens": info.max_output_tokens}
        out["top_provider"] = {"context_length": info.context_length,
                               "max_completion_tokens": info.max_output_tokens, "is_moderated": False}
    if info.input_modalities is not None or info.output_modalities is not None:
        inputs, outputs = list(info.input_modalities or ("text",)), list(info.output_modalities or ("text",))
        out["architecture"] = {"input_modalities": inputs, "output_modalities": outputs,
                               "modality": f"{','.join(inputs)}->{','.join(outputs)}"}
    if info.features is not None:
        out["supported_features"] = list(info.features)
    out["supported_parameters"] = supported_parameters(info)
    out["endpoints"] = bot_endpoints(info)
    if info.parameters is not None:
        out["parameters"] = [{"name": p.name, "schema": dict(p.schema),
                              **({"default_value": p.default} if p.has_default else {}),
                              **({"description": p.description} if p.description else {})} for p in info.parameters]
    if info.reasoning is not None:
        r = info.reasoning
        out["reasoning"] = {"budget": None if r.budget_max is None else
                            {"min_tokens": r.budget_min or 0, "max_tokens": r.budget_max},
                            "required": r.required, "supports_reasoning_effort": r.supports_effort}
    if info.pricing is not None:
        out["pricing"] = dict(info.pricing)
    return out


def anthropic_model(info: BotInfo) -> dict[str, Any]:
    """A bot in the Anthropic SDK's shape (models.list / models.retrieve)."""
    out: dict[str, Any] = {"type": "model", "id": info.name, "display_name": info.name,
                           "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created)),
                           "lifecycle": "active"}
    if info.context_length is not None:
        out["max_input_tokens"] = info.context_length
    if info.max_output_tokens is not None:
        out["max_tokens"] = info.max_output_tokens
    return out


def anthropic_model_list(bots: Sequence[BotInfo]) -> dict[str, Any]:
    data = [anthropic_model(info) for info in bots]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


###############################################################################
###############################################################################
# HTTP plumbing: an h11 stream class for calls to Poe (inbound has its own protocol, below)
###############################################################################

READ_CHUNK_BYTES = 64 * 1024
WRITE_TIMEOUT_S = 30.0
POOL_IDLE_PER_ORIGIN_COUNT = 16   # keep-alive connections kept per origin; more are closed when let go
POOL_IDLE_EXPIRY_S = 60.0         # an idle pooled connection older than this is closed, not reused
PROXY_REPLY_READ_BYTES = 4096     # one read of a proxy's answer to CONNECT
HTTP_PROXY_DEFAULT_PORT = 8080    # an HTTP(S)_PROXY URL without a port
BODY_PIECE_BYTES = 256 * 1024
INBOUND_MAX_HEAD_BYTES = 32 * 1024
OUTBOUND_MAX_HEAD_BYTES = 128 * 1024


if sys.version_info >= (3, 11):
    async def read_within(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
        """One read with a deadline (asyncio.TimeoutError). asyncio.timeout is a timer, not a task."""
        async with asyncio.timeout(timeout_s):  # novermin - this branch runs on 3.11+ only
            return await reader.read(READ_CHUNK_BYTES)
else:
    async def read_within(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
        """One read with a deadline (asyncio.TimeoutError)."""
        return await asyncio.wait_for(reader.read(READ_CHUNK_BYTES), timeout_s)


class HTTPStream:
    """An h11.Connection over an asyncio (reader, writer) pair, with a deadline on every await."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 role: type[h11.CLIENT] | type[h11.SERVER], max_head_bytes: int) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(role, max_incomplete_event_size=max_head_bytes)
        self.bytes_sent = 0
        self._loop = asyncio.get_running_loop()   # asked once: each ask costs a getpid() syscall
        # receive(): one deadline timer per connection, moved lazily rather than set for every read.
        self._deadline_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading: asyncio.Task[Any] | None = None
        self._timed_out = False

    async def send(self, *events: h11._events.Event, timeout_s: float = WRITE_TIMEOUT_S) -> None:
        try:
            # One write per call: a response head and its first data leave in one segment.
            data = b"".join(self.conn.send(event) or b"" for event in events)
            if data:
                self.writer.write(data)
                self.bytes_sent += len(data)
            # drain() only blocks when the peer is slow; skip the timer in the common case.
            if self.writer.transport.get_write_buffer_size() > 0:
                await asyncio.wait_for(self.writer.drain(), timeout_s)
            else:
                await self.writer.drain()
        except BaseException:
            self.conn.send_failed()
            raise

    async def next_event(self, timeout_s: float) -> Any:
        """The next h11 event; raises asyncio.TimeoutError when the peer is silent for timeout_s."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await read_within(self.reader, timeout_s)
            self.conn.receive_data(data)  # b"" tells h11 the peer closed

    async def receive(self, timeout_s: float) -> bytes:
        """One read (b"" once the peer closed); asyncio.TimeoutError after timeout_s of silence.

        A paced answer is read event by event, tens of milliseconds apart: a timer per read (wait_for,
        asyncio.timeout) would be set and cancelled for every one. Instead a read only moves the
        deadline; the one timer, when it fires at an older deadline, sleeps on to the new one, and
        only a deadline that really passed cancels the read, which then becomes a TimeoutError."""
        loop = self._loop
        at = loop.time() + timeout_s
        self._deadline_s = at
        timer = self._timer
        if timer is None or timer.when() > at:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(at, self._deadline_passed)
        self._reading = task = asyncio.current_task(loop)
        try:
            return await self.reader.read(READ_CHUNK_BYTES)
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            self._timed_out = False
            # Our own cancel: a timeout, unless someone else cancelled the task too (3.11+ can tell).
            if sys.version_info >= (3, 11) and task is not None and task.uncancel() > 0:  # novermin
                raise
            raise asyncio.TimeoutError from None
        finally:
            self._reading = None

    def _deadline_passed(self) -> None:
        self._timer = None
        task = self._reading
        if task is None:
            return   # not reading: the next read sets its own deadline
        loop = self._loop
        if loop.time() < self._deadline_s:
            self._timer = loop.call_at(self._deadline_s, self._deadline_passed)
            return
        self._timed_out = True
        task.cancel()

    def is_reusable(self) -> bool:
        """Both sides finished their messages (or a new cycle began) and the socket is still open."""
        states = (self.conn.our_state, self.conn.their_state)
        return (states in ((h11.DONE, h11.DONE), (h11.IDLE, h11.IDLE))
                and not self.writer.transport.is_closing() and not self.reader.at_eof())

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError):
            pass  # the socket is going away either way


# ----------------------------------------------------------------------------- outbound

@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = split_url(url)
        scheme = parts.scheme
        return cls(scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80))

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _target(url: str) -> str:
    parts = split_url(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class UpstreamResponse:
    """A response from Poe whose body is read piece by piece; the connection goes back to the pool
    only when the body was read to the end."""

    def __init__(self, pool: UpstreamPool, origin: Origin, stream: HTTPStream, response: h11.Response) -> None:
        self.status = response.status_code
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
        self._pool = pool
        self._origin = origin
        self._stream: HTTPStream | None = stream
        self.complete = False
        self._hungry = False   # h11 said NEED_DATA last time: asking again before a read would say it again

    async def read_chunk(self, timeout_s: float) -> bytes | None:
        """The next piece of the body, or None at its end. Raises asyncio.TimeoutError on silence and
        ProxyError when Poe drops the connection before the body is complete."""
        stream = self._stream
        if stream is None or self.complete:
            return None
        conn = stream.conn
        try:
            event = h11.NEED_DATA if self._hungry else conn.next_event()
            self._hungry = False
            while event is h11.NEED_DATA:
                conn.receive_data(await stream.receive(timeout_s))   # b"" tells h11 the peer closed
                event = conn.next_event()
        except asyncio.TimeoutError:
            raise  # silence, not a failure: the caller decides (on 3.11+ this is an OSError too)
        except (h11.RemoteProtocolError, ConnectionError, ssl.SSLError, OSError) as exc:
            await self.aclose()
            raise upstream_error(f"Poe closed the connection before the answer was complete ({_describe(exc)})") \
                from None
        if isinstance(event, h11.EndOfMessage):
            self.complete = True
            self._release()
            return None
        if not isinstance(event, h11.Data):
            await self.aclose()
            raise upstream_error("Poe closed the connection before the answer was complete")
        # Take everything h11 already holds in one go: one read often carries many HTTP chunks.
        pieces = [event.data]
        try:
            while True:
                more = conn.next_event()
                if isinstance(more, h11.Data):
                    pieces.append(more.data)
                    continue
                if isinstance(more, h11.EndOfMessage):
                    self.complete = True
                    self._release()
                self._hungry = more is h11.NEED_DATA
                break   # NEED_DATA (or anything else: the next call deals with it)
        except h11.RemoteProtocolError:
            pass        # the next call reports it
        return b"".join(pieces)

    async def read_all(self, limit_bytes: int, timeout_s: float) -> bytes:
        body = bytearray()
        while True:
            try:
                chunk = await self.read_chunk(timeout_s)
            except asyncio.TimeoutError:
                await self.aclose()
                raise upstream_error(f"Poe stopped sending for {timeout_s:g} s", 504, "upstream_timeout") from None
            if chunk is None:
                return bytes(body)
            body += chunk
            if len(body) > limit_bytes:
                await self.aclose()
                raise upstream_error(f"Poe's answer is larger than {limit_bytes} bytes")

    def _release(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._pool.release(self._origin, stream)

    async def aclose(self) -> None:
        """Drop the connection (closing it makes Poe stop generating)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()

    async def finish(self, timeout_s: float = 1.0) -> None:
        """Read what is left of the body, for at most timeout_s in all, so the connection can be
        reused; else close it (which also tells Poe to stop generating)."""
        deadline = time.monotonic() + timeout_s
        try:
            while await self.read_chunk(max(0.001, deadline - time.monotonic())) is not None:
                if time.monotonic() >= deadline:
                    raise asyncio.TimeoutError
        except (ProxyError, asyncio.TimeoutError):
            await self.aclose()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Event-loop turns given to a pooled connection before reuse; see UpstreamPool._take_idle.
POOL_CHECK_YIELDS = 2


class UpstreamPool:
    """Keep-alive connections to Poe, per origin; HTTPS with verification; HTTP(S)_PROXY aware."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None = None,
                 max_idle_per_origin: int = POOL_IDLE_PER_ORIGIN_COUNT,
                 idle_expiry_s: float = POOL_IDLE_EXPIRY_S) -> None:
        self._settings = settings
        self._ssl_given = ssl_context
        self._ssl_default: ssl.SSLContext | None = None
        self._proxies = dict(settings.proxies)
        self._idle: dict[Origin, deque[tuple[HTTPStream, float]]] = {}
        self._max_idle = max_idle_per_origin
        self._idle_expiry_s = idle_expiry_s
        self.connections_opened = 0

    def _ssl(self) -> ssl.SSLContext:
        """The TLS context, built on first use: loading the CA store costs about 2 MB, which a proxy
        talking plain HTTP (tests, a local Poe stand-in) never needs."""
        if self._ssl_given is not None:
            return self._ssl_given
        if self._ssl_default is None:
            self._ssl_default = _default_ssl_context()
        return self._ssl_default

    def release(self, origin: Origin, stream: HTTPStream) -> None:
        if not stream.is_reusable():
            asyncio.ensure_future(stream.aclose())
            return
        stream.conn.start_next_cycle()
        idle = self._idle.setdefault(origin, deque())
        idle.append((stream, time.monotonic()))
        while len(idle) > self._max_idle:
            asyncio.ensure_future(idle.popleft()[0].aclose())

    async def _take_idle(self, origin: Origin) -> HTTPStream | None:
        """A pooled connection still open as far as can be known before writing to it, or None.

        Poe closes keep-alive connections it finds idle. A FIN (or RST) that is already in our socket
        is only seen once the event loop has polled the socket and then run the transport's read
        callback: the first yield lets the loop poll (its callbacks queue up behind us), the second
        lets them run, so EOF or a reset shows in `is_reusable()`. A close that is still on the wire
        when we write cannot be seen by anyone; `request` then answers 502 rather than send again.
        """
        idle = self._idle.get(origin)
        if not idle:
            return None
        for _ in range(POOL_CHECK_YIELDS):
            await asyncio.sleep(0)
        now = time.monotonic()
        while idle:
            stream, since = idle.pop()
            if now - since < self._idle_expiry_s and stream.is_reusable():
                return stream
            asyncio.ensure_future(stream.aclose())
        return None

    async def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                await idle.pop()[0].aclose()

    async def request(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | Sequence[bytes],
                      what: str, timeout_s: float | None = None) -> UpstreamResponse:
        """Send one request and return once the response head arrived (or raise ProxyError).

        A request is sent a second time, on a fresh connection, only when it provably never reached
        Poe: the pooled connection failed while we were still writing it. Once it was written in
        full, Poe may be generating (and billing) the answer, so a connection lost before the head
        is a 502 and never a second query.
        """
        origin = Origin.of(url)
        read_timeout_s = timeout_s or self._settings.read_timeout_seconds
        # A body may come in pieces (an upload: multipart head, the file, tail), written one after the
        # other so that a big file is never joined into a copy.
        pieces: list[bytes] = [body] if isinstance(body, (bytes, bytearray)) else list(body)
        size = sum(len(piece) for piece in pieces)
        for attempt in (0, 1):
            stream = await self._take_idle(origin) if attempt == 0 else None
            reused = stream is not None
            if stream is None:
                stream = await self._connect(origin, what)
            proxy_http = self._proxy_for(origin) is not None and origin.scheme == "http"
            target = url if proxy_http else _target(url)
            all_headers = [("Host", origin.netloc), *headers, ("Content-Length", str(size))]
            try:
                if size <= BODY_PIECE_BYTES:
                    await stream.send(h11.Request(method=method, target=target, headers=all_headers),
                                      *(h11.Data(data=piece) for piece in pieces if piece), h11.EndOfMessage())
                else:   # a big upload: write it piece by piece, each write with its own deadline
                    await stream.send(h11.Request(method=method, target=target, headers=all_headers))
                    for piece in pieces:
                        view = memoryview(piece)
                        for start in range(0, len(piece), BODY_PIECE_BYTES):
                            await stream.send(h11.Data(data=view[start:start + BODY_PIECE_BYTES]))
                    await stream.send(h11.EndOfMessage())
            except asyncio.TimeoutError:
                await stream.aclose()
                raise upstream_error(f"{what}: Poe did not take the request within {WRITE_TIMEOUT_S:g} s", 504,
                                     "upstream_timeout") from None
            except (h11.LocalProtocolError, ConnectionError, ssl.SSLError, OSError) as exc:
                # Part of the request at most reached Poe, which cannot act on a body it did not get whole.
                await stream.aclose()
                if reused:
                    continue
                raise upstream_error(f"{what}: the connection to {origin.host} failed while sending the request "
                                     f"({_describe(exc)})") from None
            except BaseException:
                stream.writer.close()   # cancelled mid-request: the connection is in an unknown state
                raise
            try:
                while True:
                    event = await stream.next_event(read_timeout_s)
                    if isinstance(event, h11.Response):
                        return UpstreamResponse(self, origin, stream, event)
                    if isinstance(event, h11.InformationalResponse):
                        continue
                    raise h11.RemoteProtocolError("connection closed before a response")
            except asyncio.TimeoutError:
                await stream.aclose()
                raise upstream_error(f"{what}: Poe did not answer within {read_timeout_s:g} s", 504,
                                     "upstream_timeout") from None
            except (h11.RemoteProtocolError, ConnectionError, ssl.SSLError, OSError) as exc:
                detail = "closed without an answer" if stream.reader.at_eof() else _describe(exc)
                await stream.aclose()
                raise upstream_error(f"{what}: the connection to {origin.host} was lost after the request was sent "
                                     f"({detail}); it was not sent again, so that Poe does not answer (and bill) "
                                     "it twice") from None
            except BaseException:
                stream.writer.close()
                raise
        raise AssertionError("unreachable")

    def _proxy_for(self, origin: Origin) -> str | None:
        if not self._proxies or bypasses_proxy(origin.host, origin.port, self._proxies.get("no", "")):
            return None
        return self._proxies.get(origin.scheme)

    async def _connect(self, origin: Origin, what: str) -> HTTPStream:
        timeout_s = self._settings.connect_timeout_seconds
        proxy = self._proxy_for(origin)
        where = f"{origin.host}:{origin.port}"
        stage: list[str] = []   # how far a proxy got, for the message when the deadline strikes
        try:
            if proxy is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    origin.host, origin.port,
                    ssl=self._ssl() if origin.scheme == "https" else None,
                    server_hostname=origin.host if origin.scheme == "https" else None,
                    ssl_handshake_timeout=timeout_s if origin.scheme == "https" else None,
                    limit=READ_CHUNK_BYTES), timeout_s)
            else:
                where = f"{where} through the proxy {_redact_url(proxy)}"
                reader, writer = await asyncio.wait_for(self._via_proxy(origin, proxy, what, stage), timeout_s)
        except asyncio.TimeoutError:   # nothing answered: unreachable, a gateway error like the others
            raise upstream_error(f"{what}: {where} is unreachable (no connection within {timeout_s:g} s"
                                 + (f": {stage[0]})" if stage else ")"), code="upstream_unreachable") from None
        except ProxyError:
            raise
        except socket.gaierror as exc:
            raise upstream_error(f"{what}: cannot resolve {origin.host} (DNS failure: {exc.strerror or exc})",
                                 code="upstream_dns_error") from None
        except ssl.SSLCertVerificationError as exc:
            raise upstream_error(f"{what}: TLS certificate verification failed for {where}: "
                                 f"{exc.verify_message or exc.reason}", code="upstream_tls_error") from None
        except ssl.SSLError as exc:
            raise upstream_error(f"{what}: TLS handshake with {where} failed ({exc.reason or exc})",
                                 code="upstream_tls_error") from None
        except ConnectionRefusedError:
            raise upstream_error(f"{what}: connection refused by {where}", code="upstream_unreachable") from None
        except OSError as exc:
            raise upstream_error(f"{what}: cannot connect to {where} ({_describe(exc)})",
                                 code="upstream_unreachable") from None
        self.connections_opened += 1
        return HTTPStream(reader, writer, h11.CLIENT, OUTBOUND_MAX_HEAD_BYTES)

    async def _via_proxy(self, origin: Origin, proxy_url: str, what: str,
                         stage: list[str]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to `origin` through an http:// proxy. Whatever goes wrong with the proxy itself
        is a ProxyError 502 `upstream_proxy_error`; TLS problems with Poe beyond it stay TLS errors."""
        proxy = urllib.parse.urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
        if proxy.scheme != "http":
            raise upstream_error(f"proxy {_redact_url(proxy_url)}: only http:// proxy URLs are supported",
                                 code="upstream_proxy_error")
        proxy_host, proxy_port = proxy.hostname or "", proxy.port or HTTP_PROXY_DEFAULT_PORT
        name = f"the proxy {proxy_host}:{proxy_port}"

        def failure(what_happened: str, exc: BaseException | None = None) -> ProxyError:
            return upstream_error(f"{what}: {name} {what_happened}" + (f" ({_describe(exc)})" if exc else ""),
                                  code="upstream_proxy_error")

        stage[:] = [f"{name} did not accept the connection"]
        if origin.scheme == "http":
            # Plain HTTP goes to the proxy in absolute form; no tunnel needed.
            try:
                return await asyncio.open_connection(proxy_host, proxy_port, limit=READ_CHUNK_BYTES)
            except OSError as exc:
                raise failure("cannot be reached", exc) from None
        # HTTPS: open a TCP socket to the proxy, ask for a CONNECT tunnel on the raw socket, then
        # run TLS over it. Working on the socket before asyncio wraps it avoids start_tls, which
        # StreamWriter only has from Python 3.11.
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(proxy_host, proxy_port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise failure("cannot be resolved", exc) from None
        sock: socket.socket | None = None
        last_error: OSError | None = None
        for family, type_, proto, _, address in infos:
            candidate = socket.socket(family, type_, proto)
            candidate.setblocking(False)
            try:
                await loop.sock_connect(candidate, address)
                sock = candidate
                break
            except OSError as exc:
                candidate.close()
                last_error = exc
        if sock is None:
            raise failure("cannot be reached", last_error)
        try:
            authority = f"{origin.host}:{origin.port}"
            stage[:] = [f"{name} did not answer the CONNECT request for {authority}"]
            headers = [("Host", authority)]
            if proxy.username:
                creds = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
                headers.append(("Proxy-Authorization", "Basic " + base64.b64encode(creds.encode()).decode()))
            tunnel = h11.Connection(h11.CLIENT)
            try:
                await loop.sock_sendall(sock, tunnel.send(h11.Request(method="CONNECT", target=authority,
                                                                      headers=headers)))
                answered = False
                while True:
                    event = tunnel.next_event()
                    if event is h11.NEED_DATA:
                        data = await loop.sock_recv(sock, PROXY_REPLY_READ_BYTES)
                        if not data:
                            how = "in the middle of its answer to" if answered else "without answering"
                            raise failure(f"closed the connection {how} the CONNECT request for {authority}")
                        answered = True
                        tunnel.receive_data(data)
                        continue
                    if isinstance(event, h11.Response):
                        break
                    if not isinstance(event, h11.InformationalResponse):
                        raise failure(f"answered the CONNECT request for {authority} with {type(event).__name__}")
            except h11.RemoteProtocolError as exc:   # not HTTP, or cut off in the middle of its answer
                raise failure(f"sent an answer to CONNECT that is not valid HTTP ({exc})") from None
            except OSError as exc:
                raise failure(f"failed while asked for a tunnel to {authority}", exc) from None
            if not 200 <= event.status_code < 300:
                raise failure(f"refused the tunnel to {authority} (HTTP {event.status_code})")
            if tunnel.trailing_data[0]:
                raise failure("sent data before the TLS handshake")
            stage[:] = [f"the TLS handshake with {origin.host} through {name} did not finish"]
            try:
                return await asyncio.open_connection(sock=sock, ssl=self._ssl(), server_hostname=origin.host,
                                                     ssl_handshake_timeout=self._settings.connect_timeout_seconds,
                                                     limit=READ_CHUNK_BYTES)
            except ssl.SSLCertVerificationError:
                raise       # Poe's certificate, seen through the tunnel: a TLS error, reported by _connect
            except (ssl.SSLEOFError, ConnectionError, EOFError) as exc:
                raise failure(f"closed the tunnel to {authority} during the TLS handshake", exc) from None
        except BaseException:
            sock.close()
            raise


def _default_ssl_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()   # CERT_REQUIRED + hostname check, system CA store
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx




###############################################################################
###############################################################################
# Poe client: bot queries (SSE), model list, uploads
###############################################################################

USER_AGENT = f"poe2openai/{__version__}"
MODEL_LIST_MAX_BYTES = 32 * 1024 * 1024   # Poe's whole model list (a few hundred KiB today)
UPLOAD_REPLY_MAX_BYTES = 1024 * 1024      # Poe's answer to an upload (a small JSON object)
ERROR_BODY_MAX_BYTES = 64 * 1024          # an error body read for its message; the rest is dropped
ERROR_BODY_READ_TIMEOUT_S = 5.0           # ... and no longer waited for
UPLOAD_CONCURRENCY_COUNT = 4              # uploads to Poe at once; more wait their turn


class PoeEventStream:
    """The SSE events of one bot answer, pulled piece by piece with an idle deadline."""

    def __init__(self, response: UpstreamResponse, idle_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._response = response
        self._decoder = SSEDecoder()
        self._idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._last_bytes_at = clock()
        self.ended = False
        self._unread: list[SSEEvent] = []

    def unread(self, events: Sequence[SSEEvent]) -> None:
        """Give back events already read (the chat pipeline looks at the start of an answer before it
        decides how to go on): the next read() returns them first."""
        self._unread = [*events, *self._unread]

    async def read(self, wait_s: float) -> list[SSEEvent] | None:
        """Events from the next piece of the body: [] when nothing came within wait_s, None once the
        body has ended. Raises ProxyError when Poe has been silent past the idle timeout or drops
        the connection."""
        if self._unread:
            events, self._unread = self._unread, []
            return events
        if self.ended:
            return None
        idle_left_s = self._idle_timeout_s - (self._clock() - self._last_bytes_at)
        if idle_left_s <= 0:
            await self._response.aclose()
            raise upstream_error(f"Poe sent nothing for {self._idle_timeout_s:g} s", 504, "upstream_timeout")
        try:
            chunk = await self._response.read_chunk(min(wait_s, idle_left_s))
        except asyncio.TimeoutError:
            return []
        if chunk is None:
            self.ended = True
            try:
                return self._decoder.close()
            except ValueError as exc:
                raise upstream_error(f"Poe's event stream is malformed ({exc})") from None
        self._last_bytes_at = self._clock()
        try:
            return self._decoder.feed(chunk)
        except ValueError as exc:
            await self._response.aclose()
            raise upstream_error(f"Poe's event stream is malformed ({exc})") from None

    async def finish(self, complete: bool, wait_s: float = 1.0) -> None:
        """Called once we have what we need. After Poe's `done` the body ends at once: read its end so
        the connection can be reused. Otherwise (we stopped early) close it so Poe stops generating."""
        if not self.ended:
            if complete:
                await self._response.finish(wait_s)
            else:
                await self._response.aclose()
            self.ended = True

    async def aclose(self) -> None:
        await self._response.aclose()


USAGE_TIMEOUT_S = 15.0            # each of Poe's usage calls, for the admin page
USAGE_MAX_BYTES = 4 * 1024 * 1024
POINTS_HISTORY_PAGE = 100         # Poe's largest page
POINTS_HISTORY_MAX_PAGES = 10     # 1000 queries: the admin page's summary, not an audit


class PoeClient:
    def __init__(self, settings: Settings, pool: UpstreamPool) -> None:
        self._settings = settings
        self._pool = pool

    async def open_bot_stream(self, bot: str, query: dict[str, Any], api_key: str) -> PoeEventStream:
        """POST the query to /bot/{bot}. Returns once Poe accepted it; raises ProxyError otherwise."""
        url = f"{self._settings.poe_base_url}/bot/{urllib.parse.quote(bot, safe='')}"
        headers = [("Authorization", f"Bearer {api_key}"), ("Content-Type", "application/json"),
                   ("Accept", "text/event-stream"), ("Accept-Encoding", "identity"),
                   ("Cache-Control", "no-store"), ("User-Agent", USER_AGENT)]
        response = await self._pool.request("POST", url, headers, dump_json(query), f"bot {bot}")
        if response.status != 200:
            body = await _read_error_body(response)
            raise classify_poe_status(response.status, body, f"bot {bot}", response.headers)
        await _refuse_encoded(response, f"bot {bot}")
        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            body = await _read_error_body(response)
            detail = _error_text_from_body(body)
            raise upstream_error(f"bot {bot}: Poe answered with {content_type or 'no content type'} instead of "
                                 f"an event stream" + (f": {detail}" if detail else ""))
        return PoeEventStream(response, self._settings.read_timeout_seconds)

    async def list_models(self, api_key: str | None) -> Catalogue:
        url = f"{self._settings.poe_base_url}/v1/models"
        headers = [("Accept", "application/json"), ("Accept-Encoding", "identity"), ("User-Agent", USER_AGENT)]
        if api_key:
            headers.append(("Authorization", f"Bearer {api_key}"))
        response = await self._pool.request("GET", url, headers, b"", "model list")
        if response.status == 200:
            await _refuse_encoded(response, "model list")
        body = await response.read_all(MODEL_LIST_MAX_BYTES, self._settings.read_timeout_seconds)
        if response.status != 200:
            raise classify_poe_status(response.status, body, "model list", response.headers)
        try:
            payload = json.loads(body)
        except ValueError:
            raise upstream_error("model list: Poe's answer is not JSON") from None
        return catalogue_from_poe(payload)

    async def _usage_json(self, path: str, api_key: str, what: str) -> Any:
        """GET one of Poe's usage endpoints with `api_key`: its JSON, or ProxyError (a 401 stays a 401)."""
        url = f"{self._settings.poe_base_url}{path}"
        headers = [("Authorization", f"Bearer {api_key}"), ("Accept", "application/json"),
                   ("Accept-Encoding", "identity"), ("User-Agent", USER_AGENT)]
        timeout_s = min(self._settings.read_timeout_seconds, USAGE_TIMEOUT_S)
        response = await self._pool.request("GET", url, headers, b"", what, timeout_s)
        if response.status == 200:
            await _refuse_encoded(response, what)
        body = await response.read_all(USAGE_MAX_BYTES, timeout_s)
        if response.status != 200:
            raise classify_poe_status(response.status, body, what, response.headers)
        try:
            return json.loads(body)
        except ValueError:
            raise upstream_error(f"{what}: Poe's answer is not JSON") from None

    async def current_balance(self, api_key: str) -> int | float:
        payload = await self._usage_json("/usage/current_balance", api_key, "points balance")
        balance: Any = payload.get("current_point_balance") if isinstance(payload, dict) else None
        if not _is_number(balance):
            raise upstream_error("points balance: Poe's answer has no current_point_balance")
        return balance

    async def points_history(self, api_key: str, since_s: float,
                             max_pages: int = POINTS_HISTORY_MAX_PAGES) -> tuple[list[dict[str, Any]], bool]:
        """The key's points history entries back to `since_s` (Poe keeps 30 days, newest first, 100 a page),
        following `starting_after` for at most `max_pages` pages. Returns (entries, complete): complete is
        False when the page bound cut the history short."""
        entries: list[dict[str, Any]] = []
        after: str | None = None
        for _ in range(max_pages):
            query = {"limit": str(POINTS_HISTORY_PAGE)}
            if after is not None:
                query["starting_after"] = after
            payload = await self._usage_json("/usage/points_history?" + urllib.parse.urlencode(query), api_key,
                                             "points history")
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, list):
                raise upstream_error("points history: Poe's answer has no `data` array")
            page = [e for e in data if isinstance(e, dict)]
            entries += page
            last = page[-1] if page else None
            older = any(_is_number(e.get("creation_time")) and e["creation_time"] / 1e6 < since_s for e in page)
            if not payload.get("has_more") or older or last is None or not isinstance(last.get("query_id"), str):
                return entries, True
            after = last["query_id"]
        return entries, False


async def _refuse_encoded(response: UpstreamResponse, what: str) -> None:
    """We ask for `Accept-Encoding: identity` and decode nothing: a compressed body would read as
    garbage (an empty answer), so it is an error that says what came."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding and encoding != "identity":
        await response.aclose()
        raise upstream_error(f"{what}: Poe sent a body with Content-Encoding {encoding[:40]!r}, which the proxy "
                             "did not ask for (it asks for identity) and cannot read")


async def _read_error_body(response: UpstreamResponse) -> bytes:
    try:
        return await response.read_all(ERROR_BODY_MAX_BYTES, ERROR_BODY_READ_TIMEOUT_S)
    except (ProxyError, asyncio.TimeoutError):
        await response.aclose()
        return b""


MEDIA_DOWNLOAD_MAX_BYTES = 1024 * 1024 * 1024   # one file a bot made; b64_json holds it in memory whole
MEDIA_REDIRECTS = 3


async def open_download(pool: UpstreamPool, url: str, what: str) -> UpstreamResponse:
    """GET a file a bot made (its attachment URL) through the outbound pool, with its timeouts and proxy
    settings; a few redirects are followed. No credentials go with it: attachment URLs need none, and
    they may point anywhere. Returns once a 200 head arrived; raises ProxyError otherwise."""
    for _ in range(MEDIA_REDIRECTS + 1):
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise upstream_error(f"{what}: the file's address is not an http(s) URL")
        response = await pool.request("GET", url, [("Accept", "*/*"), ("Accept-Encoding", "identity"),
                                                   ("User-Agent", USER_AGENT)], b"", what)
        location = response.headers.get("location", "")
        if response.status in (301, 302, 303, 307, 308) and location:
            await response.finish()
            url = urllib.parse.urljoin(url, location)
            continue
        if response.status != 200:
            body = await _read_error_body(response)
            detail = _error_text_from_body(body)
            raise upstream_error(f"{what}: fetching the file failed with HTTP {response.status}"
                                 + (f": {detail}" if detail else ""))
        return response
    raise upstream_error(f"{what}: the file's address redirects more than {MEDIA_REDIRECTS} times")


async def download(pool: UpstreamPool, url: str, what: str, idle_timeout_s: float,
                   limit_bytes: int = MEDIA_DOWNLOAD_MAX_BYTES) -> tuple[str, bytes]:
    """A whole file a bot made: (content type, bytes)."""
    response = await open_download(pool, url, what)
    data = await response.read_all(limit_bytes, idle_timeout_s)
    return response.headers.get("content-type", "").split(";")[0].strip(), data


STALE_RETRY_S = 30.0
MODELS_WAIT_SECONDS = 2.0   # how long a chat waits for the catalogue before it goes on without it


class ModelCatalog:
    """Poe's bot catalogue, cached for a TTL, fetched by one task at a time (every caller waits for the
    same fetch), and served stale when Poe cannot be reached."""

    def __init__(self, client: PoeClient, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._clock = clock
        self._catalogue: Catalogue | None = None
        self._fetched_at = -math.inf
        self._fetch: asyncio.Task[Catalogue] | None = None
        self._failed_at = -math.inf   # the last fetch that failed with nothing cached

    def _fresh(self) -> bool:
        return self._catalogue is not None and self._clock() - self._fetched_at < self._ttl_s

    def _start_fetch(self, api_key: str | None, refresh: bool) -> asyncio.Task[Catalogue]:
        if self._fetch is None:
            self._fetch = asyncio.ensure_future(self._fetch_now(api_key, refresh))
            # A chat that stopped waiting never reads the outcome; reading it here keeps asyncio quiet.
            self._fetch.add_done_callback(lambda task: task.cancelled() or task.exception())
        return self._fetch

    async def _fetch_now(self, api_key: str | None, refresh: bool) -> Catalogue:
        try:
            self._catalogue = await self._client.list_models(api_key)
            self._fetched_at = self._clock()
            return self._catalogue
        except ProxyError as exc:
            if self._catalogue is None:
                self._failed_at = self._clock()
            if self._catalogue is None or refresh:
                raise
            log.warning("model list refresh failed, serving the cached list: %s", exc.message)
            # Try again in a while, not on every request, while Poe is down.
            self._fetched_at = self._clock() - self._ttl_s + min(STALE_RETRY_S, self._ttl_s)
            return self._catalogue
        finally:
            self._fetch = None

    async def catalogue(self, api_key: str | None, refresh: bool = False) -> Catalogue:
        """The catalogue, fetched when stale (or when `refresh`). Raises ProxyError only when Poe fails and
        nothing is cached (or a refresh was asked for)."""
        if not refresh and self._fresh():
            assert self._catalogue is not None
            return self._catalogue
        try:
            # Shielded: a client that hangs up does not cancel the fetch the others wait for.
            return await asyncio.shield(self._start_fetch(api_key, refresh))
        except ProxyError:
            if refresh or self._catalogue is None:
                raise
            return self._catalogue   # we joined someone's refresh, which failed: the cached list will do

    async def models(self, api_key: str | None, refresh: bool = False) -> list[dict[str, Any]]:
        """The catalogue as OpenAI model objects, unrenamed and unfiltered (for the admin page)."""
        return [openai_model(info) for info in (await self.catalogue(api_key, refresh)).bots]

    async def for_chat(self, api_key: str | None, wait_s: float = MODELS_WAIT_SECONDS) -> Catalogue | None:
        """The catalogue for a chat: what is cached when fresh; otherwise a fetch is started (or joined) and
        waited for at most `wait_s`, after which the chat goes on with the stale catalogue, or none, while
        the fetch goes on in the background. Never raises: a chat does not fail for want of metadata."""
        if self._fresh():
            return self._catalogue
        if self._catalogue is None and self._clock() - self._failed_at < min(STALE_RETRY_S, self._ttl_s):
            # Poe's list failed a moment ago (an upstream without /v1/models, or Poe down): chats go on
            # without it instead of each paying another request, and waiting, until the retry is due.
            return None
        task = self._start_fetch(api_key, False)
        done, _ = await asyncio.wait({task}, timeout=wait_s)
        if done and not task.cancelled() and task.exception() is None:
            return task.result()
        return self._catalogue


class Uploader:
    """Uploads the images and files of a request to Poe, each at most once: an LRU cache remembers
    what was uploaded (by content hash or URL), and concurrent requests carrying the same new file
    share one upload."""

    def __init__(self, settings: Settings, pool: UpstreamPool, clock: Callable[[], float] = time.monotonic,
                 concurrency: int = UPLOAD_CONCURRENCY_COUNT) -> None:
        self._settings = settings
        self._pool = pool
        self.cache = LRUCache(settings.url_cache_size_mb * 1024 * 1024, settings.url_cache_ttl_seconds, clock)
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._concurrency = concurrency
        self.uploads = 0

    async def attachments_for(self, media: Sequence[Media], api_key: str) -> dict[int, list[dict[str, Any]]]:
        """Poe attachments ({url, content_type, name}) by message index, in the order of the parts."""
        gate = asyncio.Semaphore(self._concurrency)

        async def one(item: Media) -> dict[str, Any]:
            async with gate:
                return await self.attach(item, api_key)

        results = await asyncio.gather(*(one(m) for m in media), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        by_message: dict[int, list[dict[str, Any]]] = {}
        for item, result in zip(media, results):
            by_message.setdefault(item.message_index, []).append(result)   # type: ignore[arg-type]
        return by_message

    async def attach(self, media: Media, api_key: str) -> dict[str, Any]:
        if media.url is not None and is_poe_cdn(media.url):
            return {"url": media.url, "content_type": _attachment_type(media.content_type, media.url),
                    "name": media.name}   # already on Poe's CDN: nothing to upload
        key = media.cache_key
        stored = self.cache.get(key)
        if stored is None:
            # Uploads in flight are shared per key as well as per content: a caller with a bad key must
            # not decide the outcome for another caller with a good one.
            flight = f"{key}|{hash(api_key)}"
            task = self._inflight.get(flight)
            if task is None:
                task = self._inflight[flight] = asyncio.ensure_future(self._upload(media, api_key))
                task.add_done_callback(lambda t: (self._inflight.pop(flight, None),
                                                  t.cancelled() or t.exception()))
            try:
                stored = await asyncio.shield(task)   # a leaving client must not cancel others' upload
            except ProxyError as exc:
                status = exc.status if exc.status in (401, 403, 429, 504) else 502
                raise ProxyError(status, f"Uploading {media.where} ({media.name}) to Poe failed: {exc.message}",
                                 "upstream_error", "upload_failed", media.where, exc.headers) from None
        return {"url": stored["url"], "content_type": stored["content_type"], "name": media.name}

    async def _upload(self, media: Media, api_key: str) -> dict[str, Any]:
        if media.data is not None:
            content_type, body = multipart_pieces([], [("file", media.name, media.content_type, media.data)])
        else:
            content_type, body = multipart_pieces([("download_url", str(media.url))], [])
        headers = [("Authorization", f"Bearer {api_key}"), ("Content-Type", content_type),
                   ("Accept", "application/json"), ("Accept-Encoding", "identity"), ("User-Agent", USER_AGENT)]
        response = await self._pool.request("POST", self._settings.poe_file_upload_url, headers, body, "file upload")
        if response.status == 200:
            await _refuse_encoded(response, "file upload")
        raw = await response.read_all(UPLOAD_REPLY_MAX_BYTES, self._settings.read_timeout_seconds)
        if response.status != 200:
            raise classify_poe_status(response.status, raw, "file upload", response.headers)
        try:
            payload = json.loads(raw)
            url = payload["attachment_url"]
            if not isinstance(url, str) or not url:
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise upstream_error("file upload: Poe's answer has no attachment_url") from None
        mime = payload.get("mime_type") if isinstance(payload.get("mime_type"), str) else ""
        size = payload.get("size")
        stored = {"url": url, "content_type": _attachment_type(mime or media.content_type, url)}
        self.uploads += 1
        self.cache.put(media.cache_key, stored,
                       len(media.data) if media.data is not None else size if _is_number(size) else len(url))
        return stored


def _attachment_type(content_type: str, url: str) -> str:
    if content_type and content_type != "application/octet-stream":
        return content_type
    guessed = guess_content_type(url)
    return "image/jpeg" if guessed == "application/octet-stream" and "/image/" in url else guessed


###############################################################################
###############################################################################
# Handlers: the dialects, the router, the admin API, the model list, the chat pipeline
###############################################################################

# Poe's body ends right after `done`: its end is read (this long at most) before the last chunk
# leaves, so the connection is back in the pool before the client can send its next request.
UPSTREAM_FINISH_WAIT_S = 0.05


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]     # lower-case names; repeated headers joined with ", "
    body: bytes | bytearray     # as read (never copied); parse_json_body consumes it
    request_id: str
    client: str = ""            # the TCP peer, "address:port"
    address: str = ""           # the client's address per X-Forwarded-For (TRUST_FORWARDED_FOR), else ""
    # Filled in by handlers for the access log.
    model: str = ""


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None   # set for streamed bodies (no Content-Length)


def json_response(status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, [("Content-Type", "application/json"), *headers], dump_json(obj))


def error_response(err: ProxyError) -> Response:
    return json_response(err.status, err.openai_body(), err.headers)


SSE_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
               ("X-Accel-Buffering", "no")]
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Accept, OpenAI-Organization, OpenAI-Project, X-Api-Key, Api-Key, " \
                     "X-Stainless-Arch, X-Stainless-Lang, X-Stainless-OS, X-Stainless-Package-Version, " \
                     "X-Stainless-Runtime, X-Stainless-Runtime-Version, X-Stainless-Retry-Count, " \
                     "X-Stainless-Timeout, Anthropic-Version, Anthropic-Beta"
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def api_key_of(request: Request) -> str:
    """The key the client sent: `Authorization: Bearer …` (the openai SDK; the anthropic SDK's auth_token),
    `x-api-key` (the anthropic SDK) or `api-key` (Azure-style clients). Never logged."""
    auth = request.headers.get("authorization", "").strip()
    scheme, _, key = auth.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return _sendable_key(key.strip())
    for header in ("x-api-key", "api-key"):
        key = request.headers.get(header, "").strip()
        if key:
            return _sendable_key(key)
    if auth:
        raise ProxyError(401, "The Authorization header must be 'Bearer <your Poe API key>'.",
                         "invalid_request_error", "invalid_api_key")
    raise ProxyError(401, "Missing API key: send your Poe API key as 'Authorization: Bearer <key>' "
                     "(get one at https://poe.com/api_key).", "invalid_request_error", "invalid_api_key")


def _sendable_key(key: str) -> str:
    # Poe keys are printable ASCII; anything else could not even be sent on (header values are bytes).
    if not (key.isascii() and key.isprintable()):
        raise ProxyError(401, "The API key has characters no Poe API key has (it must be printable ASCII).",
                         "invalid_request_error", "invalid_api_key")
    return key


def client_address(request: Request) -> str:
    """The client's IP address, without the port (back-offs are per address): the TCP peer's, or with
    TRUST_FORWARDED_FOR the one the reverse proxy saw."""
    return request.address or request.client.rpartition(":")[0] or request.client


# The label of the key the request being handled came with, for UsageStats. A request is handled in
# its connection's task from routing to the last byte of its answer, so the value set when the key was
# checked is the request's own, and each request sets it anew.
KEY_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("poe2openai_key_label", default="-")
OWN_KEY_LABEL = "own key"          # pass-through: every client's own Poe key, not told apart
KEY_MAX_FAILURES = 5               # wrong access keys per address ...
KEY_FAILURE_WINDOW_S = 300.0       # ... within this window, then 429 until it ends (as for the admin login)
KEY_FILE_CHECK_S = 2.0             # how often the access key file is looked at for changes


class Credentials:
    """Which Poe key a request runs on. Pass-through (the default): the key the client sent is its own
    Poe key, passed on. Shared (ACCESS_KEYS): the client must present one of the access keys, compared in
    constant time against every one; everything sent to Poe then carries the server's POE_API_KEY. A
    key file is re-read when it changes (a broken edit keeps the keys it replaced)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._spec = settings.access_keys
        self._clock = clock
        self.keys: tuple[AccessKey, ...] = load_access_keys("ACCESS_KEYS", self._spec) if self._spec else ()
        self.server_key = settings.poe_api_key if self._spec else ""
        self.backoff = LoginBackoff(KEY_MAX_FAILURES, KEY_FAILURE_WINDOW_S,
                                    "Too many requests with a wrong API key from your address; try again later.")
        self._file = self._spec[1:].strip() if self._spec.startswith("@") else ""
        self._file_stamp = self._stamp()
        self._checked_at = clock()

    @property
    def shared(self) -> bool:
        return bool(self._spec)

    def admit(self, request: Request) -> None:
        """Shared mode: refuse (401, or 429 while the address is locked out) a request without a valid
        access key; remember the key's label. Pass-through: nothing to check here."""
        if not self.shared:
            return
        address = client_address(request)
        presented = self.precheck(request)
        label = self._match(presented)
        if label is None:
            self.backoff.failed(address)
            raise ProxyError(401, "Invalid API key: this proxy is shared and takes only its own access keys "
                             "(not a Poe key); ask the proxy's owner for one.", "invalid_request_error",
                             "invalid_api_key")
        self.backoff.succeeded(address)
        KEY_LABEL.set(label)

    def precheck(self, request: Request) -> str:
        """Shared mode, from the head alone: the 429 of a locked-out address, the 401 of a missing key;
        else the key presented (compared by `admit` only)."""
        self.backoff.check(client_address(request))
        try:
            return api_key_of(request)
        except ProxyError:
            raise ProxyError(401, "Missing API key: this proxy is shared; send your access key as "
                             "'Authorization: Bearer <key>' or 'x-api-key: <key>' (ask the proxy's owner for one).",
                             "invalid_request_error", "invalid_api_key") from None

    def _match(self, presented: str) -> str | None:
        import hashlib
        import hmac
        self._reload_if_changed()
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for key in self.keys:   # every key, always: the time taken tells neither which nor how many
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.label
        return found

    def poe_key(self, request: Request) -> str:
        """The Poe key for a chat: the server's (after the access check) or the client's own."""
        if self.shared:
            self.admit(request)
            return self.server_key
        key = api_key_of(request)
        KEY_LABEL.set(OWN_KEY_LABEL)
        return key

    def optional_poe_key(self, request: Request) -> str | None:
        """For Poe's model list, which is public: the same, but a client without a key gets None."""
        if self.shared:
            self.admit(request)
            return self.server_key
        try:
            return api_key_of(request)
        except ProxyError:
            return None

    def _stamp(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self._file)
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    def _reload_if_changed(self) -> None:
        if not self._file or self._clock() - self._checked_at < KEY_FILE_CHECK_S:
            return
        self._checked_at = self._clock()
        stamp = self._stamp()
        if stamp is None or stamp == self._file_stamp:
            return   # unchanged, or gone for a moment (an editor replacing it): keep what we have
        self._file_stamp = stamp
        try:
            self.keys = load_access_keys("ACCESS_KEYS", self._spec)
        except SettingsError as exc:
            log.warning("access key file not reloaded, the previous keys stay in force: %s", exc)
            return
        log.info("access key file reloaded: %d key%s", len(self.keys), "" if len(self.keys) == 1 else "s")


def parse_json_body(request: Request) -> Any:
    """The body as JSON. It consumes the body: a request with big images would otherwise hold its raw
    bytes, their text and the parsed values all at once (each about the size of the body)."""
    raw = request.body
    if not raw or raw.isspace():
        raise bad_request("The request body is empty; send a JSON object.", None, "invalid_json")
    start = 3 if raw.startswith(b"\xef\xbb\xbf") else 0   # a BOM is harmless
    try:
        text = str(memoryview(raw)[start:], "utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None
    request.body = raw = b""   # from here on only the text holds it; then only the parsed values
    try:
        return json.loads(text)
    except ValueError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", None, "invalid_json") from None


# ----------------------------------------------------------------------------- dialects

class StreamEncoder(Protocol):
    """A dialect's streamed answer: the neutral deltas rendered as its SSE events, and what was said."""

    @property
    def said(self) -> AnswerText: ...

    def start(self) -> bytes: ...

    def encode(self, delta: Delta) -> bytes: ...

    def finish(self, reason: str, prompt_tokens: int) -> bytes: ...

    def error(self, err: ProxyError) -> bytes: ...


class Fold(Protocol):
    """A dialect's whole answer: the same deltas a stream would carry, folded into one JSON body."""

    @property
    def said(self) -> AnswerText: ...

    def add(self, delta: Delta) -> None: ...

    def body(self, completion_id: str, created_s: int, model: str, prompt_tokens: int, /) -> dict[str, Any]: ...


def openai_error_body(err: ProxyError, request_id: str = "") -> dict[str, Any]:
    return err.openai_body()


def _unchanged(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Dialect:
    """One API we serve, as data: everything that differs between the APIs. The chat pipeline does the
    rest the same way for all, on an OpenAI chat request. A new dialect is its request converter, stream
    encoder and fold, one record like those below, and one entry in the route table."""

    name: str
    to_openai: Callable[[Any], Any]                # request body -> the equivalent OpenAI chat request body
    completion_prefix: str                         # of the answer's id
    call_prefix: str                               # of tool-call ids
    whole_calls: bool                              # Poe's native tool calls given whole, not piece by piece
    encoder: Callable[[ChatRun], StreamEncoder]
    fold: Callable[[ChatRun], Fold]
    error_body: Callable[[ProxyError, str], dict[str, Any]] = openai_error_body   # (error, request id)
    alias: Callable[[str], str] = _unchanged       # the client's model id -> the bot it means
    # (answer id, created, model, request body) -> what every object of the answer echoes (ChatRun.envelope)
    envelope: Callable[[str, int, str, Mapping[str, Any]], dict[str, Any]] | None = None


# POST /v1/chat/completions: native tool calls stream as they come, as OpenAI's own do.
OPENAI_CHAT = Dialect(
    "openai", to_openai=_unchanged, completion_prefix="chatcmpl-", call_prefix="call_", whole_calls=False,
    encoder=lambda run: OpenAIStreamEncoder(run.completion_id, run.created_s, run.route.display,
                                            run.chat.include_usage),
    fold=lambda run: ChatFold())

# POST /v1/messages: the Anthropic Messages API (Claude Code) for any Poe bot.
ANTHROPIC_MESSAGES = Dialect(
    "anthropic", to_openai=anthropic_to_openai, completion_prefix="msg_", call_prefix="toolu_", whole_calls=True,
    encoder=lambda run: AnthropicStreamEncoder(run.completion_id, run.route.display, run.prompt_tokens),
    fold=lambda run: AnthropicFold(), error_body=anthropic_error_body, alias=claude_alias)

# POST /v1/responses: the OpenAI Responses API (Codex, client.responses) for any Poe bot.
OPENAI_RESPONSES = Dialect(
    "responses", to_openai=responses_to_openai, completion_prefix="resp_", call_prefix="call_", whole_calls=True,
    encoder=lambda run: ResponsesStreamEncoder(run.envelope), fold=lambda run: ResponsesFold(run.envelope),
    envelope=responses_envelope)


# ----------------------------------------------------------------------------- the app and its router

Handler = Callable[[Request], Awaitable[Response]]
KEYLESS_API_PATHS = frozenset({"/v1/messages/count_tokens"})   # API POSTs answered without Poe, hence without a key


@dataclass(frozen=True)
class Route:
    """A path's handlers by method, and the dialect of an API path: such a path gets CORS, and its
    errors that dialect's shape. Other paths (health, admin) get neither."""

    methods: Mapping[str, Handler]
    dialect: Dialect | None = None


@dataclass(frozen=True)
class Services:
    """The state the handler pieces share, built once by App."""

    settings: Settings
    pool: UpstreamPool
    poe: PoeClient
    registry: ModelRegistry
    catalog: ModelCatalog
    uploader: Uploader
    stats: UsageStats
    gate: RateGate
    credentials: Credentials


class ServicePart:
    """A piece of the app (admin API, model list, chat pipeline, media APIs): the shared services as
    attributes of its own, so its handlers read `self.registry`, `self.poe`, …"""

    def __init__(self, services: Services) -> None:
        self.settings: Settings = services.settings
        self.pool: UpstreamPool = services.pool
        self.poe: PoeClient = services.poe
        self.registry: ModelRegistry = services.registry
        self.catalog: ModelCatalog = services.catalog
        self.uploader: Uploader = services.uploader
        self.stats: UsageStats = services.stats
        self.gate: RateGate = services.gate
        self.credentials: Credentials = services.credentials


class App:
    """The proxy: builds the shared state and wires the pieces that answer with it."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.pool = UpstreamPool(settings, ssl_context)
        self.poe = PoeClient(settings, self.pool)
        self.registry = ModelRegistry(settings.models_path, MODELS_YAML_CHECK_S)   # read now: tests shorten it
        self.catalog = ModelCatalog(self.poe, settings.models_cache_ttl_seconds)
        self.uploader = Uploader(settings, self.pool)
        self.stats = UsageStats()
        self.gate = RateGate(settings.rate_limit_ms / 1000.0, settings.rate_limit_max_wait_seconds)
        self.credentials = Credentials(settings)
        services = Services(settings, self.pool, self.poe, self.registry, self.catalog, self.uploader,
                            self.stats, self.gate, self.credentials)
        self.admin_api = AdminAPI(services)
        self.model_list = ModelList(services)
        self.chat_pipeline = ChatPipeline(services)
        self.media = MediaAPI(services)
        self.router = Router(settings, self.admin_api, self.model_list, self.chat_pipeline, self.credentials,
                             self.media)
        self.routes = self.router.routes

    # What InboundConnection calls: the router's.
    async def dispatch(self, request: Request) -> Response:
        # Per request, not per process: several apps (tests, embedders) may share one.
        limit = answer_limit.set(self.settings.max_answer_size)
        try:
            await self.registry.refresh()   # a changed models.yaml is read off the event loop
            return await self.router.dispatch(request)
        finally:
            answer_limit.reset(limit)

    def render_error(self, request: Request, err: ProxyError) -> Response:
        return self.router.render_error(request, err)


class Router:
    """The route table, and what every request goes through: 404 and 405, CORS and its preflight, and
    the one place where errors become responses, in the shape of the path's dialect."""

    def __init__(self, settings: Settings, admin: AdminAPI, models: ModelList, chat: ChatPipeline,
                 credentials: Credentials, media: MediaAPI) -> None:
        self.settings = settings
        self.credentials = credentials
        self.admin = admin
        self.started_at = time.time()

        def api(dialect: Dialect) -> Route:   # a dialect's endpoint: POSTs answered by the chat pipeline
            return Route({"POST": chat.handler(dialect)}, dialect)

        # path -> Route; 404 and 405 are decided from this table alone.
        self.routes: dict[str, Route] = {
            "/v1/chat/completions": api(OPENAI_CHAT),
            "/chat/completions": api(OPENAI_CHAT),
            "/v1/models": Route({"GET": models.list_models}, OPENAI_CHAT),
            "/models": Route({"GET": models.list_models}, OPENAI_CHAT),
            "/healthz": Route({"GET": self.health}),
            "/admin": Route({"GET": admin.admin}),
            "/api/admin/config": Route({"GET": admin.admin_get_config, "POST": admin.admin_post_config}),
            "/api/admin/stats": Route({"GET": admin.admin_stats}),
            "/api/models": Route({"GET": admin.admin_models}),
            "/api/admin/points": Route({"GET": admin.admin_points}),
            "/": Route({"GET": self.index}),
            "/v1/models/*": Route({"GET": models.get_model}, OPENAI_CHAT),   # one model: the id is the rest of the path
            "/models/*": Route({"GET": models.get_model}, OPENAI_CHAT),
            "/v1/messages": api(ANTHROPIC_MESSAGES),
            "/v1/responses": api(OPENAI_RESPONSES),
            "/responses": api(OPENAI_RESPONSES),
            "/v1/messages/count_tokens": Route({"POST": chat.count_tokens}, ANTHROPIC_MESSAGES),
            # OpenAI's media APIs, over Poe's image, speech and video bots.
            "/v1/images/generations": Route({"POST": media.images_generations}, OPENAI_CHAT),
            "/v1/images/edits": Route({"POST": media.images_edits}, OPENAI_CHAT),
            "/v1/audio/speech": Route({"POST": media.speech}, OPENAI_CHAT),
            "/v1/videos": Route({"POST": media.videos_create, "GET": media.videos_list}, OPENAI_CHAT),
            "/v1/videos/*": Route({"GET": media.videos_get, "DELETE": media.videos_delete}, OPENAI_CHAT),
        }

    @staticmethod
    def _table_path(request: Request) -> str:
        path = request.path if request.path == "/" else request.path.rstrip("/")
        if path.startswith(("/v1/models/", "/models/")):
            path = path[:path.index("/models/") + len("/models/")] + "*"
        elif path.startswith("/v1/videos/"):
            path = "/v1/videos/*"   # /v1/videos/{id} and /v1/videos/{id}/content
        return path

    def _handler(self, request: Request, path: str, route: Route | None) -> Handler | None:
        """The route's handler for the method (None: the CORS preflight); raises the 404 or 405."""
        if route is None:
            raise ProxyError(404, f"Unknown path {request.path[:200]!r}. This proxy serves /v1/chat/completions, "
                             "/v1/messages, /v1/responses, /v1/images/generations, /v1/images/edits, "
                             "/v1/audio/speech, /v1/videos and /v1/models.", "invalid_request_error", "not_found")
        cors = route.dialect is not None
        methods = route.methods
        handler = methods.get(request.method) or (methods.get("GET") if request.method == "HEAD" else None)
        if request.method == "OPTIONS" and cors:
            return None
        if handler is None:
            allowed = ", ".join(sorted(methods) + (["OPTIONS"] if cors else []))
            raise ProxyError(405, f"Method {request.method} is not allowed on {path}; use {allowed}.",
                             "invalid_request_error", "method_not_allowed", headers=[("Allow", allowed)])
        return handler

    def precheck(self, request: Request) -> ProxyError | None:
        """What can be refused from the head alone, before a body is read (a big body costs memory):
        an unknown path, a wrong method, an API call without any key, the admin routes without Basic
        credentials (or while they are refused). Cheap, and it decides nothing the handler does not
        decide again: a key or a password is only compared there."""
        path = self._table_path(request)
        route = self.routes.get(path)
        try:
            if self._handler(request, path, route) is None:
                return None   # the preflight
            assert route is not None
            if route.dialect is not None:
                if self.credentials.shared:
                    self.credentials.precheck(request)
                elif request.method == "POST" and path not in KEYLESS_API_PATHS:
                    api_key_of(request)
            elif path == "/admin" or path.startswith("/api/"):
                self.admin.precheck(request)
        except ProxyError as exc:
            return exc
        return None

    async def dispatch(self, request: Request) -> Response:
        """Route a request; every error becomes a response here and only here."""
        path = self._table_path(request)
        route = self.routes.get(path)
        cors = route is not None and route.dialect is not None
        try:
            handler = self._handler(request, path, route)
            if handler is None:
                response = self._preflight(request)
            else:
                if cors:   # an API route: with access keys on, every one needs a key (not the preflight)
                    self.credentials.admit(request)
                response = await handler(request)
        except ProxyError as exc:
            response = self._error(path, exc, request)
        except Exception:
            # A bug of ours: log it with its traceback, never show it to the client.
            log.exception("request %s failed", request.request_id)
            response = self._error(path, ProxyError(500, "Internal error in the proxy; see its log "
                                                    f"(request {request.request_id}).", "server_error",
                                                    "internal_error"), request)
        if cors:
            response.headers.extend(self._cors_headers(request))
        return response

    def render_error(self, request: Request, err: ProxyError) -> Response:
        """For errors found before routing (413, 431, a bad body, a precheck): still in the route's dialect,
        with its CORS headers, so that a browser client can read why."""
        path = self._table_path(request)
        response = self._error(path, err, request)
        route = self.routes.get(path)
        if route is not None and route.dialect is not None:
            response.headers.extend(self._cors_headers(request))
        return response

    def _error(self, path: str, err: ProxyError, request: Request) -> Response:
        """Errors in the dialect of the route: Anthropic's shape on /v1/messages, OpenAI's elsewhere."""
        route = self.routes.get(path)
        dialect = route.dialect if route is not None and route.dialect is not None else OPENAI_CHAT
        return json_response(err.status, dialect.error_body(err, request.request_id), err.headers)

    def _cors_headers(self, request: Request) -> list[tuple[str, str]]:
        """Any origin by default, never with credentials; or only the listed CORS_ALLOW_ORIGINS."""
        allowed = self.settings.cors_allow_origins
        if "*" in allowed:
            origin = "*"
        else:
            origin = request.headers.get("origin", "").rstrip("/")
            if origin not in allowed:
                return [("Vary", "Origin")]
        return [("Access-Control-Allow-Origin", origin),
                ("Access-Control-Expose-Headers", "X-Request-Id, Retry-After"),
                *([] if origin == "*" else [("Vary", "Origin")])]

    @staticmethod
    def _preflight(request: Request) -> Response:
        asked = request.headers.get("access-control-request-headers", "")
        extra = [h.strip() for h in asked.split(",") if _TOKEN_RE.match(h.strip())
                 and h.strip().lower() not in ("cookie", "set-cookie")]
        allow = CORS_ALLOW_HEADERS + "".join(", " + h for h in extra
                                             if h.lower() not in CORS_ALLOW_HEADERS.lower().split(", "))
        return Response(204, [("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
                              ("Access-Control-Allow-Headers", allow),
                              ("Access-Control-Max-Age", "3600")])

    # --------------------------------------------------------------------- the router's own routes

    async def health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok", "version": __version__, "pid": os.getpid(),
                                   "uptime_s": round(time.time() - self.started_at, 1)})

    async def index(self, request: Request) -> Response:
        return json_response(200, {"name": "poe2openai", "version": __version__,
                                   "endpoints": ["POST /v1/chat/completions", "POST /v1/messages", "POST /v1/responses",
                                                 "POST /v1/messages/count_tokens", "GET /v1/models",
                                                 "POST /v1/images/generations", "POST /v1/images/edits",
                                                 "POST /v1/audio/speech", "POST /v1/videos", "GET /v1/videos",
                                                 "GET /healthz", "GET /admin"]})


# ----------------------------------------------------------------------------- the admin API

ADMIN_MAX_FAILURES = 5            # failed admin logins per address ...
ADMIN_FAILURE_WINDOW_S = 300.0    # ... within this window, then 429 until it ends
ADMIN_GLOBAL_MAX_FAILURES = 30    # failed admin logins from all addresses together ...
ADMIN_GLOBAL_WINDOW_S = 60.0      # ... within this window: then logins pause for everyone (not loopback)
# Passwords nobody chose: the default, and the placeholders of our deploy examples and of habit. With
# one of them the admin API answers only on a loopback bind.
WEAK_ADMIN_PASSWORDS = frozenset({"", "123456", "change-me", "changeme", "admin", "password"})


def is_loopback_host(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def admin_disabled_reason(settings: Settings) -> str:
    """Why the admin page is refused (""): a password anyone can guess on an address others can reach."""
    if settings.admin_password not in WEAK_ADMIN_PASSWORDS or is_loopback_host(settings.host):
        return ""
    which = "empty" if not settings.admin_password else (
        "the default (123456)" if settings.admin_password == "123456" else "a known placeholder")
    return (f"The admin page is disabled: ADMIN_PASSWORD is {which} and the proxy listens on "
            f"{settings.host or 'all addresses'}, where others can reach it. Set ADMIN_PASSWORD to a password "
            "of your own (or listen on HOST=127.0.0.1) and restart the proxy.")
# The page is one file with its script and style inline; the CSP admits exactly those blocks (by hash)
# and lets the page talk to nothing but this server. Everything else an injected string could use
# (other scripts, frames, forms, a <base>) is refused by the browser.
ADMIN_PAGE_CSP = ("default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; "
                  "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
ADMIN_PAGE_HEADERS = (("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"),
                      ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store"))
# Browsers mark every request with where it came from; only the page itself (same-origin) and the
# user typing an address (none) may reach the admin API.
ADMIN_FETCH_SITES = ("same-origin", "none")


POINTS_DAYS = 30            # what Poe keeps of the points history
POINTS_RECENT_DAYS = 7
POINTS_CACHE_S = 60.0       # the page may reload at will: Poe is asked at most this often ...
POINTS_ERROR_CACHE_S = 10.0  # ... and after a failure, again this soon
DAY_S = 86400               # a UTC day (Poe's history has no leap seconds to care about)
POINTS_BALANCE_WAIT_S = USAGE_TIMEOUT_S + 5    # the balance call whole: its own timeout and a margin, then 504
POINTS_HISTORY_WAIT_S = 2 * POINTS_BALANCE_WAIT_S   # all the history's pages together; past it the balance alone shows


def points_summary(entries: Iterable[Mapping[str, Any]], now_s: float, days: int = POINTS_DAYS,
                   recent_days: int = POINTS_RECENT_DAYS) -> dict[str, Any]:
    """Poe's points history entries -> points and queries per bot (over `days` and the last `recent_days`)
    and per UTC day, oldest day first. Entries without a time, a bot or a numeric cost are skipped; so are
    those older than `days`, and a query listed twice (pages that overlap) counts once."""
    since_s, recent_s = now_s - days * DAY_S, now_s - recent_days * DAY_S
    bots: dict[str, dict[str, Any]] = {}
    per_day: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for entry in entries:
        stamp: Any = entry.get("creation_time")
        bot_name, cost = entry.get("bot_name"), entry.get("cost_points")
        if not (_is_number(stamp) and _is_number(cost) and isinstance(bot_name, str) and bot_name):
            continue
        at_s = stamp / 1e6   # Poe gives microseconds
        query_id = entry.get("query_id")
        if at_s < since_s or (isinstance(query_id, str) and query_id in seen):
            continue
        if isinstance(query_id, str):
            seen.add(query_id)
        row = bots.setdefault(bot_name, {"bot": bot_name, "points": 0, "queries": 0,
                                         "points_recent": 0, "queries_recent": 0})
        row["points"] += cost
        row["queries"] += 1
        if at_s >= recent_s:
            row["points_recent"] += cost
            row["queries_recent"] += 1
        day = time.strftime("%Y-%m-%d", time.gmtime(at_s))
        total = per_day.setdefault(day, {"day": day, "points": 0, "queries": 0})
        total["points"] += cost
        total["queries"] += 1
    by_bot = sorted(bots.values(), key=lambda r: (-r["points"], r["bot"].casefold()))
    return {"by_bot": by_bot, "days": [per_day[d] for d in sorted(per_day)], "window_days": days,
            "recent_days": recent_days}


class AdminAPI(ServicePart):
    """The admin page and its API (models.yaml, stats, Poe's raw model list) behind Basic auth, with a
    back-off on failed logins per client address. A browser caches Basic credentials for the origin,
    so any page on the web could make it send them here: the API answers only requests that the
    browser marks as coming from this origin, and models.yaml changes only with a JSON body (which
    a cross-site page cannot send without a CORS preflight, and admin routes answer none)."""

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        settings = services.settings
        self._backoff = LoginBackoff(ADMIN_MAX_FAILURES, ADMIN_FAILURE_WINDOW_S,
                                     "Too many failed admin logins from your address; try again later.",
                                     global_max=ADMIN_GLOBAL_MAX_FAILURES, global_window_s=ADMIN_GLOBAL_WINDOW_S)
        self._disabled = admin_disabled_reason(settings)
        self.admin_page = _load_admin_page()
        self._admin_csp: str | None = None   # computed on the first visit: hashing needs hashlib
        self._points: tuple[str, float, dict[str, Any]] | None = None   # (key, expires at, report)
        self._points_fetch: tuple[str, asyncio.Future[dict[str, Any]]] | None = None

    async def admin(self, request: Request) -> Response:
        # No same-origin check here: following a link to /admin from elsewhere is fine; the CSP's
        # frame-ancestors and X-Frame-Options keep other sites from framing it.
        self._authenticate(request)
        if self.admin_page is None:
            raise ProxyError(404, "adminpage.html was not found next to poe2openai.py.", "invalid_request_error",
                             "not_found")
        if self._admin_csp is None:
            self._admin_csp = admin_page_csp(self.admin_page)
        return Response(200, [("Content-Type", "text/html; charset=utf-8"), ("Content-Security-Policy", self._admin_csp),
                              *ADMIN_PAGE_HEADERS], self.admin_page)

    @staticmethod
    def _check_same_origin(request: Request) -> None:
        """Refuse what a browser sends on behalf of another site. Sec-Fetch-Site, which page scripts
        cannot set, decides when present; older browsers send only Origin, which must then name this
        server (as the Host header, or X-Forwarded-Host behind a reverse proxy, has it)."""
        site = request.headers.get("sec-fetch-site", "").strip().lower()
        origin = request.headers.get("origin", "").strip()
        if site:
            if site in ADMIN_FETCH_SITES:
                return
            why = f"the browser marks it as {site}"
        elif origin:
            host = urllib.parse.urlsplit(origin).netloc.lower() if "://" in origin else ""
            hosts = {h.strip().lower() for h in (request.headers.get("host", ""),
                                                 request.headers.get("x-forwarded-host", "").split(",")[0]) if h.strip()}
            default_port = {"http": ":80", "https": ":443"}.get(origin.partition("://")[0].lower(), "")
            if host and (host in hosts or host + default_port in hosts):
                return
            why = f"its Origin {origin[:100]!r} is not this server"
        else:
            return   # not a browser (curl, scripts): nothing to guard against, the credentials decide
        raise ProxyError(403, f"Cross-site request to the admin API refused ({why}); use the admin page at "
                         "/admin on this server.", "permission_error", "cross_site_request")

    def _check_admin(self, request: Request) -> None:
        """For the API routes: from this origin (checked first: a cross-site request is no failed
        login), and with the admin credentials."""
        self._check_same_origin(request)
        self._authenticate(request)

    def precheck(self, request: Request) -> None:
        """From the head alone (the Router's precheck): refused routes, back-off, and no credentials."""
        self._refuse_if_disabled()
        self._backoff.check(client_address(request))
        if not request.headers.get("authorization", "").strip():
            raise self._unauthorized()

    def _refuse_if_disabled(self) -> None:
        if self._disabled:
            raise ProxyError(403, self._disabled, "permission_error", "admin_disabled")

    @staticmethod
    def _unauthorized() -> ProxyError:
        return ProxyError(401, "Admin credentials required.", "authentication_error", "unauthorized",
                          headers=[("WWW-Authenticate", 'Basic realm="poe2openai admin", charset="UTF-8"')])

    def _authenticate(self, request: Request) -> None:
        self._refuse_if_disabled()
        address = client_address(request)
        self._backoff.check(address)
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        user = password = b""
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            except ValueError:
                pass
        # Compare both parts in constant time, and both always, so timing tells nothing.
        import hmac   # here, not at the top: it drags in hashlib, which the idle proxy does not need
        ok_user = hmac.compare_digest(user, self.settings.admin_username.encode())
        ok_password = hmac.compare_digest(password, self.settings.admin_password.encode())
        if not (ok_user and ok_password):
            if scheme:   # a browser's first, credential-less request is not a failure
                self._backoff.failed(address)
            raise self._unauthorized()
        self._backoff.succeeded(address)

    async def admin_get_config(self, request: Request) -> Response:
        self._check_admin(request)
        config, error = self.registry.config(), self.registry.last_error
        # A big configuration takes a while to render: not on the event loop.
        body = await asyncio.get_running_loop().run_in_executor(None, lambda: dump_json(
            {**config.to_dict(), "load_error": error}))
        return Response(200, [("Content-Type", "application/json"), ("Cache-Control", "no-store")], body)

    async def admin_post_config(self, request: Request) -> Response:
        self._check_admin(request)
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            # A form or a plain-text fetch from another site needs no preflight; a JSON body does.
            raise ProxyError(415, f"Send the configuration as JSON with Content-Type: application/json (got "
                             f"{content_type[:60] or 'none'!r}).", "invalid_request_error", "unsupported_media_type")
        body = parse_json_body(request)
        if isinstance(body, dict):
            body.pop("load_error", None)
            body = {**self.registry.config().to_dict(), **body}   # fields left out keep their values
        try:
            config = ModelConfig.from_dict(body)
        except ValueError as exc:
            raise bad_request(f"Invalid configuration: {exc}", None, "invalid_config") from None
        try:
            # Serialising and writing take a while for a big configuration: not on the event loop.
            await asyncio.get_running_loop().run_in_executor(None, self.registry.save, config)
        except OSError as exc:
            raise ProxyError(500, f"Cannot write {self.registry.path}: {exc.strerror or exc}", "server_error",
                             "write_failed") from None
        return json_response(200, {"status": "success"})

    async def admin_stats(self, request: Request) -> Response:
        self._check_admin(request)
        snapshot = self.stats.snapshot()
        snapshot["version"] = __version__
        snapshot["access_keys"] = len(self.credentials.keys)   # 0: pass-through, each client its own Poe key
        snapshot["upstream"] = {"connections_opened": self.pool.connections_opened, "uploads": self.uploader.uploads,
                                "upload_cache_entries": len(self.uploader.cache),
                                "upload_cache_bytes": self.uploader.cache.total_bytes}
        return json_response(200, snapshot, [("Cache-Control", "no-store")])

    async def admin_models(self, request: Request) -> Response:
        """Poe's own list, unrenamed and unfiltered, fetched afresh (the admin page shows every bot)."""
        self._check_admin(request)
        key = self.registry.config().api_token or self.credentials.server_key or _optional_key(request)
        return json_response(200, {"object": "list", "data": await self.catalog.models(key, refresh=True)})


    async def admin_points(self, request: Request) -> Response:
        """The Poe points balance and what was spent per bot and day, on the admin's own key: models.yaml's
        api_token, else (shared mode) the proxy's POE_API_KEY; never a client's. Cached briefly."""
        self._check_admin(request)
        token = self.registry.config().api_token
        key, source = (token, "api_token") if token else (self.credentials.server_key, "POE_API_KEY")
        if not key:
            return json_response(200, {"balance": None, "by_bot": [], "days": [], "key": None,
                                       "error": "No api_token is set: set one with the API token button (it is "
                                                "kept as api_token in models.yaml) to see Poe points.",
                                       "error_code": "no_token"}, [("Cache-Control", "no-store")])
        now = time.monotonic()
        if self._points is not None and self._points[0] == key and now < self._points[1]:
            report = self._points[2]
        else:
            if self._points_fetch is None or self._points_fetch[0] != key:
                # Shared by the requests that come while it runs; shielded so one leaving does not stop it.
                self._points_fetch = (key, asyncio.ensure_future(self._fetch_points(key)))
            report = await asyncio.shield(self._points_fetch[1])
        return json_response(200, {**report, "key": source}, [("Cache-Control", "no-store")])

    async def _fetch_points(self, key: str) -> dict[str, Any]:
        assert self.poe is not None
        report: dict[str, Any] = {"balance": None, "by_bot": [], "days": [], "complete": True,
                                  "error": None, "error_code": None, "fetched_at": int(time.time())}

        def failed(err: ProxyError, what: str) -> None:
            if err.status == 401:
                report.update(error=f"api_token rejected by Poe (401): {err.message}", error_code="token_rejected")
            elif report["error"] is None:
                report.update(error=err.message if err.message.startswith(what) else f"{what}: {err.message}",
                              error_code="upstream")

        now_s = time.time()
        try:
            try:
                report["balance"] = await asyncio.wait_for(self.poe.current_balance(key), POINTS_BALANCE_WAIT_S)
            except ProxyError as err:
                failed(err, "points balance")
            except asyncio.TimeoutError:
                failed(upstream_error("Poe did not answer in time", 504, "upstream_timeout"), "points balance")
            if report["error_code"] != "token_rejected":   # the history is best-effort: a balance alone is news
                try:
                    entries, complete = await asyncio.wait_for(
                        self.poe.points_history(key, now_s - POINTS_DAYS * DAY_S), POINTS_HISTORY_WAIT_S)
                    report.update(points_summary(entries, now_s), complete=complete)
                except ProxyError as err:
                    failed(err, "points history")
                except asyncio.TimeoutError:
                    failed(upstream_error("Poe did not answer in time", 504, "upstream_timeout"), "points history")
        finally:
            self._points_fetch = None
        ttl_s = POINTS_CACHE_S if report["error"] is None else POINTS_ERROR_CACHE_S
        self._points = (key, time.monotonic() + ttl_s, report)
        return report


# ----------------------------------------------------------------------------- the model list

class ModelList(ServicePart):
    """GET /v1/models and /v1/models/{id}: Poe's models as models.yaml renames, hides and adds them."""


    async def list_models(self, request: Request) -> Response:
        """GET /v1/models: OpenAI's list shape, or the Anthropic SDK's when it sends `anthropic-version`."""
        cfg = self.registry.config()
        bots = self.registry.public_list(await self.catalog.catalogue(cfg.api_token or self.credentials.optional_poe_key(request)))
        if "anthropic-version" in request.headers:
            return json_response(200, anthropic_model_list(bots))
        return json_response(200, {"object": "list", "data": [openai_model(info) for info in bots]})

    async def get_model(self, request: Request) -> Response:
        """GET /v1/models/{id} (the SDKs' models.retrieve): one entry of the public list, found by its id or
        by Poe's id, case-insensitively."""
        wanted = urllib.parse.unquote(request.path.rstrip("/").split("/models/", 1)[1]).strip()
        cfg = self.registry.config()
        bots = self.registry.public_list(await self.catalog.catalogue(cfg.api_token or self.credentials.optional_poe_key(request)))
        folded = wanted.casefold()
        found = next((b for b in bots if b.name.casefold() == folded), None) \
            or next((b for b in bots if b.id.casefold() == folded), None)
        if found is None:
            raise ProxyError(404, f"The model '{shown(wanted)}' does not exist or is hidden on this proxy.",
                             "invalid_request_error", "model_not_found", "model")
        return json_response(200, anthropic_model(found) if "anthropic-version" in request.headers
                             else openai_model(found))


# ----------------------------------------------------------------------------- the media APIs

VIDEO_CANCEL_WAIT_S = 2.0        # at shutdown: how long cancelled video jobs get to close their Poe streams
VIDEO_STARTED_PERCENT = 10       # a running job's progress: Poe reports none, so "started" until it is done
VIDEO_LIST_DEFAULT_COUNT = 20    # GET /v1/videos page size without `limit`, as OpenAI's list endpoints
VIDEO_LIST_MAX_COUNT = 100       # ... and the largest `limit` taken, as OpenAI's


class VideoJobs:
    """Video jobs, in memory only (a restart forgets them), at most `max_jobs` and each for `ttl_s`. A job
    is seen only by its owner: a hash of the Poe key, or of the access key's label on a shared proxy."""

    def __init__(self, max_jobs: int, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._max = max_jobs
        self._ttl_s = ttl_s
        self._clock = clock
        self._jobs: OrderedDict[str, VideoJob] = OrderedDict()   # oldest first
        self.tasks: dict[str, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def _expire(self) -> None:
        now = self._clock()
        for job_id in [j.id for j in self._jobs.values() if now - j.created_at >= self._ttl_s]:
            self._drop(job_id)

    def _drop(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        task = self.tasks.pop(job_id, None)
        if task is not None and not task.done():
            task.cancel()   # closing its Poe stream stops the bot

    def add(self, job: VideoJob) -> None:
        self._expire()
        while len(self._jobs) >= self._max:
            finished = next((j for j in self._jobs.values() if j.status in ("completed", "failed")), None)
            if finished is None:
                raise ProxyError(429, f"{self._max} videos are being made on this proxy (VIDEO_JOBS_MAX); try again "
                                 "when one has finished.", "rate_limit_error", "too_many_video_jobs")
            self._drop(finished.id)
        self._jobs[job.id] = job

    def owned(self, owner: str) -> list[VideoJob]:
        self._expire()
        return [j for j in self._jobs.values() if j.owner == owner]

    def get(self, owner: str, job_id: str) -> VideoJob:
        self._expire()
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner:   # another key's job is as absent as an unknown one
            raise ProxyError(404, f"No video with id '{job_id[:100]}' (jobs are kept for a while in memory and are "
                             "lost when the proxy restarts).", "invalid_request_error", "video_not_found")
        return job

    def delete(self, owner: str, job_id: str) -> None:
        self.get(owner, job_id)
        self._drop(job_id)

    async def close(self) -> None:
        tasks = [t for t in self.tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=VIDEO_CANCEL_WAIT_S)


def _media_from_part(part: FormPart, where: str) -> Media:
    if not part.data:
        raise bad_request(f"The multipart part '{where}' ({part.filename or 'no name'}) is empty.", where,
                          "invalid_multipart")
    name = part.filename or where
    mime = part.content_type if part.content_type and part.content_type != "application/octet-stream" else \
        guess_content_type(name, part.data)
    return Media(where, 0, mime, name, data=part.data)


def _media_from_json(value: Any, where: str) -> Media:
    """An image given in a JSON body: a URL or data: URL, or {"image_url": …} as OpenAI's JSON forms have it."""
    url = value.get("image_url") if isinstance(value, dict) else value
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url.strip():
        raise bad_request(f"'{where}' must be an image URL, a data: URL or {{\"image_url\": URL}}.", where)
    return _media_from_url(url.strip(), where, 0, "image", "")


class MediaAPI(ServicePart):
    """OpenAI's Images, Audio (speech) and Videos APIs over Poe's media bots: the request becomes one Poe
    query per output (the prompt as the user message, the bot's parameters as flags), the bot's `file`
    events become the answer. Files are fetched through the same outbound pool as everything else."""

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.jobs = VideoJobs(services.settings.video_jobs_max, services.settings.video_jobs_ttl_seconds)

    # --------------------------------------------------------------------- shared steps

    def _owner(self, api_key: str) -> str:
        import hashlib
        who = f"label:{KEY_LABEL.get()}" if self.credentials.shared else f"key:{api_key}"
        return hashlib.sha256(who.encode("utf-8", "surrogateescape")).hexdigest()

    async def _bot(self, body: Any, api_key: str, request: Request) -> tuple[ModelRoute, BotInfo | None]:
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model.strip():
            raise bad_request("'model' is required: the Poe bot to ask (GET /v1/models lists them with their "
                              "`endpoints`).", "model", "missing_required_parameter")
        request.model = model[:100]
        catalogue = None
        if self.catalog is not None:
            catalogue = await self.catalog.for_chat(self.registry.config().api_token or api_key, MODELS_WAIT_SECONDS)
        route = self.registry.resolve(model, catalogue, self.settings.tool_mode)
        return route, self.registry.bot_info(route.bot, catalogue)

    @staticmethod
    def _form(request: Request) -> tuple[dict[str, Any], dict[str, list[FormPart]]]:
        """The body of an endpoint the SDK sends as multipart (a JSON body is taken too)."""
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() == "multipart/form-data":
            return form_fields(parse_multipart(content_type, request.body))
        body = parse_json_body(request)
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object or multipart/form-data.", None, "invalid_json")
        return body, {}

    async def _ask(self, route: ModelRoute, query: dict[str, Any], api_key: str) -> MediaAnswer:
        """One query; Poe's errors as in chat (an unknown bot points to the model list)."""
        await self.gate.wait()
        answer = MediaAnswer()
        try:
            events = await self.poe.open_bot_stream(route.bot, query, api_key)
            try:
                while not answer.finished:
                    batch = await events.read(self.settings.read_timeout_seconds)
                    if batch is None:
                        break
                    for event in batch:
                        answer.feed(event)
            except BaseException:
                await events.aclose()
                raise
            await events.finish(answer.done)
            if answer.error is not None:
                raise answer.error
        except ProxyError as err:
            if err.code == "model_not_found":
                raise unknown_model(route.display, route.bot, err) from None
            raise
        return answer

    async def _attachments(self, media: Sequence[Media], api_key: str) -> list[dict[str, Any]]:
        if not media:
            return []
        return (await self.uploader.attachments_for(media, api_key)).get(0, [])

    async def _record(self, model: str, started_s: float, ok: bool, prompt_tokens: int = 0,
                      completion_tokens: int = 0) -> None:
        self.stats.record(model, ok=ok, latency_s=time.perf_counter() - started_s, prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens)

    # --------------------------------------------------------------------- images

    async def images_generations(self, request: Request) -> Response:
        api_key = self.credentials.poe_key(request)
        return await self._images(request, api_key, parse_json_body(request), [], False)

    async def images_edits(self, request: Request) -> Response:
        """Multipart as the SDKs send it (`image` or `image[]`, optional `mask`), or JSON with image URLs."""
        api_key = self.credentials.poe_key(request)
        body, files = self._form(request)
        media = [_media_from_part(part, f"{part.name}") for key in ("image", "image[]") for part in files.get(key, ())]
        for key in ("image", "images"):
            value = body.pop(key, None)
            for i, item in enumerate(value if isinstance(value, list) else [] if value is None else [value]):
                media.append(_media_from_json(item, f"{key}[{i}]" if isinstance(value, list) else key))
        if not media:
            raise bad_request("'image' is required: send the image(s) to edit as multipart file part(s) named "
                              "'image' (or 'image[]').", "image", "missing_required_parameter")
        masks = files.get("mask", [])
        if len(masks) > 1:
            raise bad_request("Send at most one 'mask' part.", "mask", "invalid_multipart")
        if masks:
            media.append(_media_from_part(masks[0], "mask"))
        elif body.get("mask") is not None:
            media.append(_media_from_json(body.pop("mask"), "mask"))
        return await self._images(request, api_key, body, media, bool(masks) or any(m.where == "mask" for m in media))

    async def _images(self, request: Request, api_key: str, body: Any, media: list[Media], has_mask: bool) -> Response:
        started_s = time.perf_counter()
        route, info = await self._bot(body, api_key, request)
        wanted = parse_image_request(body, info, has_mask=has_mask)
        try:
            query = media_query(wanted, await self._attachments(media, api_key))
            gate = asyncio.Semaphore(MEDIA_CONCURRENCY)

            async def one() -> MediaAnswer:
                async with gate:
                    return await self._ask(route, query, api_key)

            answers = await _all([one() for _ in range(wanted.n)])
            items: list[dict[str, Any]] = []
            text_tokens = 0
            for answer in answers:
                images = answer.of_kind("image")
                if not images:
                    raise no_media_error("image", route.bot, answer)
                words = answer.words
                text_tokens += estimate_tokens(words) if words else 0
                for image in images:
                    item: dict[str, Any] = {"url": image.url}
                    if wanted.response_format == "b64_json":
                        _, data = await download(self.pool, image.url, f"{route.bot}'s image",
                                                 self.settings.read_timeout_seconds)
                        item = {"b64_json": base64.b64encode(data).decode("ascii")}
                    if words:
                        item["revised_prompt"] = words
                    items.append(item)
        except ProxyError:
            await self._record(wanted.model, started_s, False)
            raise
        prompt_tokens = estimate_tokens(wanted.prompt)
        usage = image_usage(prompt_tokens, len(media), len(items), text_tokens)
        await self._record(wanted.model, started_s, True, usage["input_tokens"], usage["output_tokens"])
        return json_response(200, images_body(int(time.time()), items, usage, wanted))

    # --------------------------------------------------------------------- speech

    async def speech(self, request: Request) -> Response:
        """The bot's audio, relayed to the client as it downloads, with its own Content-Type."""
        started_s = time.perf_counter()
        api_key = self.credentials.poe_key(request)
        body = parse_json_body(request)
        route, info = await self._bot(body, api_key, request)
        wanted = parse_speech_request(body, info)
        try:
            answer = await self._ask(route, media_query(wanted), api_key)
            sounds = answer.of_kind("audio")
            if not sounds:
                raise no_media_error("audio", route.bot, answer)
            what = f"{route.bot}'s audio"
            response = await open_download(self.pool, sounds[0].url, what)
        except ProxyError:
            await self._record(wanted.model, started_s, False)
            raise
        await self._record(wanted.model, started_s, True, estimate_tokens(wanted.prompt))
        return self._relayed(response, sounds[0], SPEECH_TYPES[wanted.response_format], what)

    def _relayed(self, response: UpstreamResponse, file: MediaFile, fallback_type: str, what: str) -> Response:
        declared = response.headers.get("content-type", "").split(";")[0].strip()
        content_type = next((t for t in (file.content_type, declared) if t and t != "application/octet-stream"),
                            fallback_type)
        headers = [("Content-Type", content_type), ("Cache-Control", "no-store")]
        length = response.headers.get("content-length", "")
        if length.isdigit() and "transfer-encoding" not in response.headers:
            headers.append(("Content-Length", length))   # the client sees a cut-off download as one
        return Response(200, headers, stream=self._relay(response, what))

    async def _relay(self, response: UpstreamResponse, what: str) -> AsyncIterator[bytes]:
        """The file's bytes as they arrive (the connection pulls them, so a slow client slows the download).
        A failure midway cuts the client's connection: a clean end would pass for the whole file."""
        try:
            while True:
                try:
                    chunk = await response.read_chunk(self.settings.read_timeout_seconds)
                except asyncio.TimeoutError:
                    raise upstream_error(f"{what}: the download stalled for {self.settings.read_timeout_seconds:g} s",
                                         504, "upstream_timeout") from None
                if chunk is None:
                    return
                yield chunk
        except ProxyError as exc:
            log.warning("%s: the download failed midway: %s", what, exc.message)
            raise ConnectionError(exc.message) from None
        finally:
            if not response.complete:
                await response.aclose()

    # --------------------------------------------------------------------- videos

    async def videos_create(self, request: Request) -> Response:
        """Starts the job in the background and answers at once with it `queued` (poll with GET)."""
        api_key = self.credentials.poe_key(request)
        body, files = self._form(request)
        route, info = await self._bot(body, api_key, request)
        wanted = parse_video_request(body, info)
        media = [_media_from_part(part, "input_reference") for part in files.get("input_reference", ())]
        if body.get("input_reference") is not None:
            media.append(_media_from_json(body["input_reference"], "input_reference"))
        query = media_query(wanted, await self._attachments(media, api_key))   # upload errors: real statuses
        job = VideoJob(new_id("video_"), self._owner(api_key), wanted.model, wanted.prompt, wanted.seconds,
                       wanted.size, int(time.time()))
        self.jobs.add(job)
        task = asyncio.ensure_future(self._make_video(job, route, query, api_key))
        self.jobs.tasks[job.id] = task
        task.add_done_callback(lambda t: self.jobs.tasks.pop(job.id, None) if self.jobs.tasks.get(job.id) is t else None)
        return json_response(200, job.public())

    async def _make_video(self, job: VideoJob, route: ModelRoute, query: dict[str, Any], api_key: str) -> None:
        started_s = time.perf_counter()
        job.status, job.progress = "in_progress", VIDEO_STARTED_PERCENT   # Poe tells nothing: started, then done
        try:
            answer = await self._ask(route, query, api_key)
            videos = answer.of_kind("video")
            if not videos:
                raise no_media_error("video", route.bot, answer)
            job.file = videos[0]
            job.status, job.progress, job.completed_at = "completed", 100, int(time.time())
            job.expires_at = job.created_at + int(self.settings.video_jobs_ttl_seconds)
            await self._record(job.model, started_s, True, estimate_tokens(job.prompt))
        except ProxyError as err:
            job.status, job.completed_at = "failed", int(time.time())
            job.error = {"code": err.code or "upstream_error", "message": err.message}
            await self._record(job.model, started_s, False)
        except asyncio.CancelledError:
            job.status, job.error = "failed", {"code": "cancelled", "message": "The job was cancelled."}
            raise
        except Exception:
            log.exception("video job %s failed", job.id)
            job.status, job.error = "failed", {"code": "internal_error", "message": "Internal error in the proxy."}

    def _job_path(self, request: Request) -> tuple[str, str]:
        """/v1/videos/{id}[/content] -> (id, rest)."""
        tail = request.path.rstrip("/").split("/videos/", 1)[1]
        job_id, _, rest = tail.partition("/")
        return urllib.parse.unquote(job_id), rest

    async def videos_get(self, request: Request) -> Response:
        api_key = self.credentials.poe_key(request)
        job_id, rest = self._job_path(request)
        job = self.jobs.get(self._owner(api_key), job_id)
        if rest == "":
            return json_response(200, job.public())
        if rest != "content":
            raise ProxyError(404, f"Unknown path {request.path!r}.", "invalid_request_error", "not_found")
        variant = urllib.parse.parse_qs(request.query).get("variant", ["video"])[-1]
        if variant != "video":
            raise ProxyError(404, f"Poe's video bots make no {variant[:40]}; only variant=video is available.",
                             "invalid_request_error", "not_found", "variant")
        if job.status != "completed" or job.file is None:
            raise ProxyError(409 if job.status != "failed" else 400, f"Video {job.id} is {job.status}; its content "
                             "can be downloaded once it is completed.", "invalid_request_error", "video_not_ready")
        what = f"video {job.id}"
        response = await open_download(self.pool, job.file.url, what)
        return self._relayed(response, job.file, "video/mp4", what)

    async def videos_delete(self, request: Request) -> Response:
        api_key = self.credentials.poe_key(request)
        job_id, rest = self._job_path(request)
        if rest:
            raise ProxyError(404, f"Unknown path {request.path!r}.", "invalid_request_error", "not_found")
        self.jobs.delete(self._owner(api_key), job_id)
        return json_response(200, {"id": job_id, "object": "video.deleted", "deleted": True})

    async def videos_list(self, request: Request) -> Response:
        api_key = self.credentials.poe_key(request)
        query = urllib.parse.parse_qs(request.query)
        limit_text = query.get("limit", [str(VIDEO_LIST_DEFAULT_COUNT)])[-1]
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= VIDEO_LIST_MAX_COUNT:
            raise bad_request(f"'limit' must be a whole number from 1 to {VIDEO_LIST_MAX_COUNT}.", "limit")
        order = query.get("order", ["desc"])[-1]
        if order not in ("asc", "desc"):
            raise bad_request("'order' must be asc or desc.", "order")
        return json_response(200, video_list_body(self.jobs.owned(self._owner(api_key)),
                                                  query.get("after", [None])[-1], int(limit_text), order))

    async def close(self) -> None:
        await self.jobs.close()


async def _all(coros: Sequence[Awaitable[MediaAnswer]]) -> list[MediaAnswer]:
    """Every result, in order; on the first failure the others are cancelled (closing their Poe streams)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None), None)
        if failed is not None:
            raise failed.exception()   # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        leftover = [t for t in tasks if not t.done()]
        if leftover:
            await asyncio.wait(leftover)


# ----------------------------------------------------------------------------- the chat pipeline

# Bots remembered (per process, in memory) as refusing Poe's native tool fields under TOOL_MODE auto.
XML_MEMORY_SIZE = 1024
# Poe events that are the answer itself: once one has come, the bot has taken the query.
ANSWER_EVENTS = frozenset({"text", "replace_response", "json", "file", "done"})
_TOOLS_WORDS = re.compile(r"\btools?\b|tool[ _-]?(call|use)|function[ _-]?call|unsupported[ _]feature", re.I)


def refuses_native_tools(err: ProxyError, http_status: bool) -> bool:
    """Whether Poe's error, come before any output, says that the bot takes no native tools.

    Conservative on purpose, since a bot that matches is then sent XML tools for the life of the process:
    an HTTP 400 to the query (Poe refused its shape before any bot ran; the tool fields are all that
    differs from an XML query; its /v1 API answers `unsupported_feature_for_model` so), or an `error`
    event that mentions tools or function calls and is a user error (`user_caused_error`) or one we could
    not classify. Quota, rate, auth, unknown-bot and context errors never match: XML would not help.
    """
    if http_status:
        return err.status == 400 and err.code == "bad_request"
    return err.code in ("bad_request", "bot_error") and bool(_TOOLS_WORDS.search(err.message))


def unknown_model(asked: str, bot: str, err: ProxyError) -> ProxyError:
    """Poe's "no such bot" (HTTP 404, or an error event saying so), in words that tell the client what to do.
    Only Poe decides: a bot missing from the catalogue is still asked for, since private bots are not listed."""
    which = f"'{shown(asked)}'" if asked.casefold() == bot.casefold() else f"'{shown(asked)}' (the Poe bot '{shown(bot)}')"
    return ProxyError(404, f"The model {which} does not exist on Poe; GET /v1/models lists the bots you can use. "
                      f"(Poe said: {shown(err.message, 300)})", "invalid_request_error", "model_not_found", "model", err.headers)


def _event_data(event: SSEEvent) -> dict[str, Any]:
    try:
        data = json.loads(event.data) if event.data.strip() else {}
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _memo_scope(api_key: str) -> str:
    """Whose remembered token counts a request may use: its access key's label and its Poe key."""
    return f"{KEY_LABEL.get()}\n{api_key}"


def stand_in_attachments(media: Sequence[Media]) -> dict[int, list[dict[str, Any]]]:
    """Attachments by message index as attachments_for() will give them, without uploading anything."""
    found: dict[int, list[dict[str, Any]]] = {}
    for n, item in enumerate(media):
        # A Poe CDN file keeps its URL, as attach() keeps it: the query then drops it where it repeats one.
        url = item.url if item.url is not None and is_poe_cdn(item.url) else f"about:stand-in-{n}"
        found.setdefault(item.message_index, []).append({"url": url, "content_type": "", "name": ""})
    return found


class ChatPipeline(ServicePart):
    """Answers a chat request of any dialect: converted to an OpenAI chat request, sent to Poe as a
    query, and Poe's events translated to deltas that the dialect's encoder (streaming) or fold renders."""

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._xml_bots: OrderedDict[str, None] = OrderedDict()   # casefolded bot names, oldest first
        self.token_memo = TokenMemo()   # the prompts' long texts, which agents send again every turn

    def handler(self, dialect: Dialect) -> Handler:
        async def handle(request: Request) -> Response:
            return await self.chat(request, dialect)
        return handle

    async def chat(self, request: Request, dialect: Dialect) -> Response:
        api_key = self.credentials.poe_key(request)
        body = parse_json_body(request)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            request.model = body["model"][:100]   # for the access log, even if the request is refused
        converted = dialect.to_openai(body)
        chat = parse_chat_request(converted, controls=False)
        # The client's controls as its dialect sends them: the converters keep only what a chat request has
        # a field for (not hosted search tools, output_config, top_k …), so the client's own body lies under
        # the converted one, with its own tools.
        source = converted if converted is body else {**body, **converted, "tools": body.get("tools")}
        return await self._answer(chat, api_key, dialect, source, body)

    async def count_tokens(self, request: Request) -> Response:
        """POST /v1/messages/count_tokens: answered here from the estimator, never sent to Poe."""
        body = parse_json_body(request)
        if isinstance(body, dict) and not body.get("model"):
            body = {**body, "model": "unknown"}
        chat = parse_chat_request(anthropic_to_openai(body))
        scope = _memo_scope(_optional_key(request) or "")
        return json_response(200, {"input_tokens": count_prompt_tokens(build_poe_query(chat), self.token_memo, scope)})

    def _route(self, model: str, dialect: Dialect, catalogue: Catalogue | None = None) -> ModelRoute:
        route = self.registry.resolve(model, catalogue, self.settings.tool_mode)
        if route.bot == model and dialect.alias(model) != model:
            # A dialect's own ids (Claude Code's dated Anthropic ones): unless models.yaml maps them, the
            # bot they mean.
            route = dataclasses.replace(self.registry.resolve(dialect.alias(model), catalogue, self.settings.tool_mode),
                                        display=model)
        return route

    async def _catalogue(self, api_key: str) -> Catalogue | None:
        """Poe's catalogue, if it is at hand within MODELS_WAIT_SECONDS; a chat never waits longer."""
        return await self.catalog.for_chat(self.registry.config().api_token or api_key, MODELS_WAIT_SECONDS)

    @staticmethod
    def _controls(chat: ChatRequest, source: Mapping[str, Any], bot: str, info: BotInfo | None) -> ChatRequest:
        """The client's controls as the bot's own parameters (bot_controls), with max_tokens first brought
        down to the bot's longest answer, and the description-less tools' flags that would repeat them or
        that the bot does not declare left out."""
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            if _is_number(source.get(key)):   # the one bot_controls reads
                limit = check_context(0, source[key], info)
                if limit != source[key]:
                    log.debug("%s: %s %s lowered to the bot's longest answer, %s", bot, key, source[key], limit)
                    source = {**source, key: limit}
                break
        flags, ignored = bot_controls(source, info)
        spec = chat.tools
        if spec is not None and spec.flags:
            made = {flag[2:].split(" ", 1)[0] for flag in flags}
            declared = _declared(info) if info is not None and info.parameters is not None else None
            keep = []
            for name in spec.flags:
                if name in made:
                    continue
                if declared is not None and name not in declared:
                    if not any(name in item for item in ignored):
                        ignored.append(f"tools[{name}]")
                    continue
                keep.append(name)
            spec = dataclasses.replace(spec, flags=tuple(keep))
        if ignored:
            log.debug("%s: not sent, the bot declares no such parameter: %s", bot, ", ".join(ignored))
        if tuple(flags) == chat.flags and spec is chat.tools:
            return chat   # the common case; replace() costs as much as the rest of this
        return dataclasses.replace(chat, flags=tuple(flags), tools=spec)

    def _tool_mode(self, route: ModelRoute, info: BotInfo | None) -> str:
        """The route's tool mode, `auto` decided: native for bots the catalogue lists with `tools` (unless
        the bot refused native tools before), XML for the rest."""
        if route.tool_mode != "auto":
            return route.tool_mode
        if route.bot.casefold() in self._xml_bots:
            return "xml"
        return "native" if info is not None and "tools" in (info.features or ()) else "xml"

    def _remember_xml(self, bot: str) -> None:
        self._xml_bots[bot.casefold()] = None
        self._xml_bots.move_to_end(bot.casefold())
        while len(self._xml_bots) > XML_MEMORY_SIZE:
            self._xml_bots.popitem(last=False)

    def _query(self, chat: ChatRequest, route: ModelRoute, tool_mode: str, attachments: Mapping[int, list[dict[str, Any]]],
               info: BotInfo | None, api_key: str) -> tuple[dict[str, Any], int]:
        """The Poe query and its prompt tokens, refused (400 context_length_exceeded) when it cannot fit the
        bot's context window: before Poe is called, so nothing is billed for it. Counted once: a coding
        agent's prompt is often 100 KB of text."""
        query = build_poe_query(chat, system_as_user=route.replace_response, tool_mode=tool_mode,
                                attachments=attachments)
        prompt_tokens = count_prompt_tokens(query, self.token_memo, _memo_scope(api_key))
        check_context(prompt_tokens, None, info)
        return query, prompt_tokens

    async def _open(self, bot: str, query: dict[str, Any], api_key: str,
                    probe_s: float | None = None) -> PoeEventStream | None:
        """Send the query. With `probe_s` (native tools under TOOL_MODE auto) the start of the answer is
        read, for up to probe_s, until its first output: None when Poe refused the native tools before
        any (see refuses_native_tools); otherwise the events read are given back to the stream."""
        try:
            events = await self.poe.open_bot_stream(bot, query, api_key)
        except ProxyError as err:
            if probe_s is not None and refuses_native_tools(err, http_status=True):
                log.info("%s refused native tools (%s); asking again with XML tools", bot, err.message)
                return None
            raise
        if probe_s is None:
            return events
        seen: list[SSEEvent] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + probe_s
        try:
            while (left_s := deadline - loop.time()) > 0:
                batch = await events.read(left_s)
                if batch is None:
                    break
                seen.extend(batch)
                first = next((e for e in batch if e.event in ANSWER_EVENTS or e.event == "error"), None)
                if first is None:
                    continue
                if first.event == "error" and refuses_native_tools(classify_poe_error(_event_data(first)), False):
                    log.info("%s refused native tools (%s); asking again with XML tools", bot,
                             _event_data(first).get("text"))
                    await events.aclose()
                    return None
                break
        except BaseException:
            await events.aclose()
            raise
        events.unread(seen)
        return events

    async def _answer(self, chat: ChatRequest, api_key: str, dialect: Dialect, source: Mapping[str, Any],
                      raw_body: Mapping[str, Any]) -> Response:
        started_s = time.perf_counter()
        asked_poe = False
        route: ModelRoute | None = None
        try:
            catalogue = await self._catalogue(api_key)
            route = self._route(chat.model, dialect, catalogue)
            info = self.registry.bot_info(route.bot, catalogue)
            chat = self._controls(chat, source, route.bot, info)
            media = collect_media(chat.messages)
            mode = self._tool_mode(route, info)
            attachments: Mapping[int, list[dict[str, Any]]] = {}
            if media:
                # The context check first, with stand-ins that count as the files will: a prompt the bot
                # cannot take is refused before anything is uploaded.
                self._query(chat, route, mode, stand_in_attachments(media), info, api_key)
                attachments = await self.uploader.attachments_for(media, api_key)
            query, prompt_tokens = self._query(chat, route, mode, attachments, info, api_key)
            native_fields = bool(query.get("tools") or query.get("tool_calls"))
            probe = route.tool_mode == "auto" and mode == "native" and native_fields
            await self.gate.wait()
            asked_poe = True
            events = await self._open(route.bot, query, api_key, (
                self.settings.stream_hold_seconds if chat.stream else self.settings.read_timeout_seconds)
                if probe else None)
            if events is None:
                # Refused before any output, so the bot generated nothing and Poe billed nothing (points pay
                # for what a bot answers; a query turned away at the door gets no answer). Asking again
                # in XML costs the client nothing twice, and no tool ran: tools run on the client's side.
                mode = "xml"
                query, prompt_tokens = self._query(chat, route, mode, attachments, info, api_key)
                await self.gate.wait()
                events = await self._open(route.bot, query, api_key)
                assert events is not None
                self._remember_xml(route.bot)   # only once XML was taken: a 400 of another cause is not a refusal
            if route.tool_mode != mode:
                route = dataclasses.replace(route, tool_mode=mode)
            run = ChatRun(chat, route, new_id(dialect.completion_prefix), int(time.time()), prompt_tokens,
                          started_s, dialect)
            if dialect.envelope is not None:
                run.envelope = dialect.envelope(run.completion_id, run.created_s, route.display, raw_body)
            translator = PoeTranslator(chat.tools, native_tools=mode == "native",
                                       json_answer=bool(chat.json_instruction),
                                       make_id=lambda: new_id(dialect.call_prefix),
                                       whole_calls=dialect.whole_calls)
            if not chat.stream:
                return await self._chat_whole(run, events, translator)
            return await self._chat_stream(run, events, translator)
        except ProxyError as err:
            # Keyed by the bot it resolved to; a name that never became a bot (refused before, or a bot Poe
            # does not know) is a stranger's string: one "(refused)" row holds them all.
            unknown = route is None or err.code == "model_not_found"
            self.stats.record(route.bot if route is not None else chat.model, ok=False,
                              latency_s=time.perf_counter() - started_s, refused=unknown)
            if asked_poe and route is not None and err.code == "model_not_found":
                raise unknown_model(chat.model, route.bot, err) from None
            raise

    async def _chat_whole(self, run: ChatRun, events: PoeEventStream, translator: PoeTranslator) -> Response:
        source = DeltaSource(events, translator, finish_wait_s=1.0)
        fold = run.dialect.fold(run)
        try:
            while source.finish is None:
                for delta in await source.next(self.settings.read_timeout_seconds):
                    fold.add(delta)
        finally:
            await source.aclose()
        assert source.finish is not None
        fold.add(source.finish)
        body = fold.body(run.completion_id, run.created_s, run.route.display, run.prompt_tokens)
        self._record(run, True, fold.said)
        return json_response(200, body)

    def _record(self, run: ChatRun, ok: bool, said: AnswerText) -> None:
        usage = said.usage(run.prompt_tokens)
        self.stats.record(run.route.bot, ok=ok, latency_s=time.perf_counter() - run.started_s,
                          prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])

    async def _chat_stream(self, run: ChatRun, events: PoeEventStream, translator: PoeTranslator) -> Response:
        # Hold the response head until Poe's first real event (or STREAM_HOLD_SECONDS), so an error
        # that comes first still gets its real HTTP status instead of a 200 with an error chunk.
        source = DeltaSource(events, translator, finish_wait_s=UPSTREAM_FINISH_WAIT_S)
        held: list[Delta] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.stream_hold_seconds
        try:
            while not held and source.finish is None:
                left_s = deadline - loop.time()
                if left_s <= 0:
                    break
                held = await source.next(left_s)
        except BaseException:
            await source.aclose()
            raise
        encoder = run.dialect.encoder(run)
        return Response(200, list(SSE_HEADERS), stream=self._sse_body(run, source, encoder, held))

    async def _sse_body(self, run: ChatRun, source: DeltaSource, encoder: StreamEncoder,
                        held: list[Delta]) -> AsyncIterator[bytes]:
        """The SSE body: pulled by the connection, one upstream piece at a time (backpressure)."""
        clean = False
        loop = asyncio.get_running_loop()
        keepalive_s = self.settings.sse_keepalive_seconds
        last_write_s = loop.time()
        encode = encoder.encode
        try:
            out = encoder.start()
            deltas = held
            while True:
                for delta in deltas:
                    out += encode(delta)
                if source.finish is not None:
                    yield out + encoder.finish(source.finish.text, run.prompt_tokens)
                    clean = True
                    return
                # Poe's own pings do not reach the client, so time keep-alives from our last write.
                if out:
                    yield out
                    out = b""
                    last_write_s = loop.time()
                    wait_s = keepalive_s
                else:
                    wait_s = keepalive_s - (loop.time() - last_write_s)
                    if wait_s <= 0:
                        yield SSE_KEEPALIVE
                        last_write_s = loop.time()
                        wait_s = keepalive_s
                deltas = await source.next(wait_s)
        except ProxyError as exc:
            if not source.poe_error:   # Poe's own error event is the answer, not a failure of ours
                log.warning("stream failed after it started: %s", exc.message)
            yield encoder.error(exc)
        except Exception:
            log.exception("stream failed after it started")
            yield encoder.error(ProxyError(500, "Internal error in the proxy; see its log.", "server_error",
                                           "internal_error"))
        finally:
            self._record(run, clean, encoder.said)
            await source.aclose()   # nothing left to do once finished; else the client left or Poe failed


class DeltaSource:
    """Poe's answer as batches of content deltas, consumed the same way by the hold before a stream's
    head, the stream and the whole answer, so the rules of consuming it live here only:

    - `next(wait_s)` gives the next batch: [] when Poe was silent for wait_s (the caller's deadline:
      keep-alives, the hold), raises ProxyError when Poe failed (idle timeout, dropped connection).
    - FINISH is never in a batch: once it came, `finish` holds it, the batch before it is the last,
      and the upstream was finished: read to its end after `done`, so the pooled connection is reused,
      or closed when the answer ended without one (parallel_tool_calls=false stops Poe early).
    - An ERROR delta closes the upstream; its ProxyError is raised by the pull that met it, or by the
      next one when deltas came before it in the same piece (those are given first; `poe_error` tells).
    - `aclose()` (early stop, client gone, cancellation, any failure) closes the upstream so Poe stops
      generating. The upstream is finished or closed exactly once, whatever the order of calls.
    """

    def __init__(self, events: PoeEventStream, translator: PoeTranslator, finish_wait_s: float = 1.0) -> None:
        self._events = events
        self._translator = translator
        self._finish_wait_s = finish_wait_s
        self._open = True
        self._error: ProxyError | None = None
        self.finish: Delta | None = None
        self.poe_error = False     # the error raised is an ERROR delta (Poe's `error` event)

    async def next(self, wait_s: float) -> list[Delta]:
        if self._error is not None:
            raise self._error
        if self.finish is not None:
            return []
        translator = self._translator
        try:
            batch = await self._events.read(wait_s)
        except BaseException:
            await self.aclose()
            raise
        if batch is None:
            deltas = translator.end()
        elif len(batch) == 1:
            deltas = translator.feed(batch[0])
        else:
            deltas = []
            for event in batch:
                deltas += translator.feed(event)
        if translator.finished:
            # The translator ends its output with FINISH or ERROR and gives nothing after it.
            end = deltas.pop() if deltas and deltas[-1].kind in (FINISH, ERROR) else Delta(FINISH, "stop")
            if end.kind == FINISH:
                self.finish = end
                await self._settle(translator.saw_done)
            else:
                assert end.error is not None
                self.poe_error = True
                self._error = end.error
                await self.aclose()
                if not deltas:
                    raise end.error
        return deltas

    async def _settle(self, complete: bool) -> None:
        if not self._open:
            return
        self._open = False
        try:
            await self._events.finish(complete, self._finish_wait_s)
        except BaseException:
            await self._events.aclose()   # cancelled while reading the end: the connection is unusable
            raise

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            await self._events.aclose()


@dataclass
class ChatRun:
    """One chat request on its way: what every stage of answering it needs to know."""

    chat: ChatRequest
    route: ModelRoute
    completion_id: str
    created_s: int
    prompt_tokens: int
    started_s: float      # perf_counter() at arrival, for latency
    dialect: Dialect          # how the request was converted and how its answer is rendered
    envelope: dict[str, Any] = field(default_factory=dict)   # responses: the object's echoed fields


def _optional_key(request: Request) -> str | None:
    try:
        return api_key_of(request)
    except ProxyError:
        return None


def admin_page_csp(page: bytes) -> str:
    """The admin page's Content-Security-Policy: its inline <script> and <style> blocks allowed by
    their sha256, as the browser hashes them (the exact text between the tags)."""
    import hashlib   # here, not at the top: only a visit to the admin page needs it
    text = page.decode("utf-8", "replace")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}\b[^>]*>(.*?)</{tag}>", text, re.S | re.I)
        found = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
                         for b in blocks)
        return found or "'none'"

    return ADMIN_PAGE_CSP.format(scripts=hashes("script"), styles=hashes("style"))


def _load_admin_page() -> bytes | None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adminpage.html")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


###############################################################################
###############################################################################
# Inbound connections
###############################################################################

access_log = logging.getLogger("poe2openai.access")

PIPELINE_BUFFER_BYTES = 64 * 1024   # a pipelined next request held while we answer; beyond it we stop reading
LINGER_S = 2.0                      # after refusing a body: how long we read and drop the rest of it ...
LINGER_BYTES = 4 * 1024 * 1024      # ... and how much of it at most, before closing anyway
BODY_BUDGET_RETRY_AFTER_S = 2       # the 503 of a full body budget: held bodies are given back as answers end
REQUEST_ID_CHARS = 16               # "req_" and 12 hex digits: short in logs, unique enough for one server's life
FORWARDED_FOR_MAX_CHARS = 64        # an IPv6 address (45) with room for a zone; anything longer is no address
ACCESS_LOG_ADDRESS_CHARS = 64       # access log caps on what a client sent, so no request writes a huge line
ACCESS_LOG_METHOD_CHARS = 20        # ... longer than any real method
ACCESS_LOG_PATH_CHARS = 300         # ... enough to tell any API path apart
ACCESS_LOG_MODEL_CHARS = 100        # ... as long as request.model is kept
CLOSE_WAIT_S = 1.0                  # a closing connection's last bytes get this long before it is reset
# What a client sends reaches the access log only escaped: a line break or a terminal escape in a path
# or a model name cannot forge or hide lines.
_LOG_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LOG_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def log_safe(text: str, limit: int) -> str:
    """text for a log line: control characters (C0, DEL, C1, the Unicode line separators) as escapes,
    backslashes doubled so that an escape cannot be faked, and at most `limit` characters of it."""
    safe = _LOG_UNSAFE.sub(_log_escape, text[:limit])
    return safe + "..." if len(text) > limit else safe


def _log_escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _LOG_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}")


class BodyBudget:
    """The bytes of request bodies all connections hold at once: each takes as its body arrives and gives
    back once answered (the parsed body lives as long as its answer). Past the limit a body is refused,
    so many big bodies at once cannot take all memory, however few bytes each connection sends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


@dataclass
class ServerState:
    closing: bool = False
    body_budget: BodyBudget | None = None
    connections: set[InboundConnection] = field(default_factory=set)
    per_client: dict[str, int] = field(default_factory=dict)   # open connections by client address


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _raw_error(status: int, reason: str, err: ProxyError) -> bytes:
    """A complete close-delimited error response, written without h11: only for connections over a cap
    (503, 429), which must cost next to nothing (no parser, no connection object) before hanging up."""
    body = dump_json(err.openai_body())
    extra = "".join(f"{name}: {value}\r\n" for name, value in err.headers)
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


# ----------------------------------------------------------------------------- the protocol, without I/O

@dataclass(frozen=True)
class RequestReady:
    """A request to answer: complete with its body, or refused by `error` (then answer it and close)."""
    request: Request
    error: ProxyError | None
    started: float            # clock time its head arrived, for the access log


@dataclass(frozen=True)
class CloseConnection:
    """Write what came before, then close. `abandoned`: a request whose body never finished (logged).
    `linger`: the client may still be sending a body we refused; read and drop a little of it before
    closing, so that the kernel does not reset the connection before the client has read our answer."""
    abandoned: RequestReady | None = None
    linger: bool = False


class Disconnected:
    """The client left while its answer was being made: cancel the answer (which closes Poe)."""


CLOSE = CloseConnection()
DISCONNECTED = Disconnected()
InboundAction = bytes | RequestReady | CloseConnection | Disconnected

_HEAD, _BODY, _ANSWER, _CLOSED = "head", "body", "answer", "closed"


class InboundProtocol:
    """The server side of one HTTP/1.1 connection as a state machine over bytes and clock times: no
    sockets, no tasks, no clock of its own, so it is tested by feeding it bytes.

    The adapter feeds what it reads (`receive_data`, b"" at end of input; `connection_lost` on a reset),
    calls `handle_timer` once `deadline()` passes and `response_done` once an answer is written; each
    returns actions, in order: bytes to write, a `RequestReady` to answer, `DISCONNECTED` (cancel the
    answer), `CloseConnection`. The answer itself is the bytes `respond` (whole) or `start_stream`,
    `send_data`, `end_stream` return. It owns the limits: head size (431) and total head time (408),
    body size (413), body idle time and total body time (408), the shared body memory budget (503),
    keep-alive idle time, and the 100 Continue, sent only once we start reading the body it asks for.
    A request with both Content-Length and Transfer-Encoding is refused (400) and the connection closed. Pipelined requests wait in h11 until the current answer is done.

    `precheck` (the router's) sees each request's head before its body is read: what it refuses (an
    unknown path, a wrong method, no credentials) is answered at once, without reading the body or
    sending a 100 Continue, and the connection is then closed."""

    def __init__(self, settings: Settings, now: float, client: str = "-",
                 max_head_bytes: int = INBOUND_MAX_HEAD_BYTES,
                 precheck: Callable[[Request], ProxyError | None] | None = None,
                 budget: BodyBudget | None = None) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._max_head_bytes = max_head_bytes
        self._max_body_bytes = settings.max_request_size
        self._header_timeout_s = settings.header_timeout_seconds
        self._keepalive_timeout_s = settings.keepalive_timeout_seconds
        self._body_idle_s = settings.read_timeout_seconds
        self._body_total_s = settings.body_timeout_seconds
        self._body_deadline = math.inf
        self._trust_forwarded_for = settings.trust_forwarded_for
        self._precheck = precheck
        self._budget = budget
        self._taken = 0               # of the budget, for the current request's body
        self._client = client
        self._phase = _HEAD
        self._deadline: float | None = now + self._header_timeout_s   # a new connection owes us a head
        self._head_timed = True       # the header deadline (not the keep-alive one) is running
        self._current: RequestReady | None = None
        self._body = bytearray()
        self._refused = False         # answering with an error: the rest of the input is dropped
        self._is_head = False         # HEAD request: the body of the answer is not sent
        self._chunked = False         # the streamed answer going out is chunked: send_data frames it
        self._has_body = False        # the current request announced a body
        self._held = 0                # bytes of a pipelined next request fed to h11 while we answer
        self._eof = False

    # -- state the adapter asks about

    @property
    def closed(self) -> bool:
        return self._phase is _CLOSED

    @property
    def busy(self) -> bool:
        """A request has begun (its head arrived) and is not answered yet."""
        return self._phase is _BODY or self._phase is _ANSWER

    @property
    def wants_data(self) -> bool:
        """False when reading more would only pile up input (the adapter then waits for the answer)."""
        return not (self._eof or self._phase is _CLOSED or (self._phase is _ANSWER and
                                                             (self._refused or self._held > PIPELINE_BUFFER_BYTES)))

    def deadline(self) -> float | None:
        """When `handle_timer` must be called (None: no deadline, as while an answer is made)."""
        return self._deadline

    # -- input

    def receive_data(self, data: bytes, now: float) -> list[InboundAction]:
        phase = self._phase
        if phase is _CLOSED or self._eof:
            return []   # bytes after the end of input, or after we decided to close
        if not data:
            self._eof = True
        if phase is _ANSWER:
            if self._refused:
                return []
            if not data:   # end of input while we answer: the client left (or gave up on the answer)
                self._close()
                return [DISCONNECTED]
            self._held += len(data)
            self._conn.receive_data(data)   # h11 keeps it for the next cycle
            return []
        if phase is _HEAD:
            if not self._head_timed and data:
                self._head_timed = True
                self._deadline = now + self._header_timeout_s
        else:   # a body: silence ends it early, and however it trickles it must end in time
            self._deadline = min(self._body_deadline, now + self._body_idle_s)
        self._conn.receive_data(data)
        return self._parse(now)

    def connection_lost(self, now: float) -> list[InboundAction]:
        """The socket failed (reset): nothing more can be written."""
        phase, current = self._phase, self._current
        if phase is _CLOSED:
            return []
        self._close()
        if phase is _ANSWER:
            return [] if self._refused else [DISCONNECTED]
        return [CloseConnection(current if phase is _BODY else None)]

    def handle_timer(self, now: float) -> list[InboundAction]:
        if self._deadline is None or now < self._deadline:
            return []
        phase, current = self._phase, self._current
        if phase is _HEAD and self._conn.trailing_data[0]:
            out = self._error(ProxyError(408, "The request head did not arrive in time.", "invalid_request_error",
                                         "request_timeout"))
            self._close()
            return [out, CLOSE]
        if phase is _BODY and now >= self._body_deadline:
            out = self._error(ProxyError(408, f"The request body did not arrive within {self._body_total_s:g} s "
                                         "(BODY_TIMEOUT_SECONDS).", "invalid_request_error", "request_timeout"))
            self._close()
            return [out, CloseConnection(current)]
        self._close()   # an idle keep-alive connection, or a body that stopped coming: close without a word
        return [CloseConnection(current if phase is _BODY else None)]

    def _parse(self, now: float) -> list[InboundAction]:
        actions: list[InboundAction] = []
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                actions.extend(self._remote_error(exc))
                return actions
            kind = type(event)
            if kind is h11.Data:
                data: bytes = event.data  # type: ignore[union-attr]
                self._body += data   # the one copy: into the buffer the handler gets as it is
                if len(self._body) > self._max_body_bytes:
                    actions.append(self._refuse(self._too_large()))
                    return actions
                if self._budget is not None:
                    if not self._budget.take(len(data)):
                        actions.append(self._refuse(ProxyError(
                            503, "The proxy holds too many large request bodies right now (MAX_BODY_MEMORY_MB); "
                            "try again shortly.", "server_error", "server_busy",
                            headers=[("Retry-After", str(BODY_BUDGET_RETRY_AFTER_S))])))
                        return actions
                    self._taken += len(data)
            elif kind is h11.Request:
                refusal = self._begin(event, now)
                if refusal is not None:
                    actions.append(refusal)
                    return actions
                if conn.they_are_waiting_for_100_continue:
                    actions.append(conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                       reason=b"Continue")))
            elif kind is h11.EndOfMessage:
                assert self._current is not None
                self._current.request.body = self._body   # handed over, not copied (bodies can be big)
                self._body = bytearray()
                self._phase = _ANSWER
                self._deadline = None
                actions.append(self._current)
                return actions
            elif event is h11.NEED_DATA or event is h11.PAUSED:
                return actions
            else:   # ConnectionClosed: the client is done
                self._close()
                actions.append(CLOSE)
                return actions

    def _begin(self, event: h11.Request, now: float) -> RequestReady | None:
        request = request_from(event, new_id("req_")[:REQUEST_ID_CHARS], self._client, self._trust_forwarded_for)
        self._current = RequestReady(request, None, now)
        self._phase = _BODY
        self._body_deadline = now + self._body_total_s
        self._deadline = min(self._body_deadline, now + self._body_idle_s)
        self._is_head = request.method == "HEAD"
        head_bytes = len(request.path) + len(request.query) + sum(len(k) + len(v) + 4
                                                                  for k, v in request.headers.items())
        if head_bytes > self._max_head_bytes:   # h11 caps only a head that arrives in pieces
            return self._refuse(ProxyError(431, "The request headers are too large.", "invalid_request_error",
                                           "bad_http_request"))
        declared = request.headers.get("content-length", "")
        self._has_body = "transfer-encoding" in request.headers or declared not in ("", "0")
        if "content-length" in request.headers and "transfer-encoding" in request.headers:
            # Two framings that disagree are how requests are smuggled past a proxy in front (RFC 9112
            # 6.1): refuse, and close, rather than pick one as h11 would.
            return self._refuse(bad_request("The request has both Content-Length and Transfer-Encoding.", None,
                                            "bad_http_request"))
        if declared.isdigit() and int(declared) > self._max_body_bytes:
            return self._refuse(self._too_large())
        if self._has_body and self._precheck is not None:   # a request without a body costs nothing to read
            refusal = self._precheck(request)
            if refusal is not None:
                return self._refuse(refusal)
        return None

    def _too_large(self) -> ProxyError:
        return ProxyError(413, f"The request body is larger than MAX_REQUEST_SIZE ({self._max_body_bytes} bytes).",
                          "invalid_request_error", "payload_too_large")

    def _refuse(self, err: ProxyError) -> RequestReady:
        """Answer the current request with err instead of routing it; what else it sends is dropped."""
        assert self._current is not None
        self._current = RequestReady(self._current.request, err, self._current.started)
        self._phase = _ANSWER
        self._deadline = None
        self._refused = True
        self._body = bytearray()
        self._give_back()
        return self._current

    def _give_back(self) -> None:
        if self._taken and self._budget is not None:
            self._budget.give(self._taken)
        self._taken = 0

    def _remote_error(self, exc: h11.RemoteProtocolError) -> list[InboundAction]:
        if self._phase is _BODY:
            return [self._refuse(bad_request(f"Malformed request body: {exc}", None, "bad_http_request"))]
        status = exc.error_status_hint
        message = "The request headers are too large." if status == 431 else f"Malformed HTTP request: {exc}"
        out = self._error(ProxyError(status, message, "invalid_request_error", "bad_http_request"))
        self._close()
        return [out, CLOSE]

    def _error(self, err: ProxyError) -> bytes:
        """A whole error answer for a request that never got as far as a head we could route."""
        response = error_response(err)
        response.headers.append(("Connection", "close"))
        response.headers.append(("Server", f"poe2openai/{__version__}"))
        return self.respond(response.status, response.headers, response.body)

    def _close(self) -> None:
        self._phase = _CLOSED
        self._deadline = None
        self._current = None
        self._give_back()

    # -- output: the answer to the current request

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
        """A whole answer (Content-Length framing; no body bytes on HEAD). `headers` is extended."""
        conn = self._conn
        headers.append(("Content-Length", str(len(body))))
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        if body and not self._is_head:
            out += conn.send(h11.Data(data=body))
        return out + conn.send(h11.EndOfMessage())

    def start_stream(self, status: int, headers: list[tuple[str, str]], first: bytes) -> bytes:
        """The head of a streamed answer (h11 frames it: chunked for 1.1, close-delimited for 1.0), with
        its first piece, so both leave in one segment."""
        out = self._conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        # h11 chose the framing and wrote it into the head. A chunk of a chunked body changes nothing
        # in h11's state, so send_data frames one itself, as h11 would, without an h11 event per piece.
        self._chunked = b"\r\ntransfer-encoding: chunked\r\n" in out.lower()
        return out + self.send_data(first) if first else out

    def send_data(self, data: bytes) -> bytes:
        if self._is_head:
            return b""
        if self._chunked and data:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return self._conn.send(h11.Data(data=data))

    def end_stream(self) -> bytes:
        return self._conn.send(h11.EndOfMessage())

    def send_failed(self) -> None:
        self._chunked = False   # h11, in its ERROR state now, refuses what follows
        self._conn.send_failed()

    def abort(self) -> list[InboundAction]:
        """The answer could not be written (or failed): nothing more to say on this connection."""
        if self._phase is _CLOSED:
            return []
        self._close()
        return [CLOSE]

    def response_done(self, now: float, closing: bool = False) -> list[InboundAction]:
        """The answer is written: close, or start the next cycle (and parse what the client pipelined)."""
        if self._phase is _CLOSED:
            return []
        conn = self._conn
        if closing or self._refused or conn.our_state is not h11.DONE:
            unread = self._refused and self._has_body and not self._eof and conn.their_state is h11.SEND_BODY
            self._close()
            return [CloseConnection(linger=True) if unread else CLOSE]
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            self._close()
            return [CLOSE]
        self._phase = _HEAD
        self._current = None
        self._give_back()
        self._is_head = self._chunked = False
        self._head_timed = bool(conn.trailing_data[0])   # a pipelined head is already here
        self._deadline = now + (self._header_timeout_s if self._head_timed else self._keepalive_timeout_s)
        self._held = 0
        return self._parse(now) if self._head_timed else []


def request_from(event: h11.Request, request_id: str, client: str, trust_forwarded_for: bool = False) -> Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    if "://" in path:  # absolute-form target: keep only the path
        path = urllib.parse.urlsplit(path).path or "/"
    address = ""
    if trust_forwarded_for:
        # The reverse proxy appends the address it saw to what the client sent: only its own (last)
        # entry can be believed; earlier ones are whatever the client wrote.
        address = headers.get("x-forwarded-for", "").rpartition(",")[2].strip()[:FORWARDED_FOR_MAX_CHARS]
    return Request(method=event.method.decode("ascii", "replace").upper(), path=urllib.parse.unquote(path),
                   query=query, headers=headers, body=b"", request_id=request_id, client=client, address=address)


# ----------------------------------------------------------------------------- the asyncio adapter

def drop_connection(transport: asyncio.BaseTransport) -> None:
    """Close at once, with a reset: what a stalled client has not taken is thrown away, so neither the
    descriptor nor the kernel's send buffer waits on it (a plain close keeps both until it reads)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        import struct
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # on, 0 s: a reset
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]

class InboundConnection:
    """One client connection: the asyncio side of an InboundProtocol. The task running `run` is the
    connection's one reader; it keeps reading while an answer is made, so a client that leaves is
    noticed at once and its answer (a task of its own) is cancelled, which closes Poe's side."""

    def __init__(self, app: App, state: ServerState, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.app = app
        self.state = state
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "-"
        self.protocol = InboundProtocol(app.settings, self.loop.time(), self.client, precheck=app.router.precheck,
                                        budget=state.body_budget)
        self.client_gone = False
        self._linger = False   # a refused body may still be coming: drop some of it before closing
        self.task: asyncio.Task[None] | None = None
        self.bytes_sent = 0
        self._answer: asyncio.Task[None] | None = None
        self._answering: RequestReady | None = None   # set until its access-log line is written
        self._timer: asyncio.TimerHandle | None = None
        self._resume: asyncio.Future[None] | None = None

    @property
    def busy(self) -> bool:
        return self.protocol.busy

    async def run(self) -> None:
        protocol = self.protocol
        self._arm()
        try:
            while not protocol.closed:
                if not protocol.wants_data:
                    # Nothing to read for now (an error answer is going out, or enough of a pipelined
                    # request is held): wait until the answer is done.
                    self._resume = self.loop.create_future()
                    await self._resume
                    continue
                try:
                    data = await self.reader.read(READ_CHUNK_BYTES)
                except (ConnectionError, OSError, ssl.SSLError):
                    self._apply(protocol.connection_lost(self.loop.time()))
                    break
                self._apply(protocol.receive_data(data, self.loop.time()))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection from %s failed", self.client)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            answer = self._answer
            if answer is not None and not answer.done():
                answer.cancel()   # shutdown, or a failure of ours: its cleanup closes Poe's side
                await asyncio.wait([answer])
            if self._answering is not None:   # cancelled before it could start
                self._log(self._answering, 0, 0)
            if self._linger:
                await self._drop_input()
            await self._aclose()

    async def _drop_input(self) -> None:
        """Read and drop what the client still sends (bounded in time and bytes), our answer already on
        its way after a FIN: closing with unread input would make the kernel reset the connection,
        and a client still sending its body would then often lose the answer before reading it."""
        until = self.loop.time() + LINGER_S
        dropped = 0
        try:
            while dropped < LINGER_BYTES and (left := until - self.loop.time()) > 0:
                data = await asyncio.wait_for(self.reader.read(READ_CHUNK_BYTES), left)
                if not data:
                    return
                dropped += len(data)
        except (asyncio.TimeoutError, ConnectionError, OSError, ssl.SSLError):
            pass

    def _apply(self, actions: list[InboundAction]) -> None:
        for action in actions:
            if type(action) is bytes:
                self.writer.write(action)   # small (a 100 Continue or an error): no drain needed
                self.bytes_sent += len(action)
            elif type(action) is RequestReady:
                self._answering = action
                self._answer = self.loop.create_task(self._answer_one(action))
            elif action is DISCONNECTED:
                self.client_gone = True
                if self._answer is not None:
                    self._answer.cancel()
            elif type(action) is CloseConnection:
                if action.abandoned is not None:
                    self._log(action.abandoned, 0, 0)
                if action.linger and self.transport.can_write_eof():
                    self._linger = True
                    self.transport.write_eof()   # our answer, then our end; the rest of the body is dropped
                else:
                    self.transport.close()   # after what is buffered; the reader then sees the end and stops
                self._wake()
        self._arm()

    def _arm(self) -> None:
        """One timer per connection, moved only when the protocol's deadline comes earlier (a later one is
        handled when the timer fires and finds it has not passed)."""
        at = self.protocol.deadline()
        timer = self._timer
        if at is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
        elif timer is None or at < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.protocol.handle_timer(self.loop.time()))

    def _wake(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    async def _answer_one(self, ready: RequestReady) -> None:
        request = ready.request
        response: Response | None = None
        sent_before = self.bytes_sent
        try:
            if ready.error is not None:
                response = self.app.render_error(request, ready.error)
                response.headers.append(("Connection", "close"))
            else:
                response = await self.app.dispatch(request)
            await self._send(request, response)
        except (ConnectionError, asyncio.TimeoutError, ssl.SSLError):
            self._apply(self.protocol.abort())   # the client went away or stalled; nothing left to tell it
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection from %s failed", self.client)
            self._apply(self.protocol.abort())
            return
        finally:
            self._answering = None
            self._log(ready, response.status if response else 0, self.bytes_sent - sent_before)
        try:
            self._apply(self.protocol.response_done(self.loop.time(), self.state.closing))
        except Exception:
            log.exception("connection from %s failed", self.client)
            self._apply(self.protocol.abort())
        self._wake()

    def _log(self, ready: RequestReady, status: int, sent: int) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return   # LOG_LEVEL above info: skip the escaping too
        request = ready.request
        client = self.client if not request.address else \
            f"{log_safe(request.address, ACCESS_LOG_ADDRESS_CHARS)} via {self.client}"
        access_log.info("%s %s %s %d %.1fms %dB model=%s id=%s", client,
                        log_safe(request.method, ACCESS_LOG_METHOD_CHARS),
                        log_safe(request.path, ACCESS_LOG_PATH_CHARS), status,
                        (self.loop.time() - ready.started) * 1000, sent,
                        log_safe(request.model, ACCESS_LOG_MODEL_CHARS) or "-", request.request_id)

    async def _send(self, request: Request, response: Response) -> None:
        headers = list(response.headers)
        if self.state.closing and ("Connection", "close") not in headers:
            headers.append(("Connection", "close"))
        headers.append(("Server", f"poe2openai/{__version__}"))
        headers.append(("X-Request-Id", request.request_id))
        protocol = self.protocol
        if response.stream is None:
            await self._write(protocol.respond(response.status, headers, response.body))
            return
        stream = response.stream
        try:
            # Take the first piece before writing the head: once the generator has started, closing it
            # runs its cleanup (which closes Poe's side) even if the head cannot be written.
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = b""
        try:
            await self._write(protocol.start_stream(response.status, headers, first))
            async for chunk in stream:   # pulled one piece at a time: the client's pace sets Poe's
                if chunk:
                    await self._write(protocol.send_data(chunk))
            await self._write(protocol.end_stream())
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # async generator: closes Poe's side too

    async def _write(self, data: bytes) -> None:
        transport = self.transport
        try:
            transport.write(data)
            self.bytes_sent += len(data)
            # drain() only blocks when the client is slow; skip the timer in the common case, and drain()
            # itself when everything went out and the connection is open (it would return at once).
            if transport.get_write_buffer_size() > 0:
                await asyncio.wait_for(self.writer.drain(), self.app.settings.write_timeout_seconds)
            elif transport.is_closing():
                await self.writer.drain()   # raises for a connection that is lost
        except asyncio.TimeoutError:
            # The client takes nothing: a graceful close would wait for it forever, holding the socket.
            self.protocol.send_failed()
            drop_connection(self.transport)
            raise
        except BaseException:
            self.protocol.send_failed()
            raise

    async def _aclose(self) -> None:
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_WAIT_S)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError):
            pass
        finally:
            # Still not closed: the client does not take what is buffered (a close waits until it is
            # written); drop it, so the descriptor is freed.
            if not self.writer.transport.is_closing() or self.writer.transport.get_write_buffer_size():
                drop_connection(self.transport)


###############################################################################
###############################################################################
# Server lifecycle
###############################################################################

# A terminal's Ctrl-C reaches a worker twice (directly, as one of the foreground process group, and
# forwarded by the parent) within milliseconds; only a repeat later than this is a second press.
SIGNAL_REPEAT_S = 0.25
EXIT_INTERRUPTED = 130   # a second Ctrl-C or SIGTERM cut the shutdown grace short (128 + SIGINT)
LISTEN_BACKLOG_COUNT = 1024   # connections the kernel queues before we accept them
CANCELLED_WAIT_S = 2.0        # after the grace: how long cancelled requests get to wind down...
FORCED_CANCELLED_WAIT_S = 0.2   # ... and after a second Ctrl-C
WORKER_RESTART_PAUSE_S = 0.5  # before a worker that died is started again, so a crash loop cannot spin
OPEN_FILES_FALLBACK_COUNT = 65536   # the open-file limit asked for when the hard limit is unlimited


async def serve(settings: Settings, *, ready: Callable[[int], None] | None = None,
                stop: asyncio.Event | None = None, ssl_context: ssl.SSLContext | None = None,
                install_signal_handlers: bool = False, shutdown_grace_s: float | None = None,
                reuse_port: bool = False) -> None:
    """Run the proxy until `stop` is set (or SIGTERM/SIGINT when install_signal_handlers).

    For embedding: ``await serve(Settings(port=0), ready=print_port, stop=event)``. `ready` gets the
    bound port. On stop, new connections are refused, idle ones closed, and running answers get
    `shutdown_grace_s` (default SHUTDOWN_GRACE_SECONDS) to finish. `ssl_context` replaces the default
    one for calls to Poe (a corporate CA, say). With install_signal_handlers, a second signal during
    that grace cancels the running answers at once, and serve raises KeyboardInterrupt once closed.
    """
    app = App(settings, ssl_context)
    state = ServerState(body_budget=BodyBudget(settings.max_body_memory_mb * 1024 * 1024))
    loop = asyncio.get_running_loop()
    grace_s = settings.shutdown_grace_seconds if shutdown_grace_s is None else shutdown_grace_s

    # Behind a trusted reverse proxy every connection is the proxy's: a cap per address would cap them all.
    # The machine itself is not capped either: a local reverse proxy, a benchmark, an agent's many streams.
    per_client_cap = 0 if settings.trust_forwarded_for else settings.max_connections_per_client

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> None:
        """Say so cheaply and hang up, so the connections we hold keep working."""
        writer.write(raw)
        try:   # read what the client sent before closing, so the kernel does not reset the answer away
            writer.write_eof()
            await asyncio.wait_for(reader.read(READ_CHUNK_BYTES), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass
        writer.transport.abort()   # written or not, nothing more is owed: free the socket now

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(state.connections) >= settings.max_connections:
            await refuse(reader, writer, _raw_error(503, "Service Unavailable", ProxyError(
                503, "The proxy is at its connection limit (MAX_CONNECTIONS); try again shortly.", "server_error",
                "too_many_connections")))
            return
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
        if per_client_cap and address not in LOOPBACK_CLIENTS and state.per_client.get(address, 0) >= per_client_cap:
            await refuse(reader, writer, _raw_error(429, "Too Many Requests", ProxyError(
                429, f"Too many open connections from your address (MAX_CONNECTIONS_PER_CLIENT={per_client_cap}); "
                "close some or try again shortly.", "rate_limit_error", "too_many_connections",
                headers=[("Retry-After", "1")])))
            return
        connection = InboundConnection(app, state, reader, writer)
        connection.task = asyncio.current_task()  # type: ignore[assignment]
        state.connections.add(connection)
        state.per_client[address] = state.per_client.get(address, 0) + 1
        try:
            await connection.run()
        except asyncio.CancelledError:
            if not state.closing:
                raise   # someone else's cancellation; ours (shutdown) ends here quietly
        finally:
            state.connections.discard(connection)
            left = state.per_client.pop(address, 1) - 1
            if left > 0:
                state.per_client[address] = left

    server = await asyncio.start_server(on_connect, settings.host or None, settings.port,
                                        limit=READ_CHUNK_BYTES, backlog=LISTEN_BACKLOG_COUNT, reuse_address=True,
                                        reuse_port=reuse_port or None)
    port = server.sockets[0].getsockname()[1]
    log.info("poe2openai %s listening on http://%s:%d (Poe: %s; models.yaml: %s)", __version__,
             settings.host or "*", port, settings.poe_base_url, os.path.abspath(settings.models_path))
    stale = remove_stale_temp_files(os.path.dirname(os.path.abspath(settings.models_path)))
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted models.yaml save", stale)
    if not os.path.exists(settings.models_path):
        # Nobody chose a CONFIG_DIR: running without models.yaml is the ordinary first start. A folder
        # that was chosen but holds no models.yaml may be a typo or a missing volume: worth a warning.
        chosen = settings.config_dir != Settings.config_dir
        (log.warning if chosen else log.info)(
            "no models.yaml in %s%s: Poe's models are served as they are (the admin page creates the file "
            "on its first save)", os.path.abspath(settings.config_dir), " (CONFIG_DIR)" if chosen else "")
    if app.credentials.shared:
        count = len(app.credentials.keys)
        log.info("shared proxy: clients need one of %d access key%s; every call to Poe uses POE_API_KEY", count,
                 "" if count == 1 else "s")
    if ready is not None:
        ready(port)
    stop = stop or asyncio.Event()
    forced = asyncio.Event()      # a second signal: the grace is cut short
    if install_signal_handlers:
        first_signal_at: list[float] = []

        def on_signal() -> None:
            now = time.monotonic()
            if not first_signal_at:
                first_signal_at.append(now)
                stop.set()
            elif now - first_signal_at[0] > SIGNAL_REPEAT_S:
                log.warning("second signal: stopping now, running answers are cut off")
                forced.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, on_signal)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread, or Windows
    try:
        await stop.wait()
    finally:
        state.closing = True
        server.close()
        for connection in list(state.connections):
            if not connection.busy and connection.task is not None:
                connection.task.cancel()
        running = sum(1 for c in state.connections if c.busy)
        if running:
            log.info("shutting down: waiting up to %g s for %d running answer%s%s", grace_s, running,
                     "" if running == 1 else "s", "; press Ctrl-C again to stop now" if install_signal_handlers else "")
        else:
            log.info("shutting down: no running answers")
        busy = [c.task for c in state.connections if c.task is not None]
        if busy:
            finished = asyncio.ensure_future(asyncio.wait(busy, timeout=grace_s))
            interrupted = asyncio.ensure_future(forced.wait())
            await asyncio.wait([finished, interrupted], return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()      # only the waiting: the tasks themselves are cancelled below
            interrupted.cancel()
            pending = [task for task in busy if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=FORCED_CANCELLED_WAIT_S if forced.is_set() else CANCELLED_WAIT_S)
        await app.media.close()   # video jobs live in memory only: they end with the process
        await app.pool.close()
        log.info("stopped")
        if install_signal_handlers:
            # Hand the signals back before the loop closes: a late Ctrl-C during the loop's own teardown
            # would otherwise hit its closed wake-up pipe ("Exception ignored ... Bad file descriptor").
            # Back with Python's own handlers, a second Ctrl-C is a KeyboardInterrupt, so exit status 130.
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.remove_signal_handler(signum)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
    if forced.is_set():
        raise KeyboardInterrupt   # as an unhandled Ctrl-C would: main() exits with 130


def run_workers(settings: Settings) -> int:
    """--workers N: N processes, each with its own listening socket on the same port (SO_REUSEPORT), so
    the kernel spreads connections over the cores. Each keeps its own rate gate and upload cache. The
    parent forwards SIGTERM/SIGINT and restarts a worker that dies unexpectedly; a second signal is
    forwarded too (the workers stop at once) and the parent then exits with EXIT_INTERRUPTED."""
    if settings.port == 0 or not hasattr(socket, "SO_REUSEPORT") or not hasattr(os, "fork"):
        print("poe2openai: WORKERS > 1 needs a fixed PORT and a system with SO_REUSEPORT and fork", file=sys.stderr)
        return 2
    children: dict[int, int] = {}   # pid -> worker number
    stopping = False
    forced = False

    def start(number: int) -> None:
        pid = os.fork()
        if pid == 0:   # the worker
            # The parent's forwarding handler is not the worker's: until serve() installs its own, a
            # signal does what it does by default.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = 0
            try:
                asyncio.run(serve(settings, install_signal_handlers=True, reuse_port=True))
            except KeyboardInterrupt:
                code = EXIT_INTERRUPTED
            except BaseException:   # noqa: BLE001 - a worker reports and exits; the parent decides
                log.exception("worker %d failed", number)
                code = 1
            os._exit(code)
        children[pid] = number

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping, forced
        if not stopping:
            log.info("stopping %d workers: each waits up to %g s for its running answers; press Ctrl-C again "
                     "to stop now", len(children), settings.shutdown_grace_seconds)
        else:
            forced = True
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for number in range(settings.workers):
        start(number)
    log.info("started %d workers on port %d", settings.workers, settings.port)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        number = children.pop(pid, None)
        if number is not None and not stopping:
            log.error("worker %d exited (status %d); starting it again", number, status)
            time.sleep(WORKER_RESTART_PAUSE_S)
            start(number)
    return EXIT_INTERRUPTED if forced else 0


def _raise_open_file_limit() -> None:
    """Each client stream holds two sockets: allow as many open files as the system lets us."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            wanted = hard if hard != resource.RLIM_INFINITY else OPEN_FILES_FALLBACK_COUNT
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass   # not on this platform, or not allowed: the default will do


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    import importlib.util
    if importlib.util.find_spec("yaml") is None:   # imported lazily, so check it is there before serving
        print("poe2openai: PyYAML is missing: pip install h11 pyyaml", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env(argv=sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        print(f"poe2openai: invalid setting: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    disabled = admin_disabled_reason(settings)
    if disabled:
        log.error("%s (Until then /admin, /api/admin/* and /api/models answer 403; the API works.)", disabled)
    elif settings.admin_password in WEAK_ADMIN_PASSWORDS:
        log.info("the admin page uses a default password; set ADMIN_PASSWORD before listening beyond this machine")
    if settings.poe_api_key and not settings.access_keys:
        log.warning("POE_API_KEY is set but ACCESS_KEYS is not: it is not used, and each client still sends its "
                    "own Poe key; set ACCESS_KEYS to share this proxy on POE_API_KEY")
    _raise_open_file_limit()
    if settings.workers > 1:
        return run_workers(settings)
    try:
        asyncio.run(serve(settings, install_signal_handlers=True))
    except OSError as exc:
        print(f"poe2openai: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # a second signal during the shutdown grace, or Ctrl-C before serving began
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
