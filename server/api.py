"""The gRPC API (package ``nidaan.v1``, service ``Inference``; proto in ``client/proto``).

Integrators send the DICOM instances of one study and get the findings back (and, if asked, the
DICOM SR Nidaan would send a PACS). A thin entrance: each instance passes the same admission as
over DICOM (``pacs_bridge.admission``), then the study use-case (``server.studies``) runs it
through the same pipeline, so its images share the models' batchers with studies arriving by
C-STORE.
The standard health (``grpc.health.v1``) and reflection services are offered too.

Errors follow pynetdicom's rule that a handler's failure becomes a proper status, never a broken
connection: each :class:`~nidaan.core.errors.NidaanError` maps to a gRPC code with a message
that names the problem and carries no patient data; an instance that cannot be read or decoded is
kept in quarantine with its reason, as over DICOM (up to ``grpc.max_quarantine_mb``, and never
below ``dicom.min_free_bytes`` of free disk).

Every call of the Inference service is counted and audited (``on_request``), refused ones too:
Nidaan applies ``grpc.max_concurrent_rpcs`` itself (:class:`CallSlots`) instead of leaving it to
grpcio, which refuses a call before any handler runs.

Memory is bounded by bytes, not by calls (:class:`ByteBudget`, ``grpc.max_inflight_mb``): what a
call holds while its instances are read, parsed, decoded and preprocessed is counted; a call
that would go past the limit waits for room (at most ``grpc.admission_timeout_s``, then
RESOURCE_EXHAUSTED). ``AnalyzeStudy`` receives a study one instance per message and keeps only
each instance's header and model tensors, so a study of any size fits; ``Analyze`` holds its
whole request and counts four times its size. With ``grpc.tokens_file`` every call of the
Inference service needs a bearer token (:class:`BearerTokens`); health checks stay open.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydicom import dcmread
from pydicom.dataset import Dataset

from nidaan.client.proto import inference_pb2 as pb
from nidaan.core.config import read_tokens
from nidaan.core.errors import (
    ConfigError,
    InferenceError,
    InputError,
    NidaanError,
    QueueFullError,
)
from nidaan.core.findings import CodedValue, Finding, ImageAnalysis
from nidaan.core.heap import HeapReleaser
from nidaan.pacs_bridge.admission import admit, read_bytes
from nidaan.pacs_bridge.spool import Spool
from nidaan.pacs_bridge.uids import is_valid_uid, ref

from .feedback import UnknownReport
from .model_repository import ModelSpec
from .pipeline import Prepared
from .studies import Studies

log = logging.getLogger("nidaan.api")

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "nidaan.v1.Inference"

#: NidaanError subclasses to gRPC status codes (most specific first).
_CODES: tuple[tuple[type[NidaanError], grpc.StatusCode], ...] = (
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InferenceError, grpc.StatusCode.UNAVAILABLE),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_code(exc: NidaanError) -> grpc.StatusCode:
    """The gRPC code an error maps to."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class ApiLimits:
    """What one request may hold."""

    max_instances: int = 1000
    max_pixels: int = 250_000_000  # per instance, Rows x Columns x Frames, before decoding
    #: A refused instance's bytes are kept in quarantine up to this size (its reason always)...
    max_quarantine_bytes: int = 64 << 20
    #: ...and only while the disk keeps this much free (``dicom.min_free_bytes``).
    min_free_bytes: int = 1 << 30
    #: Bytes the calls in flight may hold, and how long a call waits for room before
    #: RESOURCE_EXHAUSTED; None: the config's ``grpc.max_inflight_mb`` and
    #: ``grpc.admission_timeout_s``.
    max_inflight_bytes: int | None = None
    admission_timeout_s: float | None = None


class _Refused(Exception):
    """A request refused with a gRPC code (and, for a bad instance, its bytes to quarantine)."""

    def __init__(self, code: grpc.StatusCode, message: str, data: bytes | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


def read_instance(data: bytes, index: int, limits: ApiLimits) -> Dataset:
    """Parse one instance of a request and admit it with the checks the SCP makes
    (``pacs_bridge.admission``); _Refused names what is wrong and keeps the bytes."""
    try:
        return admit(read_bytes(data), len(data), limits.max_pixels).dataset
    except InputError as exc:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"instance {index}: {exc}", data) from exc


