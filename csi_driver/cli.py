"""`coco-csi`: run the node or controller plugin, or the end-to-end demo.

Errors end in one readable line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING

from csi_driver.constants import DRIVER_NAME, VENDOR_VERSION
from csi_driver.core.node import DEFAULT_KUBELET_DIR, DEFAULT_MAX_PARALLEL
from csi_driver.mounter import DEFAULT_MOUNTER, MOUNTERS
from csi_driver.volumes.objectmount import DEFAULT_CONTROL_DIR
from sealed_secrets.resource_uri import is_hostless_prefix

if TYPE_CHECKING:
    from csi_driver.core.node import NodeCore
    from csi_driver.server import Plugin
    from csi_driver.volumes.objectdelete import ObjectDeleter
    from csi_driver.volumes.objectmount import ObjectNodePolicy
    from sealed_secrets.resolver import Resolver

log = logging.getLogger("csi_driver.cli")


def _object_flags(sp: argparse.ArgumentParser) -> None:
    """The sealed-secret and object-store policy flags, the same for the node and the
    controller (which uses them only to delete ``onDelete: delete`` volumes), so a
    confidential controller is configured exactly like the node."""
    sp.add_argument(
        "--allowed-signing-kid",
        action="append",
        default=[],
        metavar="PREFIX",
        help="(repeatable) kid prefix a sealed secret's signing key must match",
    )
    sp.add_argument(
        "--allowed-object-endpoint",
        action="append",
        default=[],
        metavar="HOST",
        help="(repeatable) an object-store volume's endpoint host must be HOST (or match "
        "*.SUFFIX); none: object-store volumes are refused",
    )
    sp.add_argument(
        "--allowed-object-bucket",
        action="append",
        default=[],
        metavar="BUCKET[/PREFIX]",
        help="(repeatable) object-store volumes must lie in BUCKET (under PREFIX); "
        "none: any bucket on an allowed endpoint",
    )
    sp.add_argument(
        "--object-ca-bundle",
        default=None,
        metavar="FILE",
        help="trust only these CAs for object-store endpoints (default: the system store)",
    )
    sp.add_argument(
        "--allow-plaintext-object-credentials",
        action="store_true",
        help="accept object-store credentials and passphrases that are not sealed "
        "(they then passed through the host in clear)",
    )
    sp.add_argument(
        "--allow-insecure-object-endpoint",
        action="store_true",
        help="accept plain-http object-store endpoints (loopback tests only)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coco-csi", description=f"{DRIVER_NAME} CSI plugin")
    p.add_argument("--version", action="version", version=f"coco-csi {VENDOR_VERSION}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--endpoint", required=True, help="unix:///path/csi.sock")
        sp.add_argument(
            "--metrics-addr",
            default="",
            help="HOST:PORT for /metrics (off if empty; an empty HOST means 127.0.0.1)",
        )
        sp.add_argument("--log-format", choices=("kv", "json"), default="kv")
        sp.add_argument("--log-level", default="info")

    n = sub.add_parser("node", help="run the node plugin (inside the TEE guest)")
    common(n)
    n.add_argument("--node-id", required=True)
    n.add_argument(
        "--resolver", default="", help="offline-fs:/f.json | kbs:https://.. | cdh:unix://.."
    )
    n.add_argument("--state-dir", default="/var/lib/coco-csi")
    n.add_argument("--mounter", choices=sorted(MOUNTERS), default=DEFAULT_MOUNTER)
    n.add_argument("--backend-root", default=None, help="locate volumes as ROOT/<volume_id>")
    n.add_argument(
        "--kubelet-dir",
        default=DEFAULT_KUBELET_DIR,
        help="kubelet's root directory; every target path must lie below it",
    )
    n.add_argument(
        "--cipher-dir-root",
        action="append",
        default=[],
        metavar="DIR",
        help="(repeatable) a volume_context cipherDir must lie below one of these "
        "(without it and without --backend-root, cipherDir is refused)",
    )
    n.add_argument(
        "--block-image-root",
        action="append",
        default=[],
        metavar="DIR",
        help="(repeatable; tests/operators) a block volume's devicePath may be an image file "
        "below DIR (default: block devices under /dev only)",
    )
    n.add_argument(
        "--block-accept-unbound-header",
        action="store_true",
        help="open LUKS2 block volumes whose header lacks coco-csi's binding token (disks "
        "CDH or cryptsetup made); the header profile is still enforced",
    )
    n.add_argument(
        "--allowed-key-resource",
        action="append",
        default=[],
        metavar="PREFIX",
        help="(repeatable) kbs:/// prefix a keyResource must lie under (none: all refused)",
    )
    _object_flags(n)
    n.add_argument(
        "--object-control-dir",
        default=DEFAULT_CONTROL_DIR,
        metavar="DIR",
        help="where object-store daemons' credential sockets live (guest memory: a tmpfs "
        f"such as /run; created 0700; default {DEFAULT_CONTROL_DIR})",
    )
    n.add_argument(
        "--max-parallel",
        type=int,
        default=DEFAULT_MAX_PARALLEL,
        help="publish/unpublish/stats calls at once; more get RESOURCE_EXHAUSTED",
    )
    n.add_argument(
        "--volume-metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start each volume daemon with /metrics on a loopback port and show its series "
        "on this plugin's /metrics, labelled volume_id and target_path (default: on when "
        "--metrics-addr is set)",
    )
    n.add_argument("--max-volumes", type=int, default=0)
    n.add_argument("--no-allow-other", action="store_true", help="mount without allow_other")
    n.add_argument("--unmount-on-exit", action="store_true", help="unmount everything on exit")
    n.add_argument(
        "--with-controller",
        action="store_true",
        help="also serve the controller on this endpoint (single node, csi-sanity); "
        "it allocates volumes under --backend-root",
    )
    n.add_argument(
        "--default-key-resource", default=None, help="with --with-controller: kbs:///repo/type/tag"
    )

    c = sub.add_parser("controller", help="run the controller plugin (local directory backend)")
    common(c)
    c.add_argument("--backend-root", required=True)
    c.add_argument("--default-key-resource", default=None, help="kbs:///repo/type/tag")
    c.add_argument(
        "--resolver",
        default="",
        help="only in a confidential controller pod: unseal bucket credentials to delete "
        "object-store volumes whose class says onDelete: delete, and initialise new "
        "object-store prefixes in CreateVolume (same specs as the node's)",
    )
    c.add_argument(
        "--allowed-key-resource",
        action="append",
        default=[],
        metavar="PREFIX",
        help="(repeatable; confidential controller) kbs:/// prefix a keyResource must lie "
        "under for CreateVolume to derive the key and initialise an object-store prefix "
        "(the node's list; none: keyResource volumes are initialised by the node)",
    )
    _object_flags(c)

    d = sub.add_parser("demo", help="provision, publish, use and delete a volume end to end")
    d.add_argument("--mounter", choices=sorted(MOUNTERS), default=DEFAULT_MOUNTER)
    d.add_argument("--verbose", action="store_true", help="show plugin logs")

    vk = sub.add_parser("volume-key", help="volume root keys for the KBS")
    vk_sub = vk.add_subparsers(dest="vk_cmd", required=True)
    vk_new = vk_sub.add_parser(
        "new", help="print a new coco-csi volume key JWK (store it as the KBS keyResource)"
    )
    vk_new.add_argument("--kid", default=None, help="optional kid member")
    vk_new.add_argument(
        "-o", "--output", default="-", help="write to a new file (mode 0600) instead of stdout"
    )
    return p


def _check_prefixes(values: list[str], flag: str, *, kbs: bool) -> list[str]:
    for v in values:
        if not v or any(ord(c) < 0x21 or ord(c) == 0x7F for c in v):
            raise ValueError(f"{flag} must be a non-empty prefix without spaces or control chars")
        if kbs and not is_hostless_prefix(v):
            raise ValueError(f"{flag} {v!r} must be a kbs:/// prefix")
    return values


def _volume_key_new(args: argparse.Namespace) -> int:
    import os

    from csi_driver.volume_key import new_volume_key_jwk

    text = new_volume_key_jwk(args.kid)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(args.output, flags, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
    return 0


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def _run_node(args: argparse.Namespace) -> int:
    _check_with_controller(args)
    from csi_driver.core.node import NodeCore
    from csi_driver.metrics import Metrics
    from csi_driver.resolver import build
    from csi_driver.server import socket_path, start_node

    socket_path(args.endpoint)  # reject a bad endpoint before touching anything
    _check_prefixes(args.allowed_key_resource, "--allowed-key-resource", kbs=True)
    _check_prefixes(args.allowed_signing_kid, "--allowed-signing-kid", kbs=False)
    if not args.allowed_key_resource:
        log.warning("no --allowed-key-resource: volumes with a keyResource cannot publish")
    volume_metrics = _volume_metrics(args)
    resolver = build(args.resolver) if args.resolver else None
    if resolver is None:
        log.warning("no --resolver: Probe reports not ready and keyed volumes cannot publish")
    metrics = Metrics()
    core = NodeCore(
        args.node_id,
        args.state_dir,
        resolver,
        mounter=args.mounter,
        backend_root=args.backend_root,
        allow_other=not args.no_allow_other,
        max_volumes=args.max_volumes,
        metrics=metrics,
        kubelet_dir=args.kubelet_dir,
        cipher_roots=args.cipher_dir_root,
        block_image_roots=args.block_image_root,
        block_require_binding=not args.block_accept_unbound_header,
        allowed_key_resources=args.allowed_key_resource,
        allowed_signing_kids=args.allowed_signing_kid,
        max_parallel=args.max_parallel,
        object_policy=dataclasses.replace(
            _object_policy(args), control_dir=args.object_control_dir
        ),
        daemon_metrics=volume_metrics,
    )
    if volume_metrics:
        metrics.add_volume_daemons(core.supervisor.metric_endpoints)
    if args.metrics_addr:
        metrics.serve(args.metrics_addr)
    if args.with_controller:
        plugin = _start_with_controller(args, core)
    else:
        plugin = start_node(args.endpoint, core)
    _wait_for_signal()
    plugin.stop(unmount=args.unmount_on_exit)
    return 0


def _volume_metrics(args: argparse.Namespace) -> bool:
    """--volume-metrics: on with --metrics-addr unless --no-volume-metrics; asked for
    without --metrics-addr it is an error (daemons would serve what nobody can scrape)."""
    if args.volume_metrics is None:
        return bool(args.metrics_addr)
    if args.volume_metrics and not args.metrics_addr:
        raise ValueError("--volume-metrics needs --metrics-addr")
    return bool(args.volume_metrics)


def _object_policy(args: argparse.Namespace) -> ObjectNodePolicy:
    from csi_driver.volumes.objectmount import ObjectNodePolicy

    return ObjectNodePolicy(
        allowed_endpoints=tuple(
            _check_prefixes(args.allowed_object_endpoint, "--allowed-object-endpoint", kbs=False)
        ),
        allowed_buckets=tuple(
            _check_prefixes(args.allowed_object_bucket, "--allowed-object-bucket", kbs=False)
        ),
        allow_plaintext_secrets=args.allow_plaintext_object_credentials,
        allow_insecure_http=args.allow_insecure_object_endpoint,
        ca_bundle=args.object_ca_bundle,
    )


def _object_deleter(args: argparse.Namespace, resolver: Resolver | None) -> ObjectDeleter:
    """The controller's deleter; says at start whether it can delete object-store volumes."""
    from csi_driver.volumes.objectdelete import ObjectDeleter

    _check_prefixes(args.allowed_signing_kid, "--allowed-signing-kid", kbs=False)
    key_prefixes = getattr(args, "allowed_key_resource", [])
    _check_prefixes(key_prefixes, "--allowed-key-resource", kbs=True)
    deleter = ObjectDeleter(
        resolver,
        _object_policy(args),
        tuple(args.allowed_signing_kid),
        allowed_key_resources=tuple(key_prefixes),
    )
    if deleter.enabled:
        log.info(
            "object-store volumes of classes with onDelete: delete are deleted by this "
            "controller, and new object-store prefixes are initialised in CreateVolume (it "
            "unseals bucket credentials and volume keys: run it only as a confidential pod)"
        )
    else:
        log.warning(
            "no --resolver (or no --allowed-object-endpoint): this controller never deletes "
            "object-store volumes; DeleteVolume keeps their objects, and classes with "
            "onDelete: delete are refused"
        )
    return deleter


