"""The HTTP side of ``nidaan serve`` (``http.port``, 8080): metrics, health and a status page.

- ``/metrics``: Prometheus text format.
- ``/healthz``: ``{"status": "serving"}`` with 200 while the node accepts work and every
  background thread it needs (analysis workers, timer, outbox) runs; otherwise 503 with
  ``{"status": "not serving", "problems": [...]}`` naming what is wrong, e.g. which thread ended
  (for load balancers, Kubernetes probes and monitoring).
- ``/healthz`` and ``/readyz`` need neither a token nor, with ``http.tls``, a client
  certificate (the TLS handshake still checks one that is offered); every other page needs both
  where configured.
- ``/readyz``: 200 ``{"status": "ready", "checks": {...}}`` when the node can take work now: its
  models loaded (and Triton reachable with them, when used), the spool writable with
  ``dicom.min_free_bytes`` free, the state database open, every thread alive; otherwise 503 with
  each failing check's reason (a readiness probe: take the node out of rotation, don't restart).
- ``/status.json`` and ``/``: what the node is doing, as JSON and as a plain HTML page: models (and
  whether they are for diagnosis), studies by state, report deliveries by state, each model's
  queue and batches, the receiver, decoder and report builder processes, the quarantine's
  entries, storage, and drift (each model's present-rate per finding over the last day beside
  its card's, and the radiologists' verdicts); the page adds recent studies (UIDs shortened),
  failures, the quarantine's reasons, dead letters and peers. No patient data.
"""

from __future__ import annotations

import hmac
import html
import http.cookies
import json
import logging
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .console import REFRESH_S, sections

log = logging.getLogger("nidaan.status")

Snapshot = Callable[[], dict[str, Any]]
#: What keeps the node from serving (see :meth:`NidaanServer.health`); empty when it serves.
Health = Callable[[], list[str]]
#: Each readiness check and what is wrong with it ("" = ready): /readyz.
Ready = Callable[[], dict[str, str]]
#: The working sections' data for (state filter, calling AE filter).
Console = Callable[[str, str], dict[str, Any]]
#: Queue dead letters again by outbox id; how many were.
Resend = Callable[[list[int]], int]
#: Pages a probe reaches without a token.
OPEN_PATHS = ("/healthz", "/readyz")
#: The cookie a signed-in browser carries its token in.
COOKIE = "nidaan_token"


