"""Volume kinds beyond a local cipher directory: each module parses one kind's parameters.

Why a package: object-store volumes (``objectstore``) and block volumes (``block``) each
turn StorageClass parameters, volume attributes and node-publish secrets into a typed spec,
without grpc or mounting, so the parsers are tested and fuzzed in-process.
"""

__all__: list[str] = []
