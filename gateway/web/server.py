"""The local status page: a small HTTP server inside the gateway (microdot on asyncio), supervised like
every stage outside the safety core, so whatever a browser sends, polling and alarms go on.

    GET  /                 the page (HTML, CSS and script from this package: nothing from the internet)
    GET  /api/overview     the site at a glance (gateway.status.overview), JSON
    GET  /api/trend/<i>    the trend of catalogue point i: [[t, v], …]
    GET  /events           server-sent events: the overview, about once a second while it changes
    POST /api/login        {"user", "password"} → a session cookie (HttpOnly, SameSite=Strict)
    POST /api/logout
    POST /api/ack          {"rule"}: acknowledge as the logged-in user (logged, and in the alarm event)
    GET  /metrics          Prometheus text, when the gateway has metrics

Untrusted bytes are bounded before microdot parses them: a request head is read here first (16 KB, 64
lines, 10 s), checked for shape, and only then handed over; bodies are capped at 4 KB; at most 16
connections at once. Acknowledging needs a login: users and scrypt hashes in `[status] users_file`
(0600, no default user); five failed logins from one address lock it out for a minute. A POST must carry
`X-Yujing: 1`, which a cross-site form cannot set: with the SameSite cookie, no other site can make a
logged-in browser acknowledge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from microdot import Microdot, Request, Response

from .. import status
from . import users as users_mod

log = logging.getLogger("yujing.status")

MAX_HEAD = 16 * 1024
MAX_HEAD_LINES = 64
HEAD_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16
MAX_BODY = 4096
SESSION_IDLE_S = 8 * 3600
MAX_SESSIONS = 32
LOCKOUT_AFTER, LOCKOUT_S = 5, 60.0
PUSH_EVERY_S = 1.0
ALARM_LOOK_S = 0.1
HEARTBEAT_S = 15.0
COOKIE = "yujing_session"

_REQUEST_LINE = re.compile(rb"^(GET|POST|HEAD) (/[\x21-\x7e]*) HTTP/1\.[01]\r?\n$")
_HEADER_LINE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\x09\x20-\x7e\x80-\xff]*\r?\n$")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


class _HeadFirst:
    """The stream microdot reads: the head this server has already read and checked, then the socket."""

    def __init__(self, head: bytes, reader: asyncio.StreamReader) -> None:
        self._buf = head
        self._reader = reader

    async def readline(self) -> bytes:
        if self._buf:
            i = self._buf.find(b"\n")
            line, self._buf = (self._buf[: i + 1], self._buf[i + 1 :]) if i >= 0 else (self._buf, b"")
            return line
        return await self._reader.readline()

    async def readexactly(self, n: int) -> bytes:
        take, self._buf = self._buf[:n], self._buf[n:]
        return take + (await self._reader.readexactly(n - len(take)) if n > len(take) else b"")

    async def read(self, n: int = -1) -> bytes:
        if self._buf:
            take, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
            return take
        return await self._reader.read(n)


class _Writer:
    """The stream microdot writes to: asyncio's writer with the awrite/aclose it expects."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._w = writer

    async def awrite(self, data: bytes) -> None:
        self._w.write(data)
        await self._w.drain()

    async def aclose(self) -> None:
        self._w.close()
        with contextlib.suppress(ConnectionError):
            await self._w.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._w.get_extra_info(name, default)


