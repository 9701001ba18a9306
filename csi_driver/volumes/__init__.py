"""Volume kinds the node core hands staging and publishing to.

Each module serves one kind of cipher location: ``block`` (a LUKS2 container on a disk the
host attached, staged once and bind-mounted per pod); ``objectstore`` (a bucket). The
directory-backed gocryptfs volumes are still served by the core itself.
"""

__all__: list[str] = []
