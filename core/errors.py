"""Nidaan's exception hierarchy, in one place.

Every error Nidaan raises on purpose derives from :class:`NidaanError`, so an integrator can catch
one class. Messages name the problem and never carry patient data (no names, IDs, birth dates):
they may name UIDs of the object at fault, tags and sizes, never attribute values of the patient.

    NidaanError
    ├── ConfigError            the config file or an env override is wrong
    ├── ModelRepositoryError   a model folder is incomplete or inconsistent
    ├── InputError             an input cannot be analysed (maps to a DICOM failure status)
    │   ├── DecodeError        the pixel data cannot be decoded
    │   └── UnsupportedError   decodable, but no model or transfer syntax supports it
    ├── InferenceError         a backend failed to run a model
    │   └── QueueFullError     the model's queue stayed full (backpressure: try again later)
    ├── ReportError            a study's result objects could not be built (study failed)
    └── DeliveryError          a report could not be delivered (it stays queued)
"""

from __future__ import annotations


class NidaanError(Exception):
    """Base class of every error Nidaan raises on purpose."""


class ConfigError(NidaanError):
    """The configuration (TOML file or ``NIDAAN_*`` variable) is invalid."""


class ModelRepositoryError(NidaanError):
    """A model in the repository is missing a file or is inconsistent."""


class InputError(NidaanError):
    """An input instance cannot be analysed.

    ``status`` is the DICOM C-STORE status the SCP answers with (PS3.4 Annex B.2.3):
    0xC000-0xCFFF "Cannot understand", 0xA900 "Data Set does not match SOP Class".
    """

    status: int = 0xC000
    #: Which instance of a gRPC request it is about (its position), when the request held several.
    index: int | None = None

    def __init__(self, *args: object, status: int | None = None) -> None:
        super().__init__(*args)
        if status is not None:
            self.status = status


class DecodeError(InputError):
    """The pixel data cannot be decoded (corrupt, truncated or an unsupported encoding)."""

    status = 0xC210


class UnsupportedError(InputError):
    """The instance is well formed but Nidaan cannot analyse it."""

    status = 0xC211


class InferenceError(NidaanError):
    """An inference backend failed to run a model."""


class QueueFullError(InferenceError):
    """A model's inference queue stayed full for the caller's whole wait: try again later.

    The embedded batcher bounds its queue instead of growing memory without limit; the gRPC API
    answers RESOURCE_EXHAUSTED and a DICOM study waits on disk and is retried.
    """


class ReportError(NidaanError):
    """A study's result objects could not be built: the process building them died twice or
    ran past ``reports.build_timeout_s``. The study is failed visibly, with this reason."""


class DeliveryError(NidaanError):
    """A report could not be delivered to a destination; it stays queued for retry."""
