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
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydicom.dataset import Dataset

from nidaan.client.proto import inference_pb2 as pb
from nidaan.core.errors import (
    ConfigError,
    InferenceError,
    InputError,
    NidaanError,
    QueueFullError,
)
from nidaan.core.findings import CodedValue, Finding, ImageAnalysis
from nidaan.pacs_bridge.admission import admit, read_bytes
from nidaan.pacs_bridge.spool import Spool
from nidaan.pacs_bridge.uids import ref

from .model_repository import ModelSpec
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


def _one_request(requests: Iterator[bytes], kind: type[Any]) -> Any:
    """The call's request message, parsed (the handlers take requests as a stream of bytes)."""
    try:
        data = next(requests)
    except StopIteration:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the call carries no request") from None
    except grpc.RpcError:
        # The call ended first: the client cancelled it, its deadline passed, or gRPC's core
        # refused a request over grpc.max_message_mb (that caller was told RESOURCE_EXHAUSTED;
        # grpcio does not say which, so all three are counted as CANCELLED).
        raise _Refused(
            grpc.StatusCode.CANCELLED,
            "the call ended before its request was read (cancelled, past its deadline, or "
            "larger than grpc.max_message_mb)",
        ) from None
    try:
        return kind.FromString(data)
    except DecodeError:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a {kind.DESCRIPTOR.full_name} message",
        ) from None


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

    # --- work ------------------------------------------------------------------------------------

    def _run(
        self,
        method: str,
        slots: CallSlots,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
    ) -> Any:
        with slots.worker(context):
            if method == "Analyze":
                return self._analyze(_one_request(requests, pb.AnalyzeRequest), context)
            _one_request(requests, pb.ListModelsRequest)
            return self._list_models()

    def _handle(self, method: str, context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        started = time.monotonic()
        code, detail, study = grpc.StatusCode.OK, "", ""
        try:
            response = work()
            study = getattr(response, "study_instance_uid", "")
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

    def _analyze(self, request: pb.AnalyzeRequest, context: grpc.ServicerContext) -> Any:
        if not request.instances:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the request holds no instances")
        if len(request.instances) > self.limits.max_instances:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(request.instances)} instances exceed the limit of "
                f"{self.limits.max_instances} per request",
            )
        unknown = sorted(set(request.models) - set(self._by_name))
        if unknown:
            raise _Refused(
                grpc.StatusCode.NOT_FOUND,
                f"no model named {', '.join(map(repr, unknown))} "
                f"(the repository has {', '.join(sorted(self._by_name))})",
            )
        models = frozenset(request.models) or None
        datasets = [read_instance(d, i, self.limits) for i, d in enumerate(request.instances)]
        try:
            result = self.studies.analyse_request(datasets, models, report=request.include_report)
        except InputError as exc:
            data = None if exc.index is None else request.instances[exc.index]
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc), data) from exc
        response = pb.AnalyzeResponse(
            study_instance_uid=result.study_uid,
            results=[self._result(a) for a in result.analyses],
            not_analysed=result.not_analysed,
        )
        if result.report is not None:
            response.report = result.report
        return response

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
                        )
                        for f in m.findings
                    ],
                    max_batch_size=m.max_batch_size,
                    model_card=m.card.read_text(),
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
_METHODS: dict[str, Any] = {"Analyze": pb.AnalyzeResponse, "ListModels": pb.ListModelsResponse}


class _InferenceHandlers(grpc.GenericRpcHandler):
    """The service's methods, wired from the proto's messages (no generated servicer needed):
    a handler that holds a slot, or, when none is free, one that refuses (see CallSlots)."""

    def __init__(self, service: InferenceService, slots: CallSlots) -> None:
        self._slots = slots
        self._served: dict[str, grpc.RpcMethodHandler] = {}
        self._refused: dict[str, grpc.RpcMethodHandler] = {}
        for name, response in _METHODS.items():
            # Requests arrive as a stream of raw bytes, parsed by the handler (_one_request): a
            # unary client's single message is such a stream on the wire.
            path = f"/{SERVICE}/{name}"
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
        return self._served[path] if self._slots.enter() else self._refused[path]


class ApiServer:
    """A gRPC server with the Inference, health and reflection services."""

    def __init__(
        self,
        service: InferenceService,
        *,
        workers: int = 8,
        max_concurrent_rpcs: int = 64,
        max_message_bytes: int = 512 << 20,
    ) -> None:
        # Nidaan applies max_concurrent_rpcs and workers itself (CallSlots): grpcio's own limit
        # would refuse calls before any handler runs, uncounted and unaudited. Every call in
        # flight has a thread (running, or waiting for a worker), and `workers` more threads
        # answer refusals and health checks at once instead of queueing them behind those.
        self.slots = CallSlots(max_concurrent_rpcs, workers)
        self._executor = ThreadPoolExecutor(
            max_concurrent_rpcs + workers, thread_name_prefix="nidaan-grpc"
        )
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # grpcio sets SO_REUSEPORT by default: a second server on the same port would start
            # and take a share of the calls. Refuse the port like the DICOM and HTTP ports do.
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(self._executor, options=options)
        self.server.add_generic_rpc_handlers((_InferenceHandlers(service, self.slots),))
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
