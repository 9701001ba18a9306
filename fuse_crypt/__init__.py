"""fuse_crypt: a gocryptfs-compatible encrypting FUSE filesystem.

Plaintext and keys exist only in this process's memory; the storage backend
underneath only ever sees gocryptfs-format ciphertext.
"""
