from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    AGREE: _ClassVar[Verdict]
    DISAGREE: _ClassVar[Verdict]
VERDICT_UNSPECIFIED: Verdict
AGREE: Verdict
DISAGREE: Verdict

class AnalyzeRequest(_message.Message):
    __slots__ = ("instances", "models", "include_report")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REPORT_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedScalarFieldContainer[bytes]
    models: _containers.RepeatedScalarFieldContainer[str]
    include_report: bool
    def __init__(self, instances: _Optional[_Iterable[bytes]] = ..., models: _Optional[_Iterable[str]] = ..., include_report: bool = ...) -> None: ...

class AnalyzeStudyRequest(_message.Message):
    __slots__ = ("instance", "models", "include_report")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REPORT_FIELD_NUMBER: _ClassVar[int]
    instance: bytes
    models: _containers.RepeatedScalarFieldContainer[str]
    include_report: bool
    def __init__(self, instance: _Optional[bytes] = ..., models: _Optional[_Iterable[str]] = ..., include_report: bool = ...) -> None: ...

class GetStudyRequest(_message.Message):
    __slots__ = ("study_instance_uid", "include_report")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REPORT_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    include_report: bool
    def __init__(self, study_instance_uid: _Optional[str] = ..., include_report: bool = ...) -> None: ...

class GetStudyResponse(_message.Message):
    __slots__ = ("study_instance_uid", "state", "reason", "instances", "results", "report_sop_instance_uid", "report")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REPORT_SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    state: str
    reason: str
    instances: int
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    report_sop_instance_uid: str
    report: bytes
    def __init__(self, study_instance_uid: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., instances: _Optional[int] = ..., results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ..., report_sop_instance_uid: _Optional[str] = ..., report: _Optional[bytes] = ...) -> None: ...

class CodedConcept(_message.Message):
    __slots__ = ("value", "scheme", "meaning")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    MEANING_FIELD_NUMBER: _ClassVar[int]
    value: str
    scheme: str
    meaning: str
    def __init__(self, value: _Optional[str] = ..., scheme: _Optional[str] = ..., meaning: _Optional[str] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("x_min", "y_min", "x_max", "y_max")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    def __init__(self, x_min: _Optional[float] = ..., y_min: _Optional[float] = ..., x_max: _Optional[float] = ..., y_max: _Optional[float] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("label", "code", "probability", "threshold", "present", "region")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    label: str
    code: CodedConcept
    probability: float
    threshold: float
    present: bool
    region: Region
    def __init__(self, label: _Optional[str] = ..., code: _Optional[_Union[CodedConcept, _Mapping]] = ..., probability: _Optional[float] = ..., threshold: _Optional[float] = ..., present: bool = ..., region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("sop_instance_uid", "model", "model_version", "algorithm_name", "not_for_diagnosis", "findings")
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_NAME_FIELD_NUMBER: _ClassVar[int]
    NOT_FOR_DIAGNOSIS_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    sop_instance_uid: str
    model: str
    model_version: str
    algorithm_name: str
    not_for_diagnosis: bool
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    def __init__(self, sop_instance_uid: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., algorithm_name: _Optional[str] = ..., not_for_diagnosis: bool = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("study_instance_uid", "results", "not_analysed", "report")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NOT_ANALYSED_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    not_analysed: _containers.RepeatedScalarFieldContainer[str]
    report: bytes
    def __init__(self, study_instance_uid: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ..., not_analysed: _Optional[_Iterable[str]] = ..., report: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelFinding(_message.Message):
    __slots__ = ("label", "code", "threshold", "sidecar_threshold")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SIDECAR_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    label: str
    code: CodedConcept
    threshold: float
    sidecar_threshold: float
    def __init__(self, label: _Optional[str] = ..., code: _Optional[_Union[CodedConcept, _Mapping]] = ..., threshold: _Optional[float] = ..., sidecar_threshold: _Optional[float] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "version", "display_name", "not_for_diagnosis", "modalities", "body_parts", "views", "findings", "max_batch_size", "model_card", "sha256", "model_card_path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    NOT_FOR_DIAGNOSIS_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    BODY_PARTS_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    display_name: str
    not_for_diagnosis: bool
    modalities: _containers.RepeatedScalarFieldContainer[str]
    body_parts: _containers.RepeatedScalarFieldContainer[str]
    views: _containers.RepeatedScalarFieldContainer[str]
    findings: _containers.RepeatedCompositeFieldContainer[ModelFinding]
    max_batch_size: int
    model_card: str
    sha256: str
    model_card_path: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., display_name: _Optional[str] = ..., not_for_diagnosis: bool = ..., modalities: _Optional[_Iterable[str]] = ..., body_parts: _Optional[_Iterable[str]] = ..., views: _Optional[_Iterable[str]] = ..., findings: _Optional[_Iterable[_Union[ModelFinding, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., model_card: _Optional[str] = ..., sha256: _Optional[str] = ..., model_card_path: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class RecordFeedbackRequest(_message.Message):
    __slots__ = ("study_instance_uid", "tracking_uid", "model", "finding", "verdict", "comment", "reader_id")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    TRACKING_UID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINDING_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    READER_ID_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    tracking_uid: str
    model: str
    finding: str
    verdict: Verdict
    comment: str
    reader_id: str
    def __init__(self, study_instance_uid: _Optional[str] = ..., tracking_uid: _Optional[str] = ..., model: _Optional[str] = ..., finding: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., comment: _Optional[str] = ..., reader_id: _Optional[str] = ...) -> None: ...

class RecordedFeedback(_message.Message):
    __slots__ = ("model", "finding", "tracking_uid", "verdict")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINDING_FIELD_NUMBER: _ClassVar[int]
    TRACKING_UID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    model: str
    finding: str
    tracking_uid: str
    verdict: Verdict
    def __init__(self, model: _Optional[str] = ..., finding: _Optional[str] = ..., tracking_uid: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ...) -> None: ...

class RecordFeedbackResponse(_message.Message):
    __slots__ = ("study_instance_uid", "report_sop_instance_uid", "recorded")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    REPORT_SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    report_sop_instance_uid: str
    recorded: _containers.RepeatedCompositeFieldContainer[RecordedFeedback]
    def __init__(self, study_instance_uid: _Optional[str] = ..., report_sop_instance_uid: _Optional[str] = ..., recorded: _Optional[_Iterable[_Union[RecordedFeedback, _Mapping]]] = ...) -> None: ...
