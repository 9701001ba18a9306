"""`coco-csi`: run the node or controller plugin, or the end-to-end demo.

Errors end in one readable line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING

from csi_driver.constants import DRIVER_NAME, VENDOR_VERSION
from csi_driver.mounter import DEFAULT_MOUNTER, MOUNTERS

if TYPE_CHECKING:
    from csi_driver.core.node import NodeCore
    from csi_driver.server import Plugin

log = logging.getLogger("csi_driver.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coco-csi", description=f"{DRIVER_NAME} CSI plugin")
    p.add_argument("--version", action="version", version=f"coco-csi {VENDOR_VERSION}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--endpoint", required=True, help="unix:///path/csi.sock")
        sp.add_argument("--metrics-addr", default="", help="HOST:PORT for /metrics (off if empty)")
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

    d = sub.add_parser("demo", help="provision, publish, use and delete a volume end to end")
    d.add_argument("--mounter", choices=sorted(MOUNTERS), default=DEFAULT_MOUNTER)
    d.add_argument("--verbose", action="store_true", help="show plugin logs")
    return p


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
    )
    if args.metrics_addr:
        metrics.serve(args.metrics_addr)
    if args.with_controller:
        plugin = _start_with_controller(args, core)
    else:
        plugin = start_node(args.endpoint, core)
    _wait_for_signal()
    plugin.stop(unmount=args.unmount_on_exit)
    return 0


def _check_with_controller(args: argparse.Namespace) -> None:
    if args.with_controller and not args.backend_root:
        raise ValueError("--with-controller needs --backend-root (where volumes are allocated)")
    if args.default_key_resource and not args.with_controller:
        raise ValueError("--default-key-resource is a controller flag: add --with-controller")


def _start_with_controller(args: argparse.Namespace, core: NodeCore) -> Plugin:
    """Node and controller on one endpoint (--with-controller), volumes under --backend-root."""
    from csi_driver.core.controller import LocalBackend
    from csi_driver.server import start_node_with_controller

    backend = LocalBackend(args.backend_root, default_key_resource=args.default_key_resource)
    return start_node_with_controller(args.endpoint, core, backend)


def _run_controller(args: argparse.Namespace) -> int:
    from csi_driver.core.controller import LocalBackend
    from csi_driver.metrics import Metrics
    from csi_driver.server import socket_path, start_controller

    socket_path(args.endpoint)
    metrics = Metrics()
    backend = LocalBackend(args.backend_root, default_key_resource=args.default_key_resource)
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
