"""Build the coco-csi OCI image without a registry or a container daemon (`./run image`).

    mmdebstrap  Debian bookworm rootfs: the `essential` variant plus image/apt-packages.txt
    pip         a venv at /opt/coco-csi with image/requirements.lock (hash-checked) and this
                project's wheel (built from the tree, installed on its own: its hash changes);
                the few dependencies that publish no wheel (SDIST_ONLY) are locked by their
                sdist's hash and built into wheels here, with the locked build backend
    umoci       an OCI image layout, one layer, entrypoint `coco-csi`, labels, tag = version

Reproducible: SOURCE_DATE_EPOCH is the commit time, every Debian version must match
image/debian-packages.lock (drift fails the build; `--update-lock` rewrites the lock after
review), the wheels come from the hash lock, mtimes are clamped, and logs, caches, bytecode and
machine ids are removed, so two builds of one commit give one image digest
(`--check-reproducible` builds twice and compares). An SBOM (CycloneDX JSON, every Debian and
Python package) goes into the image (/usr/share/doc/coco-csi/sbom.cdx.json) and next to it.

    tools/image.py [--out DIR] [--update-lock] [--check-reproducible]
    tools/image.py lock      # re-resolve image/requirements.lock and build-requirements.lock
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
IMAGE_DIR = REPO / "image"
APT_LIST = IMAGE_DIR / "apt-packages.txt"
DEBIAN_LOCK = IMAGE_DIR / "debian-packages.lock"
PY_LOCK = IMAGE_DIR / "requirements.lock"
BUILD_LOCK = IMAGE_DIR / "build-requirements.lock"  # the wheel's build backend
DEFAULT_OUT = REPO / "build" / "image"

SUITE = "bookworm"  # pinned by name: `stable` moves on
SOURCES = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
REPOSITORY = "ghcr.io/confidential-containers/coco-csi"  # charts/coco-csi/values.yaml image
SOURCE_URL = "https://github.com/confidential-containers/coco-csi"
VENV = "/opt/coco-csi"
SBOM_IN_IMAGE = "usr/share/doc/coco-csi/sbom.cdx.json"
# Runtime dependencies the plugins never import, left out of the image (and its lock).
IMAGE_EXCLUDED = {
    # only `kubectl create sealedsecret` (a client tool) talks to the API server; the node
    # pod has no API access at all. With its own dependencies it was 80 of 250 MB.
    "kubernetes",
}
# Dependencies that publish only an sdist (no wheel on PyPI). Exactly these are locked by the
# sdist's sha256 and built into wheels during the build (build_sdists); everything else must
# be a wheel (--only-binary), so a new sdist-only dependency fails `./run image lock` until
# it is reviewed and named here.
SDIST_ONLY = frozenset({"oss2", "crcmod"})
# Compiled modules an sdist's build must produce: crcmod falls back to pure Python silently
# when its C extension fails to build, and oss2 (enable_crc=True in fuse_crypt.backend.oss)
# runs CRC-64 over every body it sends or receives: ~10 MB/s in pure Python, ~300 MB/s in C.
REQUIRED_EXTENSIONS = {"crcmod": "crcmod/_crcfunext.cpython-311-x86_64-linux-gnu.so"}
# This project's own compiled parts (setup.py): the XTS sector loop (without it the block
# daemon decrypts at ~40 % of the speed) and the block daemon's request loop (built against
# libfuse3-dev's headers, which `./run` installs on the build host).
OWN_EXTENSIONS = ("fuse_crypt/luks2/xts_sectors.so.0", "fuse_crypt/blockfront/blockloop.so.0")
# The interpreter that builds the wheels: Debian bookworm's own CPython 3.11, the one the
# image runs, so crcmod's extension is compiled against that interpreter's headers and ABI
# with bookworm's gcc (`./run image` installs python3-dev and gcc).
BUILD_PYTHON = "/usr/bin/python3.11"
# Run-time files that differ between two otherwise identical builds, or have no place in an
# image (paths relative to the rootfs; directories are emptied, not removed).
EMPTIED_DIRS = (
    "dev",
    "tmp",
    "run",
    "var/log",
    "var/cache/apt",
    "var/cache/ldconfig",
    "var/lib/apt/lists",
    "root/.cache",
)
REMOVED_FILES = (
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "var/lib/dpkg/available-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "etc/.pwd.lock",
)


class BuildError(Exception):
    """A build step failed; the message says which and what to do."""


def run(argv: list[str], **kw: object) -> str:
    """Run a command; its stdout, or BuildError with its stderr tail."""
    p = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-25:])
        raise BuildError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed:\n{tail}")
    return str(p.stdout)


@dataclass(frozen=True)
class Source:
    version: str
    revision: str  # the commit, with "-dirty" if the tree has uncommitted changes
    epoch: int  # SOURCE_DATE_EPOCH: the commit time

    @property
    def created(self) -> str:
        return datetime.fromtimestamp(self.epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def tag(self) -> str:
        return self.version


def source_info() -> Source:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    commit = run(["git", "-C", str(REPO), "rev-parse", "HEAD"]).strip()
    epoch = int(run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"]).strip())
    dirty = bool(run(["git", "-C", str(REPO), "status", "--porcelain"]))
    return Source(version, commit + ("-dirty" if dirty else ""), epoch)


def apt_packages() -> list[str]:
    names = [line.split("#", 1)[0].strip() for line in APT_LIST.read_text().splitlines()]
    return [n for n in names if n]


# ---------------------------------------------------------------------------------- wheels


def build_venv(work: Path) -> list[str]:
    """A venv of BUILD_PYTHON with the hash-locked build backend; its pip command line.

    No build isolation anywhere: it would fetch the newest setuptools, which writes every file
    of the wheels built here.
    """
    if not Path(BUILD_PYTHON).is_file():
        raise BuildError(f"{BUILD_PYTHON} is missing: `./run image` installs python3-venv")
    venv = work / "build-venv"
    run([BUILD_PYTHON, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check"]
    run(
        [*pip, "install", "--no-deps", "--only-binary=:all:", "--require-hashes"]
        + ["-r", str(BUILD_LOCK)]
    )
    return pip


def build_wheel(work: Path, pip: list[str], env: dict[str, str]) -> Path:
    """This project's wheel, built from a clean copy of the tree (tracked and new files).

    Building in the worktree would reuse a stale build/lib, which can carry deleted modules.
    The C sector loop (setup.py) is compiled as the sdists are: no debug information, the
    copy's path mapped away, and the build fails if it is missing from the wheel.
    """
    import zipfile

    src = work / "src"
    files = run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"])
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    out = work / "wheel"
    flags = f"-g0 -ffile-prefix-map={src}=/usr/src/coco-csi -ffile-prefix-map={work}=/build"
    run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        env=dict(env, CFLAGS=flags),
    )
    (wheel,) = out.glob("coco_csi-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for own in OWN_EXTENSIONS:
        if own not in names:
            raise BuildError(f"{wheel.name}: {own} was not built")
    return wheel


def binary_flags() -> list[str]:
    """Wheels only, except the SDIST_ONLY packages, which come only as sdists."""
    return ["--only-binary=:all:", "--no-binary=" + ",".join(sorted(SDIST_ONLY))]


def download_locked(dest: Path, pip: list[str]) -> None:
    """The locked wheels and sdists, each checked against its sha256 in the lock.

    pip reads an sdist's metadata by running its setup: with the locked backend
    (--no-build-isolation), not whatever an isolated build would fetch.
    """
    run(
        [*pip, "download", "--no-deps", "--no-build-isolation", *binary_flags()]
        + ["--require-hashes", "-r", str(PY_LOCK), "-d", str(dest)]
    )
    names = {_dist_name(f.name) for f in dest.glob("*.tar.gz")}
    if names != {n for n in SDIST_ONLY if n in locked_names()}:
        raise BuildError(f"sdists downloaded: {sorted(names)}; SDIST_ONLY: {sorted(SDIST_ONLY)}")


def _dist_name(filename: str) -> str:
    """The normalized project name of a wheel or sdist file name."""
    return re.sub(r"[-_.]+", "-", re.split(r"-\d", filename, maxsplit=1)[0]).lower()


def locked_names() -> set[str]:
    """The normalized names pinned in image/requirements.lock."""
    names = set()
    for line in PY_LOCK.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            names.add(re.sub(r"[-_.]+", "-", line.split("==", 1)[0].strip()).lower())
    return names


def build_sdists(wheelhouse: Path, work: Path, pip: list[str], env: dict[str, str]) -> None:
    """Replace each hash-checked sdist in the wheelhouse with a wheel built from it.

    Reproducible: unpacked to one path per package and version, compiled without debug
    information and with that path mapped to /usr/src/NAME-VERSION (nothing of the build
    directory reaches the binary), SOURCE_DATE_EPOCH for the wheel's timestamps. A missing
    REQUIRED_EXTENSIONS module fails the build instead of shipping the slow fallback.
    """
    import tarfile
    import zipfile

    for sdist in sorted(wheelhouse.glob("*.tar.gz")):
        base = sdist.name.removesuffix(".tar.gz")
        unpacked = work / "sdist"
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():  # hash-pinned, but still: plain files under base/
                parts = Path(m.name).parts
                if not (m.isfile() or m.isdir()) or not parts or parts[0] != base or ".." in parts:
                    raise BuildError(f"{sdist.name}: unexpected member {m.name!r}")
            tar.extractall(unpacked)  # members checked above
        tree = unpacked / base
        if not (tree / "setup.py").is_file() and not (tree / "pyproject.toml").is_file():
            raise BuildError(f"{sdist.name} does not unpack to {base}/")
        flags = f"-g0 -ffile-prefix-map={tree}=/usr/src/{base} -ffile-prefix-map={work}=/build"
        build_env = dict(env, CFLAGS=flags)
        out = work / "sdist-wheels"
        run(
            [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(tree)],
            env=build_env,
            cwd=tree,
        )
        name = _dist_name(sdist.name)
        (wheel,) = (w for w in out.glob("*.whl") if _dist_name(w.name) == name)
        need = REQUIRED_EXTENSIONS.get(name)
        if need and need not in zipfile.ZipFile(wheel).namelist():
            raise BuildError(f"{sdist.name}: {need} was not built (its C compiler step failed)")
        shutil.move(wheel, wheelhouse / wheel.name)
        sdist.unlink()


def wheel_lock(dest: Path) -> None:
    """image/requirements.lock without the SDIST_ONLY entries (their wheels are built here,
    so the sdist hashes cannot match them: they were checked at download)."""
    kept, skip = [], False
    for line in PY_LOCK.read_text().splitlines():
        if not line.startswith((" ", "#")):
            skip = re.sub(r"[-_.]+", "-", line.split("==", 1)[0].strip()).lower() in SDIST_ONLY
        if not skip:
            kept.append(line)
    dest.write_text("\n".join(kept) + "\n")


def image_requirements() -> list[str]:
    """pyproject's runtime dependencies, minus IMAGE_EXCLUDED."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    name = re.compile(r"[A-Za-z0-9._-]+")
    kept = []
    for dep in deps:
        m = name.match(dep)
        if not m or m.group(0).lower() not in IMAGE_EXCLUDED:
            kept.append(dep)
    return kept


