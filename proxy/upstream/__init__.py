"""Clients for upstream backends and their connection pools."""
