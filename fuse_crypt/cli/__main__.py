"""``python -m fuse_crypt.cli`` (used by the demo and tests to run the real command)."""

from fuse_crypt.cli import main

raise SystemExit(main())
