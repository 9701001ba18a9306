"""Signing and verification keys for sealed strings, as JWKs.

Lookup follows CoCo's `Secret::get_kid`: a `kid` that is a resource URI (`kbs://…`) is fetched
from the key broker, anything else names a file in a local key directory (CDH's default is
`/run/confidential-containers/cdh/sealed-secret/<kid>`). Only EC P-256 keys are accepted,
because ES256 is the only algorithm the format allows; accepting other key types would only
turn a clear "wrong key type" into a confusing signature failure later.

The header (and so the kid) is read *before* the signature can be checked: whoever hands the
guest a sealed string chooses it. A kid that names a KBS resource therefore makes the guest
send an attested request, so such a kid is used only if it is a plain `kbs:///repo/type/tag`
URI that the guest's own configuration allows (``allowed_kids``: exact URIs or prefixes ending
in `/`). Key-directory kids need no list: the directory is the guest's own allow-list.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from jwcrypto import jwk
from jwcrypto.common import JWException

from sealed_secrets.errors import KeyFormatError, ResolverError, ResourceNotFound, UnknownKid
from sealed_secrets.files import read_small_file
from sealed_secrets.resource_uri import has_dot_segment, hostless_segments, uri_allowed

DEFAULT_KEY_DIR = "/run/confidential-containers/cdh/sealed-secret"
DEFAULT_SIGNING_KID = "sealed-signing"
MAX_KEY_BYTES = 64 * 1024
_SAFE_KID_FILE = re.compile(r"[A-Za-z0-9._@+=-]+")
MAX_ALLOWED_KIDS = 64

GetResource = Callable[[str], bytes]


def is_local_kid(kid: str) -> bool:
    """A kid that can only name a file in the key directory (no URI, no path separators).

    Anything else counts as "would reach the broker": CoCo's CDH parses kids with a URL
    library (case-insensitive scheme), so ``KBS:///…`` is a resource URI there too.
    """
    return bool(_SAFE_KID_FILE.fullmatch(kid)) and kid not in (".", "..")


def is_plain_kid(kid: str) -> bool:
    """A signing-key kid that may reach the KBS: the default `resource` plugin, no host,
    exactly repo/type/tag, no query, fragment, `.` or `..` segment."""
    segments = hostless_segments(kid)
    return segments is not None and len(segments) == 3 and not has_dot_segment(segments)


def _is_kid_prefix(entry: str) -> bool:
    segments = hostless_segments(entry[:-1]) if entry.endswith("/") else None
    return segments is not None and 1 <= len(segments) <= 2 and not has_dot_segment(segments)


def check_allowed_kids(entries: Iterable[str]) -> tuple[str, ...]:
    """Validate a configured allow-list of signing-key ids; raise ResolverError if malformed.

    An entry is an exact plain kid (``kbs:///default/signing-key/tenant-a``) or a prefix ending
    in ``/`` (``kbs:///default/signing-key/``). A typo must fail loudly at configuration time,
    never silently allow more (or nothing).
    """
    if isinstance(entries, str):
        raise ResolverError("allowed kids must be a collection of strings, not one string")
    out: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not (is_plain_kid(entry) or _is_kid_prefix(entry)):
            raise ResolverError(
                "allowed signing kid must be kbs:///repo/type/tag or a prefix ending in '/' "
                f"(kbs:///repo/ or kbs:///repo/type/), got {entry!r}"
            )
        out.append(entry)
    if len(out) > MAX_ALLOWED_KIDS:
        raise ResolverError(f"at most {MAX_ALLOWED_KIDS} allowed signing kids")
    return tuple(out)


def kid_allowed(kid: str, allowed_kids: Collection[str]) -> bool:
    """True if ``kid`` is a plain KBS kid matched exactly or by a ``/``-ended prefix."""
    if not is_plain_kid(kid):
        return False
    return uri_allowed(kid, allowed_kids)


def parse_jwk(data: bytes, *, what: str, private: bool = False) -> jwk.JWK:
    """Parse a JWK (JSON) or PEM key; errors never echo the key material."""
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise KeyFormatError(f"{what} is not UTF-8 text") from None
    try:
        if text.startswith("-----BEGIN"):
            key = jwk.JWK.from_pem(text.encode())
        else:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError
            key = jwk.JWK(**obj)
    except (ValueError, TypeError, JWException, UnicodeError):
        raise KeyFormatError(f"{what} is not a valid JWK or PEM key") from None
    if private and not key.has_private:
        raise KeyFormatError(f"{what} has no private part")
    return key


def check_es256(key: jwk.JWK, *, what: str) -> jwk.JWK:
    if key.get("kty") != "EC" or key.get("crv") != "P-256":
        raise KeyFormatError(f"{what} must be an EC P-256 key (ES256)")
    return key


def _kid_path(kid: str, key_dir: str) -> Path:
    """Map a kid to a file inside key_dir, refusing anything that could escape it."""
    if not _SAFE_KID_FILE.fullmatch(kid) or kid in (".", ".."):
        raise UnknownKid("kid is not a resource URI and not a safe key file name")
    base = Path(key_dir).resolve()
    path = (base / kid).resolve()
    if path.parent != base:
        raise UnknownKid("kid escapes the key directory")
    return path


def load_verification_key(
    kid: str,
    *,
    get_resource: GetResource | None = None,
    key_dir: str | None = None,
    allowed_kids: Collection[str] = (),
) -> jwk.JWK:
    """Public ES256 key for ``kid`` (KBS resource or `<key_dir>/<kid>`); raises UnknownKid.

    A resource kid is refused before any request unless ``kid_allowed(kid, allowed_kids)``.
    """
    if not is_local_kid(kid):
        if not kid_allowed(kid, allowed_kids):
            raise UnknownKid("kid is not a key file name nor an allowed signing-key resource")
        if get_resource is None:
            raise UnknownKid(f"kid {kid!r} is a KBS resource but no resolver is configured")
        try:
            data = get_resource(kid)
        except (ResourceNotFound, ResolverError):
            raise UnknownKid(f"no verification key at {kid!r}") from None
        what = f"verification key {kid!r}"
    else:
        path = _kid_path(kid, key_dir or DEFAULT_KEY_DIR)
        if not path.exists():
            # CDH names the file after the kid; `sealed-secret keygen` writes
            # `<kid>-public.json`, so a key directory filled by keygen works as it is.
            keygen_name = path.with_name(f"{path.name}-public.json")
            path = keygen_name if keygen_name.exists() else path
        if not path.exists():
            raise UnknownKid(f"no verification key file for kid {kid!r}")
        try:  # regular file, no symlink, no FIFO that would block, bounded
            data = read_small_file(str(path), limit=MAX_KEY_BYTES, what="verification key file")
        except ResolverError as exc:
            raise UnknownKid(str(exc)) from None
        what = f"verification key file for kid {kid!r}"
    key = check_es256(parse_jwk(data, what=what), what=what)
    # Only the public half is ever needed to verify; never keep a private key around by accident.
    return jwk.JWK(**key.export_public(as_dict=True))


def generate_signing_key(kid: str = DEFAULT_SIGNING_KID) -> jwk.JWK:
    """Fresh P-256 key with the members CoCo's `secret keygen` writes (alg, use, kid)."""
    return jwk.JWK.generate(kty="EC", crv="P-256", alg="ES256", use="sig", kid=kid)


def public_jwk(key: jwk.JWK) -> jwk.JWK:
    return jwk.JWK(**key.export_public(as_dict=True))


_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_new_file(path: Path | str, mode: int) -> int:
    """Open a fresh file for writing: never an existing file, never through a symlink.

    ``O_EXCL`` refuses any existing entry (a planted symlink included, dangling or not), so a
    key or plaintext can never land in a file someone else prepared or pointed elsewhere.
    Raises FileExistsError; other OSErrors pass through.
    """
    fd = os.open(path, _NEW_FILE_FLAGS, mode)
    os.fchmod(fd, mode)  # the umask must not widen or narrow what we asked for
    return fd


def write_keypair(key: jwk.JWK, output_dir: str, kid: str) -> tuple[Path, Path]:
    """Write `<kid>-private.json` (0600) and `<kid>-public.json` (0644), both created fresh.

    Neither file is ever overwritten or written through a symlink; if the public file cannot
    be created, the private one just made is removed again so no half pair is left behind.
    """
    if not _SAFE_KID_FILE.fullmatch(kid) or kid in (".", ".."):
        raise KeyFormatError("kid must be a plain file name to be used in key file names")
    out = Path(output_dir)
    priv_path = out / f"{kid}-private.json"
    pub_path = out / f"{kid}-public.json"
    fds: list[int] = []
    try:
        for path, mode in ((priv_path, 0o600), (pub_path, 0o644)):
            fds.append(create_new_file(path, mode))
    except FileExistsError as exc:
        for fd in fds:
            os.close(fd)
        if fds:
            os.unlink(priv_path)
        raise KeyFormatError(f"refusing to overwrite existing {exc.filename}") from None
    except OSError:
        for fd in fds:
            os.close(fd)
        if fds:
            os.unlink(priv_path)
        raise
    priv_fd, pub_fd = fds
    with os.fdopen(priv_fd, "w") as f:
        json.dump(key.export_private(as_dict=True), f)
        f.write("\n")
    with os.fdopen(pub_fd, "w") as f:
        json.dump(key.export_public(as_dict=True), f)
        f.write("\n")
    return priv_path, pub_path


def load_signing_key(path: str) -> jwk.JWK:
    """Private ES256 JWK (or PEM) from a file, as written by `keygen`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise KeyFormatError(f"cannot read signing key file {path}: {exc.strerror}") from None
    what = f"signing key file {path}"
    return check_es256(parse_jwk(data, what=what, private=True), what=what)
