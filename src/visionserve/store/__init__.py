"""The model catalog and the local model store (pull, verify, mirror, manifests)."""
