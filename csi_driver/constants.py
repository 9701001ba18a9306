"""Names shared by the node and controller plugins and visible to Kubernetes objects."""

from __future__ import annotations

from importlib import metadata

DRIVER_NAME = "coco.csi.confidentialcontainers.org"

try:
    VENDOR_VERSION = metadata.version("coco-csi")
except metadata.PackageNotFoundError:  # running from a source tree without install
    VENDOR_VERSION = "0.1.0"

# StorageClass parameter / volume_context key naming the KBS key resource that every
# volume's key is derived from ("kbs:///repo/type/tag").
PARAM_KEY_RESOURCE = "keyResource"
# volume_context / secrets key carrying an explicit per-volume passphrase as a sealed secret.
PARAM_PASSPHRASE = "passphrase"
# volume_context key written by the controller: the volume's ciphertext directory.
CTX_CIPHER_DIR = "cipherDir"
# volume_context key written by the controller: the capacity CreateVolume granted, in bytes
# (decimal). The node takes it as a quota hint only, bounded by its own storage.
CTX_CAPACITY = "capacityBytes"
# Kubelet's marker for CSI inline ephemeral volumes.
CTX_EPHEMERAL = "csi.storage.k8s.io/ephemeral"
# Prefix of keys the CO adds (pod info, reserved provisioner parameters).
RESERVED_PREFIX = "csi.storage.k8s.io/"
