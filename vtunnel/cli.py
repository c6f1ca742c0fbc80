"""The ``vtunnel`` command."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import click
import structlog

from vtunnel import __version__
from vtunnel.cli_tun import agent_tun_options, agent_tun_settings, server_tun_options, server_tun_settings
from vtunnel.config import (
    INSECURE_KEY_PERMISSIONS_ENV,
    WEBSOCKS_USER_ENV,
    ConfigError,
    check_private_file,
    load_config,
    load_passphrase_file,
    resolve_cipher,
    resolve_psk,
    resolve_websocks_users,
    tunnel_config,
    write_key_file,
)
from vtunnel.logging import configure_logging
from vtunnel.protocol import TunnelConfig
from vtunnel.runtime.process import run_async, serve_until_signal
from vtunnel.security.ciphers import CIPHER_CHOICES
from vtunnel.security.datagram import ConnectionIdLayout
from vtunnel.transports.base import Endpoint, SecurityConfig, TransportError, available_transports

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from vtunnel.apps.stats import ProcessStats
    from vtunnel.kcptun import KcptunConfig
    from vtunnel.security.keys import KeySet

log = structlog.get_logger("vtunnel")

DEFAULT_SOCKS = "127.0.0.1:1080"

URL_HELP = (
    "Transport URLs: tcp://HOST:PORT, tls://HOST:PORT?cert=F&key=F, "
    "kcp://HOST:PORT?mode=fast3&sndwnd=1024&rcvwnd=1024&mtu=1350 (see `vtunnel transports`); "
    "WebSocks, no tunnel: websocks://HOST:PORT, websockss://HOST:PORT (TLS, with tls://'s options)."
)


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--log-format", type=click.Choice(["console", "json"]), default=None, help="Log line format."
    )(f)
    f = click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default=None,
        help="Least severe level logged (default info).",
    )(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")(f)
    f = click.option("--insecure", is_flag=True, help="Run without a key: plaintext, vproxy-compatible.")(f)
    f = click.option(
        "--cipher",
        type=click.Choice(CIPHER_CHOICES, case_sensitive=False),
        default=None,
        help="Transport cipher with a key (default auto: AES-256-GCM when both ends have AES instructions, "
        "else ChaCha20-Poly1305). A named cipher is the only one offered or accepted. VTUNNEL_CIPHER works too.",
    )(f)
    f = click.option(
        "--psk-file",
        type=click.Path(dir_okay=False),
        help="File holding the pre-shared key (`vtunnel keygen -o FILE`); it must not be readable or writable "
        "by group or others (chmod 600). VTUNNEL_PSK in the environment works too.",
    )(f)
    f = click.option(
        "--insecure-key-permissions",
        is_flag=True,
        help="Use a key file (or other file holding secrets) that group or others may read or write, with a "
        "warning, e.g. a secret mounted 0644 in a container. "
        f"{INSECURE_KEY_PERMISSIONS_ENV}=1 or insecure_key_permissions = true in the config work too.",
    )(f)
    return f


def _setup(
    config_path: str | None,
    section: str,
    log_level: str | None,
    log_format: str | None,
    insecure_key_permissions: bool = False,
) -> dict[str, Any]:
    try:
        cfg = load_config(config_path, section=section, allow_insecure_permissions=insecure_key_permissions)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    log_cfg = cfg.get("log", {})
    fmt = log_format or log_cfg.get("format", "console")
    if fmt not in ("console", "json"):
        raise click.UsageError(f"[log] format must be console or json, not {fmt!r}")
    configure_logging(
        level=log_level or log_cfg.get("level", "info"), fmt="json" if fmt == "json" else "console"
    )
    return cfg


def _endpoint(url: str, what: str, insecure_key_permissions: bool = False) -> Endpoint:
    try:
        endpoint = Endpoint.parse(url)
    except TransportError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None
    private_key = endpoint.params.get("key")
    if private_key:  # a TLS private key: as private as a key file
        try:
            check_private_file(
                private_key,
                f"TLS private key (key= of {what})",
                allow_insecure_permissions=insecure_key_permissions,
            )
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
    return endpoint


def _security(
    psk_file: str | None,
    insecure: bool,
    section: dict[str, Any],
    cipher: str | None = None,
    insecure_key_permissions: bool = False,
) -> SecurityConfig:
    try:
        psk = resolve_psk(
            psk_file=psk_file,
            insecure=insecure,
            section=section,
            allow_insecure_permissions=insecure_key_permissions,
        )
        chosen = resolve_cipher(cipher=cipher, section=section)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if psk is None:
        log.warning("running without a key: the tunnel is plaintext and unauthenticated (--insecure)")
    return SecurityConfig(psk=psk, cipher=chosen)


def _websocks_users(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--websocks-user",
        multiple=True,
        metavar="USER:PASS",
        help="A WebSocks user (server: repeatable, for WebSocks inside streams and --listen websocks://; agent: "
        "its login with --peer vproxy or --server websocks://). Every local user can "
        f"read it with `ps`: prefer --websocks-user-file or {WEBSOCKS_USER_ENV}.",
    )(f)
    f = click.option(
        "--websocks-user-file",
        type=click.Path(dir_okay=False),
        help="File of WebSocks users, one USER:PASS per line (# comments); chmod 600 like a key file. "
        f"{WEBSOCKS_USER_ENV}=USER:PASS (one per line) in the environment works too.",
    )(f)
    return f


def _lite_tls(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--no-lite-tls",
        is_flag=True,
        help="Never let lite-tls streams leave the tunnel's encryption (docs/lite-tls.md); lite_tls = false in "
        "[tunnel] works too. Without a key, or over kcp:// and rudp://, lite-tls is off anyway.",
    )(f)


def _peer(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--peer",
        type=click.Choice(["vtunnel", "vproxy", "kcptun"]),
        default=None,
        help="The other end. vproxy: no key, vproxy's empty SETTINGS (no extensions), kcp:// with conv=0 and "
        "mtu=1250 unless the URL says otherwise, and (agent) every destination carried the way vproxy's agent "
        "does, WebSocks inside the stream, with the login of --websocks-user-file. kcptun: kcptun-server / "
        "kcptun-client's wire on kcp://HOST:PORT?crypt=aes&mode=fast&datashard=10&parityshard=3&nocomp=0&"
        "smuxver=1&... (kcptun's option names and defaults; the agent also conn=N, kcptun-client's --conn), its "
        "--key the first line of --psk-file; the agent serves --forward LISTEN only, the server needs --target. "
        'Config: peer = "vproxy" or "kcptun".',
    )(f)


def _without_lite_tls(tunnel: TunnelConfig, off: bool) -> TunnelConfig:
    return dataclasses.replace(tunnel, lite_tls=False) if off else tunnel


def _metrics_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--metrics",
        "metrics_address",
        metavar="HOST:PORT",
        default=None,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (a bare PORT: 127.0.0.1). Only a literal IP "
        'address serves beyond loopback (0.0.0.0:9090); a host name is refused. Config: metrics = "HOST:PORT".',
    )(f)


@dataclasses.dataclass(frozen=True)
class _MetricsPlan:
    stats: ProcessStats
    registry: CollectorRegistry
    host: str
    port: int
    #: a server's worker: the channel its supervisor reads its metrics on (the supervisor serves the endpoint)
    channel: socket.socket | None = None


def _metrics_plan(value: object, role: str, *, channel: int | None = None) -> _MetricsPlan | None:
    """What ``--metrics`` (or the config's ``metrics``) asks for: None when it is not set. A server's worker
    reports to its supervisor on the ``channel`` it was given when there is one, and only then."""
    from vtunnel.apps.metrics import MetricsAddressError, make_registry, parse_metrics_address
    from vtunnel.apps.stats import ProcessStats

    if channel is not None:
        stats = ProcessStats()
        return _MetricsPlan(stats, make_registry(stats, role=role), "", 0, socket.socket(fileno=channel))
    if value is None or value == "":
        return None
    try:
        host, port = parse_metrics_address(str(value))
    except MetricsAddressError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics") from None
    stats = ProcessStats()
    return _MetricsPlan(stats, make_registry(stats, role=role), host, port)


async def _serve(
    plan: _MetricsPlan | None,
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], None],
    reload: Callable[[], None] | None = None,
) -> None:
    """Run until a signal, with the metrics endpoint up around it when asked for (SIGHUP: ``reload``)."""
    if plan is None:
        await serve_until_signal(start, stop, reload=reload)
        return
    from vtunnel.apps.metrics import serve_metrics
    from vtunnel.apps.worker_metrics import report_to_supervisor

    serving = (
        serve_metrics(plan.registry, plan.host, plan.port)
        if plan.channel is None
        else report_to_supervisor(plan.registry, plan.channel)
    )
    async with serving:
        await serve_until_signal(start, stop, reload=reload)


def _server_security(
    user_keys: str | None,
    psk_file: str | None,
    insecure: bool,
    section: dict[str, Any],
    cipher: str | None,
    insecure_key_permissions: bool,
) -> tuple[SecurityConfig, Callable[[], KeySet] | None]:
    """The server's security, with a key ring, and what reads its keys again on SIGHUP (None: no key)."""
    from vtunnel.config import insecure_key_permissions as loose_allowed
    from vtunnel.config import load_user_keys
    from vtunnel.security.keys import KeySet
    from vtunnel.transports.base import KeyRing

    path = user_keys or section.get("user_keys")
    if not path:
        security = _security(psk_file, insecure, section, cipher, insecure_key_permissions)
        if security.psk is None:
            return security, None

        def load_one() -> KeySet:
            psk = resolve_psk(
                psk_file=psk_file,
                insecure=False,
                section=section,
                allow_insecure_permissions=insecure_key_permissions,
            )
            assert psk is not None  # (resolve_psk raises rather than give none without insecure)
            return KeySet.single(psk)

        return SecurityConfig(keys=KeyRing(KeySet.single(security.psk)), cipher=security.cipher), load_one
    others = [
        name
        for name, given in (
            ("--psk-file", psk_file),
            ("psk_file", section.get("psk_file")),
            ("psk", section.get("psk")),
            ("VTUNNEL_PSK", os.environ.get("VTUNNEL_PSK")),
            ("--insecure", insecure or section.get("insecure")),
        )
        if given
    ]
    if others:
        raise click.UsageError(
            f"--user-keys (user_keys) replaces the server's one key: drop {', '.join(others)}"
        )
    try:
        loose = loose_allowed(flag=insecure_key_permissions, section=section)
        chosen = resolve_cipher(cipher=cipher, section=section)

        def load_users() -> KeySet:
            return load_user_keys(os.path.expanduser(str(path)), allow_insecure_permissions=loose)

        keys = load_users()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return SecurityConfig(keys=KeyRing(keys), cipher=chosen), load_users


def _keyless_security(psk_file: str | None, section: Mapping[str, Any], peer: str) -> SecurityConfig:
    """No key, for a peer that has none (``peer`` names it in the error when one was given)."""
    if psk_file or section.get("psk_file") or section.get("psk"):
        raise click.UsageError(f"{peer} has no key: drop --psk-file (and psk/psk_file in the config)")
    return SecurityConfig()


def _kcptun_config(
    endpoint: Endpoint,
    *,
    client: bool,
    psk_file: str | None,
    section: Mapping[str, Any],
    insecure_key_permissions: bool,
) -> KcptunConfig:
    """kcptun's options from a ``kcp://`` URL's query, and its passphrase from the first line of --psk-file."""
    from vtunnel.kcptun import KcptunConfig, KcptunError

    if endpoint.scheme != "kcp":
        raise click.UsageError(f"--peer kcptun speaks kcp:// only, not {endpoint.scheme}://")
    path = psk_file or section.get("psk_file")
    key = None
    try:
        if path:
            key = load_passphrase_file(
                str(path),
                "kcptun passphrase file",
                allow_insecure_permissions=insecure_key_permissions
                or bool(section.get("insecure_key_permissions", False)),
            )
        config = KcptunConfig.from_options(endpoint.params, client=client, key=key)
    except (ConfigError, KcptunError) as exc:
        raise click.UsageError(f"--peer kcptun: {exc}") from None
    if key is None and config.crypt != "none":
        raise click.UsageError(
            f"--peer kcptun with crypt={config.crypt} needs kcptun's passphrase (its --key): --psk-file FILE "
            "holding it on the first line (or crypt=none in the URL)"
        )
    return config


def _vproxy_endpoint(endpoint: Endpoint, *, client: bool) -> Endpoint:
    """vproxy's KCP: 1250-byte datagrams and (a client's) conversation 0, unless the URL names its own."""
    if endpoint.scheme != "kcp":
        return endpoint
    defaults = {"conv": "0", "mtu": "1250"} if client else {"mtu": "1250"}
    return dataclasses.replace(endpoint, params={**defaults, **endpoint.params})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="vtunnel")
