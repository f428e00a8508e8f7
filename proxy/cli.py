"""Command line: `port443 run` serves, `check` validates a configuration, `reload` applies it,
`certs` lists certificates, `doctor` checks what going live needs, `storage migrate` copies
one certificate store into another; `proxy --from --to` serves one site without a file."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import trio

import proxy
from proxy.config import Config
from proxy.config_load import ConfigError, load_config
from proxy.config_load.flags import FLAGS_PATH, QuickStart, quick_start_config
from proxy.doctor import run_doctor
from proxy.handlers.admin import ProcessView
from proxy.memory import freeze_startup_objects
from proxy.pidfile import read_pid, remove_pid, write_pid
from proxy.server import Server
from proxy.storage_check import check_certificate_store
from proxy.supervisor import Supervisor
from proxy.worker import Channel, WorkerSpec, answer_supervisor

DEFAULT_CONFIG = Path("config/port443.toml")
log = logging.getLogger("proxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="port443", description=__doc__)
    parser.add_argument("--version", action="version", version=f"port443 {proxy.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run the proxy"),
        ("check", "validate a configuration file and exit 0 (valid) or 1"),
        ("reload", "validate a configuration, then make the running proxy apply it (SIGHUP)"),
        ("certs", "list each site's certificate: expiry, next renewal, last error"),
        ("doctor", "check ports, store, clock, DNS, ACME and certificates before going live"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "-c",
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"TOML file (default {DEFAULT_CONFIG})",
        )
    _quick_start_parser(commands)
    storage = commands.add_parser("storage", help="work on the certificate store")
    migrate_command = storage.add_subparsers(dest="action", required=True).add_parser(
        "migrate",
        help="copy certificates, keys, renewal plans and ACME accounts into another store "
        "(never replacing a newer certificate; running it again copies nothing)",
    )
    for flag, what in (("--from", "source"), ("--to", "target")):
        migrate_command.add_argument(
            flag,
            dest=what,
            type=Path,
            required=True,
            help=f"the {what}: a configuration file (its [storage]) or a certs directory",
        )
    migrate_command.add_argument(
        "--dry-run", action="store_true", help="say what would be copied, copy nothing"
    )
    return parser


def _quick_start_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    quick = commands.add_parser(
        "proxy",
        help="serve one site without a config file: --from HOST --to BACKEND",
        description="Reverse-proxy HTTPS for one host name to its backends, with the config "
        "file's defaults: the local CA for localhost, .local/.internal names and IP "
        "addresses, ACME (Let's Encrypt) for public names.",
    )
    quick.add_argument(
        "--from",
        dest="origin",
        required=True,
        metavar="HOST",
        help="the name served: host, host:port or https://host[:port] (its port: the HTTPS one)",
    )
    quick.add_argument(
        "--to",
        dest="backends",
        required=True,
        action="append",
        metavar="BACKEND",
        help="a backend: host:port (HTTP/1.1), or an http://, h2c:// or https:// URL; "
        "repeat for several, used as one group (round robin, failover)",
    )
    quick.add_argument("--https-port", type=int, help="default 443 (or --from's port)")
    quick.add_argument("--http-port", type=int, help="redirects to HTTPS, ACME; 0: off; default 80")
    quick.add_argument("--address", help="the IP address to listen on (default 0.0.0.0)")
    quick.add_argument("--certs-dir", type=Path, help="the certificate store (default certs)")
    quick.add_argument("--email", help="ACME account contact (public names)")
    quick.add_argument(
        "--internal-certs", action="store_true", help="the local CA even for a public name"
    )
    quick.add_argument("--debug", action="store_true", help="log at debug level")


def _quick_start(args: argparse.Namespace) -> Config | None:
    flags = QuickStart(
        origin=args.origin,
        backends=tuple(args.backends),
        https_port=args.https_port,
        http_port=args.http_port,
        address=args.address,
        certs_dir=args.certs_dir,
        internal_certs=args.internal_certs,
        email=args.email,
        debug=args.debug,
    )
    try:
        return quick_start_config(flags)
    except ConfigError as exc:
        print(f"port443: invalid flags:\n{exc}", file=sys.stderr)
        return None


def _load(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"port443: invalid configuration:\n{exc}", file=sys.stderr)
        return None


async def _serve(config: Config, worker: WorkerSpec | None) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully. A worker serves
    the listeners its supervisor hands over and answers it; a lone process owns the pid
    file and the admin port."""
    if worker is None:
        for warning in check_certificate_store(config.certs.dir):
            log.warning("%s", warning)
        await _serve_alone(config)
        return
    listeners, control = worker.adopt()
    server = Server(config, listeners=listeners, serve_admin=False)
    channel = Channel(control)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_handle_signals, server, nursery.cancel_scope)
            view = ProcessView(server.metrics, server)
            nursery.start_soon(answer_supervisor, channel, view, server.shutdown)
            await _run_server(server)
            nursery.cancel_scope.cancel()
    finally:
        channel.close()


