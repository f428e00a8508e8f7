"""Certificates: the on-disk store, the built-in CA, and the per-name certificate manager."""