def _table(rows: list[list[Any]], head: list[str]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def _size(n: int | None) -> str:
    """Bytes for a person ('not measured yet' before the first retention sweep)."""
    if n is None:
        return "not measured yet"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _rate(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _drift(drift: dict[str, Any] | None) -> str:
    """The drift table: each model's present-rate per finding over the window, beside the rate
    its card expects, and the radiologists' verdicts."""
    if not drift:
        return ""
    rows = [
        [
            d["model"],
            d["finding"],
            d["analysed"],
            d["present"],
            _rate(d["present_rate"]) if d["analysed"] else "no image yet",
            _rate(d["expected_present_rate"]) or "not stated",
            _rate(d["expected_prevalence"]) or "not stated",
            f"{d['feedback']['agree']} agree, {d['feedback']['disagree']} disagree",
        ]
        for d in drift["findings"]
    ]
    hours = drift["window_s"] / 3600
    site = any(d["site_threshold"] for d in drift["findings"])
    note = (
        " A site threshold is in force for some findings: the card's rates are at the "
        "sidecar's threshold."
        if site
        else ""
    )
    return (
        f"<h2>Drift (last {hours:g} h)</h2><p>Images each model analysed and how many it found "
        "the finding present in, beside the present-rate the model card states for its held-out "
        f"set (and that set's prevalence).{html.escape(note)}</p>"
        + _table(
            rows,
            [
                "model",
                "finding",
                "images",
                "present",
                "present-rate",
                "card's present-rate",
                "card's prevalence",
                "radiologists (all time)",
            ],
        )
    )


def render(status: dict[str, Any], console: dict[str, Any] | None = None) -> str:
    """The status page for a snapshot (see :meth:`NidaanServer.snapshot`) and, when given,
    the working sections (:meth:`NidaanServer.console`)."""
    models = _table(
        [
            [
                m["name"],
                m["version"],
                ", ".join(m["modalities"]),
                "NOT FOR DIAGNOSIS (synthetic-trained)" if m["not_for_diagnosis"] else "",
            ]
            for m in status["models"]
        ],
        ["model", "version", "modalities", "use"],
    )
    studies = _table(sorted([k, v] for k, v in status["studies"].items()), ["state", "studies"])
    drift = _drift(status.get("drift"))
    outbox = _table(sorted([k, v] for k, v in status["reports"].items()), ["state", "reports"])
    batches = _table(
        [
            [name, b["images"], b["batches"], b["mean_batch"], b["queued_images"], b["rejected"]]
            for name, b in sorted(status["inference"]["models"].items())
        ],
        ["model", "images", "batches", "mean batch", "queued images", "refused"],
    )
    storage = status.get("storage", {"areas": {}, "free_bytes": None})
    space = _table(
        [
            [
                area,
                _size(a["bytes"]),
                f"{a['keep_days']:g} days" if a["keep_days"] else "for ever",
                f"{a['max_gb']:g} GB" if a["max_gb"] else "no limit",
            ]
            for area, a in storage["areas"].items()
        ],
        ["area", "size", "kept", "size limit"],
    )
    items = "".join(f"<li>{html.escape(p)}</li>" for p in status.get("problems", []))
    problems = f"<ul>{items}</ul>" if items else ""
    n = status["node"]
    r = status["receivers"]
    b = status.get("report_builders", {"workers": 0, "restarts": 0})
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Nidaan {html.escape(n["ae_title"])}</title>
<meta http-equiv="refresh" content="{REFRESH_S}">
<style>body{{font-family:sans-serif;margin:2em}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}
td,th{{border:1px solid #bbb;padding:.2em .6em;text-align:left}}</style></head><body>
<h1>Nidaan {html.escape(n["ae_title"])}: {html.escape(status["status"])}</h1>
{problems}
<p>DICOM port {n["dicom_port"]}, gRPC port {n["grpc_port"]}, up {n["uptime_s"]:.0f} s,
inference backend {html.escape(status["inference"]["backend"])},
{r["processes"]} receiver process(es) ({r["restarts"]} restarted),
{status["decoder"]["workers"]} decoder process(es) ({status["decoder"]["restarts"]} restarts),
{b["workers"]} report builder process(es) ({b["restarts"]} restarts).</p>
{sections(console) if console is not None else ""}
<h2>Models</h2>{models}
<h2>Studies</h2>{studies}
{drift}
<h2>Report deliveries</h2>{outbox}
<p>{status.get("quarantine", {}).get("entries", 0)} object(s) in the quarantine.</p>
<h2>Storage</h2><p>{_size(storage["free_bytes"])} free on the data dir's disk.</p>{space}
<h2>Batches (embedded backend)</h2>{batches}
<p><a href="/metrics">metrics</a> · <a href="/status.json">status.json</a> ·
<a href="/healthz">healthz</a></p></body></html>
"""


class StatusServer:
    """A small threaded HTTP server for metrics, health and status."""

    def __init__(
        self,
        registry: CollectorRegistry,
        snapshot: Snapshot,
        health: Health,
        ready: Ready | None = None,
        *,
        console: Console | None = None,
        resend: Resend | None = None,
        tokens: Sequence[str] = (),
    ) -> None:
        """``tokens``: when any, every page but /healthz and /readyz needs one (see
        ``http.tokens_file``)."""
        self._registry = registry
        self._snapshot = snapshot
        self._health = health
        self._ready = ready
        self._console = console
        self._resend = resend
        self._tokens = [t.encode() for t in tokens]
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.tls = False
        #: Whether the pages need a client certificate (http.tls with dicom.tls_ca).
        self.client_certs = False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                url = urllib.parse.urlsplit(self.path)
                path = url.path
                query = urllib.parse.parse_qs(url.query)
                try:
                    if path not in OPEN_PATHS and not self._allowed(query):
                        return
                    if path == "/metrics":
                        self._send(200, CONTENT_TYPE_LATEST, generate_latest(outer._registry))
                    elif path == "/healthz":
                        problems = outer._health()
                        body: dict[str, Any] = {"status": "serving"}
                        if problems:
                            body = {"status": "not serving", "problems": problems}
                        self._send(503 if problems else 200, "application/json", json.dumps(body))
                    elif path == "/readyz":
                        checks = outer._ready() if outer._ready else {}
                        failing = {k: v for k, v in checks.items() if v}
                        ready = {
                            "status": "not ready" if failing else "ready",
                            "checks": {k: v or "ok" for k, v in checks.items()},
                        }
                        self._send(503 if failing else 200, "application/json", json.dumps(ready))
                    elif path == "/status.json":
                        self._send(200, "application/json", json.dumps(outer._snapshot()))
                    elif path in ("/", "/index.html"):
                        console = None
                        if outer._console is not None:
                            console = outer._console(
                                query.get("state", [""])[0], query.get("ae", [""])[0]
                            )
                        page = render(outer._snapshot(), console)
                        self._send(200, "text/html; charset=utf-8", page)
                    elif path == "/console.json" and outer._console is not None:
                        data = outer._console(query.get("state", [""])[0], query.get("ae", [""])[0])
                        self._send(200, "application/json", json.dumps(data))
                    else:
                        self._send(404, "text/plain", f"no page {path!r}\n")
                except Exception:  # a page that fails must not take the server down
                    log.exception("HTTP %s failed", path)
                    self._send(500, "text/plain", "internal error\n")

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                path = urllib.parse.urlsplit(self.path).path
                try:
                    if not self._allowed({}):
                        return
                    if path != "/resend" or outer._resend is None:
                        self._send(404, "text/plain", f"no action {path!r}\n")
                        return
                    length = min(int(self.headers.get("Content-Length") or 0), 4096)
                    form = urllib.parse.parse_qs(self.rfile.read(length).decode("ascii", "replace"))
                    try:
                        ids = [int(v) for v in form.get("id", [])]
                    except ValueError:
                        self._send(400, "text/plain", "id must be a number\n")
                        return
                    if not ids:
                        self._send(400, "text/plain", "which dead letter? (id)\n")
                        return
                    n = outer._resend(ids)
                    log.info("status page: %d dead letter(s) queued again", n)
                    self._redirect("/")
                except Exception:  # an action that fails must not take the server down
                    log.exception("HTTP POST %s failed", path)
                    self._send(500, "text/plain", "internal error\n")

            def _allowed(self, query: dict[str, list[str]]) -> bool:
                """Whether the request carries a valid token (or none is configured) and, with
                http.tls and a CA, a client certificate the CA signed; answers 401 or 403, or
                signs the browser in (a cookie) and redirects, otherwise."""
                if outer.client_certs and not self.connection.getpeercert():
                    self._send(
                        403,
                        "text/plain",
                        "a client certificate signed by dicom.tls_ca is needed (http.tls); "
                        "only /healthz and /readyz answer without one\n",
                    )
                    return False
                if not outer._tokens:
                    return True
                offered = query.get("token", [""])[0]
                if offered and outer._valid(offered):
                    # Signed in: the token moves to a cookie and out of the address bar.
                    self.send_response(303)
                    self.send_header(
                        "Set-Cookie",
                        f"{COOKIE}={offered}; HttpOnly; SameSite=Strict; Path=/"
                        + ("; Secure" if outer.tls else ""),
                    )
                    self.send_header("Location", urllib.parse.urlsplit(self.path).path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                header = self.headers.get("Authorization", "")
                if header.startswith("Bearer ") and outer._valid(header[7:].strip()):
                    return True
                cookie = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
                if COOKIE in cookie and outer._valid(cookie[COOKIE].value):
                    return True
                self._send(
                    401,
                    "text/plain",
                    "a token is needed (http.tokens_file): open /?token=<token> once, or send "
                    "Authorization: Bearer <token>\n",
                )
                return False

            def _redirect(self, where: str) -> None:
                self.send_response(303)
                self.send_header("Location", where)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, code: int, kind: str, body: str | bytes) -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("HTTP " + format, *args)

        return Handler

    def _valid(self, token: str) -> bool:
        """Whether ``token`` is one of the configured ones (constant time; never logged)."""
        offered = token.encode()
        return any(hmac.compare_digest(offered, t) for t in self._tokens)

    def start(self, bind: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``bind:port`` (0 = any free port), over TLS with ``ssl_context`` (which
        may require client certificates); returns the port."""
        self.tls = ssl_context is not None
        if ssl_context is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED:
            # A client certificate is asked for and checked during the handshake, but needed
            # only for the pages (see _allowed): probes and the container's HEALTHCHECK reach
            # /healthz and /readyz without one, as with tokens.
            ssl_context.verify_mode = ssl.CERT_OPTIONAL
            self.client_certs = True
        self._server = ThreadingHTTPServer((bind, port), self._handler())
        if ssl_context is not None:
            # The handshake runs in each request's thread (on its first read), not in the
            # accepting one, so a client that stalls it holds up only itself.
            self._server.socket = ssl_context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="nidaan-http", daemon=True
        )
        self._thread.start()
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