async def _serve_alone(config: Config) -> None:
    server = Server(config)
    write_pid(config)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_handle_signals, server, nursery.cancel_scope)
            await _run_server(server)
            nursery.cancel_scope.cancel()
    finally:
        remove_pid(config)


async def _run_server(server: Server) -> None:
    """Serve until stopped; once listening, what startup built is frozen (memory.py)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        freeze_startup_objects()


async def _supervise(config: Config) -> None:
    for warning in check_certificate_store(config.certs.dir):
        log.warning("%s", warning)
    write_pid(config)  # `port443 reload` signals the supervisor, which tells every worker
    try:
        await Supervisor(config).run()
    finally:
        remove_pid(config)


async def _reload(server: Server) -> None:
    """SIGHUP: re-read the file the server was started with; keep the old config if broken."""
    path = server.config.path
    if path == FLAGS_PATH:
        log.warning("reload: the configuration came from flags, there is no file to re-read")
        return
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration:\n%s", exc)
        return
    await server.reload(config)


def _signal_reload(config: Config) -> int:
    try:
        pid = read_pid(config)
    except (OSError, ValueError) as exc:
        print(f"port443: no running proxy for {config.path} ({exc})", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"port443: asked process {pid} to reload {config.path}")
    return 0


async def _handle_signals(server: Server, stop_now: trio.CancelScope) -> None:
    """SIGHUP reloads, SIGUSR1 reopens the access log file. The first SIGTERM/SIGINT drains
    gracefully; a second one cuts the grace period short."""
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    with trio.open_signal_receiver(*watched) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await _reload(server)
                continue
            if signum == signal.SIGUSR1:
                await server.reopen_logs()
                continue
            if server.shutting_down:
                log.warning("received %s again: stopping now", signal.Signals(signum).name)
                stop_now.cancel()
                return
            log.info("received %s: shutting down", signal.Signals(signum).name)
            server.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "storage":
        from proxy import store_commands  # only these commands import redis

        return store_commands.migrate_stores(args.source, args.target, _load, dry_run=args.dry_run)
    config = _quick_start(args) if args.command == "proxy" else _load(args.config)
    if config is None:
        return 1
    if args.command == "certs":
        from proxy import store_commands

        return store_commands.certificates(config)
    if args.command == "doctor":
        return run_doctor(config)
    if args.command == "check":
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{args.config}: OK ({len(config.sites)} sites)")
        return 0
    if args.command == "reload":
        return _signal_reload(config)
    worker = WorkerSpec.from_env(os.environ)
    if worker is not None:
        role = f"[worker {worker.index}] "
    elif config.server.workers > 1:
        role = "[supervisor] "
    else:
        role = ""
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {role}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    if worker is None and config.server.workers > 1:
        trio.run(_supervise, config)
    else:
        trio.run(_serve, config, worker)
    return 0
