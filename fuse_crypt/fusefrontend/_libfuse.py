"""Make mfusepy load libfuse3.

mfusepy picks ``libfuse.so.2`` when both are installed; libfuse2 cannot negotiate
requests larger than 128 KiB.  The choice happens at import time, so this module
must be imported before anything imports ``mfusepy``.
"""

import os

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
