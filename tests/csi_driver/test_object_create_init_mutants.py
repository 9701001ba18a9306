"""CreateVolume's prefix init (``ObjectDeleter.initialise``, ``_can_initialise``,
``_check_conf_opens``), in process and fast, for mutation testing (tools/mutation.py).

The seams are the ones the real code crosses: ``fuse-crypt init`` is a process (faked at
``subprocess.run``, where the real one would receive its argv, its stdin and its timeout,
and written into the in-memory bucket as the real init would: the root diriv, then the conf,
create-only); the probe's HEAD and the conf check's GET go to the same in-memory bucket
(tests/fuse_crypt/fake_transport.py).  The credentials and the volume key are unsealed for
real (offline-fs resolver).  So each test asserts what reaches the bucket or the tool, which
error with which text, and that nothing is overwritten.

The same init over moto and real processes: tests/csi_driver/test_object_create_init_e2e.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.deadline import Deadline
from csi_driver.keys import derive_volume_password, root_key_from_resource
from csi_driver.resolver import build
from csi_driver.volume_key import new_volume_key_jwk
from csi_driver.volumes.objectdelete import ObjectDeleter
from fuse_crypt.backend.transport import (
    AccessDenied,
    BadResponse,
    ObjectNotFound,
    TransientError,
)
from fuse_crypt.configfile import MAX_CONF_BYTES, ConfFile
from tests.csi_driver.test_object_delete import AK, SK, Env, env  # noqa: F401 (fixture)
from tests.csi_driver.test_objectdelete_mutants import Recorder, _deleter, _msg

KEYS = ("kbs:///default/coco-csi/",)
KEY_RESOURCE = "kbs:///default/coco-csi/volume-root"  # Env.params' keyResource
PASSPHRASE = b"init-mutants passphrase Qe7"
VID = "coco-1"
PREFIX = f"pvcs/team-a/{VID}/"
WHERE = f"oss://tenant-bucket/pvcs/team-a/{VID}"
CONF, DIRIV = PREFIX + "gocryptfs.conf", PREFIX + "gocryptfs.diriv"
CA = "/etc/ca.pem"  # test_objectdelete_mutants._deleter's policy
LOGGER = "csi_driver.volumes.objectdelete"


@dataclasses.dataclass
class Init:
    env: Env
    root_jwk: bytes
    binary: str

    def password(self, vid: str = VID) -> bytes:
        """What the node derives for ``vid`` from the class's keyResource."""
        return derive_volume_password(root_key_from_resource(self.root_jwk, KEY_RESOURCE), vid)

    def context(self, **extra: str) -> dict[str, str]:
        """The volume context CreateVolume passes: the class parameters, path the prefix."""
        return self.env.params(path=PREFIX.rstrip("/"), **extra)

    def deleter(self, factory: Any = None, **kw: Any) -> ObjectDeleter:
        kw.setdefault("allowed_key_resources", KEYS)
        kw.setdefault("fuse_crypt", self.binary)
        return _deleter(self.env, factory or self.env.factory, **kw)

    def plant_conf(self, password: bytes | None = None, pad: int = 0) -> bytes:
        conf, _ = ConfFile.create(password or self.password(), scrypt_logn=10)
        body = conf.dumps() + b" " * pad
        self.env.bucket.put_raw(CONF, body)
        return body


@pytest.fixture
def init(env: Env, tmp_path: Path) -> Iterator[Init]:  # noqa: F811
    """``env`` with a root key and a passphrase behind its resolver, and a fuse-crypt path."""
    root_jwk = new_volume_key_jwk().encode()
    res = json.loads((tmp_path / "resources.json").read_text())
    res["default/coco-csi/volume-root"] = base64.b64encode(root_jwk).decode()
    res["default/objcreds/pass"] = base64.b64encode(PASSPHRASE).decode()
    path = tmp_path / "init-resources.json"
    path.write_text(json.dumps(res))
    binary = tmp_path / "fuse-crypt"
    binary.write_text("#!/bin/sh\nexit 99\n")  # never run: subprocess.run is faked
    binary.chmod(0o755)
    e = dataclasses.replace(env, resolver=build(f"offline-fs:{path}"))
    yield Init(e, root_jwk, str(binary))


