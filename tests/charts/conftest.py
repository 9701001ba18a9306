"""Shared rendering helpers for the chart tests.

The chart is rendered by the real Helm v4 engine that the ``helm-python-sdk`` wheel bundles
(``libhelm_c``, no ``helm`` binary, no cluster), so template errors, schema validation and
``fail`` calls behave exactly as in ``helm install``/``helm template``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm  # the bundled Helm engine (helm-python-sdk, a test extra)
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "coco-csi"
RELEASE = "coco-csi"
NAMESPACE = "coco-system"
KUBE_VERSION = "1.32.0"

Manifest = dict[str, Any]

# The chart has no working default KBS (no URL, no pinned CA: rendering must fail until the
# operator says which KBS to trust). Tests about anything else render on top of this minimal
# production setting; tests about the KBS settings pass ``bare=True``.
KBS_MINIMAL: dict[str, Any] = {
    "resolver": {"kbs": {"url": "https://kbs.example:8443", "caConfigMap": {"name": "kbs-ca"}}}
}


def with_kbs(values: dict[str, Any] | None) -> dict[str, Any]:
    """``values`` deep-merged over KBS_MINIMAL (values win, as with helm -f)."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(KBS_MINIMAL, values or {})


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    loaded = helm.Chart.load(CHART_DIR)
    try:
        yield loaded
    finally:
        loaded.close()


def render_raw(
    chart: Any, values: dict[str, Any] | None = None, *, bare: bool = False
) -> dict[str, str]:
    """Template path → rendered text, as `helm template` would produce it.

    Unless ``bare``, ``values`` are applied over KBS_MINIMAL (see there).
    """
    merged = (values or {}) if bare else with_kbs(values)
    return chart.render(values=merged, name=RELEASE, namespace=NAMESPACE, is_install=True)


def parse_manifests(rendered: dict[str, str]) -> list[Manifest]:
    docs: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__source__", path)
                docs.append(doc)
    return docs


@pytest.fixture(scope="session")
def render(chart: Any) -> Callable[..., list[Manifest]]:
    def _render(values: dict[str, Any] | None = None, *, bare: bool = False) -> list[Manifest]:
        return parse_manifests(render_raw(chart, values, bare=bare))

    return _render


def strip_source(doc: Manifest) -> Manifest:
    return {k: v for k, v in doc.items() if k != "__source__"}


def only(docs: list[Manifest], kind: str, name_part: str = "") -> Manifest:
    found = [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]
    assert len(found) == 1, f"expected one {kind} matching {name_part!r}, got {len(found)}"
    return found[0]


def container(workload: Manifest, name: str) -> dict[str, Any]:
    for c in workload["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r} in {workload['metadata']['name']}")


def host_path_of(workload: Manifest, volume_name: str) -> str:
    for v in workload["spec"]["template"]["spec"]["volumes"]:
        if v["name"] == volume_name:
            return v["hostPath"]["path"]
    raise AssertionError(f"no volume {volume_name!r}")


def mount_of(c: dict[str, Any], volume_name: str) -> dict[str, Any]:
    for m in c.get("volumeMounts", []):
        if m["name"] == volume_name:
            return m
    raise AssertionError(f"container {c['name']} does not mount {volume_name!r}")


def arg_value(c: dict[str, Any], flag: str) -> str:
    """Value of ``--flag=value`` in a container's args (exactly one occurrence)."""
    values = [a.split("=", 1)[1] for a in c["args"] if a.startswith(flag + "=")]
    assert len(values) == 1, f"{c['name']}: expected one {flag}=..., got {values}"
    return values[0]


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) pair in a manifest, leaves and containers alike."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
