"""URL query options, parsed and checked the same way for every transport that takes them (``kcp://``,
``rudp://``): each option has a parser that turns its text into a value or raises
:class:`~vtunnel.transports.base.TransportError` naming the scheme, the option and what it must be."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from vtunnel.transports.base import TransportError

__all__ = [
    "OptionParser",
    "bool_option",
    "check_splice",
    "choice_option",
    "int_option",
    "overrides",
    "seconds_option",
]

#: turns one option's text into its value: ``parse(name, text)``
OptionParser = Callable[[str, str], object]


def int_option(scheme: str, lo: int, hi: int) -> Callable[[str, str], int]:
    """A decimal integer from ``lo`` to ``hi``."""

    def parse(name: str, text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise TransportError(f"{scheme} option {name!r} must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise TransportError(f"{scheme} option {name!r} must be between {lo} and {hi}, got {value}")
        return value

    return parse


def seconds_option(scheme: str, lo: float, hi: float) -> Callable[[str, str], float]:
    """A number of seconds from ``lo`` to ``hi``."""

    def parse(name: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise TransportError(
                f"{scheme} option {name!r} must be a number of seconds, got {text!r}"
            ) from None
        if not lo <= value <= hi:  # also rejects nan
            raise TransportError(
                f"{scheme} option {name!r} must be between {lo} and {hi} seconds, got {text!r}"
            )
        return value

    return parse


def bool_option(scheme: str) -> Callable[[str, str], bool]:
    """On (``1``, ``on``, ``true``, ``yes``) or off (``0``, ``off``, ``false``, ``no``)."""

    def parse(name: str, text: str) -> bool:
        value = text.lower()
        if value in ("1", "on", "true", "yes"):
            return True
        if value in ("0", "off", "false", "no"):
            return False
        raise TransportError(f"{scheme} option {name!r} must be on or off, got {text!r}")

    return parse


def choice_option(scheme: str, choices: Collection[str]) -> Callable[[str, str], str]:
    """One of ``choices`` (case-insensitive; the value is lower-cased)."""

    def parse(name: str, text: str) -> str:
        value = text.lower()
        if value not in choices:
            raise TransportError(
                f"{scheme} option {name!r} must be one of {', '.join(choices)}, got {text!r}"
            )
        return value

    return parse


def overrides(
    scheme: str, params: Mapping[str, str], parsers: Mapping[str, OptionParser], *, skip: Collection[str] = ()
) -> dict[str, object]:
    """Every option of ``params`` (but those in ``skip``, read by the caller) parsed by its parser; an unknown
    one raises, listing the known ones."""
    values: dict[str, object] = {}
    for name, text in params.items():
        if name in skip:
            continue
        parser = parsers.get(name)
        if parser is None:
            known = ", ".join([*skip, *sorted(parsers)])
            raise TransportError(f"unknown {scheme} option {name!r} (known: {known})")
        values[name] = parser(name, text.strip())
    return values


def check_splice(scheme: str, params: Mapping[str, str]) -> None:
    """``splice=PORT`` (lite-tls splice mode, docs/lite-tls.md): a port number, 0 on a server for any free one, or
    ``off`` (an agent that must not splice; on a server, the same as leaving it out). The transports that take it
    only check it here; the applications read it, and it changes nothing in the link."""
    text = params.get("splice")
    if text is not None and text != "off" and not (text.isdigit() and 0 <= int(text) <= 65535):
        raise TransportError(f"{scheme} option 'splice' must be a port (0-65535) or off, got {text!r}")
