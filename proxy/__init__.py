"""port443: a TLS-terminating reverse proxy and HTTP-to-HTTPS redirector."""

__version__ = "0.1.0"  # the one place: pyproject.toml and `port443 --version` read it
