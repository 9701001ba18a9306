"""Fast in-process checks of ``luks2/volume.py`` that mutation testing runs first.

Volumes are image files formatted with cheap PBKDF2 costs; each test asserts what a change
to the volume code would break (which key opens, what is written where, what is refused).
"""

from __future__ import annotations