class CallSlots:
    """``grpc.max_concurrent_rpcs`` and ``grpc.workers``, applied by Nidaan.

    A call of the Inference service takes a slot when grpcio hands it over (in grpcio's polling
    thread, :meth:`_InferenceHandlers.service`) and leaves it when its handler returns: at most
    ``limit`` calls are in flight, running or waiting for one of the ``workers``, so memory stays
    bounded. A call past the limit is still given a handler, which answers RESOURCE_EXHAUSTED at
    once through the same path as every other call, so it is counted and audited.

    The slot is never lost: the handlers take the request as a stream (grpcio calls a
    request-streaming handler for every call it was handed, even one cancelled meanwhile, where
    a unary handler is skipped when its request never arrives), and the handler leaves its
    slot in a ``finally``.
    """

    def __init__(self, limit: int, workers: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._in_flight = 0
        self._workers = threading.BoundedSemaphore(workers)

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        with self._lock:
            return self._in_flight

    def enter(self) -> bool:
        """Take a slot if one is free."""
        with self._lock:
            if self._in_flight >= self.limit:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @contextmanager
    def worker(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Wait for one of the workers; _Refused(CANCELLED) if the caller goes away meanwhile."""
        while not self._workers.acquire(timeout=0.2):
            if not context.is_active():
                raise _Refused(
                    grpc.StatusCode.CANCELLED, "the call ended while it waited for a worker"
                )
        try:
            yield
        finally:
            self._workers.release()


#: What one instance of a call is assumed to cost before its size is known (AnalyzeStudy's
#: first message): a 1024 x 1024 radiograph's cost, so that many new calls at once cannot
#: overrun the budget by reading their first instance.
FIRST_INSTANCE_BYTES = 8 << 20
#: An Analyze request is counted at this many times its size: the message, its parsed copy,
#: one instance being parsed and decoded, and its tensors.
UNARY_COST_FACTOR = 4
#: AnalyzeStudy analyses what it has prepared once it holds this many instances' tensors.
CHUNK_INSTANCES = 32
#: Each stream's HTTP/2 flow-control window: what a sender may send ahead of the handler.
STREAM_WINDOW_BYTES = 256 << 10


def instance_cost(size: int, ds: Dataset) -> int:
    """Bytes one instance costs while it is parsed, decoded and preprocessed: its bytes three
    times (received, copied out of the message, parsed) and 8 bytes per pixel of the frame
    decoded (stored values, then the kernels' float intermediates), from its header."""
    try:
        pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        pixels *= int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        pixels = 0
    return 3 * size + 8 * pixels


class ByteBudget:
    """``grpc.max_inflight_mb``: the bytes calls in flight may hold, counted by the calls.

    A call takes what it will hold before it holds it (:meth:`acquire`, which waits for room
    while the caller is still there, at most ``timeout_s``) and gives back what it no longer
    holds (:meth:`release`). Where a call only learns the true cost after reading (an
    instance's header), it corrects its share (:meth:`adjust`) without waiting. A call never
    waits while it holds a share (AnalyzeStudy analyses what it has first), so calls cannot
    wait on each other for ever.

    When nothing is held any more, the process gives freed memory back (a garbage collection,
    then glibc's ``malloc_trim``: :class:`~nidaan.core.heap.HeapReleaser`), so the server's
    resident size returns towards its idle level after a burst (docs/configuration.md, "gRPC
    memory and overhead").
    """

    def __init__(
        self,
        limit: int,
        timeout_s: float = 30.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """``on_wait(outcome)`` hears of each call that had to wait: admitted, refused or
        cancelled (the metrics count them)."""
        self.limit = limit
        self.timeout_s = timeout_s
        self._on_wait = on_wait or (lambda outcome: None)
        self._used = 0
        self._peak = 0
        self._cond = threading.Condition()
        self._releaser = HeapReleaser()

    @property
    def in_flight(self) -> int:
        """Bytes held now."""
        with self._cond:
            return self._used

    @property
    def peak(self) -> int:
        """The most bytes held at once since start."""
        with self._cond:
            return self._peak

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes if there is room now."""
        with self._cond:
            if self._used + n > self.limit:
                return False
            self._take(n)
            return True

    def acquire(self, n: int, context: grpc.ServicerContext, what: str) -> None:
        """Take ``n`` bytes, waiting for room; _Refused(RESOURCE_EXHAUSTED) when ``n`` can never
        fit or no room came within ``timeout_s``, _Refused(CANCELLED) when the caller left."""
        mib = 1 << 20
        if n > self.limit:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{what} needs {-(-n // mib)} MiB in flight, more than grpc.max_inflight_mb "
                f"({self.limit // mib} MiB): send the study with AnalyzeStudy, one instance per "
                "message",
            )
        deadline = time.monotonic() + self.timeout_s
        waited = False
        with self._cond:
            while self._used + n > self.limit:
                waited = True
                left = deadline - time.monotonic()
                if left <= 0:
                    self._on_wait("refused")
                    raise _Refused(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the server held its limit of {self.limit // mib} MiB in flight "
                        f"(grpc.max_inflight_mb) for {self.timeout_s:g} s "
                        "(grpc.admission_timeout_s): try again later",
                    )
                self._cond.wait(min(left, 0.2))
                if not context.is_active():
                    self._on_wait("cancelled")
                    raise _Refused(
                        grpc.StatusCode.CANCELLED, "the call ended while it waited for memory"
                    )
            self._take(n)
        if waited:
            self._on_wait("admitted")

    def adjust(self, n: int) -> None:
        """Take ``n`` more bytes (or give back ``-n``) without waiting."""
        if n < 0:
            self.release(-n)
        elif n:
            with self._cond:
                self._take(n)

    def release(self, n: int) -> None:
        """Give back ``n`` bytes."""
        if n <= 0:
            return
        with self._cond:
            self._used -= n
            idle = self._used == 0
            self._cond.notify_all()
        if idle:
            self._releaser.poke()

    def _take(self, n: int) -> None:
        self._used += n
        self._peak = max(self._peak, self._used)


class BearerTokens:
    """``grpc.tokens_file``: the tokens a call may carry as ``authorization: Bearer <token>``.

    Each candidate is compared with every token by SHA-256 digest and
    :func:`hmac.compare_digest`, so the time taken says nothing about a token's length or how
    much of it matched. Tokens are never logged or put in an error message.
    """

    def __init__(self, tokens: list[str]) -> None:
        if not tokens:
            raise ConfigError("grpc.tokens_file holds no token")
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def check(self, metadata: Any) -> str:
        """'' when the call's metadata carries a valid token, else why not (for the caller)."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "this server needs a bearer token: send metadata 'authorization: Bearer <token>'"
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = value.partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for known in self._digests:  # every token compared: no early exit
            ok |= hmac.compare_digest(digest, known)
        if scheme.lower() != "bearer" or not ok:
            return "the bearer token is not one this server accepts"
        return ""


def _next_message(requests: Iterator[bytes]) -> bytes | None:
    """The call's next request message as bytes (the handlers take requests as a stream of
    bytes); None at the end of the stream."""
    try:
        return next(requests)
    except StopIteration:
        return None
    except grpc.RpcError:
        # The call ended first: the client cancelled it, its deadline passed, or gRPC's core
        # refused a request over grpc.max_message_mb (that caller was told RESOURCE_EXHAUSTED;
        # grpcio does not say which, so all three are counted as CANCELLED).
        raise _Refused(
            grpc.StatusCode.CANCELLED,
            "the call ended before its request was read (cancelled, past its deadline, or "
            "larger than grpc.max_message_mb)",
        ) from None


def _parse(data: bytes, kind: type[Any]) -> Any:
    """A request message from its bytes; _Refused(INVALID_ARGUMENT) if it is not one."""
    try:
        return kind.FromString(data)
    except DecodeError:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a {kind.DESCRIPTOR.full_name} message",
        ) from None


def _one_request(requests: Iterator[bytes], kind: type[Any]) -> Any:
    """The call's single request message, parsed."""
    data = _next_message(requests)
    if data is None:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the call carries no request")
    return _parse(data, kind)


def _strip_pixels(ds: Dataset) -> None:
    """Drop an instance's pixel data once its tensors are made: the analysis and the report
    need only its header, and a call must not hold a study's pixels."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            del ds[keyword]


def _code(c: CodedValue) -> pb.CodedConcept:
    return pb.CodedConcept(value=c.value, scheme=c.scheme, meaning=c.meaning)


def _finding(f: Finding) -> pb.Finding:
    out = pb.Finding(
        label=f.label,
        code=_code(f.code),
        probability=f.probability,
        threshold=f.threshold,
        present=f.present,
    )
    if f.region is not None:
        r = f.region
        out.region.CopyFrom(pb.Region(x_min=r.x_min, y_min=r.y_min, x_max=r.x_max, y_max=r.y_max))
    return out


class _StudyCall:
    """One call's study, prepared instance by instance (Analyze and AnalyzeStudy).

    Each instance is decoded and preprocessed as it comes, its pixel data dropped, and its
    tensors kept until :meth:`flush` analyses them (their bytes, ``held``, are the call's share
    of the byte budget until then). Findings and headers are all that stays to the end, where
    :meth:`finish` builds the response and, if asked, the SR.
    """

    def __init__(self, service: InferenceService, models: frozenset[str] | None) -> None:
        self.service = service
        self.models = models
        self.study_uid = ""
        self.headers: list[Dataset] = []
        self.analyses: list[ImageAnalysis] = []
        self._pending: dict[str, dict[str, Prepared]] = {}
        self._pending_headers: list[Dataset] = []
        #: Bytes of the budget the pending tensors hold (AnalyzeStudy's; Analyze counts them
        #: in its request's share).
        self.held = 0

    @property
    def pending_count(self) -> int:
        """Instances prepared and not analysed yet."""
        return len(self._pending_headers)

    def add(self, data: bytes, ds: Dataset, index: int) -> int:
        """Prepare instance ``index`` (``ds``, parsed from ``data``) for its models; the bytes
        its tensors hold. _Refused names a bad instance and keeps its bytes for quarantine."""
        study = str(ds.StudyInstanceUID)
        if not self.study_uid:
            self.study_uid = study
        elif study != self.study_uid:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"instance {index} is of another study than instance 0: the instances belong "
                "to 2 studies; send one study per request",
            )
        try:
            prepared = self.service.studies.pipeline.prepare(ds, self.models)
        except InputError as exc:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"instance {index}: {exc}", data
            ) from exc
        _strip_pixels(ds)
        self.headers.append(ds)
        if not prepared:
            return 0
        self._pending[str(ds.SOPInstanceUID)] = prepared
        self._pending_headers.append(ds)
        return sum(int(p.tensor.nbytes) for p in prepared.values())

    def flush(self) -> None:
        """Analyse the pending instances (their images meet other calls' in the batchers) and
        give their tensors' bytes back."""
        if not self._pending_headers:
            return
        models = self.models
        try:
            self.analyses.extend(
                self.service.studies.pipeline.analyse(
                    self._pending_headers, allowed=lambda ds: models, prepared=self._pending
                )
            )
        finally:
            self.drop()

    def drop(self) -> None:
        """Forget the pending tensors and give their bytes back (also when the call fails)."""
        self._pending = {}
        self._pending_headers = []
        self.service.budget.release(self.held)
        self.held = 0

    def finish(self, report: bool) -> pb.AnalyzeResponse:
        """Analyse what is pending; the call's response (with its SR, if asked)."""
        self.flush()
        analysed = {str(a.source.SOPInstanceUID) for a in self.analyses}
        response = pb.AnalyzeResponse(
            study_instance_uid=self.study_uid,
            results=[self.service._result(a) for a in self.analyses],
            not_analysed=[
                str(ds.SOPInstanceUID)
                for ds in self.headers
                if str(ds.SOPInstanceUID) not in analysed
            ],
        )
        if report and self.analyses:
            # The same SR Analyze always returned (Studies builds it, with its UIDs).
            response.report = self.service.studies.request_report(self.study_uid, self.analyses)
        return response


# --- reading a Nidaan SR back (GetStudy) -----------------------------------------------------


def _walk(ds: Dataset) -> Iterator[Dataset]:
    """Every content item below ``ds``, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _concept_name(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence", [])
    return str(names[0].CodeValue) if names else ""


def _measurement_groups(sr: Dataset) -> Iterator[Dataset]:
    """The SR's TID 1501/1410 Measurement Groups (125007, DCM)."""
    for item in _walk(sr):
        if item.get("ValueType") == "CONTAINER" and _concept_name(item) == "125007":
            yield item


def _coded(item: Dataset | None, keyword: str = "ConceptCodeSequence") -> pb.CodedConcept | None:
    if item is None or not item.get(keyword):
        return None
    c = item.get(keyword)[0]
    return pb.CodedConcept(
        value=str(c.CodeValue), scheme=str(c.CodingSchemeDesignator), meaning=str(c.CodeMeaning)
    )


def _text(item: Dataset | None) -> str:
    return "" if item is None else str(item.get("TextValue", ""))


class InferenceService:
    """The ``nidaan.v1.Inference`` handlers over the study use-cases."""

    def __init__(
        self,
        studies: Studies,
        spool: Spool,
        *,
        limits: ApiLimits | None = None,
        on_request: Callable[[str, grpc.StatusCode, str], None] | None = None,
    ) -> None:
        self.studies = studies
        self.models = studies.pipeline.models
        self.spool = spool
        self.limits = limits or ApiLimits()
        self._on_request = on_request
        self._by_name: dict[str, ModelSpec] = {m.name: m for m in self.models}
        g = studies.config.grpc
        metrics = studies.metrics
        self.budget = ByteBudget(
            self.limits.max_inflight_bytes or g.max_inflight_mb << 20,
            g.admission_timeout_s
            if self.limits.admission_timeout_s is None
            else self.limits.admission_timeout_s,
            on_wait=lambda outcome: metrics.grpc_admission_waits.labels(outcome).inc(),
        )
        metrics.watch_grpc_inflight(lambda: self.budget.in_flight, self.budget.limit)

    # --- handlers --------------------------------------------------------------------------------

    def serve(
        self,
        method: str,
        slots: CallSlots,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
    ) -> Any:
        """A call that holds one of ``slots``: wait for a worker, read the request, answer it
        (``Analyze``: one study's instances, see the proto; ``ListModels``: the repository)."""
        try:
            return self._handle(
                method, context, lambda: self._run(method, slots, requests, context)
            )
        finally:
            slots.leave()

    def refuse(
        self, method: str, limit: int, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Any:
        """A call past ``grpc.max_concurrent_rpcs``: RESOURCE_EXHAUSTED straight away, its
        request never read."""

        def busy() -> Any:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is serving its limit of {limit} calls at once "
                "(grpc.max_concurrent_rpcs): try again later",
            )

        return self._handle(method, context, busy)

    def unauthenticated(
        self, method: str, why: str, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Any:
        """A call without a valid bearer token (``grpc.tokens_file``): UNAUTHENTICATED, its
        request never read, counted and audited like every call."""

        def refused() -> Any:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, why)

        return self._handle(method, context, refused)

    # --- work ------------------------------------------------------------------------------------

    def _run(
        self,
        method: str,
        slots: CallSlots,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
    ) -> Any:
        if method == "AnalyzeStudy":
            # No worker for the whole call: a stream lasts as long as its sender takes. What it
            # holds is bounded by the byte budget instead, and it waits for nothing while it
            # holds a share of it.
            return self._analyze_study(requests, context)
        if method == "Analyze":
            return self._analyze(requests, context, slots)
        with slots.worker(context):
            if method == "GetStudy":
                return self._get_study(_one_request(requests, pb.GetStudyRequest))
            if method == "RecordFeedback":
                return self._record_feedback(_one_request(requests, pb.RecordFeedbackRequest))
            _one_request(requests, pb.ListModelsRequest)
            return self._list_models()

    def _handle(self, method: str, context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        started = time.monotonic()
        code, detail, study = grpc.StatusCode.OK, "", ""
        try:
            response = work()
            study = getattr(response, "study_instance_uid", "")
            if not context.is_active():
                # Answered after the caller had gone (cancelled, or past its deadline): counted
                # as what the caller saw, not as served.
                code = grpc.StatusCode.CANCELLED
            return response
        except _Refused as exc:
            code, detail = exc.code, str(exc)
            if exc.data is not None:
                self._quarantine(exc.data, detail, code)
        except NidaanError as exc:
            code, detail = status_code(exc), str(exc)
        except Exception as exc:  # keep serving; the caller learns it was our fault
            log.exception("gRPC %s failed", method)
            code, detail = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
        finally:
            if self._on_request is not None:
                self._on_request(method, code, study)
            log.info(
                "gRPC %s from %s: %s in %.0f ms%s",
                method,
                context.peer(),
                code.name,
                (time.monotonic() - started) * 1000,
                f" (study {ref(study)})" if study else "",
            )
        context.abort(code, detail)

    def _quarantine(self, data: bytes, reason: str, code: grpc.StatusCode) -> None:
        """Keep a refused instance's bytes, within this API's limits, and its reason."""
        try:
            self.spool.quarantine(
                [data],
                reason,
                status=f"gRPC {code.name}",
                size=len(data),
                min_free_bytes=self.limits.min_free_bytes,
                max_bytes=self.limits.max_quarantine_bytes,
            )
        except OSError as exc:  # the answer still names the problem; the disk is the operator's
            log.error("could not quarantine a refused instance: %s", exc.strerror)

    def _models(self, names: Sequence[str]) -> frozenset[str] | None:
        """The models a call names (None: every model that accepts an image); NOT_FOUND for a
        name the repository lacks."""
        unknown = sorted(set(names) - set(self._by_name))
        if unknown:
            raise _Refused(
                grpc.StatusCode.NOT_FOUND,
                f"no model named {', '.join(map(repr, unknown))} "
                f"(the repository has {', '.join(sorted(self._by_name))})",
            )
        return frozenset(names) or None

    def _too_many(self, n: int) -> _Refused:
        return _Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{n} instances exceed the limit of {self.limits.max_instances} per request",
        )

    def _analyze(
        self, requests: Iterator[bytes], context: grpc.ServicerContext, slots: CallSlots
    ) -> Any:
        """Analyze: the whole study in one message. Its cost (UNARY_COST_FACTOR times its size)
        is taken from the byte budget before it is parsed, and its instances are then
        prepared one by one like AnalyzeStudy's, holding one of the workers. The worker is
        let go before inference: waiting for a batch uses no CPU, and while a call waits for
        its batch another call's images can be prepared, to join that batch."""
        cost = 0
        try:
            with slots.worker(context):
                data = _next_message(requests)
                if data is None:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the call carries no request")
                self.budget.acquire(
                    UNARY_COST_FACTOR * len(data),
                    context,
                    f"an Analyze request of {len(data) >> 20} MiB",
                )
                cost = UNARY_COST_FACTOR * len(data)
                request = _parse(data, pb.AnalyzeRequest)
                del data  # the parsed message holds the instances; the call's bytes can go
                if not request.instances:
                    raise _Refused(
                        grpc.StatusCode.INVALID_ARGUMENT, "the request holds no instances"
                    )
                if len(request.instances) > self.limits.max_instances:
                    raise self._too_many(len(request.instances))
                study = _StudyCall(self, self._models(request.models))
                for i in range(len(request.instances)):
                    instance = request.instances[i]
                    study.add(instance, read_instance(instance, i, self.limits), i)
                report = request.include_report
                del request, instance
            return study.finish(report)
        finally:
            self.budget.release(cost)

    def _analyze_study(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        """AnalyzeStudy: one instance per message. Before it reads a message a call takes what
        the instance will cost from the byte budget (the previous instance's cost, or
        FIRST_INSTANCE_BYTES), corrects it from the instance's header, and keeps only the
        header and the tensors (counted until they are analysed, every CHUNK_INSTANCES)."""
        study: _StudyCall | None = None
        report = False
        estimate = min(FIRST_INSTANCE_BYTES, self.budget.limit)
        index = 0
        try:
            while True:
                reserved = estimate
                if not self.budget.try_acquire(reserved):
                    if study is not None:
                        study.flush()  # never wait while holding a share of the budget
                    self.budget.acquire(reserved, context, f"instance {index}")
                try:
                    data = _next_message(requests)
                    if data is None:
                        break
                    message = _parse(data, pb.AnalyzeStudyRequest)
                    del data
                    if study is None:
                        study = _StudyCall(self, self._models(message.models))
                        report = message.include_report
                    if index >= self.limits.max_instances:
                        raise self._too_many(index + 1)
                    instance = message.instance
                    del message
                    if not instance:
                        raise _Refused(
                            grpc.StatusCode.INVALID_ARGUMENT, f"message {index} holds no instance"
                        )
                    ds = read_instance(instance, index, self.limits)
                    cost = instance_cost(len(instance), ds)
                    self.budget.adjust(cost - reserved)
                    reserved = cost
                    kept = study.add(instance, ds, index)
                    del instance, ds
                    study.held += kept
                    reserved -= kept  # the tensors' share now belongs to the study
                finally:
                    self.budget.release(reserved)
                estimate = cost
                index += 1
                if study.pending_count >= CHUNK_INSTANCES:
                    study.flush()
            if study is None or index == 0:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the stream carries no instance")
            return study.finish(report)
        finally:
            if study is not None:
                study.drop()

    def _get_study(self, request: pb.GetStudyRequest) -> Any:
        """GetStudy: what the node knows of a study received over DICOM, and the findings of
        its newest report, read back from the SR in the spool."""
        uid = request.study_instance_uid.strip()
        if not is_valid_uid(uid):
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "study_instance_uid is not a valid UID (PS3.5 9.1: digits and dots, at most 64)",
            )
        record = self.studies.study_record(uid)
        if record is None:
            raise _Refused(
                grpc.StatusCode.NOT_FOUND,
                "no study with this Study Instance UID has been received over DICOM",
            )
        state, reason, count, path, report_uid = record
        response = pb.GetStudyResponse(
            study_instance_uid=uid, state=state, reason=reason, instances=count
        )
        if path is not None:
            with open(path, "rb") as fh:
                data = fh.read()
            response.results.extend(self._report_results(dcmread(io.BytesIO(data))))
            response.report_sop_instance_uid = report_uid
            if request.include_report:
                response.report = data
        return response

    def _record_feedback(self, request: pb.RecordFeedbackRequest) -> Any:
        """RecordFeedback: a radiologist's verdict on a finding of the study's newest report
        (``server.feedback``): NOT_FOUND when Nidaan has no such report or finding."""
        feedback = self.studies.feedback
        if feedback is None:
            raise _Refused(grpc.StatusCode.UNIMPLEMENTED, "feedback is not recorded by this node")
        verdicts = {pb.AGREE: "agree", pb.DISAGREE: "disagree"}
        if request.verdict not in verdicts:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "verdict must be AGREE or DISAGREE")
        uid = request.study_instance_uid.strip()
        try:
            report_uid, recorded = feedback.record(
                uid,
                verdicts[request.verdict],
                tracking_uid=request.tracking_uid.strip(),
                model=request.model.strip(),
                finding=request.finding.strip(),
                comment=request.comment,
                reader=request.reader_id,
            )
        except UnknownReport as exc:
            raise _Refused(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        return pb.RecordFeedbackResponse(
            study_instance_uid=uid,
            report_sop_instance_uid=report_uid,
            recorded=[
                pb.RecordedFeedback(
                    model=r.model,
                    finding=r.finding,
                    tracking_uid=r.tracking_uid,
                    verdict=pb.AGREE if r.verdict == "agree" else pb.DISAGREE,
                )
                for r in recorded
            ],
        )

    def _report_results(self, sr: Dataset) -> list[pb.ImageResult]:
        """The findings of a Nidaan SR (TID 1500, see ``pacs_bridge.reports``), per image and
        model. The label and threshold come from the repository's model of that name and
        version when it is still there; presence is what the report said."""
        results: dict[tuple[str, str, str], pb.ImageResult] = {}
        for group in _measurement_groups(sr):
            items = {_concept_name(item): item for item in _walk(group)}
            code = _coded(items.get("121071"))  # Finding
            name = _text(items.get("111001"))  # Algorithm Name
            version = _text(items.get("111003"))  # Algorithm Version
            sop = next(
                (
                    str(ref.ReferencedSOPInstanceUID)
                    for item in _walk(group)
                    for ref in item.get("ReferencedSOPSequence", [])
                ),
                "",
            )
            if code is None or not name:
                continue
            model = next(
                (
                    m
                    for m in self.models
                    if m.algorithm.name == name and m.algorithm.version == version
                ),
                None,
            )
            spec = None
            if model is not None:
                spec = next((f for f in model.findings if f.code.value == code.value), None)
            tracking = _text(items.get("112039"))
            label = spec.label if spec else tracking.rsplit(" ", 1)[0]
            probability = 0.0
            certainty = items.get("111012")
            if certainty is not None and certainty.get("MeasuredValueSequence"):
                probability = float(certainty.MeasuredValueSequence[0].NumericValue)
            threshold = spec.threshold if spec else 0.0
            stated = items.get("122411")  # Threshold Value: the one the report applied
            if stated is not None and stated.get("MeasuredValueSequence"):
                threshold = float(stated.MeasuredValueSequence[0].NumericValue)
            presence = items.get(code.value)  # the qualitative evaluation named by the finding
            present = _coded(presence, "ConceptCodeSequence")
            finding = pb.Finding(
                label=label,
                code=code,
                probability=probability,
                threshold=threshold,
                present=present is not None and present.value == "52101004",
            )
            scoord = items.get("111030")  # Image Region
            if scoord is not None and "GraphicData" in scoord:
                xs = [float(v) for v in scoord.GraphicData[0::2]]
                ys = [float(v) for v in scoord.GraphicData[1::2]]
                finding.region.CopyFrom(
                    pb.Region(x_min=min(xs), y_min=min(ys), x_max=max(xs), y_max=max(ys))
                )
            key = (sop, name, version)
            if key not in results:
                results[key] = pb.ImageResult(
                    sop_instance_uid=sop,
                    model="" if model is None else model.name,
                    model_version=version,
                    algorithm_name=name,
                    not_for_diagnosis=any("NOT FOR DIAGNOSIS" in _text(i) for i in _walk(group)),
                )
            results[key].findings.append(finding)
        return list(results.values())

    def _result(self, a: ImageAnalysis) -> pb.ImageResult:
        model = next((m for m in self.models if m.algorithm == a.algorithm), None)
        return pb.ImageResult(
            sop_instance_uid=str(a.source.SOPInstanceUID),
            model="" if model is None else model.name,
            model_version=a.algorithm.version,
            algorithm_name=a.algorithm.name,
            not_for_diagnosis=a.algorithm.not_for_diagnosis,
            findings=[_finding(f) for f in a.findings],
        )

    def _list_models(self) -> Any:
        return pb.ListModelsResponse(
            models=[
                pb.Model(
                    name=m.name,
                    version=m.version,
                    display_name=m.display_name,
                    not_for_diagnosis=m.algorithm.not_for_diagnosis,
                    modalities=list(m.accepts.modalities),
                    body_parts=list(m.accepts.body_parts),
                    views=list(m.accepts.views),
                    findings=[
                        pb.ModelFinding(
                            label=f.label,
                            code=_code(f.code),
                            threshold=f.threshold,
                            sidecar_threshold=f.sidecar_threshold,
                        )
                        for f in m.findings
                    ],
                    max_batch_size=m.max_batch_size,
                    model_card=m.card.read_text(),
                    sha256=m.algorithm.digest,
                    model_card_path=str(m.card),
                )
                for m in self.models
            ]
        )


def server_credentials(certificate: str, private_key: str, ca: str) -> grpc.ServerCredentials:
    """Mutual TLS: our certificate and key (PEM files), and the CA whose signature a client's
    certificate must carry."""
    with open(private_key, "rb") as k, open(certificate, "rb") as c, open(ca, "rb") as r:
        return grpc.ssl_server_credentials(
            [(k.read(), c.read())], root_certificates=r.read(), require_client_auth=True
        )


#: The service's methods and their response messages (the proto's ``rpc`` lines).
_METHODS: dict[str, Any] = {
    "Analyze": pb.AnalyzeResponse,
    "AnalyzeStudy": pb.AnalyzeResponse,
    "GetStudy": pb.GetStudyResponse,
    "ListModels": pb.ListModelsResponse,
    "RecordFeedback": pb.RecordFeedbackResponse,
}


class _InferenceHandlers(grpc.GenericRpcHandler):
    """The service's methods, wired from the proto's messages (no generated servicer needed):
    a handler that holds a slot, or, when none is free, one that refuses (see CallSlots); with
    ``tokens``, one that answers UNAUTHENTICATED to a call without a valid bearer token."""

    def __init__(
        self, service: InferenceService, slots: CallSlots, tokens: BearerTokens | None = None
    ) -> None:
        self._service = service
        self._slots = slots
        self._tokens = tokens
        self._names: dict[str, str] = {}
        self._served: dict[str, grpc.RpcMethodHandler] = {}
        self._refused: dict[str, grpc.RpcMethodHandler] = {}
        for name, response in _METHODS.items():
            # Requests arrive as a stream of raw bytes, parsed by the handler (_one_request): a
            # unary client's single message is such a stream on the wire.
            path = f"/{SERVICE}/{name}"
            self._names[path] = name
            self._served[path] = grpc.stream_unary_rpc_method_handler(
                functools.partial(service.serve, name, slots),
                response_serializer=response.SerializeToString,
            )
            self._refused[path] = grpc.stream_unary_rpc_method_handler(
                functools.partial(service.refuse, name, slots.limit),
                response_serializer=response.SerializeToString,
            )

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        if path not in self._served:
            return None  # another service's, or unknown (grpcio answers UNIMPLEMENTED)
        if self._tokens is not None:
            # Before a slot is taken: a caller without a token costs no call slot. Health and
            # reflection are other services, not checked here, so probes need no token.
            why = self._tokens.check(handler_call_details.invocation_metadata)
            if why:
                name = self._names[path]
                return grpc.stream_unary_rpc_method_handler(
                    functools.partial(self._service.unauthenticated, name, why),
                    response_serializer=_METHODS[name].SerializeToString,
                )
        return self._served[path] if self._slots.enter() else self._refused[path]


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The gRPC core settings of Nidaan's server (``benchmarks/load.py`` measures gRPC's own
    cost with the same)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # grpcio sets SO_REUSEPORT by default: a second server on the same port would start
        # and take a share of the calls. Refuse the port like the DICOM and HTTP ports do.
        ("grpc.so_reuseport", 0),
        # Memory: gRPC's core buffers what senders send ahead of the handlers, up to each
        # stream's flow-control window, which bandwidth probing grows to megabytes on a
        # fast link. With hundreds of calls at once that is outside the byte budget, so
        # the window stays fixed and small: a sender waits for the handler to read.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
    ]


class ApiServer:
    """A gRPC server with the Inference, health and reflection services.

    ``tokens`` (default: those of the config's ``grpc.tokens_file``, if set) makes every call
    of the Inference service carry a bearer token; health and reflection stay open.
    """

    def __init__(
        self,
        service: InferenceService,
        *,
        workers: int = 8,
        max_concurrent_rpcs: int = 256,
        max_message_bytes: int = 512 << 20,
        tokens: BearerTokens | None = None,
    ) -> None:
        # Nidaan applies max_concurrent_rpcs and workers itself (CallSlots): grpcio's own limit
        # would refuse calls before any handler runs, uncounted and unaudited. Every call in
        # flight has a thread (running, or waiting for a worker), and `workers` more threads
        # answer refusals and health checks at once instead of queueing them behind those.
        self.service = service
        self.slots = CallSlots(max_concurrent_rpcs, workers)
        self._executor = ThreadPoolExecutor(
            max_concurrent_rpcs + workers, thread_name_prefix="nidaan-grpc"
        )
        self.server = grpc.server(self._executor, options=server_options(max_message_bytes))
        if tokens is None and service.studies.config.grpc.tokens_file:
            tokens = BearerTokens(read_tokens(service.studies.config.grpc.tokens_file))
        self.server.add_generic_rpc_handlers((_InferenceHandlers(service, self.slots, tokens),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    def start(self, bind: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
        """Listen on ``bind:port`` (0 = any free port), over TLS with ``credentials``; returns
        the port."""
        address = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
        if port:
            # Tried first with a plain socket: gRPC's core would log a line of its own (to
            # stderr, whatever Python's logging says) before failing, and a person should read
            # one line naming the setting.
            try:
                socket.create_server((bind, port)).close()
            except OSError as exc:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ConfigError(f"grpc.port: cannot listen on {address}: {why}") from None
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio raises "Failed to bind"; older ones returned port 0
            self.port = 0
        if self.port == 0:
            # A NidaanError, so that `nidaan serve` says so in one line and exits.
            raise ConfigError(
                f"grpc.port: cannot listen on {address}: the port is in use (another server?) "
                "or the address is not this host's"
            )
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def stop(self, grace_s: float = 5.0) -> None:
        """Say NOT_SERVING, let calls in flight finish for ``grace_s``, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self._executor.shutdown(wait=False)
