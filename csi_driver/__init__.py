"""csi_driver: the CSI plugin that publishes encrypted volumes inside the guest."""

# What bench/, the CLI entry point and the docs may import (tests/test_public_surfaces.py guards
# it): public submodules. Everything else is internal and may move freely.
__all__ = [
    "cli",
    "client",
    "convert",
    "core",
    "keys",
]
