from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RuntimeMeasurementResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[RuntimeMeasurementResult]
    NOT_SUPPORTED: _ClassVar[RuntimeMeasurementResult]
    NOT_ENABLED: _ClassVar[RuntimeMeasurementResult]
OK: RuntimeMeasurementResult
NOT_SUPPORTED: RuntimeMeasurementResult
NOT_ENABLED: RuntimeMeasurementResult

class GetEvidenceRequest(_message.Message):
    __slots__ = ("RuntimeData",)
    RUNTIMEDATA_FIELD_NUMBER: _ClassVar[int]
    RuntimeData: bytes
    def __init__(self, RuntimeData: _Optional[bytes] = ...) -> None: ...

class GetAdditionalEvidenceRequest(_message.Message):
    __slots__ = ("RuntimeData",)
    RUNTIMEDATA_FIELD_NUMBER: _ClassVar[int]
    RuntimeData: bytes
    def __init__(self, RuntimeData: _Optional[bytes] = ...) -> None: ...

class GetEvidenceResponse(_message.Message):
    __slots__ = ("Evidence",)
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    Evidence: bytes
    def __init__(self, Evidence: _Optional[bytes] = ...) -> None: ...

class GetTokenRequest(_message.Message):
    __slots__ = ("TokenType",)
    TOKENTYPE_FIELD_NUMBER: _ClassVar[int]
    TokenType: str
    def __init__(self, TokenType: _Optional[str] = ...) -> None: ...

class GetTokenResponse(_message.Message):
    __slots__ = ("Token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    Token: bytes
    def __init__(self, Token: _Optional[bytes] = ...) -> None: ...

class ExtendRuntimeMeasurementRequest(_message.Message):
    __slots__ = ("Domain", "Operation", "Content", "RegisterIndex")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REGISTERINDEX_FIELD_NUMBER: _ClassVar[int]
    Domain: str
    Operation: str
    Content: str
    RegisterIndex: int
    def __init__(self, Domain: _Optional[str] = ..., Operation: _Optional[str] = ..., Content: _Optional[str] = ..., RegisterIndex: _Optional[int] = ...) -> None: ...

class ExtendRuntimeMeasurementResponse(_message.Message):
    __slots__ = ("Result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    Result: RuntimeMeasurementResult
    def __init__(self, Result: _Optional[_Union[RuntimeMeasurementResult, str]] = ...) -> None: ...

class BindInitDataRequest(_message.Message):
    __slots__ = ("Digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    Digest: bytes
    def __init__(self, Digest: _Optional[bytes] = ...) -> None: ...

class BindInitDataResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTeeTypeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTeeTypeResponse(_message.Message):
    __slots__ = ("tee",)
    TEE_FIELD_NUMBER: _ClassVar[int]
    tee: str
    def __init__(self, tee: _Optional[str] = ...) -> None: ...

class GetAdditionalTeesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetAdditionalTeesResponse(_message.Message):
    __slots__ = ("additional_tees",)
    ADDITIONAL_TEES_FIELD_NUMBER: _ClassVar[int]
    additional_tees: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, additional_tees: _Optional[_Iterable[str]] = ...) -> None: ...
