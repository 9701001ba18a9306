"""The kernel engine's command lines and error mapping. device-mapper is absent on the build
machines, so nothing here activates a mapping (docs/block.md says so too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_driver import errors
from csi_driver.volumes import block_kernel as bk
from tests.fuse_crypt import luks2_helpers as lh


class Recorder:
    def __init__(self, rc: int = 0, stderr: str = "") -> None:
        self.calls: list[tuple[list[str], bytes | None]] = []
        self.rc, self.stderr = rc, stderr

    def __call__(self, argv: list[str], stdin: bytes | None) -> bk.Result:
        self.calls.append((argv, stdin))
        return bk.Result(self.rc, self.stderr)


def test_format_argv_is_cdhs() -> None:
    assert bk.format_argv("/dev/vdb") == [
        "cryptsetup", "--batch-mode", "luksFormat", "--type", "luks2", "--cipher",
        "aes-xts-plain64", "--sector-size", "4096", "--key-file", "-", "--", "/dev/vdb",
    ]  # fmt: skip
    argv = bk.format_argv("/dev/vdb", integrity=True, header="/run/h")
    assert argv[9:14] == ["--integrity", "hmac-sha256", "--integrity-no-wipe", "--header", "/run/h"]


def test_open_uses_the_guest_header_copy_and_the_volume_key_on_stdin() -> None:
    rec = Recorder()
    eng = bk.KernelEngine(rec)
    name = bk.mapper_name("pvc-1")
    vk = bytes(range(64))
    assert eng.open("/dev/vdb", vk, name, "/run/coco/h", readonly=True) == f"/dev/mapper/{name}"
    argv, stdin = rec.calls[0]
    assert argv[:6] == ["cryptsetup", "--batch-mode", "open", "--type", "luks2", "--header"]
    assert argv[6:] == ["/run/coco/h", "--volume-key-file", "/dev/stdin", "--disable-keyring",
                        "--readonly", "--", "/dev/vdb", name]  # fmt: skip
    assert stdin == vk and not any(vk.hex() in a for a in argv)
    eng.format("/dev/vdb", b"k3y")
    assert rec.calls[1][1] == b"k3y" and "--key-file" in rec.calls[1][0]


def test_format_kdf_costs_are_ours() -> None:
    """Explicit KDF costs (the userspace engine's), never cryptsetup's benchmarked ones,
    which could exceed the header profile's caps on a fast CPU; the key only on stdin."""
    rec = Recorder()
    eng = bk.KernelEngine(rec)
    eng.format("/dev/vdb", b"k" * 64, integrity=True, high_entropy=True)
    eng.format("/dev/vdb", b"human", high_entropy=False)
    (fast, s1), (slow, s2) = rec.calls
    assert fast == [
        "cryptsetup", "--batch-mode", "luksFormat", "--type", "luks2", "--cipher",
        "aes-xts-plain64", "--sector-size", "4096", "--integrity", "hmac-sha256",
        "--integrity-no-wipe", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
        "--key-file", "-", "--", "/dev/vdb",
    ]  # fmt: skip
    assert slow[9:19] == [
        "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "65536",
        "--pbkdf-parallel", "1", "--key-file", "-",
    ]  # fmt: skip
    assert (s1, s2) == (b"k" * 64, b"human")


def test_resize_uses_the_header_copy_and_no_secret() -> None:
    """cryptsetup 2.6's resize of a keyring mapping would want a passphrase and a keyslot
    (the copy has none): the mapping is opened --disable-keyring, resize gets the copy (not
    the host's header, whose offset it would otherwise trust) and nothing on stdin."""
    rec = Recorder()
    bk.KernelEngine(rec).resize("coco-1", "/run/coco/h")
    assert rec.calls == [
        (["cryptsetup", "--batch-mode", "resize", "--disable-keyring", "--header", "/run/coco/h",
          "--", "coco-1"], None),
    ]  # fmt: skip
    with pytest.raises(errors.InvalidArgument):
        bk.resize_argv("../x", "/run/h")
    with pytest.raises(errors.InvalidArgument):
        bk.resize_argv("coco-1", "run/h")
    for rc, stderr, expected in [
        (1, "Cannot initialize device-mapper.", errors.FailedPrecondition),
        (4, "Device coco-1 is not active.", errors.NotFound),
        (1, "Resize of active device requires volume key in keyring", errors.Internal),
    ]:
        with pytest.raises(expected):
            bk.KernelEngine(Recorder(rc, stderr)).resize("coco-1", "/run/h")


def test_the_real_runner_gives_no_stdin_when_there_is_no_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stdin=None is /dev/null, never the plugin's own stdin (cryptsetup would wait on it
    for a passphrase); a secret goes in as input. Real processes, the arguments observed."""
    import subprocess

    seen: list[dict[str, object]] = []
    real = subprocess.run

    def spy(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        seen.append(kwargs)
        return real(argv, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "run", spy)
    assert bk._subprocess_runner(["sh", "-c", "cat; echo done >&2"], None) == bk.Result(0, "done\n")
    assert seen[0].get("stdin") == subprocess.DEVNULL and "input" not in seen[0]
    assert bk._subprocess_runner(["sh", "-c", "cat >&2"], b"in") == bk.Result(0, "in")
    assert seen[1].get("input") == b"in"


def test_names_and_paths_are_checked() -> None:
    assert bk.mapper_name("a/../b").startswith("coco-")
    for bad in ("", "-x", "a b", "a/b", "x" * 65):
        with pytest.raises(errors.InvalidArgument):
            bk.open_argv("/dev/vdb", bad, "/run/h")
        with pytest.raises(errors.InvalidArgument):
            bk.close_argv(bad)
    for bad_path in ("vdb", "/dev/../etc/passwd", "/dev/vdb\0"):
        with pytest.raises(errors.InvalidArgument):
            bk.format_argv(bad_path)


@pytest.mark.parametrize(
    ("rc", "stderr", "expected"),
    [
        (2, "No key available with this passphrase.", errors.WrongVolumeKey),
        (
            1,
            "Cannot initialize device-mapper. Is dm_mod kernel module loaded?",
            errors.FailedPrecondition,
        ),  # fmt: skip
        (4, "Device /dev/vdz does not exist or access denied.", errors.NotFound),
        (5, "Device coco-x already exists.", errors.FailedPrecondition),
        (3, "", errors.ResourceExhausted),
        (1, "something else", errors.Internal),
    ],
)
def test_failures_map_to_csi_errors(rc: int, stderr: str, expected: type) -> None:
    with pytest.raises(expected):
        bk.KernelEngine(Recorder(rc, stderr)).open("/dev/vdb", b"k", "coco-1", "/run/h",
                                                    readonly=False)  # fmt: skip


def test_close_is_idempotent() -> None:
    bk.KernelEngine(Recorder(4, "not active")).close("coco-1")
    with pytest.raises(errors.Internal):
        bk.KernelEngine(Recorder(1, "busy")).close("coco-1")


def test_available_follows_mapper_control(tmp_path: Path) -> None:
    assert bk.available(str(tmp_path / "control")) is False
    (tmp_path / "control").write_bytes(b"")
    assert bk.available(str(tmp_path / "control")) is False  # not a character device
    assert bk.available("/dev/null") is True  # stands in for a working control node


def test_real_cryptsetup_without_device_mapper(tmp_path: Path) -> None:
    """On this machine: the engine's real luksFormat works on an image; the guest's header
    copy (zero-padded to 16 MiB) plus the volume key on stdin passes cryptsetup's
    --test-passphrase (a wrong key is WrongVolumeKey), and the real open fails with the
    device-mapper error mapped to FAILED_PRECONDITION; --integrity format fails too."""
    lh.skip_without_cryptsetup()
    if bk.available():
        pytest.skip("device-mapper present: this test is for machines without it")
    from fuse_crypt.luks2 import KdfCost, format_volume

    eng = bk.KernelEngine()
    img = tmp_path / "d.img"
    with img.open("wb") as f:
        f.truncate(32 << 20)
    eng.format(str(img), b"pw")
    assert lh.cs_opens(img, b"pw")
    assert lh.cs_json(img)["segments"]["0"]["encryption"] == "aes-xts-plain64"

    ours = tmp_path / "ours.img"
    with ours.open("wb") as f:
        f.truncate(32 << 20)
    fd = os.open(ours, os.O_RDWR)
    try:
        opened = format_volume(fd, b"pw", kdf="pbkdf2", kdf_cost=KdfCost(iterations=1000))
    finally:
        os.close(fd)
    copy = tmp_path / "hdr"
    copy.write_bytes(ours.read_bytes()[: 32 << 10])  # what Opened.header holds
    with copy.open("r+b") as f:
        f.truncate(bk.HEADER_COPY_SIZE)
    eng.verify(str(ours), opened.volume_key, str(copy))
    with pytest.raises(errors.WrongVolumeKey):
        eng.verify(str(ours), os.urandom(64), str(copy))
    with pytest.raises(errors.FailedPrecondition, match="device-mapper"):
        eng.open(str(ours), opened.volume_key, "coco-t", str(copy), readonly=False)
    img2 = tmp_path / "e.img"
    with img2.open("wb") as f:
        f.truncate(32 << 20)
    with pytest.raises(errors.CsiError):
        eng.format(str(img2), b"pw", integrity=True)
