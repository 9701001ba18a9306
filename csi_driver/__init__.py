"""csi_driver: the CSI plugin that publishes encrypted volumes inside the guest."""