def main() -> None:
    """vtunnel: a multiplexed ARQ tunnel.

    Run `vtunnel server` at the exit and `vtunnel agent` next to your applications; they carry many TCP (and UDP)
    streams over one tunnel on KCP/UDP, TCP, TLS or a plugin transport, speaking vproxy's KCP tunnel protocol.

    \b
    Quick start on two machines:
      exit$   vtunnel keygen -o key
      exit$   vtunnel server --listen kcp://0.0.0.0:4000 --psk-file key
      laptop$ vtunnel agent --server kcp://EXIT:4000 --psk-file key --socks 127.0.0.1:1080
      laptop$ curl --socks5-hostname 127.0.0.1:1080 https://example.com/
    """


@main.command()
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="URL",
    help="Where tunnels arrive (repeatable); websocks:// and websockss:// take WebSocks clients instead.",
)
@click.option(
    "--target", metavar="HOST:PORT", help="Send every stream without a destination here (kcptun style)."
)
@click.option(
    "--allow-private", is_flag=True, help="Let clients reach loopback/private/link-local addresses."
)
@click.option(
    "--workers",
    metavar="N|auto",
    default=None,
    help="Worker processes sharing the listening ports (default 1; auto: one per core); a supervisor binds them "
    "and restarts a worker that dies; SIGHUP replaces the workers one by one. With a lite-tls splice=PORT, each "
    "worker takes PORT + its slot (2N ports from PORT on). Config: workers.",
)
@click.option(
    "--server-id",
    metavar="HEX",
    default=None,
    help="Up to 2 bytes (hex) that start every connection ID of kcp:// and rudp:// with a key, in clear, for a "
    "load balancer in front of several servers (docs/security.md). Config: server_id.",
)
@click.option(
    "--user-keys",
    type=click.Path(),
    default=None,
    help="One key per user instead of --psk-file: a directory of key files (each file's name is its user's) or "
    "a file of NAME KEY lines, private like a key file. SIGHUP reads it again: removed users' tunnels are cut. "
    'Config: user_keys = "PATH".',
)
@_websocks_users
@_peer
@_lite_tls
@_metrics_option
@server_tun_options
@_common
def server(
    listen: tuple[str, ...],
    target: str | None,
    allow_private: bool,
    workers: str | None,
    server_id: str | None,
    user_keys: str | None,
    no_lite_tls: bool,
    metrics_address: str | None,
    websocks_user_file: str | None,
    websocks_user: tuple[str, ...],
    peer: str | None,
    psk_file: str | None,
    insecure: bool,
    insecure_key_permissions: bool,
    cipher: str | None,
    config_path: str | None,
    log_level: str | None,
    log_format: str | None,
    **tun_options: Any,
) -> None:
    """Accept tunnels and carry their streams to the destinations they ask for (or to --target).

    By default clients may not reach loopback, private, link-local or multicast addresses (checked after DNS
    resolution); --allow-private lifts that. Without a key the server refuses to start unless --insecure is given.
    SIGINT/SIGTERM send GOAWAY and let open streams finish (up to drain_timeout) before exiting.

    \b
    --listen websocks://HOST:PORT    vproxy's WebSocks agents, one TCP connection per destination (no tunnel,
                                     no key: the --websocks-user-file users log in; 401 / 400 otherwise)
    --listen websockss://HOST:PORT?cert=F&key=F   the same inside TLS (tls://'s options)
    A WebSocks client has handshake_timeout ([server] in the config, default 30 s) for its request.
    """
    from vtunnel.apps.policy import ExitPolicy
    from vtunnel.apps.server import Server, ServerSettings
    from vtunnel.apps.websocks import HANDSHAKE_TIMEOUT, WEBSOCKS_SCHEMES

    cfg = _setup(config_path, "server", log_level, log_format, insecure_key_permissions)
    sec = cfg.get("server", {})
    urls = list(listen) or list(sec.get("listen", []))
    if not urls:
        raise click.UsageError(f"give at least one --listen URL. {URL_HELP}")
    endpoints = [_endpoint(u, "--listen", insecure_key_permissions) for u in urls]
    from vtunnel.apps.workers import parse_server_id, parse_workers, worker_from_environment

    try:
        worker = worker_from_environment()
        count = 1 if worker is not None else parse_workers(workers or sec.get("workers", 1))
        sid = parse_server_id(server_id or sec.get("server_id"))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if worker is not None:
        endpoints = [worker.splice_endpoint(e) for e in endpoints]
    metrics = _metrics_plan(
        None if worker is not None else metrics_address or sec.get("metrics"),
        "server",
        channel=worker.metrics_fd if worker is not None else None,
    )
    if (peer or sec.get("peer")) == "kcptun":
        if metrics is not None:
            raise click.UsageError("--metrics is not available with --peer kcptun")
        if count > 1:
            raise click.UsageError("--workers is not available with --peer kcptun")
        if tun_options.get("tun_pools") or sec.get("tun"):
            raise click.UsageError("--peer kcptun carries no IP packets: drop --tun")
        _kcptun_server(endpoints, target or sec.get("target"), psk_file, sec, insecure_key_permissions)
        return
    peer_vproxy = (peer or sec.get("peer")) == "vproxy"
    if peer_vproxy:
        endpoints = [_vproxy_endpoint(e, client=False) for e in endpoints]
    try:
        users = resolve_websocks_users(
            specs=websocks_user,
            user_file=websocks_user_file,
            section=sec,
            allow_insecure_permissions=insecure_key_permissions,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    websocks_only = all(e.scheme in WEBSOCKS_SCHEMES for e in endpoints)
    if any(e.scheme in WEBSOCKS_SCHEMES for e in endpoints) and not users:
        raise click.UsageError(
            "--listen websocks:// needs WebSocks users: --websocks-user-file FILE (one USER:PASS per line) or "
            f"{WEBSOCKS_USER_ENV}"
        )
    load_keys: Callable[[], KeySet] | None = None
    if (peer_vproxy or websocks_only) and (user_keys or sec.get("user_keys")):
        raise click.UsageError(
            "--user-keys needs vtunnel tunnels with a key (not --peer vproxy or websocks:// only)"
        )
    if peer_vproxy:
        security = _keyless_security(psk_file, sec, "a vproxy peer")
        log.warning("peer vproxy: the tunnel is plaintext and unauthenticated, as vproxy's is")
    elif websocks_only:  # no tunnel: the WebSocks users are the only credentials
        security = _keyless_security(psk_file, sec, "a websocks:// listener")
    else:
        security, load_keys = _server_security(
            user_keys, psk_file, insecure, sec, cipher, insecure_key_permissions
        )
    if not security.insecure:
        security = dataclasses.replace(
            security,
            connection_ids=worker.layout(sid) if worker is not None else ConnectionIdLayout(server_id=sid),
        )
    try:
        policy = ExitPolicy(
            allow_private=allow_private or bool(sec.get("allow_private", False)),
            allow=tuple(sec.get("allow", ())),
            deny=tuple(sec.get("deny", ())),
        )
        settings = ServerSettings(
            listen=endpoints,
            security=security,
            target=target or sec.get("target"),
            policy=policy,
            websocks_users=users,
            # vproxy gzips text-like DATA over 1 KiB, and inflates what it is sent
            tunnel=dataclasses.replace(tunnel_config(cfg.get("tunnel", {})), gzip=True)
            if peer_vproxy
            else _without_lite_tls(tunnel_config(cfg.get("tunnel", {})), no_lite_tls),
            connect_timeout=float(sec.get("connect_timeout", 10.0)),
            drain_timeout=float(sec.get("drain_timeout", 10.0)),
            idle_timeout=sec.get("idle_timeout"),
            handshake_timeout=float(sec.get("handshake_timeout", HANDSHAKE_TIMEOUT)),
            tun=server_tun_settings(tun_options, sec, by_user=bool(user_keys or sec.get("user_keys"))),
        )
        srv = Server(settings, stats=metrics.stats if metrics is not None else None)
        if count > 1:
            from vtunnel.apps.workers import listen_plan

            listen_plan(endpoints, workers=count, keyed=not security.insecure, server_id=sid)
    except (ValueError, ConfigError, TransportError) as exc:
        raise click.UsageError(str(exc)) from None
    if count > 1:
        from vtunnel.apps.workers import supervise

        if not _check_only():
            supervise(
                endpoints,
                workers=count,
                keyed=not security.insecure,
                server_id=sid,
                drain_timeout=settings.drain_timeout,
                metrics=(metrics.host, metrics.port) if metrics is not None else None,
            )
        return

    def reload() -> None:
        """SIGHUP: read the keys again; a removed user's tunnels are cut, a bad file changes nothing."""
        assert load_keys is not None
        try:
            keys = load_keys()
        except (ConfigError, click.UsageError) as exc:
            log.error("reload failed: the keys are unchanged", error=str(exc))
            return
        srv.reload_keys(keys)

    async def go() -> None:
        reloading = reload if load_keys is not None else None
        if worker is None:
            await _serve(metrics, srv.serve, srv.shutdown, reloading)
            return
        from vtunnel.apps.workers import serve_ready

        await _serve(
            metrics, functools.partial(serve_ready, srv.serve, worker.ready), srv.shutdown, reloading
        )

    _run_or_exit(go)


@main.command()
@click.option(
    "--server",
    "server_urls",
    multiple=True,
    metavar="URL",
    help="The server's transport URL (repeatable: UDP ones first, the others as their fallback; tunnels spread "
    "over a tier, and move when a server dies), or websocks:// / websockss:// for a WebSocks server (no tunnel). "
    "Config: server = URL or a list.",
)
@click.option("--forward", multiple=True, metavar="LISTEN[=DEST]", help="Forward a local port (repeatable).")
@click.option(
    "--socks",
    metavar="HOST:PORT",
    help="SOCKS5 proxy front (default 127.0.0.1:1080 when no other front is given).",
)
@click.option(
    "--http", metavar="HOST:PORT", help="HTTP proxy front (CONNECT and plain), e.g. 127.0.0.1:8118."
)
@click.option(
    "--conn", "connections", type=click.IntRange(1, 64), default=None, help="Tunnels to keep (default 1)."
)
@_websocks_users
@_peer
@_lite_tls
@_metrics_option
@agent_tun_options
@_common
def agent(
    server_urls: tuple[str, ...],
    forward: tuple[str, ...],
    socks: str | None,
    http: str | None,
    connections: int | None,
    no_lite_tls: bool,
    metrics_address: str | None,
    websocks_user_file: str | None,
    websocks_user: tuple[str, ...],
    peer: str | None,
    psk_file: str | None,
    insecure: bool,
    insecure_key_permissions: bool,
    cipher: str | None,
    config_path: str | None,
    log_level: str | None,
    log_format: str | None,
    **tun_options: Any,
) -> None:
    """The local end: SOCKS5/HTTP proxy fronts and port forwards, carried to the server in one tunnel.

    \b
    --forward 127.0.0.1:9000             every connection goes to the server's --target
    --forward 127.0.0.1:9000=host:port   the server connects to host:port (resolved at the server)
    The agent keeps its tunnels up and reconnects with backoff when the server restarts.

    \b
    --server kcp://A:4000 --server tls://A:443 --server tls://B:443
                                         several servers: kcp:// (and rudp://) first, the others when no
                                         UDP server answers; tunnels spread over the servers of a tier and
                                         go to another when theirs dies or goes away (docs/agent.md)

    \b
    --server websocks://HOST:PORT        a WebSocks server (vproxy's, or vtunnel's --listen websocks://): no
                                         tunnel, one TCP connection per destination, logged in with the one
                                         USER:PASS of --websocks-user-file; every --forward needs =DEST
    --server websockss://HOST:PORT?ca=F  the same inside TLS (tls://'s ca= and servername= options)
    """
    from vtunnel.apps.agent import Agent, AgentSettings, Forward, parse_hostport
    from vtunnel.apps.websocks import WEBSOCKS_SCHEMES

    cfg = _setup(config_path, "agent", log_level, log_format, insecure_key_permissions)
    sec = cfg.get("agent", {})
    urls = _server_urls(server_urls, sec.get("server"))
    url = urls[0]
    metrics = _metrics_plan(metrics_address or sec.get("metrics"), "agent")
    try:
        forwards = [Forward.parse(f) for f in (forward or tuple(sec.get("forward", ())))]
        socks_addr = socks or sec.get("socks")
        http_addr = http or sec.get("http")
        if (peer or sec.get("peer")) == "kcptun":
            fronts = [name for name, given in (("--socks", socks_addr), ("--http", http_addr)) if given]
            fronts += [f"--forward ...={fwd.destination}" for fwd in forwards if fwd.destination]
            if fronts:
                raise click.UsageError(
                    f"--peer kcptun cannot carry a destination ({', '.join(fronts)}): a kcptun-server sends every "
                    "stream to its own --target, so a front that names a destination would report success for a "
                    "place it never reached; use --forward LISTEN (no destination)"
                )
            if websocks_user or websocks_user_file:
                raise click.UsageError("--peer kcptun has no WebSocks login: drop --websocks-user(-file)")
            if metrics is not None:
                raise click.UsageError("--metrics is not available with --peer kcptun")
            if len(urls) > 1:
                raise click.UsageError("--peer kcptun takes one --server")
            if agent_tun_settings(tun_options, sec) is not None:
                raise click.UsageError("--peer kcptun carries no IP packets: drop --tun")
            _kcptun_agent(
                _endpoint(url, "--server", insecure_key_permissions),
                [fwd.listen for fwd in forwards],
                psk_file,
                sec,
                insecure_key_permissions,
            )
            return
        tun = agent_tun_settings(tun_options, sec)
        if not (forwards or socks_addr or http_addr or tun):
            socks_addr = DEFAULT_SOCKS
        server_endpoints = [_endpoint(u, "--server", insecure_key_permissions) for u in urls]
        server_endpoint = server_endpoints[0]
        tunnel = _without_lite_tls(tunnel_config(cfg.get("tunnel", {})), no_lite_tls)
        login: tuple[str, str] | None = None
        peer_vproxy = (peer or sec.get("peer", "vtunnel")) == "vproxy"
        websocks_server = server_endpoint.scheme in WEBSOCKS_SCHEMES
        if peer_vproxy or websocks_server:
            if websocks_server:
                security = _keyless_security(psk_file, sec, "a WebSocks server")
                if server_endpoint.scheme == "websocks":
                    log.warning(
                        "websocks:// is plaintext: the password is hashed, what is relayed is not (websockss://: TLS)"
                    )
            else:
                security = _keyless_security(psk_file, sec, "a vproxy peer")
                log.warning("peer vproxy: the tunnel is plaintext and unauthenticated, as vproxy's is")
                server_endpoints = [_vproxy_endpoint(e, client=True) for e in server_endpoints]
                # vproxy gzips text-like DATA over 1 KiB, and inflates what it is sent
                tunnel = dataclasses.replace(tunnel, extensions=False, gzip=True)
            logins = resolve_websocks_users(
                specs=websocks_user,
                user_file=websocks_user_file,
                section=sec,
                allow_insecure_permissions=insecure_key_permissions,
            )
            if len(logins) != 1:
                needs = f"a {server_endpoint.scheme}:// server" if websocks_server else "--peer vproxy"
                raise click.UsageError(
                    f"{needs} needs exactly one WebSocks login (USER:PASS): --websocks-user-file FILE or "
                    f"{WEBSOCKS_USER_ENV}; the server checks it before it connects anything"
                )
            login = next(iter(logins.items()))
        else:
            if websocks_user or websocks_user_file:
                raise click.UsageError(
                    "--websocks-user and --websocks-user-file are for --peer vproxy and websocks:// servers"
                )
            security = _security(psk_file, insecure, sec, cipher, insecure_key_permissions)
        settings = AgentSettings(
            servers=server_endpoints,
            security=security,
            forwards=forwards,
            socks=parse_hostport(socks_addr, default_host="127.0.0.1") if socks_addr else None,
            http=parse_hostport(http_addr, default_host="127.0.0.1") if http_addr else None,
            socks_users=dict(sec.get("socks_users", {})),
            tunnel=tunnel,
            connections=connections or int(sec.get("connections", 1)),
            drain_timeout=float(sec.get("drain_timeout", 10.0)),
            open_timeout=float(sec.get("open_timeout", 10.0)),
            websocks_login=login,
            tun=tun,
        )
        ag = Agent(settings, stats=metrics.stats if metrics is not None else None)
    except (ValueError, ConfigError, TransportError) as exc:
        raise click.UsageError(str(exc)) from None

    async def go() -> None:
        await _serve(metrics, ag.serve, ag.shutdown)

    _run_or_exit(go)


def _server_urls(given: tuple[str, ...], configured: object) -> list[str]:
    """The agent's server URLs: the command line's, else the config's ``server`` (a URL or a list of them)."""
    if given:
        return list(given)
    if isinstance(configured, str) and configured:
        return [configured]
    if isinstance(configured, list) and configured and all(isinstance(u, str) and u for u in configured):
        return list(configured)
    if configured:
        raise click.UsageError(f"[agent] server must be a URL or a list of URLs, not {configured!r}")
    raise click.UsageError(f"give --server URL. {URL_HELP}")


def _kcptun_agent(
    endpoint: Endpoint,
    forwards: list[tuple[str, int]],
    psk_file: str | None,
    sec: Mapping[str, Any],
    insecure_key_permissions: bool,
) -> None:
    from vtunnel.apps.kcptun_peer import KcptunAgent

    if not forwards:
        raise click.UsageError(
            "--peer kcptun needs --forward LISTEN: a kcptun-server sends every stream to its --target"
        )
    config = _kcptun_config(
        endpoint,
        client=True,
        psk_file=psk_file,
        section=sec,
        insecure_key_permissions=insecure_key_permissions,
    )
    ag = KcptunAgent(config, endpoint, forwards, drain_timeout=float(sec.get("drain_timeout", 10.0)))

    async def go() -> None:
        await serve_until_signal(ag.serve, ag.shutdown)

    _run_or_exit(go)


def _kcptun_server(
    endpoints: list[Endpoint],
    target: str | None,
    psk_file: str | None,
    sec: Mapping[str, Any],
    insecure_key_permissions: bool,
) -> None:
    from vtunnel.apps.kcptun_peer import KcptunServer

    if not target:
        raise click.UsageError("--peer kcptun needs --target HOST:PORT: kcptun-clients name no destination")
    configs = {
        _kcptun_config(
            e, client=False, psk_file=psk_file, section=sec, insecure_key_permissions=insecure_key_permissions
        )
        for e in endpoints
    }
    if len(configs) != 1:
        raise click.UsageError("--peer kcptun: give every --listen URL the same kcptun options")
    srv = KcptunServer(
        configs.pop(),
        endpoints,
        target,
        connect_timeout=float(sec.get("connect_timeout", 10.0)),
        idle_timeout=sec.get("idle_timeout"),
    )

    async def go() -> None:
        await serve_until_signal(srv.serve, srv.shutdown)

    _run_or_exit(go)


class _CheckOnly:
    """In the click context's ``obj`` under ``check-config``: the commands build everything and run nothing."""


def _check_only() -> bool:
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.find_object(_CheckOnly) is not None


def _run_or_exit(go: Callable[[], Awaitable[None]]) -> None:
    """Run ``go``; a failure to start (a port in use, a bad certificate) is one clear line and exit status 1.

    Under ``check-config`` nothing runs: the command has checked its settings by getting here.
    """
    if _check_only():
        return
    try:
        run_async(go)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        startup = _first_leaf(group, (OSError, TransportError))
        if startup is None:
            raise
        log.error("cannot start", error=str(startup) or repr(startup))
        sys.exit(1)
    except (OSError, TransportError) as exc:
        log.error("cannot start", error=str(exc) or repr(exc))
        sys.exit(1)


def _first_leaf(
    group: BaseExceptionGroup[BaseException], kinds: tuple[type[BaseException], ...]
) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_leaf(exc, kinds)
            if found is not None:
                return found
        elif isinstance(exc, kinds):
            return exc
    return None


@main.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Write the key to FILE, created readable and writable by you only (mode 0600), instead of printing it.",
)
@click.option("--force", is_flag=True, help="With -o: replace FILE if it exists (the new file is 0600 too).")
def keygen(output: str | None, force: bool) -> None:
    """Make a fresh random pre-shared key (give the same one to the server and the agent).

    `vtunnel keygen -o FILE` writes a key file that only you can read, as --psk-file requires. Without -o the
    key is printed to stdout: `vtunnel keygen > FILE` gives a file of your umask's mode (usually readable by
    everyone), which the server and the agent refuse until you chmod 600 it.
    """
    from vtunnel.security.keys import generate_key

    if output is None:
        if force:
            raise click.UsageError("--force goes with -o FILE")
        click.echo(generate_key())
        return
    try:
        write_key_file(output, generate_key() + "\n", replace=force)
    except FileExistsError:
        raise click.ClickException(f"{output} exists; pass --force to replace it") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--insecure-key-permissions",
    is_flag=True,
    help="Accept secret files that group or others may read or write, as the commands would with this flag.",
)
@click.pass_context
def check_config(ctx: click.Context, file: str, insecure_key_permissions: bool) -> None:
    """Check a config FILE without starting anything: exit status 0 when it is usable, 1 with the errors.

    Each of [server] and [agent] in FILE is checked as `vtunnel server --config FILE` (or `agent`) would read
    it, with no other option and the environment as it is (VTUNNEL_PSK, ...): TOML, unknown settings, URLs and
    their options, addresses, the key and users files (readable, private, well formed), the exit policy,
    [tunnel] and [log]. Nothing is bound or connected, so a port in use is not found here.
    """
    try:
        cfg = load_config(file, allow_insecure_permissions=insecure_key_permissions)
        tunnel_config(cfg.get("tunnel", {}))
    except ConfigError as exc:
        click.echo(str(exc) if file in str(exc) else f"{file}: {exc}", err=True)
        sys.exit(1)
    ctx.obj = _CheckOnly()
    sections = [name for name in ("server", "agent") if name in cfg]
    commands = {"server": server, "agent": agent}
    failed = False
    for name in sections:
        try:
            ctx.invoke(commands[name], config_path=file, insecure_key_permissions=insecure_key_permissions)
        except click.ClickException as exc:
            click.echo(f"{file}: [{name}]: {exc.format_message()}", err=True)
            failed = True
    if failed:
        sys.exit(1)
    if not sections:
        click.echo(f"{file}: ok (no [server] or [agent] section: only [tunnel] and [log] checked)")
    else:
        click.echo(f"{file}: ok ({', '.join(f'[{name}]' for name in sections)})")