class FakeInit:
    """``fuse-crypt init`` at ``subprocess.run``: records what it was given and writes what
    the real tool writes (fuse_crypt/cli/commands.py ``_init_object``)."""

    def __init__(self, bucket: Any, returncode: int = 0, stderr: bytes = b"") -> None:
        self.bucket = bucket
        self.returncode = returncode
        self.stderr = stderr
        self.calls: list[tuple[list[str], bytes, float]] = []

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        assert kw["capture_output"] is True
        self.calls.append((list(argv), kw["input"], kw["timeout"]))
        if self.returncode:
            return subprocess.CompletedProcess(argv, self.returncode, b"", self.stderr)
        _, _, rest = kw["input"].partition(b"\n\n")
        password = rest.removesuffix(b"\n")
        logn = int(argv[argv.index("--scryptn") + 1])
        conf, _ = ConfFile.create(password, scrypt_logn=logn)
        prefix = argv[-1].split("/", 3)[3] + "/"
        self.bucket.put(prefix + "gocryptfs.diriv", b"\x07" * 16, metadata={}, if_none_match=True)
        self.bucket.put(prefix + "gocryptfs.conf", conf.dumps(), metadata={}, if_none_match=True)
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    @property
    def stdin_lines(self) -> list[bytes]:
        return self.calls[0][1].split(b"\n")


@pytest.fixture
def tool(init: Init, monkeypatch: pytest.MonkeyPatch) -> FakeInit:
    fake = FakeInit(init.env.bucket)
    monkeypatch.setattr(subprocess, "run", fake)
    return fake


@pytest.fixture
def probes(init: Init, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, float]]:
    """The probe's transport (one HEAD of the conf) is the in-memory bucket."""
    from fuse_crypt.cli.objectloc import ObjectLocation

    made: list[tuple[Any, float]] = []

    def transport(self: ObjectLocation, retry_budget: float = 60.0) -> Any:
        made.append((self, retry_budget))
        return init.env.bucket

    monkeypatch.setattr(ObjectLocation, "transport", transport)
    return made


def _records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, Any]]:
    return [
        (r.getMessage(), r.levelno, getattr(r, "fields", None))
        for r in caplog.records
        if r.name == LOGGER
    ]


class Served:
    """The conf check's transport: answers its one GET from ``body`` (or raises ``error``)
    with the range semantics of a store, recording what was asked."""

    def __init__(self, body: bytes = b"", error: Exception | None = None) -> None:
        self.body = body
        self.error = error
        self.gets: list[tuple[str, int, int]] = []

    def get(self, key: str, start: int, length: int) -> bytes:
        self.gets.append((key, start, length))
        if self.error is not None:
            raise self.error
        return self.body[start : start + length]


# -- _can_initialise ---------------------------------------------------------------------


def test_reasons_to_leave_the_init_to_the_node_by_their_text(init: Init) -> None:
    on = init.deleter()
    p = init.context()
    creds = {k: p.pop(k) for k in ("akId", "akSecret")}
    assert on._can_initialise({**p, **creds}, {}) is None
    off = ObjectDeleter(None, on.policy, allowed_key_resources=KEYS)
    assert off._can_initialise({**p, **creds}, {}) == (
        "this controller has no resolver or --allowed-object-endpoint"
    )
    assert on._can_initialise(p, {}) == (
        "the bucket credentials come only with the node-publish secret"
    )
    no_key = {k: v for k, v in {**p, **creds}.items() if k != "keyResource"}
    assert on._can_initialise(no_key, {}) == (
        "the volume key comes only with the node-publish secret"
    )
    without_keys = init.deleter(allowed_key_resources=())
    assert without_keys._can_initialise({**p, **creds}, {}) == (
        "this controller has no --allowed-key-resource"
    )


