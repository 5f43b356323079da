"""What ``--triton-url`` names: fixed ``HOST:PORT`` endpoints, a ``dns:///`` name or a ``file:///`` list.

Parsed where the settings are checked (a malformed target fails at start-up, naming itself) and
resolved by the endpoint pool (:mod:`swc_service.triton_pool`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {address!r}")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Target:
    """What ``--triton-url`` names: ``kind`` static (fixed addresses), dns or file."""

    kind: str
    addresses: tuple[str, ...] = ()  # static
    name: str = ""  # dns: the host name; file: the path
    port: int = 0  # dns

    @property
    def dynamic(self) -> bool:
        return self.kind != "static"


def parse_target(text: str) -> Target:
    """``HOST:PORT``, ``H:P,H:P``, ``dns:///NAME:PORT`` or ``file:///path``; ValueError otherwise."""
    text = text.strip()
    if text.startswith("dns:"):
        rest = text.removeprefix("dns:").removeprefix("//")
        if not rest.startswith("/"):
            raise ValueError(f"dns target must be dns:///NAME:PORT (no DNS authority), got {text!r}")
        host, port = _split(rest[1:])
        return Target("dns", name=host, port=port)
    if text.startswith("file:"):
        path = text.removeprefix("file://")
        if not path.startswith("/"):
            raise ValueError(f"file target must be file:///absolute/path, got {text!r}")
        return Target("file", name=path)
    addresses = tuple(join_address(*_split(a)) for a in text.split(",") if a.strip())
    if not addresses:
        raise ValueError("empty Triton target")
    return Target("static", addresses=addresses)


def read_endpoint_file(path: str) -> list[str]:
    """``HOST:PORT`` per line; blank lines and ``#`` comments skipped; a bad line is an error."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                out.append(join_address(*_split(line)))
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
    return out
