"""A small client for Nidaan's gRPC API (``nidaan.v1.Inference``).

    from nidaan.client import Client

    with Client("127.0.0.1:50051") as nidaan:
        response = nidaan.analyze(["study/ct-001.dcm", "study/ct-002.dcm"], report=True)
        for result in response.results:
            print(result.model, [(f.label, f.present) for f in result.findings])

Failures raise the same exceptions the server uses (:mod:`nidaan.core.errors`): InputError for
INVALID_ARGUMENT, QueueFullError for RESOURCE_EXHAUSTED, InferenceError for UNAVAILABLE (the
server or its inference backend cannot be reached; a refused TLS handshake too) and
DEADLINE_EXCEEDED, NidaanError otherwise; the message is gRPC's or the server's.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    ) -> None:
        """Connect to ``target`` (host:port). With ``tls_ca`` (PEM) the server's certificate is
        verified over TLS; ``certificate`` and ``private_key`` (PEM) identify this client to a
        server that requires client certificates (``grpc.tls = true``)."""
        self.target = target
        self.timeout_s = timeout_s
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

    def list_models(self) -> Any:
        """The server's models (a ListModelsResponse)."""
        return self._call(self._list_models, pb.ListModelsRequest(), None)

    def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return method(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()
            kind = _ERRORS.get(code, NidaanError)
            raise kind(f"{code.name}: {exc.details()}") from exc

    def close(self) -> None:
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
