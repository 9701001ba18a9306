"""sealed_secrets: CoCo sealed secrets and attestation-gated key release."""

# What other packages, the CLI entry points and the docs may import (tests/test_public_surfaces.py
# guards it): public submodules. Everything else is internal and may move freely.
__all__ = [
    "cli",
    "errors",
    "kubectl_plugin",
    "resolver",
    "resource_uri",
    "seal",
]
