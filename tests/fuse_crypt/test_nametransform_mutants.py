"""Name-transform boundaries a mutation run (tools/mutation.py) showed untested.

A new file so as not to collide with the fuse_crypt hardening work in test_nametransform.py.
"""

from __future__ import annotations

import pytest

from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.errors import InvalidNameError
from fuse_crypt.nametransform import NameTransform, pad16, unpad16

CORE = CryptoCore(bytes(range(32)))
IV = bytes.fromhex("fa89634babeeacec772ad12994f0455e")


@pytest.mark.parametrize("pad", [0, 17, 31, 255])
def test_unpad16_refuses_pad_bytes_outside_1_to_16_even_when_consistent(pad: int) -> None:
    """``pad`` copies of ``pad`` at the end, inside the buffer: only 1..16 is PKCS#7."""
    size = 256 if pad == 255 else 32
    data = b"x" * (size - max(pad, 1)) + bytes((pad,)) * max(pad, 1)
    assert len(data) == size
    with pytest.raises(InvalidNameError):
        unpad16(data)


def test_unpad16_accepts_every_legal_pad() -> None:
    for n in range(1, 40):  # an empty name is never valid, padded or not
        assert unpad16(pad16(b"n" * n)) == b"n" * n


@pytest.mark.parametrize("brk", ["\n", "\r"])
def test_a_line_break_anywhere_is_refused(brk: str) -> None:
    nt = NameTransform(CORE)
    good = nt.encrypt_name("file.txt", IV)
    assert nt.decrypt_name(good, IV) == "file.txt"
    for text in (good[:4] + brk + good[4:], good + brk, brk + good):
        with pytest.raises(InvalidNameError) as info:
            nt.b64decode(text)
        assert str(info.value) == "name contains a line break"


def test_padded_base64_volumes_refuse_unpadded_names() -> None:
    padded = NameTransform(CORE, raw64=False)
    name = padded.encrypt_name("file.txt", IV)
    assert name.endswith("=") and padded.decrypt_name(name, IV) == "file.txt"
    with pytest.raises(InvalidNameError):
        padded.b64decode(name.rstrip("="))


def test_encrypted_name_length_limit_is_2048_bytes() -> None:
    """2048 ciphertext bytes pass the length check (and fail later, on the name); 2064 not."""
    nt = NameTransform(CORE)
    at_limit = nt.b64encode(CORE.eme_encrypt(IV, pad16(b"a" * 2047)))
    with pytest.raises(InvalidNameError) as info:
        nt.decrypt_name(at_limit, IV)
    assert str(info.value) != "encrypted name has invalid length"
    over = nt.b64encode(bytes(2064))
    with pytest.raises(InvalidNameError) as info:
        nt.decrypt_name(over, IV)
    assert str(info.value) == "encrypted name has invalid length"
