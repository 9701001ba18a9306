#!/usr/bin/env python3
"""Mutation testing of the modules that guard secrets and data: one command, a score each.

    ./run mutate                       # every module below, one after the other
    ./run mutate sealed_secrets/jws.py # just one (several may be named)
    ./run mutate --list                # the modules and the tests each is judged by
    ./run mutate --again MODULE        # re-judge only the last run's survivors (after new tests)

Why a separate command: it runs each module's tests once per mutant (hundreds of times), far
too slow for every CI run; CI keeps the normal suite. Run it after changing one of these
modules and keep the score at or above TARGET (docs/testing.md has the last scores and the
surviving mutants judged equivalent).

How: mutmut 3 (the ``mutation`` extra) in a scratch copy of the tree per module
(``.mutation/<module>/``, git-ignored), so the work tree is never mutated and each module is
judged only by its own test files (``MODULES``; a fast in-process file first, so most
mutants die in milliseconds), optionally only in named functions (``FUNCTIONS``). mutmut
copies the product packages to ``mutants/`` and runs pytest there; the suite's own guard
(tests/test_tree_under_test.py, PYTHONPATH from tests/conftest.py) makes spawned tools run
the mutated tree too. Survivors, with their diffs, are written to
``.mutation/<module>/survivors.txt``.

Low impact by default (the machine is shared): ``nice -n 10`` and one worker (``--jobs``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"
TARGET = 0.90
PACKAGES = ("sealed_secrets", "csi_driver", "fuse_crypt", "coco_proto")

# module -> the test files that are meant to catch a bug in it (smallest, most critical first)
MODULES: dict[str, list[str]] = {
    "sealed_secrets/jws.py": ["tests/sealed_secrets/test_jws.py"],
    "sealed_secrets/payload.py": ["tests/sealed_secrets/test_payload.py"],
    "sealed_secrets/jwe.py": [
        "tests/sealed_secrets/test_jwe.py",
        "tests/sealed_secrets/test_kbs_client.py",
    ],
    "sealed_secrets/evidence.py": [
        "tests/sealed_secrets/test_evidence.py",
        "tests/sealed_secrets/test_kbs_client.py",
        "tests/sealed_secrets/test_aa_cdh.py",
        "tests/sealed_secrets/test_kbs_trust.py",
    ],
    "sealed_secrets/kbs_client.py": [
        "tests/sealed_secrets/test_kbs_client_mutants.py",
        "tests/sealed_secrets/test_kbs_client.py",
        "tests/sealed_secrets/test_kbs_trust.py",
        "tests/sealed_secrets/test_no_secret_leaks_kbs.py",
    ],
    "fuse_crypt/contentenc.py": [
        "tests/fuse_crypt/test_contentenc.py",
        "tests/fuse_crypt/test_contentenc_mutants.py",
        "tests/fuse_crypt/test_gocryptfs_vectors.py",
    ],
    "fuse_crypt/nametransform.py": [
        "tests/fuse_crypt/test_nametransform.py",
        "tests/fuse_crypt/test_nametransform_mutants.py",
        "tests/fuse_crypt/test_gocryptfs_vectors.py",
    ],
    "fuse_crypt/configfile.py": [
        "tests/fuse_crypt/test_configfile.py",
        "tests/fuse_crypt/test_configfile_mutants.py",
        "tests/fuse_crypt/test_gocryptfs_vectors.py",
    ],
    "fuse_crypt/luks2/profile.py": [
        "tests/fuse_crypt/test_luks2_profile_mutants.py",
        "tests/fuse_crypt/test_luks2_hostile.py",
        "tests/fuse_crypt/test_luks2_fuzz.py",
    ],
    "fuse_crypt/luks2/header.py": [
        "tests/fuse_crypt/test_luks2_header_mutants.py",
        "tests/fuse_crypt/test_luks2_hostile.py",
        "tests/fuse_crypt/test_luks2_fuzz.py",
    ],
    "fuse_crypt/luks2/binding.py": [
        "tests/fuse_crypt/test_luks2_binding_mutants.py",
        "tests/fuse_crypt/test_luks2_hostile.py",
    ],
    "fuse_crypt/luks2/keyslot.py": [
        "tests/fuse_crypt/test_luks2_keyslot_mutants.py",
        "tests/fuse_crypt/test_luks2_keyslot.py",
        "tests/fuse_crypt/test_luks2_interop.py",
    ],
    "fuse_crypt/luks2/volume.py": [
        "tests/fuse_crypt/test_luks2_volume_mutants.py",
        "tests/fuse_crypt/test_luks2_hostile.py",
        "tests/fuse_crypt/test_luks2_interop.py",
        "tests/fuse_crypt/test_luks2_integrity.py",
    ],
    "fuse_crypt/luks2/segment.py": [
        "tests/fuse_crypt/test_luks2_segment_mutants.py",
        "tests/fuse_crypt/test_luks2_segment.py",
        "tests/fuse_crypt/test_blockloop.py",
    ],
    "fuse_crypt/blockfront/device.py": [
        "tests/fuse_crypt/test_blockfront_mutants.py",
        "tests/fuse_crypt/test_blockfront.py",
    ],
    "fuse_crypt/blockfront/native.py": [
        "tests/fuse_crypt/test_blockloop.py",
    ],
    "fuse_crypt/backend/retrying.py": [
        "tests/fuse_crypt/test_retrying_mutants.py",
        "tests/fuse_crypt/test_retrying.py",
    ],
    "fuse_crypt/backend/transport.py": [
        "tests/fuse_crypt/test_transport_mutants.py",
        "tests/fuse_crypt/test_retrying_mutants.py",
    ],
    "fuse_crypt/backend/oss.py": [
        "tests/fuse_crypt/test_oss_mutants.py",
        "tests/fuse_crypt/test_oss_transport.py",
        "tests/fuse_crypt/test_oss_fuzz.py",
    ],
    "fuse_crypt/backend/s3.py": [
        "tests/fuse_crypt/test_s3_mutants.py",
        "tests/fuse_crypt/test_s3_transport.py",
    ],
    "csi_driver/keys.py": [
        "tests/csi_driver/test_keys_mutants.py",
        "tests/sealed_secrets/test_kid_gate.py",
        "tests/csi_driver/test_node.py",
        "tests/csi_driver/test_mutation_gaps.py",
    ],
    "csi_driver/validate.py": [
        "tests/csi_driver/test_validate_mutants.py",
        "tests/csi_driver/test_core_node_mutants.py",
        "tests/csi_driver/test_attacks.py",
    ],
    "csi_driver/core/node.py": [
        "tests/csi_driver/test_core_node_mutants.py",
        "tests/csi_driver/test_crash_matrix.py",
        "tests/csi_driver/test_node.py",
        "tests/csi_driver/test_mutation_gaps.py",
    ],
    "csi_driver/volumes/objectdelete.py": [
        "tests/csi_driver/test_objectdelete_mutants.py",
        "tests/csi_driver/test_object_delete.py",
        "tests/csi_driver/test_object_uploads.py",
        "tests/csi_driver/test_object_delete_parallel.py",
        "tests/csi_driver/test_object_uploads_mutants.py",
        "tests/csi_driver/test_object_create_init_mutants.py",
        "tests/csi_driver/test_object_create_init.py",
        "tests/csi_driver/test_object_create_init_e2e.py",
    ],
    "fuse_crypt/cli/credsocket.py": [
        "tests/fuse_crypt/test_credsocket_mutants.py",
        "tests/fuse_crypt/test_objectstore_usage.py",
    ],
    "fuse_crypt/cli/usagecache.py": [
        "tests/fuse_crypt/test_objectstore_usage.py",
    ],
    "fuse_crypt/backend/credentials.py": [
        "tests/fuse_crypt/test_credentials_mutants.py",
        "tests/fuse_crypt/test_credential_refresh.py",
    ],
    # the node plugin's bounded fetch of each volume daemon's /metrics, and what it re-exports
    "csi_driver/loopscrape.py": [
        "tests/csi_driver/test_loopscrape_mutants.py",
        "tests/csi_driver/test_volume_metrics.py",
    ],
    "csi_driver/volumemetrics.py": [
        "tests/csi_driver/test_volume_metrics_mutants.py",
        "tests/csi_driver/test_volume_metrics.py",
    ],
}

# module -> the only functions mutated in it ("func" or "Class.method"); a module not named
# here is mutated whole. The node core's publish/stats machinery is judged by the FUSE and
# crash suites; what mutation testing guards there is what checks a request or a state
# record and what removes things (unpublish).
FUNCTIONS: dict[str, list[str]] = {
    "csi_driver/core/node.py": [
        "_require",
        "NodeCore._target",
        "NodeCore._check_record",
        "NodeCore._ephemeral_dir",
        "NodeCore._locate",
        "NodeCore._capacity_hint",
        "NodeCore.unpublish",
        "NodeCore._remove_target",
        "NodeCore._remove_ephemeral",
    ],
    # the unlock, re-key and commit paths and the I/O under them: what decides which key
    # opens, what is written where, and that a header changed under us is not overwritten.
    # Not the format path (format_volume, _kdf_json, _new_keyslot): what it writes is judged
    # by profile.validate on its own output and by cryptsetup (test_luks2_interop.py).
    "fuse_crypt/luks2/volume.py": [
        "_pread",
        "_pwrite",
        "_check_passphrase",
        "is_luks",
        "_slot_order",
        "_try_slot",
        "_unlock",
        "_opened",
        "open_volume",
        "_write_headers",
        "_still_validated",
        "_commit",
        "_free_area",
        "add_passphrase",
        "remove_passphrase",
        "bind_volume",
    ],
    # the one function that runs: the ObjectTransport protocol's stubs (``...``) never
    # execute, so mutating their default values changes nothing (8 mutants, "no tests");
    # test_transport_mutants.py compares every implementation's defaults with them instead
    "fuse_crypt/backend/transport.py": ["ObjectStoreError.__init__"],
    # what parses and bounds the bucket's answers (the SDK plumbing is judged by the peer
    # tests, test_oss_transport.py and test_retrying.py's fault proxy)
    "fuse_crypt/backend/oss.py": [
        "_transient_from",
        "_code",
        "_rid",
        "_map_oss_error",
        "_clean_etag",
        "_meta_out",
        "_meta_in",
        "_check_key",
        "_check_part",
        "_BoundedResponse.read_at_most",
        "_BoundedResponse.read",
        "OssTransport._info",
        "OssTransport.get",
        "OssTransport.list",
        "OssTransport._check_listed",
        "OssTransport.create_multipart",
        "OssTransport.complete_multipart",
    ],
    "fuse_crypt/backend/s3.py": [
        "_code",
        "_etag",
        "_ns",
        "_meta",
        "_size",
        "S3Transport._client_error",
        "S3Transport.head",
        "S3Transport.get",
        "S3Transport._read_body",
        "S3Transport.delete_many",
        "S3Transport.list",
        "S3Transport.create_multipart",
    ],
}

# A surviving mutant whose only change is the text of an error message or a ``what=`` label
# (never which error is raised, nor when) is counted apart: see docs/testing.md.
_MESSAGE_ONLY = re.compile(r"^\s*(raise \w+\(|.*\bwhat=|f?[\"'].*[\"'],?$|None,?$)")


# mutmut's states that count as killed (a test failed, hung or crashed on the mutant)
KILLED = ("killed", "timeout", "segfault", "caught by type check")


@dataclass
class Score:
    module: str
    status: dict[str, str] = field(default_factory=dict)  # mutant -> mutmut status
    diffs: dict[str, str] = field(default_factory=dict)  # surviving mutant -> diff

    def count(self, *states: str) -> int:
        return sum(1 for s in self.status.values() if s in states)

    @property
    def killed(self) -> int:
        return self.count(*KILLED)

    @property
    def survivors(self) -> list[str]:
        return [m for m, s in self.status.items() if s not in KILLED]

    @property
    def message_only(self) -> list[str]:
        return [m for m in self.survivors if _is_message_only(self.diffs.get(m, ""))]

    @property
    def score(self) -> float:
        return self.killed / len(self.status) if self.status else 0.0


def _is_message_only(diff: str) -> bool:
    """Every changed line is an error's text (or its ``what=`` label), inside a raise."""
    lines = diff.splitlines()
    changed = [ln[1:] for ln in lines if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
    in_raise = any("raise " in ln or "what=" in ln for ln in lines)
    return bool(changed) and in_raise and all(_MESSAGE_ONLY.match(ln) for ln in changed)


def _copy_tree(dest: Path, under: str = "") -> None:
    """The files git would commit (tracked + untracked, not ignored): the tree under test.

    ``under``: only that top-level directory, copied over what ``dest`` has (``--again``).
    """
    if dest.exists() and not under:
        shutil.rmtree(dest)
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", under or "."],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    # The gRPC stubs and the two C libraries are build outputs git ignores (setup.py writes
    # them at install): the copy needs them all the same, or nothing that imports coco_proto
    # runs there and the block tests lose their default XTS backend and request loop.
    stubs = [] if under not in ("", "coco_proto") else sorted(ROOT.glob("coco_proto/*_pb2*.py*"))
    if under in ("", "fuse_crypt"):
        stubs += sorted(ROOT.glob("fuse_crypt/*/*.so.0"))
    for src in [ROOT / os.fsdecode(name) for name in filter(None, listed)] + stubs:
        if src.is_file() and not src.is_symlink():
            (dest / src.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / src.relative_to(ROOT))


def _refresh_tests(dest: Path, module: str, functions: list[str]) -> dict[str, str]:
    """``--again``: the last run's statuses (its survivors are judged once more by today's
    tests).

    Valid only for the same mutants, so the module must not have changed since that run;
    the mutants killed then stay killed (tests were only added or sharpened since).
    """
    if not (dest / "mutants").is_dir():
        raise SystemExit(f"mutation: no earlier run of {module} in {dest}; run it afresh")
    if (dest / module).read_bytes() != (ROOT / module).read_bytes():
        raise SystemExit(f"mutation: {module} changed since its last run; run it afresh")
    before = _statuses(dest, functions)
    _copy_tree(dest, "tests")
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    _configure(dest, module, MODULES[module])
    return before


def _statuses(dest: Path, functions: list[str]) -> dict[str, str]:
    """mutant -> mutmut status (of ``functions`` only, if any are named)."""
    out = {}
    listed = _mutmut(dest, "results", "--all", "true", nice=0).stdout
    for line in listed.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name and (not functions or name.partition("__mutmut_")[0] in functions):
            out[name] = status
    return out


def _configure(dest: Path, module: str, tests: list[str]) -> None:
    quote = lambda items: "[" + ", ".join(f'"{i}"' for i in items) + "]"  # noqa: E731
    with open(dest / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write(
            "\n[tool.mutmut]\n"
            f"source_paths = {quote(PACKAGES)}\n"
            f"only_mutate = {quote([module])}\n"
            f"pytest_add_cli_args_test_selection = {quote(tests)}\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x"]\n'
            "use_git_change_detection = false\n"
        )


def _mutmut(
    dest: Path, *args: str, nice: int, tests: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``tests``: the module's test files, in the order each mutant should run them
    (tests/conftest.py sorts by ``COCO_MUTATION_TEST_ORDER``; mutmut's own order is a set's)."""
    cmd = [sys.executable, "-m", "mutmut", *args]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if tests:
        env["COCO_MUTATION_TEST_ORDER"] = os.pathsep.join(tests)
    return subprocess.run(cmd, cwd=dest, capture_output=True, text=True, env=env, check=False)


def _function_names(module: str, only: Sequence[str] = ()) -> list[str]:
    """mutmut's names of the functions in FUNCTIONS[module] (mutants: ``<name>__mutmut_N``),
    or of ``only`` (``--functions``: a subset, to finish a run that was stopped part-way)."""
    dotted = module.removesuffix(".py").replace("/", ".")
    names = []
    for func in only or FUNCTIONS.get(module, []):
        cls, _, name = func.rpartition(".")
        names.append(f"{dotted}.x\u01c1{cls}\u01c1{name}" if cls else f"{dotted}.x_{name}")
    return names


def run_module(
    module: str, *, jobs: int, nice: int, again: bool = False, only: Sequence[str] = ()
) -> Score:
    slug = module.removesuffix(".py").replace("/", ".")
    dest = WORK / slug
    functions = _function_names(module, only)
    before: dict[str, str] = {}
    if again:
        before = _refresh_tests(dest, module, functions)
        names = [n for n, s in before.items() if s not in KILLED]
    else:
        _copy_tree(dest)
        _configure(dest, module, MODULES[module])
        names = [f"{f}*" for f in functions]  # mutmut matches its names with fnmatch
    if names or not again:  # (no names at all would mean every mutant)
        ran = _mutmut(
            dest, "run", "--max-children", str(jobs), *names, nice=nice, tests=MODULES[module]
        )
        log = dest / ("again.log" if again else "run.log")
        log.write_text(ran.stdout + ran.stderr, encoding="utf-8")
        if ran.returncode != 0:
            raise SystemExit(f"mutation: mutmut failed on {module} (see {log})")
    status = _statuses(dest, functions)
    if again:
        # mutmut forgets every verdict when the test list changed (a test file added to
        # MODULES): a mutant killed before and not re-run now keeps its earlier verdict
        for name, was in before.items():
            if was in KILLED and status.get(name) == "not checked":
                status[name] = was
    score = Score(module, status)
    for name in score.survivors:
        score.diffs[name] = _mutmut(dest, "show", name, nice=0).stdout
    with open(dest / "survivors.txt", "w", encoding="utf-8") as f:
        for name in score.survivors:
            kind = "message-only" if name in score.message_only else "behaviour"
            f.write(f"=== {name} [{score.status[name]}, {kind}]\n{score.diffs[name]}\n")
    return score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    p.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    p.add_argument("--nice", type=int, default=10, help="niceness of the run (default 10)")
    p.add_argument("--list", action="store_true", help="print modules and their tests")
    p.add_argument(
        "--again",
        action="store_true",
        help="judge only the last run's survivors again, with the current tests (the module "
        "itself must be unchanged): minutes instead of a full run after adding tests",
    )
    p.add_argument(
        "--functions",
        default="",
        help='comma-separated: mutate only these functions ("func" or "Class.method") of '
        "the one module named, e.g. the part of a run a deadline stopped; the score is theirs",
    )
    args = p.parse_args(argv)
    only = [f for f in args.functions.split(",") if f]
    if only and len(args.modules) != 1:
        p.error("--functions needs exactly one module")
    if args.list:
        for module, tests in MODULES.items():
            only = f" (only {', '.join(FUNCTIONS[module])})" if module in FUNCTIONS else ""
            print(f"{module}{only}: {' '.join(tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        p.error(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    scores = []
    for module in args.modules or list(MODULES):
        print(f"mutation: {module} ...", flush=True)
        s = run_module(module, jobs=args.jobs, nice=args.nice, again=args.again, only=only)
        scores.append(s)
        print(_line(s), flush=True)
    print("\nmodule                          mutants killed survived msg-only  score")
    for s in scores:
        print(_line(s))
    return 0 if all(s.score >= TARGET for s in scores) else 1


def _line(s: Score) -> str:
    flag = "" if s.score >= TARGET else f"  < {TARGET:.0%}"
    return (
        f"{s.module:<31} {len(s.status):>7} {s.killed:>6} {len(s.survivors):>8} "
        f"{len(s.message_only):>8} {s.score:>6.1%}{flag}"
    )


if __name__ == "__main__":
    sys.exit(main())
