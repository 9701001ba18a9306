"""sealed_secrets: CoCo sealed secrets and attestation-gated key release."""