class StatusServer:
    def __init__(self, gw: Any, *, host: str, port: int, users_file: Any = None, ssl_context: ssl.SSLContext | None = None,
                 metrics: Callable[[], Awaitable[tuple[bytes, str]]] | None = None) -> None:
        self.gw = gw
        self.host, self.port = host, port
        self.users_file = users_file
        self.ssl_context = ssl_context
        self.metrics = metrics
        self._sessions: dict[str, tuple[str, float]] = {}  # token → (user, last used, monotonic)
        self._failures: dict[str, tuple[int, float]] = {}  # address → (failed logins in a row, when the last was)
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._login_gate = asyncio.Semaphore(1)  # one scrypt at a time: ~16 MB each
        self._handlers: set[asyncio.Task[Any]] = set()
        self.bound_port: int | None = None
        self.app = self._routes()

    # ------------------------------------------------------------------ serving

    async def run(self) -> None:
        server = await asyncio.start_server(self._connection, self.host, self.port, ssl=self.ssl_context, limit=MAX_HEAD)
        sock = server.sockets[0].getsockname() if server.sockets else (self.host, self.port)
        self.bound_port = sock[1]
        scheme = "https" if self.ssl_context else "http"
        log.info("status page on %s://%s:%d/", scheme, self.host if self.host != "0.0.0.0" else "<this machine>", self.bound_port)
        try:
            async with server:
                await server.serve_forever()
        finally:
            for task in list(self._handlers):  # live-update streams end with the server
                task.cancel()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=2)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            if self._slots.locked():
                writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            async with self._slots:
                head = await self._read_head(reader)
                if head is None:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                await self.app.handle_request(_HeadFirst(head, reader), _Writer(writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping: this connection's task ends here (asyncio logs a cancelled one)
        except Exception:
            log.exception("status page: a request failed (the gateway goes on)")
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self._handlers.discard(task)

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request line and headers, whole and well-formed, within the bounds; None otherwise."""
        lines: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + HEAD_TIMEOUT_S
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), max(left, 0.001))
            except (TimeoutError, asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError):
                return None
            size += len(line)
            if size > MAX_HEAD or len(lines) > MAX_HEAD_LINES or len(line) > Request.max_readline:
                return None  # (microdot would raise on a line over its max_readline, and print a traceback)
            if line in (b"\r\n", b"\n"):
                break
            pattern = _HEADER_LINE if lines else _REQUEST_LINE
            if not pattern.match(line):
                return None
            lines.append(line)
        return b"".join(lines) + b"\r\n" if lines else None

    # ------------------------------------------------------------------ routes

    def _routes(self) -> Microdot:
        app = Microdot()
        Request.max_content_length = MAX_BODY  # this process's only microdot app
        Request.max_body_length = MAX_BODY

        @app.get("/")
        @app.get("/app.js")
        @app.get("/style.css")
        async def static(request: Request) -> Any:
            name, ctype = STATIC[request.path]
            body = resources.files("gateway.web").joinpath("static", name).read_bytes()
            return body, 200, {"Content-Type": ctype, "Cache-Control": "no-cache", **_SECURITY_HEADERS}

        @app.get("/api/overview")
        async def overview(request: Request) -> Any:
            return self._json(await self._overview(request))

        @app.get("/api/trend/<int:point>")
        async def trend(request: Request, point: int) -> Any:
            trends = getattr(self.gw, "trends", None)
            if trends is None or not 0 <= point < len(self.gw.config.catalogue):
                return self._json({"error": f"no point {point}"}, 404)
            return self._json({"point": point, "step_s": trends.step_s, "series": trends.series(point)})

        @app.get("/events")
        async def events(request: Request) -> Any:
            return Response(body=self._stream(request), headers={"Content-Type": "text/event-stream",
                                                                  "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        @app.post("/api/login")
        async def login(request: Request) -> Any:
            return await self._login(request)

        @app.post("/api/logout")
        async def logout(request: Request) -> Any:
            if not self._csrf_ok(request):
                return self._json({"ok": False, "message": "missing X-Yujing header"}, 403)
            self._sessions.pop(request.cookies.get(COOKIE, ""), None)
            res = self._json({"ok": True})
            res.headers["Set-Cookie"] = [self._cookie("", 0)]
            return res

        @app.post("/api/ack")
        async def ack(request: Request) -> Any:
            return self._ack(request)

        @app.get("/metrics")
        async def metrics(request: Request) -> Any:
            if self.metrics is None:
                return "metrics are not enabled on this gateway\n", 404
            try:
                body, ctype = await self.metrics()
            except Exception:
                log.exception("status page: /metrics failed (the page goes on)")
                return "metrics failed; see the gateway log\n", 500
            return body, 200, {"Content-Type": ctype}

        @app.errorhandler(404)
        async def not_found(request: Request) -> Any:
            return self._json({"error": "not found"}, 404)

        return app

    @staticmethod
    def _json(obj: Any, code: int = 200) -> Response:
        return Response(body=json.dumps(obj, ensure_ascii=False, default=str), status_code=code,
                        headers={"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store", **_SECURITY_HEADERS})

    async def _overview(self, request: Request) -> dict[str, Any]:
        data = await status.overview(self.gw)
        data["you"] = self._user(request)
        data["can_acknowledge"] = self.users_file is not None
        return data

    async def _stream(self, request: Request) -> AsyncIterator[str]:
        """The overview whenever it changed (looked at every second), and a comment every 15 s otherwise,
        so a proxy or a phone does not close an idle stream. One stream per connection, within the limit."""
        last = None
        quiet_since = time.monotonic()
        yield "retry: 2000\n\n"
        while True:
            data = await self._overview(request)
            for moving in ("now_ms", "you"):  # the page keeps its own clock and its login (a cookie set after
                data.pop(moving, None)          # this stream opened is not in its request)
            if data.get("uptime_s") is not None:
                data["uptime_s"] = data["uptime_s"] // 60 * 60  # a change a minute, not a push a second
            text = json.dumps(data, ensure_ascii=False, default=str, sort_keys=True)
            if text != last:
                last = text
                quiet_since = time.monotonic()
                yield f"data: {text}\n\n"
            elif time.monotonic() - quiet_since >= HEARTBEAT_S:
                quiet_since = time.monotonic()
                yield ": still here\n\n"
            # Values once a second; an alarm that changes goes out within 0.1 s of the poll that changed it.
            alarms = self._alarm_signature()
            for _ in range(round(PUSH_EVERY_S / ALARM_LOOK_S)):
                await asyncio.sleep(ALARM_LOOK_S)
                if self._alarm_signature() != alarms:
                    break

    def _alarm_signature(self) -> tuple[Any, ...]:
        desk = self.gw.desk
        if desk is None:
            return ()
        return tuple((s.level, s.acked, s.latched, s.fault) for s in desk.engine.snapshot().values())

    # ------------------------------------------------------------------ login and acknowledging

    def _csrf_ok(self, request: Request) -> bool:
        return request.headers.get("X-Yujing") == "1"

    def _user(self, request: Request) -> str | None:
        token = request.cookies.get(COOKIE)
        entry = self._sessions.get(token or "")
        if entry is None:
            return None
        user, used = entry
        if time.monotonic() - used > SESSION_IDLE_S:
            self._sessions.pop(token or "", None)
            return None
        self._sessions[token or ""] = (user, time.monotonic())
        return user

    def _address(self, request: Request) -> str:
        addr = request.client_addr
        return str(addr[0]) if isinstance(addr, (tuple, list)) and addr else "?"

    async def _login(self, request: Request) -> Response:
        if not self._csrf_ok(request):
            return self._json({"ok": False, "message": "missing X-Yujing header"}, 403)
        if self.users_file is None:
            return self._json({"ok": False, "message": "acknowledging from this page is off: no [status] users_file on this gateway"}, 403)
        where = self._address(request)
        failed, last = self._failures.get(where, (0, 0.0))
        if failed >= LOCKOUT_AFTER and time.monotonic() - last < LOCKOUT_S:
            return self._json({"ok": False, "message": f"too many failed logins from {where}; wait a minute"}, 429)
        body = request.json if isinstance(request.json, dict) else {}
        name, password = body.get("user"), body.get("password")
        if not isinstance(name, str) or not isinstance(password, str) or len(name) > 64 or len(password) > 256:
            return self._json({"ok": False, "message": 'expected {"user": …, "password": …}'}, 400)
        try:
            known = users_mod.load(self.users_file)  # read each time: a user added on site works at once
        except users_mod.UsersFileError as exc:
            log.error("status page: %s", exc)
            return self._json({"ok": False, "message": "the users file cannot be read; see the gateway log"}, 500)
        async with self._login_gate:
            ok = await asyncio.to_thread(users_mod.verify, known, name, password)
        if not ok:
            self._failures[where] = (failed + 1 if time.monotonic() - last < LOCKOUT_S else 1, time.monotonic())
            if len(self._failures) > 1024:
                self._failures.clear()  # bounded; a lockout is a speed bump, not the defence (scrypt is)
            log.warning("status page: failed login for %r from %s", name[:64], where)
            return self._json({"ok": False, "message": "wrong user name or password"}, 401)
        self._failures.pop(where, None)
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda t: self._sessions[t][1])
            self._sessions.pop(oldest)
        token = secrets.token_urlsafe(32)
        self._sessions[token] = (name, time.monotonic())
        log.info("status page: %s logged in from %s", name, where)
        res = self._json({"ok": True, "user": name})
        res.headers["Set-Cookie"] = [self._cookie(token, SESSION_IDLE_S)]
        return res

    def _cookie(self, value: str, max_age: int) -> str:
        secure = "; Secure" if self.ssl_context is not None else ""
        return f"{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"

    def _ack(self, request: Request) -> Response:
        if not self._csrf_ok(request):
            return self._json({"ok": False, "message": "missing X-Yujing header"}, 403)
        user = self._user(request)
        if user is None:
            return self._json({"ok": False, "message": "log in to acknowledge"}, 401)
        body = request.json if isinstance(request.json, dict) else {}
        rule = body.get("rule")
        if not isinstance(rule, str) or self.gw.desk is None:
            return self._json({"ok": False, "message": 'expected {"rule": …}'}, 400)
        ok, message = self.gw.desk.acknowledge(rule, user)
        log.info("status page: %s acknowledged %s from %s: %s", user, rule[:64], self._address(request), message)
        return self._json({"ok": ok, "message": message}, 200 if ok else 400)


_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                     "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"}