def _check_with_controller(args: argparse.Namespace) -> None:
    if args.with_controller and not args.backend_root:
        raise ValueError("--with-controller needs --backend-root (where volumes are allocated)")
    if args.default_key_resource and not args.with_controller:
        raise ValueError("--default-key-resource is a controller flag: add --with-controller")


def _start_with_controller(args: argparse.Namespace, core: NodeCore) -> Plugin:
    """Node and controller on one endpoint (--with-controller), volumes under --backend-root."""
    from csi_driver.core.controller import LocalBackend
    from csi_driver.server import start_node_with_controller

    backend = LocalBackend(
        args.backend_root,
        default_key_resource=args.default_key_resource,
        object_deleter=_object_deleter(args, core.resolver),
    )
    return start_node_with_controller(args.endpoint, core, backend)


def _run_controller(args: argparse.Namespace) -> int:
    from csi_driver.core.controller import LocalBackend
    from csi_driver.metrics import Metrics
    from csi_driver.resolver import build
    from csi_driver.server import socket_path, start_controller

    socket_path(args.endpoint)
    metrics = Metrics()
    resolver = build(args.resolver) if args.resolver else None
    backend = LocalBackend(
        args.backend_root,
        default_key_resource=args.default_key_resource,
        object_deleter=_object_deleter(args, resolver),
    )
    if args.metrics_addr:
        metrics.serve(args.metrics_addr)
    plugin = start_controller(args.endpoint, backend, metrics=metrics)
    _wait_for_signal()
    plugin.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    from csi_driver.logsetup import setup_logging
    from fuse_crypt.hardening import disable_core_dumps

    args = _parser().parse_args(argv)
    try:
        if args.cmd == "demo":
            from csi_driver.demo import run_demo

            setup_logging("kv", "info" if args.verbose else "critical")
            return run_demo(mounter=args.mounter)
        if args.cmd == "volume-key":
            return _volume_key_new(args)
        setup_logging(args.log_format, args.log_level)
        disable_core_dumps()  # the plugin holds volume keys: no core file, no ptrace
        if args.cmd == "node":
            return _run_node(args)
        return _run_controller(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one readable line, no traceback
        print(f"coco-csi {args.cmd}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
