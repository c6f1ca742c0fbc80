"""kcp:// URL options: presets, overrides and the errors for bad ones."""

from __future__ import annotations

from dataclasses import fields

import pytest

from vtunnel.arq.kcp_options import PRESETS, KCPOptions
from vtunnel.transports.base import Endpoint, SecurityConfig, TransportError, get_transport
from vtunnel.transports.kcp.options import parse_options
from vtunnel.transports.kcp.transport import KCPTransport


def test_defaults_are_fast3_with_big_windows() -> None:
    opts = parse_options({})
    assert (opts.mode, opts.nodelay, opts.interval, opts.resend, opts.nc) == ("fast3", 1, 10, 2, 1)
    assert (opts.sndwnd, opts.rcvwnd, opts.mtu) == (4096, 4096, 1350)
    assert opts.conv is None


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("normal", (0, 40, 2, 1)),
        ("fast", (0, 30, 2, 1)),
        ("fast2", (1, 20, 2, 1)),
        ("fast3", (1, 10, 2, 1)),
        ("fast4", (1, 5, 1, 1)),
        ("FAST2", (1, 20, 2, 1)),
    ],
)
def test_presets(mode: str, expected: tuple[int, int, int, int]) -> None:
    nd = parse_options({"mode": mode}).nodelay_args
    assert (nd.nodelay, nd.interval, nd.resend, nd.nc) == expected


def test_overrides_apply_on_top_of_the_preset() -> None:
    opts = parse_options(
        {"mode": "normal", "interval": "15", "sndwnd": "256", "rcvwnd": "512", "mtu": "1200"}
    )
    assert (opts.nodelay, opts.interval, opts.sndwnd, opts.rcvwnd, opts.mtu) == (0, 15, 256, 512, 1200)
    assert parse_options({"conv": "0"}).conv == 0
    assert parse_options({"conv": "random"}).conv is None
    assert parse_options({"timeout": "2.5", "idle": "30"}).timeout == 2.5


def test_without_pacing_the_send_window_defaults_to_kcptuns() -> None:
    # unpaced, ikcp sends a whole window at once: the paced default of 4096 would overrun shallow queues
    assert parse_options({"pacing": "off"}).sndwnd == 1024
    assert parse_options({"pacing": "off", "sndwnd": "4096"}).sndwnd == 4096
    assert parse_options({"pacing": "on"}).sndwnd == 4096


def test_every_option_field_can_be_set_from_the_url() -> None:
    samples = {
        "nodelay": "1",
        "interval": "20",
        "resend": "0",
        "nc": "0",
        "sndwnd": "64",
        "rcvwnd": "256",
        "mtu": "1400",
        "conv": "7",
        "timeout": "3",
        "idle": "9",
        "sessions": "10",
        "sockbuf": "1048576",
        "connect_timeout": "4",
    }
    opts = parse_options({**samples, "pacing": "off", "ackrepeat": "off", "fec": "10/3"})
    assert opts.pacing is False
    assert opts.ackrepeat is False
    assert opts.fec == (10, 3)
    for f in fields(KCPOptions):
        if f.name not in ("mode", "pacing", "ackrepeat", "fec"):
            assert str(getattr(opts, f.name)).rstrip("0").rstrip(".") == samples[f.name].rstrip("0").rstrip(
                "."
            )


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"mode": "turbo"}, "mode"),
        ({"sndwindow": "10"}, "sndwindow"),
        ({"mtu": "abc"}, "mtu"),
        ({"mtu": "10"}, "mtu"),
        ({"mtu": "70000"}, "mtu"),
        ({"rcvwnd": "32"}, "rcvwnd"),
        ({"nc": "2"}, "nc"),
        ({"conv": "-1"}, "conv"),
        ({"conv": "4294967296"}, "conv"),
        ({"timeout": "nan"}, "timeout"),
        ({"idle": "0"}, "idle"),
        ({"interval": ""}, "interval"),
    ],
)
def test_bad_options_name_the_option(params: dict[str, str], named: str) -> None:
    with pytest.raises(TransportError, match=repr(named)):
        parse_options(params)


@pytest.mark.parametrize("value", ["on", "off", "1", ""])
def test_the_removed_passthrough_option_says_what_replaced_it(value: str) -> None:
    """``passthrough`` (lite-tls muxed over clear runs of sealed datagrams) is gone: a URL that still has it is
    refused, whatever its value, with a message that points at splice mode."""
    with pytest.raises(
        TransportError, match=r"kcp option 'passthrough' was removed: .*splice=PORT .*lite-tls\.md"
    ):
        parse_options({"passthrough": value})


def test_a_kcp_url_with_passthrough_is_refused() -> None:
    with pytest.raises(TransportError, match="'passthrough' was removed"):
        get_transport("kcp").check(Endpoint.parse("kcp://127.0.0.1:9000?passthrough=on&splice=9001"))


def test_check_and_registry() -> None:
    transport = get_transport("kcp")
    assert isinstance(transport, KCPTransport)
    transport.check(Endpoint.parse("kcp://127.0.0.1:9000?mode=fast3&sndwnd=1024&rcvwnd=1024&mtu=1350"))
    with pytest.raises(TransportError, match="'bogus'"):
        transport.check(Endpoint.parse("kcp://127.0.0.1:9000?bogus=1"))
    assert set(PRESETS) == {"normal", "fast", "fast2", "fast3", "fast4"}


@pytest.mark.anyio
async def test_connect_and_listen_reject_bad_options_before_opening_anything() -> None:
    transport = KCPTransport()
    with pytest.raises(TransportError, match="'mode'"):
        await transport.connect(Endpoint.parse("kcp://127.0.0.1:9?mode=x"), security=SecurityConfig())
    with pytest.raises(TransportError, match="'mtu'"):
        await transport.listen(Endpoint.parse("kcp://127.0.0.1:0?mtu=1"), security=SecurityConfig())


@pytest.mark.parametrize(
    ("text", "value"), [("on", True), ("1", True), ("TRUE", True), ("off", False), ("no", False)]
)
def test_pacing_is_on_by_default_and_can_be_turned_off(text: str, value: bool) -> None:
    assert parse_options({}).pacing is True
    assert parse_options({"pacing": text}).pacing is value


def test_pacing_takes_only_on_or_off() -> None:
    with pytest.raises(TransportError, match="pacing"):
        parse_options({"pacing": "maybe"})
