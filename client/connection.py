"""A small client for Nidaan's gRPC API (``nidaan.v1.Inference``).

    from nidaan.client import Client

    with Client("127.0.0.1:50051") as nidaan:
        response = nidaan.analyze(["study/ct-001.dcm", "study/ct-002.dcm"], report=True)
        for result in response.results:
            print(result.model, [(f.label, f.present) for f in result.findings])

        # A study of any size: instances sent one by one (AnalyzeStudy), read as they go.
        response = nidaan.analyze_study(sorted(Path("study").glob("*.dcm")))
        # A study the PACS sent over DICOM: its state, findings and report.
        study = nidaan.get_study("1.2.826.0.1.3680043.8.498.1", report=True)

Behind a gateway that terminates TLS, a server may want a bearer token instead of a client
certificate: ``Client(target, token=...)`` (or ``token_file=``) sends ``authorization: Bearer
<token>`` with every call.

Failures raise the same exceptions the server uses (:mod:`nidaan.core.errors`): InputError for
INVALID_ARGUMENT, QueueFullError for RESOURCE_EXHAUSTED, InferenceError for UNAVAILABLE (the
server or its inference backend cannot be reached; a refused TLS handshake too) and
DEADLINE_EXCEEDED, NidaanError otherwise; the message is gRPC's or the server's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from nidaan.core.errors import InferenceError, InputError, NidaanError, QueueFullError

from .proto import inference_pb2 as pb

SERVICE = "nidaan.v1.Inference"

_ERRORS: dict[grpc.StatusCode, type[NidaanError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InputError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFullError,
    grpc.StatusCode.UNAVAILABLE: InferenceError,
    grpc.StatusCode.DEADLINE_EXCEEDED: InferenceError,
}


class Client:
    """A connection to one Nidaan server; thread-safe (one gRPC channel)."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 120.0,
        max_message_bytes: int = 512 << 20,
        tls_ca: str | Path | None = None,
        certificate: str | Path | None = None,
        private_key: str | Path | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
    ) -> None:
        """Connect to ``target`` (host:port). With ``tls_ca`` (PEM) the server's certificate is
        verified over TLS; ``certificate`` and ``private_key`` (PEM) identify this client to a
        server that requires client certificates (``grpc.tls = true``). ``token`` (or the
        first token in ``token_file``, written like ``grpc.tokens_file``) is sent as a bearer
        token with every call, for a server that reads ``grpc.tokens_file``."""
        self.target = target
        self.timeout_s = timeout_s
        if token is None and token_file is not None:
            # The format of grpc.tokens_file: the first token in it, '#' lines are comments.
            lines = [t.strip() for t in Path(token_file).expanduser().read_text().splitlines()]
            token = next((t for t in lines if t and not t.startswith("#")), None)
        # Kept only in the call metadata, never in an error message or repr.
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token.strip()}"),) if token else ()
        )
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_ca is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(private_key).read_bytes() if private_key else None,
                certificate_chain=Path(certificate).read_bytes() if certificate else None,
            )
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self._analyze = self.channel.unary_unary(
            f"/{SERVICE}/Analyze",
            request_serializer=pb.AnalyzeRequest.SerializeToString,
            response_deserializer=pb.AnalyzeResponse.FromString,
        )
        self._list_models = self.channel.unary_unary(
            f"/{SERVICE}/ListModels",
            request_serializer=pb.ListModelsRequest.SerializeToString,
            response_deserializer=pb.ListModelsResponse.FromString,
        )
        self._analyze_study = self.channel.stream_unary(
            f"/{SERVICE}/AnalyzeStudy",
            request_serializer=pb.AnalyzeStudyRequest.SerializeToString,
            response_deserializer=pb.AnalyzeResponse.FromString,
        )
        self._get_study = self.channel.unary_unary(
            f"/{SERVICE}/GetStudy",
            request_serializer=pb.GetStudyRequest.SerializeToString,
            response_deserializer=pb.GetStudyResponse.FromString,
        )
        self._record_feedback = self.channel.unary_unary(
            f"/{SERVICE}/RecordFeedback",
            request_serializer=pb.RecordFeedbackRequest.SerializeToString,
            response_deserializer=pb.RecordFeedbackResponse.FromString,
        )

    def analyze(
        self,
        instances: Sequence[bytes | str | Path],
        *,
        models: Sequence[str] = (),
        report: bool = False,
        timeout_s: float | None = None,
    ) -> Any:
        """Analyse one study's instances (file paths or Part 10 bytes); an AnalyzeResponse."""
        data = [i if isinstance(i, bytes) else Path(i).read_bytes() for i in instances]
        request = pb.AnalyzeRequest(instances=data, models=list(models), include_report=report)
        return self._call(self._analyze, request, timeout_s)

    def analyze_study(
        self,
        instances: Iterable[bytes | str | Path],
        *,
        models: Sequence[str] = (),
        report: bool = False,
        timeout_s: float | None = None,
    ) -> Any:
        """Analyse one study of any size (AnalyzeStudy): its instances (file paths or Part 10
        bytes, any iterable, read one at a time) go one per message; an AnalyzeResponse."""

        def messages() -> Iterator[Any]:
            for n, item in enumerate(instances):
                data = item if isinstance(item, bytes) else Path(item).read_bytes()
                if n == 0:
                    yield pb.AnalyzeStudyRequest(
                        instance=data, models=list(models), include_report=report
                    )
                else:
                    yield pb.AnalyzeStudyRequest(instance=data)

        return self._call(self._analyze_study, messages(), timeout_s)

    def get_study(
        self, study_instance_uid: str, *, report: bool = False, timeout_s: float | None = None
    ) -> Any:
        """State, findings and (with ``report``) the SR of a study the server received over
        DICOM (a GetStudyResponse); NidaanError("NOT_FOUND: ...") for one it never received."""
        request = pb.GetStudyRequest(study_instance_uid=study_instance_uid, include_report=report)
        return self._call(self._get_study, request, timeout_s)

    def record_feedback(
        self,
        study_instance_uid: str,
        *,
        agree: bool,
        tracking_uid: str = "",
        model: str = "",
        finding: str = "",
        comment: str = "",
        reader_id: str = "",
        timeout_s: float | None = None,
    ) -> Any:
        """A radiologist's verdict (``agree`` or not) on a finding of the study's report: the
        finding's ``tracking_uid`` in the report, or ``model`` and ``finding`` (label); a
        RecordFeedbackResponse. The server keeps ``reader_id`` only as a keyed digest."""
        request = pb.RecordFeedbackRequest(
            study_instance_uid=study_instance_uid,
            tracking_uid=tracking_uid,
            model=model,
            finding=finding,
            verdict=pb.AGREE if agree else pb.DISAGREE,
            comment=comment,
            reader_id=reader_id,
        )
        return self._call(self._record_feedback, request, timeout_s)

    def list_models(self) -> Any:
        """The server's models (a ListModelsResponse)."""
        return self._call(self._list_models, pb.ListModelsRequest(), None)

    def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            kind = _ERRORS.get(code, NidaanError)
            raise kind(f"{code.name}: {exc.details()}") from exc

    def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
