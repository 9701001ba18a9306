"""Signing and verification keys for sealed strings, as JWKs.

Lookup follows CoCo's `Secret::get_kid`: a `kid` that is a resource URI (`kbs://…`) is fetched
from the key broker, anything else names a file in a local key directory (CDH's default is
`/run/confidential-containers/cdh/sealed-secret/<kid>`). Only EC P-256 keys are accepted,
because ES256 is the only algorithm the format allows; accepting other key types would only
turn a clear "wrong key type" into a confusing signature failure later.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from jwcrypto import jwk
from jwcrypto.common import JWException

from sealed_secrets.errors import KeyFormatError, ResolverError, ResourceNotFound, UnknownKid

DEFAULT_KEY_DIR = "/run/confidential-containers/cdh/sealed-secret"
DEFAULT_SIGNING_KID = "sealed-signing"
MAX_KEY_BYTES = 64 * 1024
_SAFE_KID_FILE = re.compile(r"[A-Za-z0-9._@+=-]+")

GetResource = Callable[[str], bytes]


def is_resource_uri(kid: str) -> bool:
    return kid.startswith("kbs://") or kid.startswith("kbs+")


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
    kid: str, *, get_resource: GetResource | None = None, key_dir: str | None = None
) -> jwk.JWK:
    """Public ES256 key for ``kid`` (KBS resource or `<key_dir>/<kid>`); raises UnknownKid."""
    if is_resource_uri(kid):
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
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_KEY_BYTES + 1)
        except FileNotFoundError:
            raise UnknownKid(f"no verification key file for kid {kid!r}") from None
        except OSError as exc:
            raise UnknownKid(f"verification key file for kid {kid!r}: errno {exc.errno}") from None
        if len(data) > MAX_KEY_BYTES:
            raise KeyFormatError(f"verification key file for kid {kid!r} is too large")
        what = f"verification key file for kid {kid!r}"
    key = check_es256(parse_jwk(data, what=what), what=what)
    # Only the public half is ever needed to verify; never keep a private key around by accident.
    return jwk.JWK(**key.export_public(as_dict=True))


def generate_signing_key(kid: str = DEFAULT_SIGNING_KID) -> jwk.JWK:
    """Fresh P-256 key with the members CoCo's `secret keygen` writes (alg, use, kid)."""
    return jwk.JWK.generate(kty="EC", crv="P-256", alg="ES256", use="sig", kid=kid)


def public_jwk(key: jwk.JWK) -> jwk.JWK:
    return jwk.JWK(**key.export_public(as_dict=True))


def write_keypair(key: jwk.JWK, output_dir: str, kid: str) -> tuple[Path, Path]:
    """Write `<kid>-private.json` (mode 0600, never overwritten) and `<kid>-public.json`."""
    if not _SAFE_KID_FILE.fullmatch(kid) or kid in (".", ".."):
        raise KeyFormatError("kid must be a plain file name to be used in key file names")
    out = Path(output_dir)
    priv_path = out / f"{kid}-private.json"
    pub_path = out / f"{kid}-public.json"
    data = key.export_private(as_dict=True)
    try:
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFormatError(f"refusing to overwrite {priv_path}") from None
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.write("\n")
    pub_path.write_text(json.dumps(key.export_public(as_dict=True)) + "\n")
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
