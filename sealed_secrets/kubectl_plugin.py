"""`kubectl create sealedsecret NAME …`: a Secret whose every value is a CoCo sealed string.

Installed as the console script `kubectl-create-sealedsecret`; kubectl >= 1.29 execs it for
`kubectl create sealedsecret` with the remaining argv verbatim (it parses no flags for us), so
this module accepts `kubectl create secret generic`'s flags plus the kubeconfig flags itself.

Every value is sealed *before* anything leaves the process: with `--dry-run=client` nothing is
sent anywhere, and otherwise the API server (and etcd, and anyone with `get secrets`) only
ever sees `sealed.…` strings. The values are unsealed inside the TEE by CDH (kata's env and
volume handling) or by this project's CSI driver.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from sealed_secrets import keys
from sealed_secrets.errors import SealedSecretError
from sealed_secrets.sealing_options import CliError, aliyun_envelope_options, envelope_sealer

PROG = "kubectl-create-sealedsecret"
KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")
MAX_VALUE = 512 * 1024
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _die(msg: str, code: int = 1) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


# --- gathering values (kubectl create secret generic semantics) --------------------------


def _check_key(key: str, data: dict[str, Any]) -> None:
    if not KEY_RE.fullmatch(key):
        raise CliError(
            f"{key!r} is not valid key name for a Secret (regex used for validation is "
            "'[-._a-zA-Z0-9]+')"
        )
    if key in data:
        raise CliError(f"cannot add key {key}, another key by that name already exists")


def _read_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_VALUE + 1)
    except OSError as exc:
        raise CliError(f"error reading {path}: {exc.strerror}") from None
    if len(data) > MAX_VALUE:
        raise CliError(f"{path} is larger than {MAX_VALUE} bytes")
    return data


def gather_values(
    literals: Iterable[str], files: Iterable[str], env_files: Iterable[str]
) -> dict[str, bytes]:
    """Plaintext values by key, in kubectl's order: literals, files, env files."""
    data: dict[str, bytes] = {}
    for item in literals:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"invalid literal source {key or item!r}, expected key=value")
        _check_key(key, data)
        data[key] = value.encode()
    for spec in files:
        for one in (s for s in spec.split(",") if s):  # StringSlice: comma-splittable
            key, sep, path = one.partition("=")
            if not sep:
                key, path = "", one
            if (sep and not key) or not path:
                raise CliError(f"key names or file paths cannot be empty: {one!r}")
            p = Path(path)
            if p.is_dir():
                if key:
                    raise CliError("cannot give a key name for a directory path")
                for child in sorted(p.iterdir()):
                    if child.is_file() and KEY_RE.fullmatch(child.name):
                        _check_key(child.name, data)
                        data[child.name] = _read_file(child)
                continue
            key = key or p.name
            _check_key(key, data)
            data[key] = _read_file(p)
    for path in env_files:
        raw = _read_file(Path(path)).decode("utf-8", errors="strict")
        for lineno, line in enumerate(raw.lstrip("\ufeff").splitlines(), 1):
            stripped = line.lstrip()
            if not stripped or stripped.startswith("#"):
                continue
            key, sep, value = stripped.partition("=")
            if not sep:
                if key.strip() in os.environ:  # kubectl: bare KEY takes the env value
                    value = os.environ[key.strip()]
                else:
                    continue
            key = key.strip()
            if not key:
                raise CliError(f"{path}:{lineno}: missing key name")
            _check_key(key, data)
            data[key] = value.encode()
    return data


def parse_vault_refs(items: Iterable[str], data: dict[str, Any]) -> dict[str, str]:
    refs: dict[str, str] = {}
    for item in items:
        key, sep, uri = item.partition("=")
        if not sep or not uri:
            raise CliError(f"invalid vault source {item!r}, expected key=kbs:///repo/type/tag")
        _check_key(key, {**data, **refs})
        refs[key] = uri
    return refs


# --- sealing -----------------------------------------------------------------------------


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def seal_all(
    args: argparse.Namespace, values: dict[str, bytes], refs: dict[str, str]
) -> dict[str, str]:
    from sealed_secrets.seal import seal_vault

    kid = args.signing_kid or _env("SEALED_SECRET_SIGNING_KID")
    key_path = args.signing_jwk_path or _env("SEALED_SECRET_SIGNING_JWK")
    if not kid or not key_path:
        raise CliError("--signing-kid and --signing-jwk-path are required (signing is mandatory)")
    signing = keys.load_signing_key(key_path)
    sealed: dict[str, str] = {}
    if values:
        key_id = args.key_id or _env("SEALED_SECRET_KEY_ID")
        if not key_id:
            raise CliError("--key-id is required to seal values")
        public: bytes | None = None
        aliyun: dict[str, Any] | None = None
        if args.provider == "coco-csi-asym":
            pub_path = args.public_key or _env("SEALED_SECRET_PUBLIC_KEY")
            if not pub_path:
                raise CliError("--public-key is required for provider coco-csi-asym")
            public = _read_file(Path(pub_path))
        else:
            if not args.region_id or not args.guest_token_path:
                raise CliError("aliyun needs --region-id and --guest-token-path")
            aliyun = aliyun_envelope_options(
                region_id=args.region_id,
                guest_token_path=args.guest_token_path,
                kms_instance_id=args.kms_instance_id,
                endpoint=args.kms_endpoint,
                credential_file=args.kms_credential_file,
                ca=args.kms_ca,
            )
            if aliyun is None:
                raise CliError("aliyun sealing needs --kms-credential-file or ALIBABA_CLOUD_*")
        seal = envelope_sealer(
            args.provider,
            key_id=key_id,
            signing_key=signing,
            signing_kid=kid,
            public_key_pem=public,
            kms_options=aliyun,
        )
        for name, plaintext in values.items():
            sealed[name] = seal(plaintext)
    for name, uri in refs.items():
        sealed[name] = seal_vault(uri, "kbs", signing_key=signing, signing_kid=kid)
    return sealed


