"""The userspace block engine's frontend: a LUKS2 data segment served as one plaintext
file (``<mountpoint>/disk``) for ``losetup --direct-io=on``; a second frontend beside
:mod:`fuse_crypt.fusefrontend`.

* :mod:`.device` -- the device, opened once and checked; byte-granular plaintext I/O with
  read-modify-write of partial sectors (crypto: :mod:`fuse_crypt.luks2.segment`);
* :mod:`.serve` -- the FUSE mount: the request loop in C (:mod:`.native`, ``blockloop.c``)
  where it was built, else libfuse3 via mfusepy (same plumbing as fusefrontend);
* :mod:`.cli` -- ``fuse-crypt block-serve``.
"""

from .device import CryptDevice, DeviceError, device_size, open_device
from .serve import DISK_NAME, FSNAME, serve_block

__all__ = [
    "DISK_NAME",
    "FSNAME",
    "cli",
    "CryptDevice",
    "DeviceError",
    "device_size",
    "open_device",
    "serve_block",
]
