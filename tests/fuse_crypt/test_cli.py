"""The ``fuse-crypt`` command line: exit codes, one-line errors, conf safety, passwd.

Every command runs as a real subprocess (``python -m fuse_crypt.cli``). Where a second
implementation helps prove a result, Debian's gocryptfs 2.3 is the judge: it must accept
the confs we write and our password changes, and the volumes it writes are what our
master-key check is tested against. Tests that need a live mount fail (never skip)
when the FUSE frontend does not import.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse_crypt.cli_helpers import (
    FC,
    PASSWORD,
    assert_one_line_error,
    fc,
    force_unmount,
    gocryptfs_init,
    is_mounted,
    write_passfile,
)

NEW_PASSWORD = "another test password"
HEX64 = re.compile(r"[0-9a-f]{8}(-?[0-9a-f]{8}){7}")

have_gocryptfs = pytest.mark.skipif(
    shutil.which("gocryptfs") is None, reason="gocryptfs (Debian package) not installed"
)


# --------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def new_passfile(tmp_path: Path) -> Path:
    return write_passfile(tmp_path / "new_passfile", NEW_PASSWORD)


@pytest.fixture
def gocryptfs_volume(tmp_path: Path, passfile: Path) -> Iterator[Path]:
    """A gocryptfs-made volume holding one file, a symlink and a subdirectory."""
    if shutil.which("gocryptfs") is None:
        pytest.skip("gocryptfs (Debian package) not installed")
    cipher = tmp_path / "gc-cipher"
    view = tmp_path / "gc-view"
    cipher.mkdir()
    view.mkdir()
    gocryptfs_init(cipher, passfile)
    subprocess.run(
        ["gocryptfs", "-q", "-passfile", passfile, cipher, view], check=True, capture_output=True
    )
    try:
        (view / "sub").mkdir()
        (view / "sub" / "data.txt").write_bytes(b"written by gocryptfs\n" * 100)
        os.symlink("sub/data.txt", view / "link")
    finally:
        force_unmount(view)
    yield cipher


def conf_master_key(cipher: Path, password: str) -> bytes:
    from fuse_crypt.configfile import ConfFile

    return ConfFile.loads((cipher / "gocryptfs.conf").read_bytes()).unlock(password.encode())


# --------------------------------------------------------------------------- init / info


def test_init_writes_gocryptfs_layout_and_no_master_key_off_tty(
    tmp_path: Path, passfile: Path
) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    proc = fc("init", "--scryptn", "10", "--passfile", passfile, cipher)
    assert proc.returncode == 0, proc.stderr
    conf = cipher / "gocryptfs.conf"
    diriv = cipher / "gocryptfs.diriv"
    assert sorted(os.listdir(cipher)) == ["gocryptfs.conf", "gocryptfs.diriv"]
    assert stat.S_IMODE(conf.stat().st_mode) == 0o400
    assert stat.S_IMODE(diriv.stat().st_mode) == 0o444
    assert len(diriv.read_bytes()) == 16
    # Not a TTY: the master key must not be printed anywhere.
    key = conf_master_key(cipher, PASSWORD)
    assert key.hex() not in (proc.stdout + proc.stderr).replace("-", "")
    assert not HEX64.search(proc.stdout + proc.stderr)


def test_info_matches_gocryptfs_info_fields(cipherdir: Path) -> None:
    proc = fc("info", cipherdir)
    assert proc.returncode == 0, proc.stderr
    out = dict(
        (k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in proc.stdout.splitlines())
    )
    assert out["FeatureFlags"] == "HKDF GCMIV128 DirIV EMENames LongNames Raw64"
    assert out["EncryptedKey"] == "64B"
    assert out["ScryptObject"] == "Salt=32B N=1024 R=8 P=1 KeyLen=32"
    assert out["contentEncryption"] == "AES-GCM-256"
    if shutil.which("gocryptfs"):
        theirs = subprocess.run(
            ["gocryptfs", "-info", cipherdir], capture_output=True, text=True, check=True
        ).stdout
        for key in ("FeatureFlags", "EncryptedKey", "ScryptObject", "contentEncryption"):
            their_line = next(line for line in theirs.splitlines() if line.startswith(key + ":"))
            assert their_line.split(":", 1)[1].strip() == out[key]


def test_init_refuses_non_empty_cipherdir(tmp_path: Path, passfile: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    (cipher / "precious").write_text("keep me")
    msg = assert_one_line_error(fc("init", "--scryptn", "10", "--passfile", passfile, cipher), 40)
    assert "not empty" in msg
    assert os.listdir(cipher) == ["precious"]
    assert (cipher / "precious").read_text() == "keep me"


def test_init_missing_cipherdir(tmp_path: Path, passfile: Path) -> None:
    msg = assert_one_line_error(
        fc("init", "--scryptn", "10", "--passfile", passfile, tmp_path / "nope"), 6
    )
    assert "does not exist" in msg


def test_init_rejects_bad_scryptn(tmp_path: Path, passfile: Path) -> None:
    (tmp_path / "c").mkdir()
    assert_one_line_error(fc("init", "--scryptn", "9", "--passfile", passfile, tmp_path / "c"), 13)
    assert os.listdir(tmp_path / "c") == []


def test_init_reads_password_line_from_stdin(tmp_path: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    proc = fc("init", "--scryptn", "10", cipher, stdin="from stdin\nignored\n")
    assert proc.returncode == 0, proc.stderr
    assert len(conf_master_key(cipher, "from stdin")) == 32


def test_init_empty_password_is_refused(tmp_path: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    assert_one_line_error(fc("init", "--scryptn", "10", cipher, stdin="\n"), 22)
    assert os.listdir(cipher) == []


def test_init_around_given_master_key(tmp_path: Path, passfile: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    key_hex = "f2a477e3-5823f5e0-20f65889-9c23ae02-a7b64d4f-8484db51-7998f19b-c6e289d6"
    proc = fc(
        "init",
        "--scryptn",
        "10",
        "--masterkey",
        "stdin",
        "--passfile",
        passfile,
        cipher,
        stdin=key_hex + "\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert conf_master_key(cipher, PASSWORD).hex() == key_hex.replace("-", "")
    assert key_hex not in proc.stdout + proc.stderr


def test_usage_errors_are_one_line_exit_1(tmp_path: Path) -> None:
    msg = assert_one_line_error(fc("mount", "--no-such-flag", tmp_path, tmp_path), 1)
    assert "--no-such-flag" in msg
    assert_one_line_error(fc("frobnicate"), 1)
    assert_one_line_error(fc("mount", tmp_path), 1)


# --------------------------------------------------------------------------- mount errors


def test_wrong_password_refused_before_mounting(
    cipherdir: Path, mountpoint: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not the password\n")
    proc = fc("mount", "--passfile", bad, cipherdir, mountpoint)
    msg = assert_one_line_error(proc, 12)
    assert "password incorrect" in msg
    assert "not the password" not in proc.stderr
    assert not is_mounted(mountpoint)


def test_wrong_password_from_stdin(cipherdir: Path, mountpoint: Path) -> None:
    assert_one_line_error(fc("mount", cipherdir, mountpoint, stdin="nope\n"), 12)
    assert not is_mounted(mountpoint)


def test_wrong_master_key_is_detected(gocryptfs_volume: Path, mountpoint: Path) -> None:
    wrong = os.urandom(32).hex()
    proc = fc("mount", "--masterkey", "stdin", gocryptfs_volume, mountpoint, stdin=wrong + "\n")
    msg = assert_one_line_error(proc, 12)
    assert "master key incorrect" in msg
    assert wrong not in proc.stderr
    assert not is_mounted(mountpoint)


def test_malformed_master_key_is_not_echoed(cipherdir: Path, mountpoint: Path) -> None:
    secretish = "deadbeef" * 7 + "zz"
    proc = fc("mount", "--masterkey", secretish, cipherdir, mountpoint)
    assert "64 hex digits" in assert_one_line_error(proc, 14)
    assert secretish not in proc.stderr


def test_passfile_and_masterkey_are_exclusive(
    cipherdir: Path, mountpoint: Path, passfile: Path
) -> None:
    assert_one_line_error(
        fc("mount", "--passfile", passfile, "--masterkey", "00" * 32, cipherdir, mountpoint), 1
    )


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: b"{ this is not json", id="garbage"),
        pytest.param(lambda d: d.replace(b'"Raw64"', b'"Raw64",\n\t\t"Bogus"'), id="unknown-flag"),
        pytest.param(lambda d: d.replace(b'"Version": 2', b'"Version": 3'), id="version-3"),
        pytest.param(lambda d: d[: len(d) // 2], id="truncated"),
    ],
)
def test_bad_conf_refused_and_never_rewritten(
    cipherdir: Path, mountpoint: Path, passfile: Path, new_passfile: Path, mutate
) -> None:
    conf = cipherdir / "gocryptfs.conf"
    os.chmod(conf, 0o600)
    conf.write_bytes(mutate(conf.read_bytes()))
    os.chmod(conf, 0o400)
    before = sha256(conf)
    assert_one_line_error(fc("mount", "--passfile", passfile, cipherdir, mountpoint), 23)
    assert not is_mounted(mountpoint)
    assert_one_line_error(fc("info", cipherdir), 23)
    assert_one_line_error(
        fc("passwd", "--passfile", passfile, "--new-passfile", new_passfile, cipherdir), 23
    )
    assert_one_line_error(
        fc("passwd", "--masterkey", "00" * 32, "--new-passfile", new_passfile, cipherdir), 23
    )
    assert sha256(conf) == before
    assert sorted(os.listdir(cipherdir)) == ["gocryptfs.conf", "gocryptfs.diriv"]


def test_missing_conf(cipherdir: Path, mountpoint: Path, passfile: Path) -> None:
    (cipherdir / "gocryptfs.conf").unlink()
    assert "gocryptfs.conf" in assert_one_line_error(
        fc("mount", "--passfile", passfile, cipherdir, mountpoint), 23
    )


def test_missing_mountpoint(cipherdir: Path, passfile: Path, tmp_path: Path) -> None:
    msg = assert_one_line_error(
        fc("mount", "--passfile", passfile, cipherdir, tmp_path / "nope"), 10
    )
    assert "does not exist" in msg


def test_non_empty_mountpoint(cipherdir: Path, passfile: Path, mountpoint: Path) -> None:
    (mountpoint / "file").write_text("x")
    assert "not empty" in assert_one_line_error(
        fc("mount", "--passfile", passfile, cipherdir, mountpoint), 10
    )
    assert not is_mounted(mountpoint)


def test_missing_cipherdir(tmp_path: Path, passfile: Path, mountpoint: Path) -> None:
    assert_one_line_error(fc("mount", "--passfile", passfile, tmp_path / "nope", mountpoint), 6)


def test_missing_passfile(cipherdir: Path, mountpoint: Path, tmp_path: Path) -> None:
    msg = assert_one_line_error(
        fc("mount", "--passfile", tmp_path / "nofile", cipherdir, mountpoint), 9
    )
    assert "nofile" in msg


def test_mountpoint_inside_cipherdir(cipherdir: Path, passfile: Path) -> None:
    inner = cipherdir / "inner"
    inner.mkdir()
    assert_one_line_error(fc("mount", "--passfile", passfile, cipherdir, inner), 10)


def test_unmount_not_mounted(tmp_path: Path) -> None:
    assert "not mounted" in assert_one_line_error(fc("unmount", tmp_path), 10)


# --------------------------------------------------------------------------- passwd


@have_gocryptfs
def test_passwd_new_works_old_fails_with_gocryptfs_as_judge(
    cipherdir: Path, passfile: Path, new_passfile: Path, tmp_path: Path, mountpoint: Path
) -> None:
    key_before = conf_master_key(cipherdir, PASSWORD)
    proc = fc("passwd", "--passfile", passfile, "--new-passfile", new_passfile, cipherdir)
    assert proc.returncode == 0, proc.stderr
    assert conf_master_key(cipherdir, NEW_PASSWORD) == key_before
    assert stat.S_IMODE((cipherdir / "gocryptfs.conf").stat().st_mode) == 0o400
    assert not (cipherdir / "gocryptfs.conf.tmp").exists()
    # Ours refuses the old password (before any fork) ...
    assert_one_line_error(fc("mount", "--passfile", passfile, cipherdir, mountpoint), 12)
    # ... and gocryptfs agrees about both.
    gc = ["gocryptfs", "-q", "-passfile"]
    old = subprocess.run([*gc, passfile, cipherdir, mountpoint], capture_output=True, check=False)
    assert old.returncode == 12
    new = subprocess.run(
        [*gc, new_passfile, cipherdir, mountpoint], capture_output=True, check=False
    )
    assert new.returncode == 0, new.stderr
    force_unmount(mountpoint)


def test_passwd_wrong_old_password_changes_nothing(
    cipherdir: Path, new_passfile: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.write_text("wrong\n")
    before = sha256(cipherdir / "gocryptfs.conf")
    assert_one_line_error(
        fc("passwd", "--passfile", bad, "--new-passfile", new_passfile, cipherdir), 12
    )
    assert sha256(cipherdir / "gocryptfs.conf") == before


def test_passwd_both_passwords_on_stdin_and_scryptn(cipherdir: Path) -> None:
    proc = fc("passwd", "--scryptn", "11", cipherdir, stdin=f"{PASSWORD}\n{NEW_PASSWORD}\n")
    assert proc.returncode == 0, proc.stderr
    assert len(conf_master_key(cipherdir, NEW_PASSWORD)) == 32
    assert "N=2048" in fc("info", cipherdir).stdout


def test_passwd_keeps_a_fresh_salt(cipherdir: Path, passfile: Path, tmp_path: Path) -> None:
    from fuse_crypt.configfile import ConfFile

    before = ConfFile.loads((cipherdir / "gocryptfs.conf").read_bytes())
    same = tmp_path / "same"
    same.write_text(PASSWORD + "\n")
    assert fc("passwd", "--passfile", passfile, "--new-passfile", same, cipherdir).returncode == 0
    after = ConfFile.loads((cipherdir / "gocryptfs.conf").read_bytes())
    assert after.salt != before.salt
    assert after.encrypted_key != before.encrypted_key
    assert after.feature_flags == before.feature_flags


@have_gocryptfs
def test_passwd_master_key_reset(
    gocryptfs_volume: Path, new_passfile: Path, mountpoint: Path
) -> None:
    key = conf_master_key(gocryptfs_volume, PASSWORD)
    conf = gocryptfs_volume / "gocryptfs.conf"
    before = sha256(conf)
    argv = ["passwd", "--masterkey", "stdin", "--new-passfile", new_passfile, gocryptfs_volume]
    # A wrong key is caught against the volume's own ciphertext; nothing is written.
    wrong = fc(*argv, stdin=os.urandom(32).hex() + "\n")
    assert_one_line_error(wrong, 12)
    assert sha256(conf) == before
    assert not (gocryptfs_volume / "gocryptfs.conf.bak").exists()
    ok = fc(*argv, stdin=key.hex() + "\n")
    assert ok.returncode == 0, ok.stderr
    assert sha256(gocryptfs_volume / "gocryptfs.conf.bak") == before
    assert conf_master_key(gocryptfs_volume, NEW_PASSWORD) == key
    proc = subprocess.run(
        ["gocryptfs", "-q", "-passfile", new_passfile, gocryptfs_volume, mountpoint],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        assert (mountpoint / "sub" / "data.txt").read_bytes() == b"written by gocryptfs\n" * 100
    finally:
        force_unmount(mountpoint)


# --------------------------------------------------------------------------- mount happy path


def test_mount_returns_when_live_and_unmount(
    cipherdir: Path, passfile: Path, mountpoint: Path
) -> None:
    proc = fc("mount", "--passfile", passfile, cipherdir, mountpoint, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert is_mounted(mountpoint)
    # Usable immediately: no sleep between `mount` returning and the first write.
    (mountpoint / "now").write_bytes(b"immediately usable")
    assert (mountpoint / "now").read_bytes() == b"immediately usable"
    assert fc("unmount", mountpoint).returncode == 0
    assert not is_mounted(mountpoint)
    assert "now" not in os.listdir(cipherdir)


def test_mount_with_master_key_on_stdin(cipherdir: Path, passfile: Path, mountpoint: Path) -> None:
    key = conf_master_key(cipherdir, PASSWORD)
    proc = fc("mount", "--masterkey", "stdin", cipherdir, mountpoint, stdin=key.hex() + "\n")
    assert proc.returncode == 0, proc.stderr
    try:
        (mountpoint / "f").write_text("via master key")
    finally:
        assert fc("unmount", mountpoint).returncode == 0
    proc = fc("mount", "--passfile", passfile, cipherdir, mountpoint)
    assert proc.returncode == 0, proc.stderr
    assert (mountpoint / "f").read_text() == "via master key"


def test_passwd_then_mount_with_new_password(
    cipherdir: Path, passfile: Path, new_passfile: Path, mountpoint: Path
) -> None:
    assert fc("mount", "--passfile", passfile, cipherdir, mountpoint).returncode == 0
    (mountpoint / "kept").write_text("survives passwd")
    assert fc("unmount", mountpoint).returncode == 0
    assert (
        fc("passwd", "--passfile", passfile, "--new-passfile", new_passfile, cipherdir).returncode
        == 0
    )
    assert_one_line_error(fc("mount", "--passfile", passfile, cipherdir, mountpoint), 12)
    assert not is_mounted(mountpoint)
    proc = fc("mount", "--passfile", new_passfile, cipherdir, mountpoint)
    assert proc.returncode == 0, proc.stderr
    assert (mountpoint / "kept").read_text() == "survives passwd"


def test_demo_runs_end_to_end() -> None:
    proc = subprocess.run([*FC, "demo"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("demo OK")
    assert "no plaintext name, content or link target" in proc.stdout


def _run_on_pty(argv: list[str], answers: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdin/stdout/stderr, answering prompts."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execv(argv[0], argv)
    out = b""
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break  # EIO: child closed the terminal
                if not chunk:
                    break
                out += chunk
                if pending and chunk.rstrip().endswith(b":"):
                    os.write(fd, pending.pop(0).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_init_on_a_terminal_asks_twice_and_shows_master_key(tmp_path: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    code, out = _run_on_pty([*FC, "init", "--scryptn", "10", str(cipher)], ["tty pw", "tty pw"])
    assert code == 0, out
    assert "Repeat:" in out
    assert "tty pw" not in out  # no echo
    shown = HEX64.search(out)
    assert shown is not None, out
    assert shown.group(0).replace("-", "") == conf_master_key(cipher, "tty pw").hex()


def test_init_on_a_terminal_rejects_mismatch(tmp_path: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    code, out = _run_on_pty([*FC, "init", "--scryptn", "10", str(cipher)], ["one", "two"])
    assert code == 9, out
    assert "do not match" in out
    assert os.listdir(cipher) == []


def test_mount_with_master_key_after_conf_loss(gocryptfs_volume: Path, mountpoint: Path) -> None:
    """gocryptfs pain point: the conf is gone, only the master key is left."""
    key = conf_master_key(gocryptfs_volume, PASSWORD)
    (gocryptfs_volume / "gocryptfs.conf").unlink()
    proc = fc(
        "mount", "--ro", "--masterkey", "stdin", gocryptfs_volume, mountpoint, stdin=key.hex()
    )
    assert proc.returncode == 0, proc.stderr
    assert (mountpoint / "sub" / "data.txt").read_bytes() == b"written by gocryptfs\n" * 100
    assert os.readlink(mountpoint / "link") == "sub/data.txt"


def test_bad_metrics_addr_is_a_usage_error(
    cipherdir: Path, passfile: Path, mountpoint: Path
) -> None:
    for bad in ("localhost", "host:port", "127.0.0.1:70000"):
        msg = assert_one_line_error(
            fc("mount", "--passfile", passfile, "--metrics-addr", bad, cipherdir, mountpoint), 1
        )
        assert "HOST:PORT" in msg
    assert not is_mounted(mountpoint)