def build_manifest(
    name: str, namespace: str | None, secret_type: str | None, sealed: dict[str, str]
) -> dict[str, Any]:
    """The Secret as `kubectl create secret generic --dry-run=client` would print it."""
    meta: dict[str, Any] = {"name": name, "creationTimestamp": None}
    if namespace:
        meta["namespace"] = namespace
    obj: dict[str, Any] = {"kind": "Secret", "apiVersion": "v1", "metadata": meta}
    obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in sorted(sealed.items())}
    if secret_type:
        obj["type"] = secret_type
    return obj


# --- output and API ----------------------------------------------------------------------


def render(obj: dict[str, Any], output: str | None, *, suffix: str) -> str:
    if output == "json":
        return json.dumps(obj, indent=4) + "\n"
    if output == "yaml":
        text: str = yaml.safe_dump(obj, sort_keys=True, default_flow_style=False)
        return text
    if output == "name":
        return f"secret/{obj['metadata']['name']}\n"
    return f"secret/{obj['metadata']['name']} created{suffix}\n"


def _kubeconfig_path(args: argparse.Namespace) -> str | None:
    return args.kubeconfig or None  # None: the client honours $KUBECONFIG then ~/.kube/config


def _current_namespace(args: argparse.Namespace) -> str:
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=_kubeconfig_path(args))
    except Exception:
        if args.context:  # kubectl's wording when the kubeconfig is missing or lacks it
            raise CliError(f'context "{args.context}" does not exist') from None
        raise CliError("cannot load kubeconfig (use --kubeconfig or KUBECONFIG)") from None
    ctx = active
    if args.context:
        ctx = next((c for c in contexts if c.get("name") == args.context), None)
        if ctx is None:
            raise CliError(f'context "{args.context}" does not exist')
    return (ctx or {}).get("context", {}).get("namespace") or "default"


def _check_context(args: argparse.Namespace) -> None:
    if args.context:
        _current_namespace(args)


def api_client(args: argparse.Namespace) -> Any:
    from kubernetes import client, config

    try:
        api = config.new_client_from_config(
            config_file=_kubeconfig_path(args), context=args.context or None
        )
    except Exception:
        raise CliError("cannot load kubeconfig (use --kubeconfig or KUBECONFIG)") from None
    conf = api.configuration

    def overrides(c: Any) -> None:
        if args.server:
            c.host = args.server
        if args.token:
            c.api_key = {"authorization": f"Bearer {args.token}"}
        if args.insecure_skip_tls_verify:
            c.verify_ssl = False
        if args.certificate_authority:
            c.ssl_ca_cert = args.certificate_authority

    # The client re-applies the kubeconfig before each request (token refresh hook), which
    # would silently undo command-line overrides; re-apply ours after it.
    reload = getattr(conf, "refresh_api_key_hook", None)
    if reload is not None:

        def hook(c: Any) -> None:
            reload(c)
            overrides(c)

        conf.refresh_api_key_hook = hook
    overrides(conf)
    conf.retries = 0
    return client.CoreV1Api(api)


def _api_error(exc: Exception) -> CliError:
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    try:
        st = json.loads(body) if body else {}
    except ValueError:
        st = {}
    if isinstance(st, dict) and st.get("kind") == "Status":
        reason = st.get("reason") or "Unknown"
        return CliError(f"from server ({reason}): {st.get('message', '')}".strip())
    if status:
        return CliError(f"from server: HTTP {status} {getattr(exc, 'reason', '')}".strip())
    return CliError("cannot reach the Kubernetes API server")


