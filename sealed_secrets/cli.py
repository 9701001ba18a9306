"""`sealed-secret`: keygen, seal (vault | envelope), unseal and verify, CoCo-`secret`-like flags.

Output is meant for pipes: the sealed string (or the plaintext) alone on stdout, every
notice on stderr. Any failure is one line `sealed-secret: error: …` on stderr and a non-zero
exit (1 for operational errors, 2 for usage errors, as argparse does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from sealed_secrets import keys
from sealed_secrets.errors import SealedSecretError
from sealed_secrets.sealing_options import CliError, aliyun_envelope_options, envelope_sealer

PROG = "sealed-secret"
MAX_PLAINTEXT = 512 * 1024  # sealed strings must fit a Secret value / env var comfortably
DEFAULT_RESOLVER_ENV = "SEALED_SECRET_RESOLVER"


def _json_arg(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a JSON object") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return obj


def _read_input(path: str | None, *, limit: int, what: str) -> bytes:
    try:
        if path in (None, "-"):
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise CliError(f"{what} is larger than {limit} bytes")
    return data


def _read_sealed(args: argparse.Namespace) -> str:
    if getattr(args, "sealed", None):
        sealed: str = args.sealed.strip()
        return sealed
    raw = _read_input(args.file_path, limit=1 << 20, what="sealed secret")
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CliError("sealed secret input is not ASCII text") from None


def _refuse_existing(path: str) -> None:
    """Fail early (before any KBS round trip) if an output path is already taken."""
    if os.path.lexists(path):
        raise CliError(
            f"refusing to write {path}: it already exists (or is a symlink); "
            "remove it or pass --force to replace it atomically"
        )


def _write_out(data: bytes, path: str | None, *, force: bool = False) -> None:
    """Write plaintext to stdout or to a *new* 0600 file, never through a symlink.

    ``force`` replaces an existing entry atomically: the data goes to a fresh temporary file
    in the same directory, which is then renamed over the target. rename() replaces a
    symlink itself, so the file it pointed to is never touched.
    """
    if path in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    target = path
    if force:
        directory, name = os.path.split(path)
        target = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
    try:
        fd = keys.create_new_file(target, 0o600)
    except FileExistsError:
        _refuse_existing(path)
        raise CliError(f"refusing to write {path}: it already exists") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(target, path)
    except BaseException:
        if force:
            with contextlib.suppress(OSError):
                os.unlink(target)
        raise


def _signing(args: argparse.Namespace) -> Any:
    return keys.load_signing_key(args.signing_jwk_path)


# --- subcommands -------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    if args.sealing:
        from sealed_secrets.providers import asym

        key = asym.generate_keypair(args.sealing)
        kid = args.kid or "sealing"
    else:
        kid = args.kid or keys.DEFAULT_SIGNING_KID
        key = keys.generate_signing_key(kid)
    priv, pub = keys.write_keypair(key, args.output_dir, kid)
    print(f"wrote {priv} (keep secret) and {pub}", file=sys.stderr)


def cmd_seal_vault(args: argparse.Namespace) -> None:
    from sealed_secrets.seal import seal_vault

    sealed = seal_vault(
        args.resource_uri,
        args.provider,
        signing_key=_signing(args),
        signing_kid=args.signing_kid,
        provider_settings=args.provider_settings,
        annotations=args.annotations,
    )
    print("Warning: Secrets must be provisioned to provider separately.", file=sys.stderr)
    print(sealed)


def _envelope_sealer(args: argparse.Namespace) -> Callable[[bytes], str]:
    """Build `plaintext -> sealed string` once (keys loaded, KMS client made) for many values."""
    signing = _signing(args)
    if args.kms == "asym":
        from sealed_secrets.providers import asym

        public = _read_input(args.public_key, limit=64 * 1024, what="public key file")
        return envelope_sealer(
            asym.NAME,
            key_id=args.key_id,
            signing_key=signing,
            signing_kid=args.signing_kid,
            wrap_type=args.wrap_type,
            public_key_pem=public,
        )
    aliyun = aliyun_envelope_options(
        region_id=args.region_id,
        guest_token_path=args.guest_token_path,
        kms_instance_id=args.kms_instance_id,
        endpoint=args.endpoint,
        credential_file=args.credential_file,
        ca=args.ca,
    )
    if aliyun is None:
        raise CliError(
            "aliyun sealing needs --credential-file or ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET"
        )
    return envelope_sealer(
        "aliyun",
        key_id=args.key_id,
        signing_key=signing,
        signing_kid=args.signing_kid,
        wrap_type=args.wrap_type,
        kms_options=aliyun,
    )


def cmd_seal_envelope(args: argparse.Namespace) -> None:
    plaintext = _read_input(args.file_path, limit=MAX_PLAINTEXT, what="plaintext file")
    print(_envelope_sealer(args)(plaintext))


_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "managedFields", "selfLink")
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")


def _yaml_kind(value: Any) -> str:
    """How YAML read a scalar, for an error that tells the user what to quote."""
    import datetime

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean (YAML reads unquoted y/n, yes/no, on/off as true/false)"
    if isinstance(value, int | float):
        return "a number (YAML reads unquoted 0123 as octal 83)"
    if isinstance(value, datetime.date):
        return "a timestamp"
    if isinstance(value, bytes):
        return "binary (!!binary)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def _string_map(doc: dict[str, Any], field: str) -> dict[str, str]:
    """``data``/``stringData`` as Kubernetes stores it: a map of valid keys to strings.

    The API server refuses any other value (a number or boolean in stringData is a decoding
    error), so this refuses it too rather than sealing a YAML-coerced value such as "83" for
    ``0123`` or "True" for ``yes``. Values never appear in the message.
    """
    value = doc.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CliError(f"{field} must be a map of key: string, not {_yaml_kind(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _SECRET_KEY.fullmatch(key):
            shown = repr(key) if isinstance(key, str) else _yaml_kind(key)
            raise CliError(f"{field} key {shown} is not a valid Secret key ([-._a-zA-Z0-9]+)")
        if not isinstance(item, str):
            raise CliError(
                f"{field}[{key}] is {_yaml_kind(item)}, not a string; the API server would "
                "refuse it. Quote the value in the YAML"
            )
        out[key] = item
    return out


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CliError(f"{what} must be a map, not {_yaml_kind(value)}")
    return dict(value)


def _already_sealed(value: bytes) -> bool:
    """Only a structurally valid sealed string counts; a password "sealed.x" is still sealed."""
    from sealed_secrets import jws

    if not value.startswith(b"sealed.") or not value.isascii():
        return False
    try:
        jws.parse(value.decode("ascii"))
    except SealedSecretError:
        return False
    return True


def seal_manifest_doc(doc: Any, sealer: Callable[[bytes], str]) -> dict[str, Any]:
    """Seal every value of a v1 Secret (data and stringData); already sealed values are kept.

    Mirrors kubeseal's input handling: server-side metadata and the last-applied annotation
    (which would hold the plaintext) are stripped.
    """
    import base64
    import binascii

    if not isinstance(doc, dict) or doc.get("kind") != "Secret" or doc.get("apiVersion") != "v1":
        raise CliError("input is not a v1 Secret manifest")
    meta = _mapping(doc.get("metadata"), "metadata")
    if not meta.get("name") or not isinstance(meta["name"], str):
        raise CliError("input Secret has no metadata.name")
    for name in _SERVER_FIELDS:
        meta.pop(name, None)
    meta["creationTimestamp"] = None
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    annotations.pop(_LAST_APPLIED, None)
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    values: dict[str, bytes] = {}
    for key, b64 in _string_map(doc, "data").items():
        try:
            values[key] = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise CliError(f"data[{key}] is not valid base64") from None
    for key, text in _string_map(doc, "stringData").items():
        values[key] = text.encode()  # stringData wins, as on the API server
    if not values:
        raise CliError(f"Secret {meta['name']} has no data to seal")
    sealed = {k: v.decode() if _already_sealed(v) else sealer(v) for k, v in sorted(values.items())}
    out: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": meta}
    out["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in sealed.items()}
    for name in ("type", "immutable"):
        if name in doc:
            out[name] = doc[name]
    return out


def _yaml_where(exc: Any) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" (line {mark.line + 1})" if mark is not None else ""


_DUPLICATE_KEY = "duplicate key in a map"


def _no_duplicates_loader() -> Any:
    """A SafeLoader that reads plain scalars the way kubectl does, and refuses duplicates.

    kubectl turns YAML into JSON with go-yaml's YAML 1.1 rules, which also read ``y``/``n``
    as booleans and ``1e3`` as a number; PyYAML does not. Resolving them as kubectl does
    means such unquoted values are refused (the API server would refuse them) instead of
    being sealed as strings kubectl would never have sent. Duplicate keys are refused because
    PyYAML would silently keep the last one.
    """
    import re as _re

    import yaml

    class Loader(yaml.SafeLoader):
        bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # unhashable key: let PyYAML report it
                    continue
                if dup:
                    raise yaml.constructor.ConstructorError(
                        None, None, _DUPLICATE_KEY, key_node.start_mark
                    )
            return super().construct_mapping(node, deep=deep)

    Loader.yaml_implicit_resolvers = {
        k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", _re.compile(r"^(?:y|Y|n|N)$"), list("yYnN")
    )
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        _re.compile(r"^[-+]?(?:[0-9]+)(?:[eE][-+]?[0-9]+)$"),
        list("-+0123456789"),
    )
    return Loader


def cmd_seal_manifest(args: argparse.Namespace) -> None:
    import yaml

    raw = _read_input(args.file_path, limit=4 * 1024 * 1024, what="Secret manifest")
    try:
        docs = [d for d in yaml.load_all(raw, Loader=_no_duplicates_loader()) if d is not None]
    except yaml.YAMLError as exc:
        if getattr(exc, "problem", None) == _DUPLICATE_KEY:
            raise CliError(f"input has a duplicate key{_yaml_where(exc)}") from None
        raise CliError(f"input is not valid YAML/JSON{_yaml_where(exc)}") from None
    except RecursionError:
        raise CliError("input YAML is nested too deeply") from None
    if not docs:
        raise CliError("input holds no Secret manifest")
    sealer = _envelope_sealer(args)
    sealed = [seal_manifest_doc(d, sealer) for d in docs]
    if args.output == "json":
        text = "\n".join(json.dumps(d, indent=4) for d in sealed) + "\n"
    else:
        text = "---\n".join(yaml.safe_dump(d, sort_keys=True) for d in sealed)
    sys.stdout.write(text)


def _resolver(args: argparse.Namespace) -> Any:
    spec = args.resolver or os.environ.get(DEFAULT_RESOLVER_ENV)
    if not spec:
        return None
    from sealed_secrets.resolver import build_resolver

    return build_resolver(spec, cache_ttl=60.0)


def cmd_unseal(args: argparse.Namespace) -> None:
    from sealed_secrets.unseal import unseal_secret

    sealed = _read_sealed(args)
    out = args.output
    if out is None and args.file_path not in (None, "-"):
        out = f"{args.file_path}.unsealed"  # CoCo `secret unseal` behaviour
    if out not in (None, "-") and not args.force:
        _refuse_existing(out)
    resolver = _resolver(args)
    options = {"aliyun": {"credential_dir": args.aliyun_credential_dir}}
    if args.aliyun_credential_dir is None:
        options = {}
    plaintext = unseal_secret(
        sealed,
        get_resource=resolver.get_resource if resolver is not None else None,
        verify=not args.skip_verification,
        allow_unsigned=args.allow_unsigned,
        key_dir=args.key_path,
        provider_options=options,
        allowed_kids=args.allowed_kid,
    )
    _write_out(plaintext, out, force=args.force)
    if out not in (None, "-"):
        print(f"unsealed to {out}", file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> None:
    from sealed_secrets import jws
    from sealed_secrets import payload as pl
    from sealed_secrets.unseal import decode

    sealed = _read_sealed(args)
    if args.public_key:
        parsed = jws.parse(sealed)
        key = keys.parse_jwk(
            _read_input(args.public_key, limit=64 * 1024, what="public key file"),
            what="public key file",
        )
        jws.verify(parsed, keys.check_es256(keys.public_jwk(key), what="public key file"))
        secret = pl.loads(parsed.payload)
    else:
        resolver = _resolver(args)
        parsed, secret = decode(
            sealed,
            get_resource=resolver.get_resource if resolver is not None else None,
            key_dir=args.key_path,
            allowed_kids=args.allowed_kid,
        )
    info = {"kid": parsed.kid, "verified": True, **secret.to_json()}
    if isinstance(secret, pl.EnvelopeSecret):  # ciphertext is noise to a human reader
        for name in ("encrypted_key", "encrypted_data", "iv"):
            info[name] = f"<{len(getattr(secret, name))} base64 chars>"
    print(json.dumps(info, indent=2))


# --- parser ------------------------------------------------------------------------------


def _provider_parsers(kms: Any, func: Callable[[argparse.Namespace], None]) -> None:
    a = kms.add_parser("asym", aliases=["coco-csi-asym"], help="wrap to a public key (offline)")
    a.add_argument("--public-key", required=True, help="recipient public JWK or PEM file")
    a.set_defaults(func=func, kms="asym")
    ali = kms.add_parser("ali", aliases=["aliyun"], help="wrap with Alibaba Cloud KMS")
    ali.add_argument("--region-id", required=True)
    ali.add_argument("--kms-instance-id", help="KMS instance (endpoint <id>.cryptoservice…)")
    ali.add_argument("--endpoint", help="KMS endpoint host[:port] override")
    ali.add_argument(
        "--guest-token-path",
        required=True,
        help="path of the AK:SK:STS file *inside the guest* (written into provider_settings)",
    )
    ali.add_argument("--credential-file", help="local AK:SK[:STS] file used to seal")
    ali.add_argument("--ca", help="CA bundle for the KMS endpoint")
    ali.set_defaults(func=func, kms="ali")


def _allowed_kid_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allowed-kid",
        action="append",
        default=[],
        metavar="KID",
        help="KBS signing-key kid this command may fetch through --resolver: exact "
        "kbs:///repo/type/tag or a prefix ending in / (repeatable; default: none)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Seal, unseal and verify CoCo sealed secrets (sealed.<jws>)."
    )
    sub = p.add_subparsers(dest="command", required=True)

    kg = sub.add_parser("keygen", help="generate an ES256 signing key pair (or a sealing pair)")
    kg.add_argument(
        "--kid", help=f"key id and file name prefix (default {keys.DEFAULT_SIGNING_KID})"
    )
    kg.add_argument("--output-dir", default=".", help="directory for <kid>-private/public.json")
    kg.add_argument(
        "--sealing",
        type=str.upper,
        choices=["EC", "RSA"],
        help="generate a coco-csi-asym sealing key pair instead (private half goes to KBS)",
    )
    kg.set_defaults(func=cmd_keygen)

    seal = sub.add_parser("seal", help="produce a signed sealed string on stdout")
    seal.add_argument("--signing-kid", required=True, help="kid written into the JWS header")
    seal.add_argument("--signing-jwk-path", required=True, help="private ES256 JWK file")
    ss = seal.add_subparsers(dest="kind", required=True)

    v = ss.add_parser("vault", help="seal a reference to a value held by the provider")
    v.add_argument("-r", "--resource-uri", required=True, help="kbs:///repo/type/tag or name")
    v.add_argument("-p", "--provider", required=True, help="kbs | aliyun")
    v.add_argument("--provider-settings", type=_json_arg, default={}, metavar="JSON")
    v.add_argument("-a", "--annotations", type=_json_arg, default={}, metavar="JSON")
    v.set_defaults(func=cmd_seal_vault)

    e = ss.add_parser("envelope", help="encrypt a value under a provider-wrapped data key")
    e.add_argument("-k", "--key-id", required=True, help="KMS key id / kbs:// URI of private key")
    e.add_argument("-f", "--file-path", help="plaintext file (default: stdin)")
    e.add_argument("--wrap-type", choices=["A256GCM", "A256CTR"], default="A256GCM")
    kms = e.add_subparsers(dest="kms", required=True)
    _provider_parsers(kms, cmd_seal_envelope)

    m = ss.add_parser(
        "manifest", help="seal every value of a v1 Secret manifest (kubeseal-style pipe)"
    )
    m.add_argument("-k", "--key-id", required=True, help="KMS key id / kbs:// URI of private key")
    m.add_argument("-f", "--file-path", help="Secret YAML/JSON (default: stdin)")
    m.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    m.add_argument("--wrap-type", choices=["A256GCM", "A256CTR"], default="A256GCM")
    mk = m.add_subparsers(dest="kms", required=True)
    _provider_parsers(mk, cmd_seal_manifest)

    u = sub.add_parser("unseal", help="verify and unseal (needs access to the key broker)")
    u.add_argument("sealed", nargs="?", help="sealed string (default: -f or stdin)")
    u.add_argument("-f", "--file-path", help="file holding the sealed string (- for stdin)")
    u.add_argument(
        "-o",
        "--output",
        help="output file, created new with mode 0600 (default <file>.unsealed or stdout)",
    )
    u.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output file atomically (never writes through a symlink)",
    )
    u.add_argument("-k", "--key-path", help="directory of verification keys named by kid")
    u.add_argument(
        "--resolver",
        help=f"offline-fs:/f.json | kbs:URL?aa=… | cdh:unix://… (env {DEFAULT_RESOLVER_ENV})",
    )
    _allowed_kid_arg(u)
    u.add_argument("-s", "--skip-verification", action="store_true")
    u.add_argument("--allow-unsigned", action="store_true", help="accept legacy fakejwsheader")
    u.add_argument("--aliyun-credential-dir", help="in-guest aliyun credential directory")
    u.set_defaults(func=cmd_unseal)

    ver = sub.add_parser("verify", help="check the signature and print the payload metadata")
    ver.add_argument("sealed", nargs="?", help="sealed string (default: -f or stdin)")
    ver.add_argument("-f", "--file-path", help="file holding the sealed string (- for stdin)")
    ver.add_argument("-k", "--key-path", help="directory of verification keys named by kid")
    ver.add_argument("--public-key", help="verify with this public JWK instead of kid lookup")
    ver.add_argument("--resolver", help="resolver spec for kbs:// kids")
    _allowed_kid_arg(ver)
    ver.set_defaults(func=cmd_verify)
    return p


def _die(msg: str, code: int = 1) -> NoReturn:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (SealedSecretError, CliError) as exc:
        _die(f"{type(exc).__name__}: {exc}" if isinstance(exc, SealedSecretError) else str(exc))
    except OSError as exc:
        _die(f"{exc.strerror or 'I/O error'}")
    except KeyboardInterrupt:
        _die("interrupted", 130)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