def test_exactly_the_two_credentials_suffice_and_a_key_resource_may_be_a_secret(
    init: Init,
) -> None:
    on = init.deleter()
    # nothing but the two credentials among the names the parser maps (keyResource and
    # bucket are not among them): the credential set is complete, not more than complete
    only = {"akId": "sealed", "akSecret": "sealed", "keyResource": KEY_RESOURCE}
    assert on._can_initialise(only, {}) is None
    assert on._can_initialise({"akId": "sealed", "keyResource": KEY_RESOURCE}, {}) == (
        "the bucket credentials come only with the node-publish secret"
    )
    # the keyResource in the provisioner secret, not in the class
    creds = {"akId": "sealed", "akSecret": "sealed"}
    assert on._can_initialise(creds, {"keyResource": KEY_RESOURCE}) is None
    assert on._can_initialise(creds, {"keyresource": KEY_RESOURCE}) == (
        "the volume key comes only with the node-publish secret"
    )


# -- initialise: left to the node ----------------------------------------------------------


def test_leaving_the_init_is_logged_with_the_reason_and_touches_nothing(
    init: Init, tool: FakeInit, probes: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    d = init.deleter(allowed_key_resources=())
    assert d.initialise(VID, init.context(), {}, Deadline(5)) is False
    assert _records(caplog) == [
        (
            "object-store volume left for the node to initialise at first publish",
            logging.INFO,
            {"volume_id": VID, "reason": "this controller has no --allowed-key-resource"},
        )
    ]
    assert tool.calls == [] and probes == [] and init.env.made == []
    assert init.env.bucket.objects == {}


# -- initialise: a new prefix ----------------------------------------------------------------


def test_a_new_prefix_gets_a_conf_the_nodes_key_opens(
    init: Init, tool: FakeInit, probes: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert init.deleter().initialise(VID, init.context(), {}, Deadline(5)) is True
    # what the tool was given: our binary, the node's scrypt cost for a derived key, the
    # operator's CA bundle, the volume's own location; credentials and password on stdin
    ((argv, _, timeout),) = tool.calls
    assert argv[:4] == [init.binary, "init", "--scryptn", "10"]
    assert argv[argv.index("--ca-bundle") + 1] == CA
    assert argv[-1] == WHERE
    assert 0 < timeout <= 5  # the call's deadline bounds the tool, not the 60 s default
    assert tool.calls[0][1] == (
        f"OSS_ACCESS_KEY_ID={AK}\nOSS_ACCESS_KEY_SECRET={SK}\n\n".encode() + init.password() + b"\n"
    )
    # what reached the bucket: the root diriv and a conf the node's key opens
    assert set(init.env.bucket.objects) == {CONF, DIRIV}
    ConfFile.loads(init.env.bucket.body(CONF)).unlock(init.password())
    # the probe: one HEAD of the conf, through a transport bounded by the call's deadline
    assert [op for op, *_ in init.env.bucket.log] == ["head", "put", "put"]
    assert init.env.bucket.log[0][1] == CONF
    ((loc, budget),) = probes
    assert loc.ca_bundle == CA and (loc.access_key, loc.secret_key) == (AK, SK)
    assert 1.0 <= budget <= 2.5
    assert init.env.made == []  # a conf just written is not read back
    assert _records(caplog) == [
        (
            "initialised object-store volume prefix",
            logging.INFO,
            {"volume_id": VID, "location": WHERE, "key_source": "kbs-derived"},
        )
    ]


def test_a_passphrase_class_inits_with_the_passphrase(
    init: Init, tool: FakeInit, probes: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    e = init.env
    params = init.context(keyResource="", encPasswd=e.seal("pass"))
    d = init.deleter(allowed_key_resources=())
    assert d.initialise(VID, params, {}, Deadline(5)) is True
    ((argv, _, _),) = tool.calls
    assert argv[:4] == [init.binary, "init", "--scryptn", "16"]
    assert tool.stdin_lines[-2] == PASSPHRASE
    assert _records(caplog)[0][2]["key_source"] == "sealed-passphrase"


def test_the_key_and_credentials_come_from_the_provisioner_secret_too(
    init: Init, tool: FakeInit, probes: list[Any]
) -> None:
    e = init.env
    p = init.context()
    secrets = {k: p.pop(k) for k in ("akId", "akSecret", "keyResource")}
    assert init.deleter().initialise(VID, p, secrets, Deadline(5)) is True
    ConfFile.loads(e.bucket.body(CONF)).unlock(init.password())


def test_without_a_fuse_crypt_path_the_tool_is_found_as_on_the_node(
    init: Init, tool: FakeInit, probes: list[Any]
) -> None:
    from csi_driver.mounter import _tool

    d = init.deleter(fuse_crypt=None)
    assert d.initialise(VID, init.context(), {}, Deadline(5)) is True
    assert tool.calls[0][0][0] == _tool("fuse-crypt") != init.binary


def test_the_kid_allow_list_applies_before_any_bucket_io(
    init: Init, tool: FakeInit, probes: list[Any]
) -> None:
    d = dataclasses.replace(init.deleter(), allowed_kids=("kbs:///default/other-keys/",))
    with pytest.raises(errors.PermissionDenied) as info:
        d.initialise(VID, init.context(), {}, Deadline(5))
    assert _msg(info).startswith("cannot unseal volume_context[akId]: ")
    assert tool.calls == [] and probes == [] and init.env.bucket.objects == {}


def test_a_failed_tool_is_the_nodes_error_and_nothing_is_written(
    init: Init, probes: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = FakeInit(init.env.bucket, returncode=40)
    monkeypatch.setattr(subprocess, "run", tool)
    with pytest.raises(errors.FailedPrecondition) as info:
        init.deleter().initialise(VID, init.context(), {}, Deadline(5))
    assert _msg(info) == (
        f"{WHERE} holds objects but no gocryptfs.conf: it has held data and is not "
        "re-initialised (restore its gocryptfs.conf from a backup)"
    )
    assert init.env.bucket.objects == {}


# -- initialise: a prefix that already holds a conf ---------------------------------------------


def test_an_existing_conf_that_opens_is_success_and_nothing_is_written(
    init: Init, tool: FakeInit, probes: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    e = init.env
    body = init.plant_conf()
    served = Served(body)
    rec = Recorder(served)
    params = init.context(securityToken=e.seal("ak"))
    assert init.deleter(rec, budget=10.0).initialise(VID, params, {}, Deadline(60)) is True
    assert tool.calls == [] and e.bucket.body(CONF) == body and set(e.bucket.objects) == {CONF}
    ((spec, ak, sk, token, ca, budget),) = rec.calls
    assert (spec.bucket, spec.prefix) == ("tenant-bucket", PREFIX)
    assert (ak, sk, token, ca, budget) == (AK, SK, AK, CA, 5.0)
    assert served.gets == [(CONF, 0, MAX_CONF_BYTES + 1)]  # bounded by the one conf cap
    assert _records(caplog) == [
        (
            "object-store volume prefix already initialised with this volume's key",
            logging.INFO,
            {"volume_id": VID, "location": WHERE, "key_source": "kbs-derived"},
        )
    ]


@pytest.mark.parametrize(
    ("own", "remaining", "expected"),
    [
        (10.0, 60.0, 5.0),  # half the deleter's budget when the call has more time
        (120.0, 8.0, 4.0),  # half the call's remaining time when it has less
        (1.5, 60.0, 1.0),  # and never under 1 s
        (0.2, 60.0, 1.0),
    ],
)
def test_the_conf_checks_budget(
    init: Init,
    tool: FakeInit,
    probes: list[Any],
    own: float,
    remaining: float,
    expected: float,
) -> None:
    rec = Recorder(Served(init.plant_conf()))
    d = init.deleter(rec, budget=own)
    assert d.initialise(VID, init.context(), {}, Deadline(remaining)) is True
    assert rec.calls[0][-1] == pytest.approx(expected, abs=0.05)
    assert rec.calls[0][3] is None  # no session token in this class


def test_a_conf_of_exactly_the_cap_is_read_and_one_byte_more_is_refused(
    init: Init, tool: FakeInit, probes: list[Any]
) -> None:
    size = len(init.plant_conf())
    body = init.plant_conf(pad=MAX_CONF_BYTES - size)
    assert len(body) == MAX_CONF_BYTES
    assert init.deleter(Recorder(Served(body))).initialise(VID, init.context(), {}, Deadline(60))
    big = Served(body + b" ")
    with pytest.raises(errors.FailedPrecondition) as info:
        init.deleter(Recorder(big)).initialise(VID, init.context(), {}, Deadline(60))
    assert _msg(info) == f"gocryptfs.conf at {WHERE} is implausibly large"
    assert tool.calls == [] and init.env.bucket.counts["put"] == 0


def test_a_conf_the_key_does_not_open_is_refused_and_kept(
    init: Init, tool: FakeInit, probes: list[Any]
) -> None:
    e = init.env
    foreign = init.plant_conf(b"someone else's password")
    with pytest.raises(errors.FailedPrecondition) as info:
        init.deleter().initialise(VID, init.context(), {}, Deadline(60))
    assert _msg(info) == (
        f"{WHERE} already holds a gocryptfs.conf that this volume's key does not open: "
        "it is not overwritten (remove the prefix, or restore the right key)"
    )
    assert info.value.__suppress_context__
    # another volume id derives another password: its own conf does not open this one
    other = init.plant_conf(init.password("coco-2"))
    with pytest.raises(errors.FailedPrecondition):
        init.deleter().initialise(VID, init.context(), {}, Deadline(60))
    assert e.bucket.body(CONF) == other != foreign
    assert tool.calls == [] and e.bucket.counts["put"] == 0


def test_a_conf_that_is_not_a_conf_is_refused_and_kept(
    init: Init, tool: FakeInit, probes: list[Any]
) -> None:
    e = init.env
    e.bucket.put_raw(CONF, b'{"not": "a conf"')
    with pytest.raises(errors.FailedPrecondition) as info:
        init.deleter().initialise(VID, init.context(), {}, Deadline(60))
    assert _msg(info) == (
        f"{WHERE} already holds a gocryptfs.conf that is not a valid gocryptfs config: "
        "it is not overwritten"
    )
    assert info.value.__suppress_context__
    assert e.bucket.body(CONF) == b'{"not": "a conf"' and e.bucket.counts["put"] == 0


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (
            ObjectNotFound("get: 404"),
            errors.Unavailable,
            f"gocryptfs.conf at {WHERE} vanished while checked",
        ),
        (
            AccessDenied("403 AccessDenied"),
            errors.PermissionDenied,
            f"the object store refused these credentials for {WHERE}",
        ),
        (
            TransientError("503 SlowDown"),
            errors.Unavailable,
            f"object store for {WHERE}: 503 SlowDown",
        ),
        (
            BadResponse("truncated body"),
            errors.FailedPrecondition,
            f"object store for {WHERE}: truncated body",
        ),
    ],
)
def test_the_conf_checks_store_errors(
    init: Init,
    tool: FakeInit,
    probes: list[Any],
    error: Exception,
    code: type[errors.CsiError],
    text: str,
) -> None:
    init.plant_conf()
    with pytest.raises(code) as info:
        init.deleter(Recorder(Served(error=error))).initialise(
            VID, init.context(), {}, Deadline(60)
        )
    assert type(info.value) is code and _msg(info) == text
    assert info.value.__suppress_context__
    assert tool.calls == [] and init.env.bucket.counts["put"] == 0
