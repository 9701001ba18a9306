"""A rendered pod container as a `podman run` command line, the way kubelet would run it.

Everything comes from the manifest: the image, the args (with kubelet's $(VAR) expansion from
the container's env), the user, privileges and capabilities from securityContext, and every
volumeMount with its propagation. hostPath volumes live below a fake host root (``/x`` on the
node is ``<host_root>/x`` here; ``/dev`` and ``/dev/fuse`` are the real ones) and emptyDirs
get fresh directories, so one test directory
plays the node's filesystem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Manifest = dict[str, Any]

# Kubernetes mountPropagation -> bind propagation (the kubelet/CRI mapping).
PROPAGATION = {"Bidirectional": "rshared", "HostToContainer": "rslave", "None": "rprivate"}


def container_of(workload: Manifest, name: str) -> dict[str, Any]:
    for c in workload["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name!r} in {workload['metadata']['name']}")


def env_of(c: dict[str, Any], fields: dict[str, str]) -> dict[str, str]:
    """The container's env as kubelet fills it: literal values and downward-API fields."""
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def pod_info(pod: str, uid: str, *, ephemeral: bool = False) -> dict[str, str]:
    """What kubelet adds to NodePublishVolume's volume context (podInfoOnMount) for pod
    ``pod`` in namespace ``apps`` under the default service account."""
    return {
        "csi.storage.k8s.io/pod.name": pod,
        "csi.storage.k8s.io/pod.namespace": "apps",
        "csi.storage.k8s.io/pod.uid": uid,
        "csi.storage.k8s.io/serviceAccount.name": "default",
        "csi.storage.k8s.io/ephemeral": "true" if ephemeral else "false",
    }


def host_source(volume: dict[str, Any], host_root: Path) -> Path:
    """Where a pod volume lives on the fake node."""
    if "hostPath" in volume:
        return host_root / volume["hostPath"]["path"].lstrip("/")
    if "emptyDir" in volume:
        return host_root / "emptydir" / volume["name"]
    raise AssertionError(f"volume {volume['name']}: only hostPath and emptyDir are mapped")


def podman_args(
    workload: Manifest, name: str, host_root: Path, fields: dict[str, str]
) -> tuple[list[str], dict[str, Path]]:
    """`podman run` arguments for container ``name`` and the host source of each mount."""
    c = container_of(workload, name)
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    env = env_of(c, fields)
    sc = c.get("securityContext", {})
    args: list[str] = []
    if sc.get("privileged"):
        args.append("--privileged")
    if "runAsUser" in sc:
        args.append(f"--user={sc['runAsUser']}")
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    for cap in sc.get("capabilities", {}).get("drop", []):
        args.append(f"--cap-drop={cap}")
    for cap in sc.get("capabilities", {}).get("add", []):
        args.append(f"--cap-add={cap}")
    sources: dict[str, Path] = {}
    for m in c.get("volumeMounts", []):
        vol = volumes[m["name"]]
        src = host_source(vol, host_root)
        kind = vol.get("hostPath", {}).get("type", "")
        if src in (host_root / "dev", host_root / "dev/fuse"):
            src = Path("/") / src.relative_to(host_root)  # the real host paths: the devices
        elif kind == "File" or kind == "CharDevice":
            assert src.exists(), f"hostPath {vol['hostPath']['path']} ({kind}) must exist"
        else:
            src.mkdir(parents=True, exist_ok=True)  # DirectoryOrCreate, emptyDir
        sources[m["name"]] = src
        prop = PROPAGATION[m.get("mountPropagation", "None")]
        opts = f"type=bind,src={src},dst={m['mountPath']},bind-propagation={prop}"
        if m.get("readOnly"):
            opts += ",ro"
        args.append(f"--mount={opts}")
    for k, v in env.items():
        args.append(f"--env={k}={v}")
    if c.get("command"):  # replaces the image's entrypoint, as in Kubernetes
        args.append("--entrypoint=" + json.dumps([_expand(a, env) for a in c["command"]]))
    return [*args, c["image"], *(_expand(a, env) for a in c.get("args", []))], sources


def _expand(arg: str, env: dict[str, str]) -> str:
    for k, v in env.items():
        arg = arg.replace(f"$({k})", v)
    return arg
