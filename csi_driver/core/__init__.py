"""Plain-Python driver core (no gRPC): node publishing and controller volume allocation."""

# What the gRPC layer and bench/ may import (tests/test_public_surfaces.py guards it).
__all__ = [
    "controller",
    "node",
    "store",
    "volcap",
]
