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
kept in quarantine with its reason, as over DICOM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydicom.dataset import Dataset

from nidaan.client.proto import inference_pb2 as pb
from nidaan.core.errors import InferenceError, InputError, NidaanError, QueueFullError
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

    def Analyze(self, request: pb.AnalyzeRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Analyse one study's instances; see the proto for the contract."""
        return self._handle("Analyze", context, lambda: self._analyze(request, context))

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """The repository's models."""
        return self._handle("ListModels", context, self._list_models)

    # --- work ------------------------------------------------------------------------------------

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
                self.spool.quarantine([exc.data], detail, status=f"gRPC {code.name}")
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


def _handlers(service: InferenceService) -> grpc.GenericRpcHandler:
    """The service's methods, wired from the proto's messages (no generated servicer needed)."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Analyze": grpc.unary_unary_rpc_method_handler(
                service.Analyze,
                request_deserializer=pb.AnalyzeRequest.FromString,
                response_serializer=pb.AnalyzeResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                service.ListModels,
                request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
        },
    )


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
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="nidaan-grpc")
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        # Past max_concurrent_rpcs, gRPC answers RESOURCE_EXHAUSTED at once: bounded work.
        self.server = grpc.server(
            self._executor, options=options, maximum_concurrent_rpcs=max_concurrent_rpcs
        )
        self.server.add_generic_rpc_handlers((_handlers(service),))
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
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"gRPC cannot listen on {address}")
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def stop(self, grace_s: float = 5.0) -> None:
        """Say NOT_SERVING, let calls in flight finish for ``grace_s``, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self._executor.shutdown(wait=False)
