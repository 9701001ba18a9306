"""Python stubs generated from proto/ by proto/generate.py (do not edit by hand)."""