def resolve_locked(requirements: list[str]) -> list[str]:
    """`name==version --hash=sha256:...` for everything these requirements install here."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            + ["--dry-run", "--ignore-installed", *binary_flags(), "--report", str(report)]
            + requirements
        )
        items = json.loads(report.read_text())["install"]
    lines = []
    for item in sorted(items, key=lambda i: i["metadata"]["name"].lower()):
        meta = item["metadata"]
        sha = item["download_info"]["archive_info"]["hashes"]["sha256"]
        if not item["download_info"]["url"].endswith(".whl"):
            lines.append("# sdist only (tools/image.py SDIST_ONLY): built into a wheel per build")
        lines.append(f"{meta['name'].lower()}=={meta['version']} \\\n    --hash=sha256:{sha}")
    return lines


def write_python_locks() -> None:
    """Resolve the image's dependencies and the wheel's build backend; write both locks."""
    header = [
        "# Pinned with hashes for CPython 3.11 on manylinux x86_64 (as in Debian bookworm).",
        "# Regenerate: `./run image lock`. Installed with pip --require-hashes --no-deps.",
    ]
    runtime = [
        "# The coco-csi image's Python dependencies; the project's own wheel is separate.",
        *header,
        f"# Left out (tools/image.py IMAGE_EXCLUDED): {', '.join(sorted(IMAGE_EXCLUDED))}.",
    ]
    PY_LOCK.write_text("\n".join(runtime + resolve_locked(image_requirements())) + "\n")
    backend = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    build = ["# What builds the coco-csi wheel (pyproject [build-system] requires).", *header]
    BUILD_LOCK.write_text("\n".join(build + resolve_locked(list(backend))) + "\n")


# ---------------------------------------------------------------------------------- rootfs


def mmdebstrap(
    rootfs: Path, wheelhouse: Path, lock: Path, wheel: Path, env: dict[str, str]
) -> None:
    """The Debian rootfs with the venv installed by customize hooks (inside the chroot)."""

    def q(path: Path) -> str:
        return shlex.quote(str(path))

    built = sorted(
        (w for w in wheelhouse.glob("*.whl") if _dist_name(w.name) in SDIST_ONLY),
        key=lambda w: w.name,
    )
    pip_env = "PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1"
    pip = f'chroot "$1" env {pip_env} {VENV}/bin/python -m pip'
    install = "install -q --no-index --no-compile --no-deps --find-links /tmp/wheels"
    hooks = [
        f'mkdir "$1/tmp/wheels" && cp {q(wheelhouse)}/*.whl {q(wheel)} "$1/tmp/wheels/"',
        f'cp {q(lock)} "$1/tmp/wheels/requirements.lock"',
        f'chroot "$1" env {pip_env} python3 -m venv {VENV}',
        f"{pip} {install} --require-hashes -r /tmp/wheels/requirements.lock",
        # the wheels built from the SDIST_ONLY sdists (hash-checked at download)
        *(f"{pip} {install} /tmp/wheels/{w.name}" for w in built),
        f"{pip} {install} /tmp/wheels/{wheel.name}",
        # pip/setuptools only served the install; the image does not install anything later.
        f"{pip} uninstall -q -y pip setuptools",
        # manylinux wheels assume system libraries (libstdc++ for grpcio): fail here, not at
        # the plugin's first import in a cluster
        f'! chroot "$1" sh -c "find {VENV} -name \'*.so*\' -type f -exec ldd {{}} +"'
        " | grep -B20 'not found'",
        'rm -rf "$1/tmp/wheels"',
    ]
    argv = [
        "mmdebstrap",
        "--variant=essential",
        "--mode=root",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--include=" + ",".join(apt_packages()),
        # no manuals, translations or docs beyond the copyright files (licences stay)
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        *(f"--customize-hook={h}" for h in hooks),
        SUITE,
        str(rootfs),
        *SOURCES,
    ]
    run(argv, env=env)


def debian_packages(rootfs: Path) -> list[tuple[str, str, str]]:
    """(name, version, arch) of every installed Debian package, sorted."""
    out = run(
        ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W"]
        + ["-f", "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"]
    )
    rows = []
    for line in out.splitlines():
        status, name, version, arch = line.split("\t")
        if status.startswith("ii"):
            rows.append((name, version, arch))
    return sorted(rows)


def check_debian_lock(rows: list[tuple[str, str, str]], update: bool) -> list[str]:
    """Differences from image/debian-packages.lock (or rewrite it when ``update``)."""
    text = "".join(f"{n}={v}\n" for n, v, _ in rows)
    header = (
        f"# Every Debian package in the coco-csi image ({SUITE}, -updates, -security), as\n"
        "# installed. A build that resolves anything else fails; review the change, then\n"
        "# `./run image --update-lock`.\n"
    )
    if update:
        DEBIAN_LOCK.write_text(header + text)
        return []
    want = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in DEBIAN_LOCK.read_text().splitlines()
        if line and not line.startswith("#")
    }
    have = {n: v for n, v, _ in rows}
    drift = [
        f"  {n}: locked {want.get(n, '(absent)')}, got {have.get(n, '(absent)')}"
        for n in sorted(set(want) | set(have))
        if want.get(n) != have.get(n)
    ]
    return drift


def set_changes(drift: list[str]) -> list[str]:
    """The drift lines that are not Debian's own updates of a locked package.

    deb.debian.org serves only the newest version of each package, so a stable point release
    or a security update moves locked versions forward without anything here changing; that
    drift is reviewed when the lock is rewritten (`./run image` refuses it) but must not turn
    the test suite red. A package added or removed, or a version going *backwards* (a mirror
    serving something older than what was reviewed), is a change to what the image is made
    of, and is always reported.
    """
    changes = []
    for line in drift:
        m = re.fullmatch(r"  (\S+): locked (\S+), got (\S+)", line)
        if m is None or "(absent)" in (m[2], m[3]):
            changes.append(line)
            continue
        newer = subprocess.run(["dpkg", "--compare-versions", m[3], "gt", m[2]], check=False)
        if newer.returncode != 0:
            changes.append(line)
    return changes


def drift_error(drift: list[str]) -> BuildError:
    return BuildError(
        f"Debian packages drifted from {DEBIAN_LOCK.relative_to(REPO)} (a {SUITE} point "
        "release or security update):\n" + "\n".join(drift) + "\nReview, then rerun with "
        "`./run image --update-lock` and commit the lock."
    )


def python_packages(rootfs: Path) -> list[tuple[str, str]]:
    """(name, version) of every distribution in the image's venv, sorted."""
    import importlib.metadata as md

    site = next((rootfs / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
    rows = {(d.metadata["Name"], d.version) for d in md.distributions(path=[str(site)])}
    return sorted(rows, key=lambda r: r[0].lower())


def sbom(src: Source, debs: list[tuple[str, str, str]], pys: list[tuple[str, str]]) -> bytes:
    """A CycloneDX 1.5 JSON SBOM; its serial number derives from its content (reproducible)."""
    comps = [
        {
            "type": "library" if n != "coco-csi" else "application",
            "name": n,
            "version": v,
            "purl": f"pkg:pypi/{re.sub(r'[-_.]+', '-', n).lower()}@{quote(v)}",
        }
        for n, v in pys
    ] + [
        {
            "type": "library",
            "name": n,
            "version": v,
            "purl": f"pkg:deb/debian/{n}@{quote(v, safe='')}?arch={a}&distro=debian-{SUITE}",
        }
        for n, v, a in debs
    ]
    doc = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "timestamp": src.created,
            "component": {
                "type": "container",
                "name": REPOSITORY,
                "version": src.version,
                "properties": [{"name": "vcs-revision", "value": src.revision}],
            },
            "tools": {"components": [{"type": "application", "name": "coco-csi tools/image.py"}]},
        },
        "components": comps,
    }
    body = json.dumps(doc, indent=1, sort_keys=True).encode()
    doc["serialNumber"] = uuid.uuid5(uuid.NAMESPACE_URL, hashlib.sha256(body).hexdigest()).urn
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def scrub(rootfs: Path, epoch: int) -> None:
    """Remove what differs between builds, then clamp every mtime to SOURCE_DATE_EPOCH."""
    for rel in EMPTIED_DIRS:
        d = rootfs / rel
        if d.is_dir() and not d.is_symlink():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    for rel in REMOVED_FILES:
        (rootfs / rel).unlink(missing_ok=True)
    # Bytecode: py3compile's (timestamp-based, compiled in whatever order dpkg ran) and none
    # from pip (--no-compile); then one compileall pass in a fixed order with a fixed hash
    # seed (frozenset constants) and checked-hash pycs (no mtimes): byte-identical every
    # build, and the plugins start in ~0.2 s instead of ~0.9 s (the controller's root
    # filesystem is read-only, so it could not cache them itself).
    for cache in list(rootfs.rglob("__pycache__")):
        shutil.rmtree(cache)
    for pyc in rootfs.rglob("*.pyc"):
        pyc.unlink()
    libs = sorted("/" + str(p.relative_to(rootfs)) for p in (rootfs / "usr/lib").glob("python3*"))
    run(
        ["chroot", str(rootfs), "env", "PYTHONHASHSEED=0", "python3", "-m", "compileall", "-q"]
        + ["--invalidation-mode", "checked-hash", VENV + "/lib", *libs]
    )
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in [*dirnames, *filenames, "."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_mtime > epoch:
                os.utime(p, (epoch, epoch), follow_symlinks=False)


# ---------------------------------------------------------------------------------- OCI


def umoci_pack(rootfs: Path, layout: Path, src: Source) -> str:
    """Pack rootfs as a one-layer OCI image at layout:tag; returns the manifest digest."""
    ref = f"{layout}:{src.tag}"
    labels = {
        "org.opencontainers.image.title": "coco-csi",
        "org.opencontainers.image.version": src.version,
        "org.opencontainers.image.revision": src.revision,
        "org.opencontainers.image.created": src.created,
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.base.name": f"debian:{SUITE}",
    }
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", ref])
    run(
        ["umoci", "insert", "--image", ref, "--history.created", src.created]
        + ["--history.created_by", "tools/image.py (mmdebstrap + venv)", str(rootfs), "/"]
    )
    cfg = ["umoci", "config", "--image", ref, "--no-history", "--created", src.created]
    cfg += ["--os", "linux", "--architecture", "amd64"]
    # The chart gives only args (node/controller ...): the entrypoint is the CLI.
    cfg += ["--config.entrypoint", f"{VENV}/bin/coco-csi", "--config.user", "0:0"]
    cfg += ["--config.workingdir", "/"]
    cfg += ["--config.env", f"PATH={VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    cfg += ["--config.env", "PYTHONDONTWRITEBYTECODE=1"]
    for k, v in labels.items():
        cfg += ["--config.label", f"{k}={v}"]
    run(cfg)
    run(["umoci", "gc", "--layout", str(layout)])
    return manifest_digest(layout, src.tag)


def manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(m["digest"])
    raise BuildError(f"tag {tag} not in {layout}/index.json")


def layer_bytes(layout: Path, digest: str) -> int:
    manifest = json.loads((layout / "blobs" / digest.replace(":", "/", 1)).read_text())
    return sum(int(layer["size"]) for layer in manifest["layers"])


# ---------------------------------------------------------------------------------- driver


def build(out: Path, *, update_lock: bool = False, allow_drift: bool = False) -> dict[str, object]:
    """Build into out/: oci/ (layout, tag = version), sbom.cdx.json, build.json (summary).

    ``allow_drift`` records Debian lock drift in build.json instead of failing: the image
    tests use it so that a Debian security update fails the one lock test, not all of them.
    """
    t0 = time.monotonic()
    out = out.resolve()  # the sdists build in their own directory: no relative paths
    src = source_info()
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(src.epoch), LC_ALL="C.UTF-8", TZ="UTC")
    if out.exists():
        ours = {"oci", "sbom.cdx.json", "build.json"}
        if any(c.name not in ours and not c.name.startswith("coco-image-") for c in out.iterdir()):
            raise BuildError(f"--out {out} holds other files; give a new or a build directory")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="coco-image-", dir=out) as tmp:
        work = Path(tmp)
        pip = build_venv(work)
        wheel = build_wheel(work, pip, env)
        wheelhouse = work / "wheelhouse"
        download_locked(wheelhouse, pip)
        build_sdists(wheelhouse, work, pip, env)
        lock = work / "requirements-wheels.lock"
        wheel_lock(lock)
        rootfs = work / "rootfs"
        mmdebstrap(rootfs, wheelhouse, lock, wheel, env)
        debs = debian_packages(rootfs)
        drift = check_debian_lock(debs, update_lock)
        if drift and not allow_drift:
            raise drift_error(drift)
        pys = python_packages(rootfs)
        bom = sbom(src, debs, pys)
        (rootfs / SBOM_IN_IMAGE).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / SBOM_IN_IMAGE).write_bytes(bom)
        (out / "sbom.cdx.json").write_bytes(bom)
        scrub(rootfs, src.epoch)
        rootfs_bytes = int(run(["du", "-sb", str(rootfs)]).split()[0])
        digest = umoci_pack(rootfs, out / "oci", src)
    summary: dict[str, object] = {
        "image": f"{REPOSITORY}:{src.tag}",
        "layout": str(out / "oci"),
        "tag": src.tag,
        "digest": digest,
        "revision": src.revision,
        "source_date_epoch": src.epoch,
        "compressed_bytes": layer_bytes(out / "oci", digest),
        "rootfs_bytes": rootfs_bytes,
        "debian_packages": len(debs),
        "python_packages": len(pys),
        "debian_lock_drift": drift,
        "debian_lock_set_changes": set_changes(drift),
        "seconds": round(time.monotonic() - t0, 1),
    }
    (out / "build.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run image", description=__doc__.split("\n\n")[0])
    p.add_argument("action", nargs="?", choices=("build", "lock"), default="build")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output dir (build/image)")
    p.add_argument("--update-lock", action="store_true", help="rewrite the Debian version lock")
    p.add_argument(
        "--allow-drift", action="store_true", help="record Debian lock drift, do not fail (tests)"
    )
    p.add_argument(
        "--check-reproducible", action="store_true", help="build twice, compare the digests"
    )
    a = p.parse_args(argv)
    try:
        if a.action == "lock":
            write_python_locks()
            print(f"wrote {PY_LOCK.relative_to(REPO)} and {BUILD_LOCK.relative_to(REPO)}")
            return 0
        first = build(a.out, update_lock=a.update_lock, allow_drift=a.allow_drift)
        print(json.dumps(first, indent=1))
        if a.check_reproducible:
            second = build(a.out.with_name(a.out.name + "-again"), allow_drift=a.allow_drift)
            same = first["digest"] == second["digest"]
            print(f"second build: {second['digest']} ({second['seconds']} s)")
            print("reproducible: same digest" if same else "NOT reproducible: digests differ")
            return 0 if same else 1
        return 0
    except BuildError as e:
        print(f"image: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
