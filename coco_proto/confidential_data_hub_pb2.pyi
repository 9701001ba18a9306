from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class UnsealSecretInput(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: bytes
    def __init__(self, secret: _Optional[bytes] = ...) -> None: ...

class UnsealSecretOutput(_message.Message):
    __slots__ = ("plaintext",)
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    plaintext: bytes
    def __init__(self, plaintext: _Optional[bytes] = ...) -> None: ...

class GetResourceRequest(_message.Message):
    __slots__ = ("ResourcePath",)
    RESOURCEPATH_FIELD_NUMBER: _ClassVar[int]
    ResourcePath: str
    def __init__(self, ResourcePath: _Optional[str] = ...) -> None: ...

class GetResourceResponse(_message.Message):
    __slots__ = ("Resource",)
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    Resource: bytes
    def __init__(self, Resource: _Optional[bytes] = ...) -> None: ...

class SecureMountRequest(_message.Message):
    __slots__ = ("volume_type", "options", "flags", "mount_point")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VOLUME_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    volume_type: str
    options: _containers.ScalarMap[str, str]
    flags: _containers.RepeatedScalarFieldContainer[str]
    mount_point: str
    def __init__(self, volume_type: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., flags: _Optional[_Iterable[str]] = ..., mount_point: _Optional[str] = ...) -> None: ...

class SecureMountResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImagePullRequest(_message.Message):
    __slots__ = ("image_url", "bundle_path")
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    image_url: str
    bundle_path: str
    def __init__(self, image_url: _Optional[str] = ..., bundle_path: _Optional[str] = ...) -> None: ...

class ImagePullResponse(_message.Message):
    __slots__ = ("manifest_digest",)
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    manifest_digest: str
    def __init__(self, manifest_digest: _Optional[str] = ...) -> None: ...
