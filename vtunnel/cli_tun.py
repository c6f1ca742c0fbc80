"""The command-line options of IP mode (``--tun`` and friends, docs/tun.md), for ``vtunnel server`` and ``agent``.

Each command takes them with one decorator and hands what click parsed (a ``**tun_options`` mapping) and its config
section to one function that builds the settings, ``None`` when IP mode is off. An option given on the command
line wins over the same setting in the file (``tun``, ``tun_dev``, ``tun_mtu``, ``tun_nat``, ``tun_isolate`` in
``[server]``; ``tun``, ``tun_route``, ``tun_dev``, ``tun_mtu`` in ``[agent]``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from vtunnel.apps.tun import TunAgentSettings, TunServerSettings

__all__ = ["agent_tun_options", "agent_tun_settings", "server_tun_options", "server_tun_settings"]


def _device_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--tun-mtu",
        type=click.IntRange(576, 65535),
        default=None,
        help="IP mode: the TUN device's MTU (agent: at most this; by default what the transport carries "
        "without splitting a packet).",
    )(f)
    return click.option(
        "--tun-dev",
        metavar="NAME",
        default=None,
        help="IP mode: the TUN device's name (default vtun0; '%d' in it: the kernel numbers it).",
    )(f)


def server_tun_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = _device_options(f)
    f = click.option(
        "--tun-nat",
        is_flag=True,
        help="IP mode: masquerade the pools' traffic to the outside (an nftables table of its own, removed on "
        "exit; IP forwarding on). The exit policy applies to it.",
    )(f)
    f = click.option(
        "--tun-isolate",
        is_flag=True,
        help="IP mode: agents may not reach each other (only the server and, with --tun-nat, the outside).",
    )(f)
    return click.option(
        "--tun",
        "tun_pools",
        multiple=True,
        metavar="CIDR",
        help="IP mode: a TUN device with the first address of CIDR; each agent that asks (agent --tun) gets the "
        "next free one (one IPv4 and one IPv6 pool at most; repeatable).",
    )(f)


def agent_tun_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = _device_options(f)
    f = click.option(
        "--tun-route",
        multiple=True,
        metavar="CIDR",
        help="IP mode: also route CIDR through the tunnel (repeatable; the pool's own network always is).",
    )(f)
    return click.option(
        "--tun",
        "tun_on",
        is_flag=True,
        help="IP mode: a TUN device with an address the server (--tun CIDR) gives; needs CAP_NET_ADMIN.",
    )(f)


def _merged(
    options: Mapping[str, Any], section: Mapping[str, Any], renames: Mapping[str, str]
) -> dict[str, Any]:
    merged = {option: section.get(key) for key, option in renames.items()}
    merged.update({k: v for k, v in options.items() if v})
    return merged


def server_tun_settings(
    options: Mapping[str, Any], section: Mapping[str, Any] | None = None, *, by_user: bool = False
) -> TunServerSettings | None:
    """The server's IP mode from its options and config section (``by_user``: the server has per-user keys, and
    leases addresses by user); raises ValueError for a bad one."""
    names = {"tun": "tun_pools", "tun_dev": "tun_dev", "tun_mtu": "tun_mtu", "tun_nat": "tun_nat"}
    options = _merged(options, section or {}, {**names, "tun_isolate": "tun_isolate"})
    pools = options.get("tun_pools") or ()
    if isinstance(pools, str):
        pools = (pools,)
    if not pools:
        if options.get("tun_nat") or options.get("tun_isolate"):
            raise ValueError("--tun-nat and --tun-isolate need --tun CIDR")
        return None
    from vtunnel.apps.tun import RELIABLE_MTU, TunServerSettings, parse_pools

    return TunServerSettings(
        pools=parse_pools(pools),
        device=options.get("tun_dev") or "vtun0",
        mtu=options.get("tun_mtu") or RELIABLE_MTU,
        client_to_client=not options.get("tun_isolate"),
        nat=bool(options.get("tun_nat")),
        by_user=by_user,
    )


def agent_tun_settings(
    options: Mapping[str, Any], section: Mapping[str, Any] | None = None
) -> TunAgentSettings | None:
    """The agent's IP mode from its options and config section; raises ValueError for a bad one."""
    names = {"tun": "tun_on", "tun_route": "tun_route", "tun_dev": "tun_dev", "tun_mtu": "tun_mtu"}
    options = _merged(options, section or {}, names)
    routes = options.get("tun_route") or ()
    if isinstance(routes, str):
        routes = (routes,)
    if not options.get("tun_on"):
        if routes:
            raise ValueError("--tun-route needs --tun")
        return None
    from vtunnel.apps.tun import TunAgentSettings

    networks = []
    for text in routes:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--tun-route {text!r}: not a network (CIDR)") from None
    return TunAgentSettings(
        device=options.get("tun_dev") or "vtun0", routes=tuple(networks), mtu=options.get("tun_mtu")
    )
