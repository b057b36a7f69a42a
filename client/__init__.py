"""Nidaan's public API for integrators: the gRPC client and the exceptions it raises.

    from nidaan.client import Client, InputError

    with Client("127.0.0.1:50051") as nidaan:
        response = nidaan.analyze(["study/ct-001.dcm", "study/ct-002.dcm"], report=True)

Installing the distribution without extras (``pip install nidaan``) gives just this: the client
and its two dependencies (grpcio, protobuf), none of the server's (``nidaan[server]``).

Every error derives from :class:`NidaanError` (the hierarchy is documented in
:mod:`nidaan.core.errors`, which the server raises too).
"""

from nidaan.core.errors import (
    ConfigError,
    DecodeError,
    DeliveryError,
    InferenceError,
    InputError,
    ModelRepositoryError,
    NidaanError,
    QueueFullError,
    UnsupportedError,
)

from .connection import SERVICE, Client

__all__ = [
    "SERVICE",
    "Client",
    "ConfigError",
    "DecodeError",
    "DeliveryError",
    "InferenceError",
    "InputError",
    "ModelRepositoryError",
    "NidaanError",
    "QueueFullError",
    "UnsupportedError",
]
