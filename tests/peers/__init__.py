"""Protocol-level test peers (KBS, Attestation Agent, CDH) for the CoCo interfaces.

They follow the published protocols (coco-interfaces.md sections 3, 5, 6) closely enough to
exercise the product clients end to end, and are deliberately written without importing the
product code they test. Never imported by product code.
"""
