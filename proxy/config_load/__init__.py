"""TOML config file -> `Config`, or one `ConfigError` listing every problem with its line.

All problems are collected before raising, so a user fixes a config in one pass rather than
one error per attempt; each names the file, line and key (`config/x.toml:3: listen.https: ...`).
The section readers are mixins of one `ConfigReader`, one module per group of tables.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from proxy.config import Config
from proxy.config_load import convert
from proxy.config_load.certs import CertSections
from proxy.config_load.reader import ConfigError, Table
from proxy.config_load.server import ServerSections
from proxy.config_load.sites import SiteSections
from proxy.config_load.tracing import TracingSections
from proxy.toml_lines import KeyLocator

__all__ = ["ConfigError", "load_config", "parse_config"]

TOP_KEYS = (
    "log_level",
    "server",
    "listen",
    "certs",
    "acme",
    "storage",
    "hsts",
    "limits",
    "tls",
    "http2",
    "http3",
    "access_log",
    "admin",
    "tracing",
    "sites",
    "upstream_groups",
    "trusted_proxies",
)
_LOG_LEVELS = ("debug", "info", "warning", "error")
_TOML_ERROR_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def load_config(path: Path) -> Config:
    """Read and validate the config file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: config is not UTF-8: {exc}"]) from exc
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    """Validate TOML `text`; `path` is only used in messages and as `Config.path`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_ERROR_LINE.search(str(exc))
        line = match.group(1) if match else max(1, len(text.splitlines()))
        raise ConfigError([f"{path}:{line}: invalid TOML: {exc}"]) from None
    return ConfigReader(path, KeyLocator(text)).checked(data)


class ConfigReader(SiteSections, CertSections, ServerSections, TracingSections):
    """Every section reader together; `config` builds the whole model."""

    def checked(self, data: Table) -> Config:
        """The model built from `data`, or ConfigError listing every problem found."""
        config = self.config(data)
        if self.problems:
            raise ConfigError(self.problems)
        return config

    def config(self, data: Table) -> Config:
        """The model built from `data`; meaningless if any problem was found."""
        root = self._table(data, (), TOP_KEYS) or {}
        log_level = self._value(root, (), "log_level", "info", convert.choice(_LOG_LEVELS))
        certs = self._certs(root)
        groups = self._named_groups(root)
        sites = self._sites(root, certs.issuer, groups)
        listen = self._listen(root)
        acme_sites = [site for site in sites if (site.issuer or certs.issuer) == "acme"]
        storage = self._storage(root)
        return Config(
            path=self._path,
            server=self._server(root),
            listen=listen,
            certs=certs,
            acme=self._acme(root, listen, acme_sites),
            storage=storage,
            hsts=self._hsts(root),
            limits=self._limits(root, storage),
            tls=self._tls(root, sites),
            http2=self._http2(root),
            http3=self._http3(root),
            access_log=self._access_log(root),
            admin=self._admin(root, listen),
            tracing=self._tracing(root),
            sites=sites,
            log_level=log_level,
            trusted_proxies=self._value(root, (), "trusted_proxies", (), convert.networks),
            warnings=tuple(self.warnings),
        )
