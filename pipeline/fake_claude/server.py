"""The fake Claude HTTP server: stdlib ThreadingHTTPServer, one thread per connection, so slow
(latency-injected) requests never hold each other up."""

from __future__ import annotations

import json
import logging
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

from pipeline.fake_claude.batches import MAX_BATCH_BYTES, BatchApi, BatchStore, JsonLines, is_batch_path
from pipeline.fake_claude.options import FakeOptions
from pipeline.fake_claude.quality import QualityModel
from pipeline.fake_claude.responder import Outcome, Responder, Response
from pipeline.fake_claude.stats import LoggedRequest, Recorder

log = logging.getLogger(__name__)

_MAX_BODY_BYTES = 64 * 1024 * 1024
_BATCH_POLL_S = 0.05  # how often the batch thread looks for a batch come due


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog: benchmarks open hundreds of connections at once, and the default of 5
    # makes the kernel drop SYNs, which clients see as multi-second connect stalls.
    request_queue_size = 2048

    def __init__(
        self, address: tuple[str, int], responder: Responder, recorder: Recorder, clock: Callable[[], float],
        batch_api: BatchApi,
    ) -> None:
        super().__init__(address, _Handler)
        self.responder = responder
        self.batch_api = batch_api
        self.recorder = recorder
        self.clock = clock
        self.stopping = threading.Event()  # wakes sleeping handlers on stop
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can hang for seconds on machines
        # without working DNS; the name is only used in logs, so skip the lookup.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        """Shut idle keep-alive connections so their handler threads end with the server."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # already closed by the peer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client hanging up (timeouts, drop faults) is routine here, not a bug
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-claude/1.0"
    timeout = 600  # seconds an idle keep-alive connection is kept
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without NODELAY, Nagle plus the client's delayed
        # ACK adds ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one line per request would swamp benchmark output; /_fake/requests has it."""

    # -- routing ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        now = self.server.clock()
        if is_batch_path(url.path):
            self._batches("GET", url.path, url.query, None, now)
        elif url.path == "/v1/models":
            query = dict(parse_qsl(url.query))
            self._send(self.server.responder.list_models(self._headers(), query, now=now).response)
        elif url.path.startswith("/v1/models/"):
            model_id = unquote(url.path.removeprefix("/v1/models/"))
            self._send(self.server.responder.get_model(self._headers(), model_id, now=now).response)
        elif url.path == "/_fake/stats":
            self._send_json(200, self.server.recorder.stats())
        elif url.path == "/_fake/requests":
            self._send_json(200, self.server.recorder.requests())
        else:
            self._not_found(url.path, now)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if is_batch_path(url.path) and self._too_large(MAX_BATCH_BYTES):
            return
        raw = self._read_body(MAX_BATCH_BYTES if is_batch_path(url.path) else _MAX_BODY_BYTES)
        now = self.server.clock()
        if url.path == "/v1/messages":
            self._messages(raw, now)
        elif is_batch_path(url.path):
            body = _parse_json(raw) if raw else None  # a cancel has no body
            if isinstance(body, _BadJson):
                self._send(self.server.responder.error(400, "invalid_request_error", body.message, now=now).response)
            else:
                self._batches("POST", url.path, url.query, body, now)
        elif url.path == "/v1/messages/count_tokens":
            body = _parse_json(raw)
            if isinstance(body, _BadJson):
                outcome = self.server.responder.error(400, "invalid_request_error", body.message, now=now)
            else:
                outcome = self.server.responder.count_tokens(self._headers(), body, now=now)
                self.server.recorder.counted_tokens()
            self._send(outcome.response)
        elif url.path == "/_fake/reset":
            self.server.responder.reset()
            self.server.recorder.reset()
            self.server.batch_api.store.reset()
            self._send_json(200, {"ok": True})
        else:
            self._not_found(url.path, now)

    def do_DELETE(self) -> None:
        url = urlsplit(self.path)
        now = self.server.clock()
        if is_batch_path(url.path):
            self._batches("DELETE", url.path, url.query, None, now)
        else:
            self._not_found(url.path, now)

    # -- /v1/messages/batches --------------------------------------------------------------------

    def _batches(self, method: str, path: str, query: str, body: Any, now: float) -> None:
        server = self.server
        host = self.headers.get("host") or "{}:{}".format(*server.server_address[:2])
        self._send(server.batch_api.handle(method, path, dict(parse_qsl(query)), self._headers(), body,
                                           responder=server.responder, recorder=server.recorder, now=now,
                                           base_url=f"http://{host}"))

    def _too_large(self, limit: int) -> bool:
        """Answer 413 without reading a body over `limit` bytes (the connection closes after it)."""
        length = self.headers.get("content-length")
        if length is None or not length.isdigit() or int(length) <= limit:
            return False
        self.close_connection = True
        outcome = self.server.responder.error(
            413, "request_too_large",
            f"body: {int(length):,} bytes, more than the {limit:,} bytes a message batch takes",
            now=self.server.clock())
        self._send(outcome.response)
        return True

    # -- /v1/messages ----------------------------------------------------------------------------

    def _messages(self, raw: bytes, started: float) -> None:
        recorder = self.server.recorder
        recorder.arrived()
        outcome: Outcome | None = None
        recorded = False
        try:
            outcome = self._decide(raw, started)
            if outcome.delay_s > 0:
                self.server.stopping.wait(outcome.delay_s)
            # Recorded just before the last write, so a client that has its answer (or its
            # dropped connection) always finds the request in /_fake/stats and /_fake/requests.
            dropping = outcome.response is None or self.server.stopping.is_set()
            # Likewise the cache: what this answer wrote is readable by the client's next request.
            self.server.responder.settle(outcome, delivered=not dropping)
            recorder.finished(_log_entry(outcome, started, self.server.clock(), dropped=dropping))
            recorded = True
            if dropping:
                self._drop()
            else:
                self._send(outcome.response)
        finally:
            if not recorded:
                recorder.finished(_log_entry(outcome, started, self.server.clock(), dropped=True))

    def _decide(self, raw: bytes, now: float) -> Outcome:
        responder = self.server.responder
        body = _parse_json(raw)
        if isinstance(body, _BadJson):
            return responder.error(400, "invalid_request_error", body.message, now=now)
        try:
            return responder.messages(self._headers(), body, now=now)
        except Exception:
            # A bug in the fake must look like a server error to the client, not like a network
            # drop that sends it retrying; the traceback goes to the log for whoever runs the fake.
            log.exception("fake-claude failed to answer a request")
            return responder.error(500, "api_error", "Internal server error in fake-claude", now=now)

    # -- I/O helpers -----------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _read_body(self, limit: int = _MAX_BODY_BYTES) -> bytes:
        length = self.headers.get("content-length")
        if length is not None and length.isdigit():
            return self.rfile.read(min(int(length), limit))
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            return self._read_chunked()
        return b""

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    continue  # trailers
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _send(self, response: Response | None) -> None:
        if response is None:
            self._drop()
            return
        if isinstance(response.body, JsonLines):
            payload, content_type = b"".join(line + b"\n" for line in response.body.lines), "application/x-jsonl"
        else:
            payload, content_type = json.dumps(response.body, ensure_ascii=False).encode(), "application/json"
        try:
            self.send_response(response.status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(payload)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up first (e.g. its timeout fired during a stall): nothing to send to.
            self.close_connection = True

    def _send_json(self, status: int, body: Any) -> None:
        self._send(Response(status, {}, body))

    def _not_found(self, path: str, now: float) -> None:
        outcome = self.server.responder.error(404, "not_found_error", f"Not found: {path}", now=now)
        self._send(outcome.response)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            return  # the peer closed first: dropped either way


class _BadJson:
    def __init__(self, message: str) -> None:
        self.message = message


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _BadJson(f"body: could not parse JSON: {exc}")


def _log_entry(outcome: Outcome | None, started: float, ended: float, *, dropped: bool) -> LoggedRequest:
    if outcome is None:  # the fake failed before deciding, and the connection goes unanswered
        return LoggedRequest(None, None, 0, started, ended, 0, 0, "", None)
    status = 0 if dropped else outcome.status
    answered = status == 200
    return LoggedRequest(
        model=outcome.model,
        purpose=outcome.purpose,
        status=status,
        started_at=started,
        ended_at=ended,
        input_tokens=outcome.input_tokens if answered else 0,
        output_tokens=outcome.output_tokens if answered else 0,
        request_id=outcome.request_id,
        fault=outcome.fault,
        cache=_cache_result(outcome) if answered else None,
        cache_creation_input_tokens=outcome.cache.creation_tokens if answered else 0,
        cache_read_input_tokens=outcome.cache.read_tokens if answered else 0,
        true_difficulty=outcome.judged.difficulty if answered and outcome.judged else None,
        wrong=outcome.judged.wrong if answered and outcome.judged else None,
        output_format=outcome.output_format,
    )


def _cache_result(outcome: Outcome) -> str | None:
    """hit / miss for a request with a cacheable prefix; uncacheable when every breakpoint fell short
    of the model's minimum; None without a breakpoint."""
    plan = outcome.cache
    if plan.cacheable:
        return "hit" if plan.hit else "miss"
    return "uncacheable" if plan.marked else None


class FakeClaude:
    """The fake server, in-process: `with FakeClaude() as fc: Anthropic(base_url=fc.base_url)`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        options: FakeOptions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` gives the fake's time (cache TTLs, rate-limit buckets, the request log): a test
        passes its own to expire a cache entry without waiting for it."""
        self.options = options or FakeOptions()
        self._clock = clock
        self._address = (host, port)
        self._responder = Responder(self.options)
        self._recorder = Recorder(quality=self._responder.quality.describe())
        self._batch_api = BatchApi(_batch_store(self.options))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._batch_thread: threading.Thread | None = None

    def start(self) -> FakeClaude:
        if self._server is not None:
            raise RuntimeError("FakeClaude is already started")
        server = _Server(self._address, self._responder, self._recorder, self._clock, self._batch_api)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-claude", daemon=True
        )
        thread.start()
        batch_thread = threading.Thread(target=self._process_batches, args=(server,), name="fake-claude-batches",
                                        daemon=True)
        batch_thread.start()
        self._server, self._thread, self._batch_thread = server, thread, batch_thread
        return self

    def _process_batches(self, server: _Server) -> None:
        """Message batches are processed here, one chunk at a time, as each comes due."""
        while not server.stopping.is_set():
            try:
                busy = server.batch_api.store.advance(server.responder, self._recorder, self._clock())
            except Exception:
                # Like a request the fake fails to answer: logged, and the fake keeps serving.
                log.exception("fake-claude failed to process a message batch")
                busy = False
            if not busy:
                server.stopping.wait(_BATCH_POLL_S)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join(timeout=5)
        if self._batch_thread is not None:
            self._batch_thread.join(timeout=5)
        self._server = self._thread = self._batch_thread = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("FakeClaude is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def base_url(self) -> str:
        host, port = self.address
        # A wildcard bind is reachable on loopback; clients cannot connect to 0.0.0.0 everywhere.
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

    def stats(self) -> dict[str, Any]:
        return self._recorder.stats()

    @property
    def quality(self) -> QualityModel:
        """The quality model answering: `fake.quality.answer(Job.of(payload), "classify", "haiku")` is
        what a Haiku call on that job gets."""
        return self._responder.quality

    def requests(self) -> list[dict[str, Any]]:
        return self._recorder.requests()

    def reset(self) -> None:
        """Clear counters, the log, `times=N` counters, rate-limit buckets, the prompt cache and the
        message batches; reseed faults."""
        self._responder.reset()
        self._batch_api.store.reset()
        self._recorder.reset()

    def reconfigure(self, options: FakeOptions) -> None:
        """Serve with new options from now on (a new fault mix, say) and start a fresh log, on the
        same address: clients keep their base URL and connections. Call it between runs, not
        while requests are in flight."""
        self.options = options
        self._responder = Responder(options)
        self._batch_api.store = _batch_store(options)
        if self._server is not None:
            self._server.responder = self._responder
        self._recorder.reset()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _batch_store(options: FakeOptions) -> BatchStore:
    return BatchStore(delay_s=options.batch_delay_s, error_rates=options.batch_error_rates, seed=options.seed)


def serve_forever(*, host: str, port: int, options: FakeOptions) -> None:
    """Serve until SIGINT or SIGTERM (for the CLI)."""
    fake = FakeClaude(host=host, port=port, options=options).start()
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        bound_host, bound_port = fake.address
        print(f"fake-claude listening on http://{bound_host}:{bound_port}", flush=True)
        while not done.wait(0.5):
            continue
    finally:
        fake.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
