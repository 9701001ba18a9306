"""Plain-Python driver core (no gRPC): node publishing and controller volume allocation."""
