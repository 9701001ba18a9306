"""The userspace engine's LUKS2 step: make a container, or unlock one to its volume key.

Two implementations of one small seam (``LuksEngine``):

* ``UserspaceLuks`` (the default): ``fuse_crypt.luks2`` (pure Python): the header is read
  once into guest memory, checked against the accepted profiles, bound to the key, and
  unlocked from that copy (docs/block.md).
* ``CryptsetupOfflineLuks``: cryptsetup 2.6 commands that need no device-mapper
  (``luksFormat``, ``luksDump --dump-volume-key``); an independent engine for the tests.
  It trusts cryptsetup's header parsing (the segment it reports is still checked here:
  cipher, sector size, offsets, no integrity) and cryptsetup may repair a header it reads,
  so it is never the node's choice.

Both hand back the volume key and the data segment's geometry, which the block daemon
(``fuse-crypt block-serve``) gets on stdin and as flags.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from csi_driver import errors
from csi_driver.proc import tail
from fuse_crypt.errors import BadInputError, WrongKeyError
from fuse_crypt.luks2 import (
    HeaderError,
    KdfCost,
    Luks2Error,
    Opened,
    add_passphrase,
    bind_volume,
    format_volume,
    open_volume,
    remove_passphrase,
)

KDF_TIMEOUT = 120.0
CIPHERS = ("aes-xts-plain64", "aes-xts-plain")
SECTOR_SIZE = 4096


@dataclass(frozen=True)
class Unlocked:
    """An opened container: its volume key (never shown) and data segment."""

    volume_key: bytes = field(repr=False)
    offset: int
    size: int | None  # None: dynamic (to the end of the device)
    sector_size: int
    cipher: str
    # Both header copies exactly as validated (fuse_crypt.luks2 Opened.header): what the
    # kernel engine hands cryptsetup as a detached header. Empty from engines without it.
    header: bytes = field(default=b"", repr=False, compare=False)
    # "hmac(sha256)": CDH's dataIntegrity (dm-integrity; only the kernel engine serves it).
    integrity: str | None = None


def unlocked_from(opened: Opened) -> Unlocked:
    """The engine-neutral view of a volume fuse_crypt.luks2 opened."""
    seg = opened.segment
    return Unlocked(
        opened.volume_key, seg.offset, seg.size, seg.sector_size, seg.cipher, opened.header,
        seg.integrity,
    )  # fmt: skip


def _header_refused(exc: HeaderError) -> errors.FailedPrecondition:
    msg = str(exc)
    prefix = "LUKS2 header refused"
    return errors.FailedPrecondition(msg if msg.startswith(prefix) else f"{prefix}: {msg}")


def integrity_mismatch(wanted: bool) -> errors.FailedPrecondition:
    """A volume opened with the other dataIntegrity setting than it was made with. Refused
    before anything is written: opened the other way its sectors would read as garbage."""
    made, asked = ("without", "with") if wanted else ("with", "without")
    return errors.FailedPrecondition(
        f"the volume was made {made} dataIntegrity but is staged {asked} it; refusing to "
        "open it (nothing was written): set dataIntegrity as it was when the volume was made"
    )


class LuksEngine(Protocol):
    name: str

    def format(self, device: str, passphrase: bytes, *, high_entropy: bool) -> None:
        """Write a new LUKS2 container (CDH's profile) on an empty device."""

    def unlock(self, device: str, passphrase: bytes, *, integrity: bool = False) -> Unlocked:
        """Unlock; WrongVolumeKey if the key does not open it, FailedPrecondition if the
        header is not one we accept or its dataIntegrity differs from ``integrity``. Never
        writes to the device."""

    def rotate(
        self, device: str, old: bytes, new: bytes, *, high_entropy: bool, integrity: bool = False
    ) -> None:
        """Add a keyslot for ``new`` (opened by ``old``), check it opens, then remove the
        slot of ``old``: a crash in between leaves both working, never neither."""

    def retire(self, device: str, old: bytes, *, integrity: bool = False) -> bool:
        """Remove the keyslot ``old`` still opens, if any (a rotation's second step that a
        crash cut off). The caller has just unlocked with the new key, so ``old`` is never
        the only way in. False when ``old`` opens no slot: nothing was written."""

    def bind(self, device: str, passphrase: bytes, *, integrity: bool) -> Unlocked:
        """Add the binding token to a container this guest just made with cryptsetup
        (dataIntegrity, kernel engine), then return it unlocked."""


def check_segment(seg: dict[str, object]) -> tuple[int, int | None, int, str]:
    """The accepted data segment (luks2.md §5.4 item 7), from already-parsed JSON."""
    cipher = seg.get("encryption")
    ok = (
        seg.get("type") == "crypt"
        and cipher in CIPHERS
        and type(seg.get("sector_size")) is int
        and seg.get("sector_size") == SECTOR_SIZE
        and seg.get("iv_tweak") == "0"
        and isinstance(seg.get("offset"), str)
        and re.fullmatch(r"[0-9]{1,19}", str(seg.get("offset")))
        and isinstance(seg.get("size"), str)
        and (seg["size"] == "dynamic" or re.fullmatch(r"[0-9]{1,19}", str(seg["size"])))
        and "flags" not in seg
    )
    if "integrity" in seg:
        raise errors.FailedPrecondition(
            "the volume uses dm-integrity (dataIntegrity): only the kernel engine opens it"
        )
    if not ok:
        raise errors.FailedPrecondition("the LUKS2 data segment is not a profile this node accepts")
    offset = int(str(seg["offset"]))
    size = None if seg["size"] == "dynamic" else int(str(seg["size"]))
    if offset % SECTOR_SIZE or (size is not None and (size == 0 or size % SECTOR_SIZE)):
        raise errors.FailedPrecondition("the LUKS2 data segment is not sector-aligned")
    return offset, size, SECTOR_SIZE, str(cipher)


class CryptsetupOfflineLuks:
    name = "cryptsetup-offline"
    FORMAT = ["--type", "luks2", "--cipher", "aes-xts-plain64", "--sector-size", "4096"]

    def _bin(self) -> str:
        tool = shutil.which("cryptsetup")
        if tool is None:
            raise errors.FailedPrecondition("cryptsetup is not installed")
        return tool

    def _run(self, args: list[str], passphrase: bytes | None) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(
                [self._bin(), "--batch-mode", *args],
                input=passphrase,
                capture_output=True,
                timeout=KDF_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise errors.DeadlineExceeded("cryptsetup timed out") from None

    def format(self, device: str, passphrase: bytes, *, high_entropy: bool) -> None:
        kdf = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"] if high_entropy else []
        res = self._run(["luksFormat", *self.FORMAT, *kdf, "--key-file", "-", device], passphrase)
        if res.returncode != 0:
            raise errors.Internal(
                f"luksFormat failed: {tail(res.stderr.decode('utf-8', 'replace'))}"
            )

    def rotate(
        self, device: str, old: bytes, new: bytes, *, high_entropy: bool, integrity: bool = False
    ) -> None:
        raise errors.FailedPrecondition("key rotation needs the userspace LUKS2 engine")

    def retire(self, device: str, old: bytes, *, integrity: bool = False) -> bool:
        raise errors.FailedPrecondition("key rotation needs the userspace LUKS2 engine")

    def bind(self, device: str, passphrase: bytes, *, integrity: bool) -> Unlocked:
        raise errors.FailedPrecondition("binding a header needs the userspace LUKS2 library")

    def unlock(self, device: str, passphrase: bytes, *, integrity: bool = False) -> Unlocked:
        if integrity:
            raise errors.FailedPrecondition("dataIntegrity needs the kernel engine")
        meta = self._run(["luksDump", "--dump-json-metadata", device], None)
        if meta.returncode != 0:
            raise errors.FailedPrecondition("the device holds no LUKS2 container")
        try:
            doc = json.loads(meta.stdout)
            segments = doc["segments"]
        except (ValueError, KeyError, TypeError):
            raise errors.FailedPrecondition("unreadable LUKS2 metadata") from None
        if not isinstance(segments, dict) or set(segments) != {"0"}:
            raise errors.FailedPrecondition("the LUKS2 container must have exactly one segment")
        offset, size, sector, cipher = check_segment(segments["0"])
        res = self._run(["luksDump", "--dump-volume-key", "--key-file", "-", device], passphrase)
        if res.returncode == 2:
            raise errors.WrongVolumeKey("the volume key does not open this LUKS2 container")
        if res.returncode != 0:
            raise errors.FailedPrecondition("cryptsetup cannot unlock the container")
        block = res.stdout.decode("ascii", "replace").split("MK dump:", 1)[-1]
        key = bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", block)))
        if len(key) not in (32, 64):
            raise errors.FailedPrecondition("unexpected volume key size")
        return Unlocked(key, offset, size, sector, cipher)


class UserspaceLuks:
    """fuse_crypt.luks2: header read once, validated and bound to the key, in the guest.

    ``require_binding``: refuse a header that lacks our binding token (the default). Off
    only by the operator's ``--block-accept-unbound-header`` for disks CDH or cryptsetup
    made: the profile still holds, but nothing then proves the header is the key owner's.
    """

    name = "userspace"

    def __init__(self, *, require_binding: bool = True) -> None:
        self.require_binding = require_binding

    @staticmethod
    def _open(device: str, *, read_only: bool) -> int:
        from fuse_crypt.blockfront import DeviceError, open_device

        try:
            return open_device(device, read_only=read_only, allow_regular=True)
        except DeviceError as exc:
            raise errors.FailedPrecondition(f"device {device}: {exc.strerror}") from None

    def format(self, device: str, passphrase: bytes, *, high_entropy: bool) -> None:
        # A 256-bit random key gains nothing from KDF cost; a human passphrase gets Argon2id.
        cost = KdfCost(iterations=1000) if high_entropy else None
        fd = self._open(device, read_only=False)
        try:
            format_volume(
                fd,
                passphrase,
                sector_size=SECTOR_SIZE,
                kdf="pbkdf2" if high_entropy else "argon2id",
                kdf_cost=cost,
            )
        except (Luks2Error, BadInputError) as exc:
            raise errors.Internal(f"cannot format the LUKS2 container: {exc}") from None
        finally:
            os.close(fd)

    def rotate(
        self, device: str, old: bytes, new: bytes, *, high_entropy: bool, integrity: bool = False
    ) -> None:
        cost = KdfCost(iterations=1000) if high_entropy else None
        kdf = "pbkdf2" if high_entropy else "argon2id"
        binding, allow = self.require_binding, integrity

        def change(fd: int) -> None:
            add_passphrase(
                fd, old, new, require_binding=binding, allow_integrity=allow, kdf=kdf,
                kdf_cost=cost,
            )  # fmt: skip
            # the new slot works
            open_volume(fd, new, require_binding=binding, allow_integrity=allow)
            remove_passphrase(fd, old, require_binding=binding, allow_integrity=allow)

        try:
            self._change_keyslots(device, change, "key rotation failed")
        except WrongKeyError:
            raise errors.WrongVolumeKey(
                "neither the volume key nor the previous key opens this LUKS2 container"
            ) from None

    def retire(self, device: str, old: bytes, *, integrity: bool = False) -> bool:
        binding, allow = self.require_binding, integrity
        try:
            self._change_keyslots(
                device,
                lambda fd: remove_passphrase(
                    fd, old, require_binding=binding, allow_integrity=allow
                ),
                "removing the previous key failed",
            )
        except WrongKeyError:
            return False
        return True

    def _change_keyslots(self, device: str, change: Callable[[int], None], failed: str) -> None:
        """One descriptor and one error mapping for keyslot changes; a wrong key
        (WrongKeyError) is the caller's to judge."""
        fd = self._open(device, read_only=False)
        try:
            change(fd)
        except WrongKeyError:
            raise
        except HeaderError as exc:
            raise errors.FailedPrecondition(f"LUKS2 header refused: {exc}") from None
        except (Luks2Error, BadInputError) as exc:
            raise errors.FailedPrecondition(f"{failed}: {exc}") from None
        finally:
            os.close(fd)

    def unlock(self, device: str, passphrase: bytes, *, integrity: bool = False) -> Unlocked:
        """``integrity`` (the kernel engine's dataIntegrity) is the only way an integrity
        header opens; without it such a header is refused by the profile, never served as
        plain XTS sectors."""
        return self._opened(
            device,
            lambda fd: open_volume(
                fd, passphrase, require_binding=self.require_binding, allow_integrity=integrity
            ),
            read_only=True,
            integrity=integrity,
            wrong_key="the volume key does not open this LUKS2 container",
            failed="cannot open the LUKS2 container",
        )

    def bind(self, device: str, passphrase: bytes, *, integrity: bool) -> Unlocked:
        return self._opened(
            device,
            lambda fd: bind_volume(fd, passphrase, allow_integrity=integrity),
            read_only=False,
            integrity=integrity,
            wrong_key="the volume key does not open the LUKS2 container just made",
            failed="cannot bind the LUKS2 header",
        )

    def _opened(
        self,
        device: str,
        how: Callable[[int], Opened],
        *,
        read_only: bool,
        integrity: bool,
        wrong_key: str,
        failed: str,
    ) -> Unlocked:
        """One error mapping for unlock and bind: a wrong key is WrongVolumeKey, a refused
        header or anything else FAILED_PRECONDITION; an integrity volume asked for must be
        one."""
        fd = self._open(device, read_only=read_only)
        try:
            opened = how(fd)
        except WrongKeyError:
            raise errors.WrongVolumeKey(wrong_key) from None
        except HeaderError as exc:
            raise _header_refused(exc) from None
        except (Luks2Error, BadInputError) as exc:
            raise errors.FailedPrecondition(f"{failed}: {exc}") from None
        finally:
            os.close(fd)
        if integrity and opened.segment.integrity is None:
            raise integrity_mismatch(True)
        return unlocked_from(opened)


def default_engine(*, require_binding: bool = True) -> LuksEngine:
    """The pure-Python library (cryptsetup's offline commands stay the tests' oracle)."""
    return UserspaceLuks(require_binding=require_binding)