def create(args: argparse.Namespace, obj: dict[str, Any]) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    api = api_client(args)
    namespace = args.namespace or _current_namespace(args)
    obj["metadata"].pop("creationTimestamp", None)
    kwargs: dict[str, Any] = {"field_manager": args.field_manager, "_preload_content": False}
    if args.dry_run == "server":
        kwargs["dry_run"] = "All"
    try:
        try:
            # kubernetes>=35's generated client omits Content-Type for request bodies; say it.
            resp = api.create_namespaced_secret(
                namespace, obj, _headers={"Content-Type": "application/json"}, **kwargs
            )
        except TypeError:  # older generated clients: no _headers, but they set the header
            resp = api.create_namespaced_secret(namespace, obj, **kwargs)
    except ApiException as exc:
        raise _api_error(exc) from None
    except Exception:
        raise CliError("cannot reach the Kubernetes API server") from None
    try:
        doc: dict[str, Any] = json.loads(resp.data)
        return doc
    except ValueError:
        raise CliError("the API server returned a non-JSON response") from None


# --- CLI ---------------------------------------------------------------------------------


def _dry_run(value: str) -> str:
    if value in ("unchanged", "true"):
        print(
            "W: --dry-run is deprecated and can be replaced with --dry-run=client.",
            file=sys.stderr,
        )
        return "client"
    if value == "false":
        return "none"
    if value not in ("none", "client", "server"):
        raise argparse.ArgumentTypeError(
            f'Invalid dry-run value ({value}). Must be "none", "server", or "client".'
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubectl create sealedsecret",
        usage="kubectl create sealedsecret NAME [--type=string] [--from-file=[key=]source] "
        "[--from-literal=key1=value1] [--from-vault=key=kbs:///repo/type/tag] "
        "[--dry-run=server|client|none] --signing-kid KID --signing-jwk-path FILE "
        "--key-id ID [--public-key FILE]",
        description="Create a Secret whose values are CoCo sealed strings (sealed before "
        "anything is sent; unsealed only inside the TEE).",
    )
    p.add_argument("name", metavar="NAME")
    g = p.add_argument_group("values (as kubectl create secret generic)")
    g.add_argument("--from-literal", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--from-file", action="append", default=[], metavar="[KEY=]SOURCE")
    g.add_argument("--from-env-file", action="append", default=[], metavar="PATH")
    g.add_argument(
        "--from-vault",
        action="append",
        default=[],
        metavar="KEY=KBS_URI",
        help="seal a reference to a KBS resource (value provisioned separately)",
    )
    g.add_argument("--type", dest="secret_type", help="the Secret type")
    s = p.add_argument_group("sealing")
    s.add_argument("--signing-kid", help="kid in the JWS header (env SEALED_SECRET_SIGNING_KID)")
    s.add_argument("--signing-jwk-path", help="private ES256 JWK (env SEALED_SECRET_SIGNING_JWK)")
    s.add_argument("--provider", choices=["coco-csi-asym", "aliyun"], default="coco-csi-asym")
    s.add_argument("--key-id", help="kbs:// URI of the sealing private key, or KMS key id")
    s.add_argument("--public-key", help="coco-csi-asym recipient public key (JWK or PEM)")
    s.add_argument("--region-id", help="aliyun region")
    s.add_argument("--kms-instance-id", help="aliyun KMS instance")
    s.add_argument("--kms-endpoint", help="aliyun KMS endpoint override")
    s.add_argument("--guest-token-path", help="aliyun: AK:SK:STS file path inside the guest")
    s.add_argument("--kms-credential-file", help="aliyun: local AK:SK[:STS] used to seal")
    s.add_argument("--kms-ca", help="aliyun: CA bundle for the KMS endpoint")
    k = p.add_argument_group("kubectl")
    k.add_argument("-n", "--namespace")
    k.add_argument("--dry-run", nargs="?", const="unchanged", default="none", type=_dry_run)
    k.add_argument("-o", "--output", choices=["yaml", "json", "name"])
    k.add_argument("--kubeconfig")
    k.add_argument("--context")
    k.add_argument("-s", "--server")
    k.add_argument("--token")
    k.add_argument("--certificate-authority")
    k.add_argument("--insecure-skip-tls-verify", action="store_true")
    k.add_argument("--field-manager", default="kubectl-create")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not DNS_SUBDOMAIN.fullmatch(args.name) or len(args.name) > 253:
            raise CliError(f"invalid Secret name {args.name!r}: must be a DNS subdomain")
        values = gather_values(args.from_literal, args.from_file, args.from_env_file)
        refs = parse_vault_refs(args.from_vault, values)
        if not values and not refs:
            raise CliError("no values given (use --from-literal, --from-file, ...)")
        sealed = seal_all(args, values, refs)
        values.clear()  # drop plaintext references as soon as they are sealed
        obj = build_manifest(args.name, args.namespace, args.secret_type, sealed)
        if args.dry_run == "client":
            _check_context(args)
            sys.stdout.write(render(obj, args.output, suffix=" (dry run)"))
            return 0
        created = create(args, obj)
        suffix = " (server dry run)" if args.dry_run == "server" else ""
        sys.stdout.write(render(created, args.output, suffix=suffix))
    except SealedSecretError as exc:
        _die(f"{type(exc).__name__}: {exc}")
    except CliError as exc:
        _die(str(exc))
    except UnicodeDecodeError:
        _die("env file is not valid UTF-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