@main.command()
def transports() -> None:
    """List the installed transports (built-in and plugins from the `vtunnel.transports` entry points)."""
    for scheme, found in available_transports().items():
        if isinstance(found, Exception):
            click.echo(f"{scheme:8} BROKEN: {found!r}")
        else:
            click.echo(f"{scheme:8} {found.__module__}.{found.__qualname__}  {found.description}")


@main.command()
@click.option(
    "--transport", type=click.Choice(["kcp", "tcp"]), default="kcp", help="Transport between the pair."
)
@click.option("--socks", default="127.0.0.1:1080", show_default=True, help="The agent's SOCKS5 address.")
@click.option("--http", default="127.0.0.1:8118", show_default=True, help="The agent's HTTP proxy address.")
@click.option("--tunnel-port", default=4000, show_default=True, help="Loopback port of the tunnel server.")
@click.option("--page-port", default=8080, show_default=True, help="Port of the demo page (0: no page).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def demo(transport: str, socks: str, http: str, tunnel_port: int, page_port: int, log_level: str) -> None:
    """Start a server and an agent on loopback (what `make run` does), with a fresh key and a demo page."""
    from vtunnel.demo import run_demo

    configure_logging(level=log_level, fmt="console")
    run_async(
        lambda: run_demo(
            transport=transport, socks=socks, http=http, tunnel_port=tunnel_port, page_port=page_port
        )
    )


if __name__ == "__main__":
    main()
