"""Typed, protobuf-free views of what the service returns, so callers never touch generated code."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar

from visloc_client.errors import LocateError
from visloc_client.v1 import locator_pb2 as pb

_C = TypeVar("_C", bound="_Copied")


class Method(str, enum.Enum):
    """How the location was obtained (a ``str`` so it prints and serialises as its value)."""

    UNSPECIFIED = "unspecified"
    SWC = "swc"
    CELL = "cell"

    @classmethod
    def from_pb(cls, value: int) -> Method:
        return {pb.METHOD_SWC: cls.SWC, pb.METHOD_CELL: cls.CELL}.get(value, cls.UNSPECIFIED)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _from_fields(cls: Any, msg: Any, **converted: Any) -> Any:
    """``cls`` from the message's fields of the same names; ``converted`` gives the ones that
    need more than a copy (nested messages, enums, repeated fields)."""
    return cls(
        **{f.name: converted[f.name] if f.name in converted else getattr(msg, f.name) for f in dataclasses.fields(cls)}
    )


class _Copied:
    """A view whose fields are copies of the message's fields of the same names."""

    @classmethod
    def from_pb(cls: type[_C], msg: Any) -> _C:
        return _from_fields(cls, msg)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LocateOptions:
    """Per-request options; ``None`` means the server's default (see ``ServiceInfo.defaults``).

    Only types are checked here; ranges are the server's to judge (it answers INVALID_ARGUMENT).
    """

    top_k: int | None = None
    eps_km: float | None = None
    conf_scale_km: float | None = None
    conf_threshold: float | None = None
    neighbours: int = 0
    top_cells: int = 0
    claims: tuple[tuple[float, float], ...] = ()  # (lat, lon) the photo is said to be from
    claim_radius_km: float | None = None
    claim_neighbours: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "neighbours", "top_cells", "claim_neighbours"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value)
        for name in ("eps_km", "conf_scale_km", "conf_threshold", "claim_radius_km"):
            value = getattr(self, name)
            if value is not None:
                _check_real(name, value)
        claims = tuple(tuple(c) for c in self.claims)
        for c in claims:
            if len(c) != 2:
                raise ValueError(f"a claim is (lat, lon), got {c!r}")
            for value in c:
                _check_real("a claim's coordinate", value)
        object.__setattr__(self, "claims", claims)

    def to_pb(self) -> pb.LocateOptions:
        msg = pb.LocateOptions(
            return_neighbours=self.neighbours,
            return_top_cells=self.top_cells,
            claims=[pb.Claim(lat=lat, lon=lon) for lat, lon in self.claims],
            claim_neighbours=self.claim_neighbours,
        )
        for name in ("top_k", "eps_km", "conf_scale_km", "conf_threshold", "claim_radius_km"):
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        return msg

    @classmethod
    def from_pb(cls, msg: pb.LocateOptions) -> LocateOptions:
        return cls(
            top_k=msg.top_k if msg.HasField("top_k") else None,
            eps_km=msg.eps_km if msg.HasField("eps_km") else None,
            conf_scale_km=msg.conf_scale_km if msg.HasField("conf_scale_km") else None,
            conf_threshold=msg.conf_threshold if msg.HasField("conf_threshold") else None,
            neighbours=msg.return_neighbours,
            top_cells=msg.return_top_cells,
            claims=tuple((c.lat, c.lon) for c in msg.claims),
            claim_radius_km=msg.claim_radius_km if msg.HasField("claim_radius_km") else None,
            claim_neighbours=msg.claim_neighbours,
        )


class LocateOptionArgs(TypedDict, total=False):
    """``LocateOptions`` as keywords, for type checkers: ``client.locate(image, **options)``
    (a test keeps the two in step)."""

    top_k: int | None
    eps_km: float | None
    conf_scale_km: float | None
    conf_threshold: float | None
    neighbours: int
    top_cells: int
    claims: tuple[tuple[float, float], ...]
    claim_radius_km: float | None
    claim_neighbours: int


@dataclass(frozen=True)
class Cell(_Copied):
    id: int
    lat: float
    lon: float
    probability: float


@dataclass(frozen=True)
class Neighbour(_Copied):
    """A background image that SwC considered; ``row_id`` indexes the upstream collection."""

    row_id: int
    similarity: float
    lat: float
    lon: float
    cluster: int
    in_prediction: bool


@dataclass(frozen=True)
class ScaleDensity(_Copied):
    scale_km: float
    density: float


@dataclass(frozen=True)
class ClaimNeighbour(_Copied):
    """A background image near a claimed location; ``distance_km`` from the claim."""

    row_id: int
    similarity: float
    lat: float
    lon: float
    distance_km: float


@dataclass(frozen=True)
class ClaimCheck:
    """How much of the model's belief lies near a claimed location (a belief, not a proof):
    ``mass`` is the probability of the cells within each PD scale of the claim; ``cell`` the
    cell nearest the claim and ``rank`` its place among all cells (1 = the top cell);
    ``distance_km`` from the prediction to the claim."""

    lat: float
    lon: float
    mass: tuple[ScaleDensity, ...] = ()
    cell: Cell | None = None
    rank: int = 0
    cell_distance_km: float = 0.0
    distance_km: float = 0.0
    neighbours: tuple[ClaimNeighbour, ...] = ()

    def mass_at(self, scale_km: float) -> float:
        """The mass within ``scale_km`` (one of the served PD scales)."""
        for d in self.mass:
            if d.scale_km == scale_km:
                return d.density
        raise KeyError(f"{scale_km} km is not among the served scales {[d.scale_km for d in self.mass]}")

    @classmethod
    def from_pb(cls, msg: pb.ClaimCheck) -> ClaimCheck:
        return cls(
            lat=msg.claim.lat,
            lon=msg.claim.lon,
            mass=tuple(ScaleDensity.from_pb(d) for d in msg.mass),
            cell=Cell.from_pb(msg.cell) if msg.HasField("cell") else None,
            rank=msg.rank,
            cell_distance_km=msg.cell_distance_km,
            distance_km=msg.distance_km,
            neighbours=tuple(ClaimNeighbour.from_pb(n) for n in msg.neighbours),
        )


@dataclass(frozen=True)
class Timings(_Copied):
    """Server-side milliseconds per stage (``queue_ms``: waiting to be batched for Triton)."""

    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    triton_ms: float = 0.0
    swc_ms: float = 0.0
    pd_ms: float = 0.0
    total_ms: float = 0.0
    claim_ms: float = 0.0


@dataclass(frozen=True)
class LocateResult:
    """One prediction. ``confidence`` is the PD at ``conf_scale_km``; ``localizable`` is
    ``confidence > conf_threshold`` as decided by the server."""

    request_id: str
    lat: float
    lon: float
    method: Method
    confidence: float
    localizable: bool
    top_cell: Cell | None = None
    prediction_density: tuple[ScaleDensity, ...] = ()
    neighbours: tuple[Neighbour, ...] = ()
    top_cells: tuple[Cell, ...] = ()
    model_version: str = ""
    background_version: str = ""
    timings: Timings = field(default_factory=Timings)
    image_width: int = 0
    image_height: int = 0
    input_width: int = 0
    input_height: int = 0
    batch_size: int = 0
    claims: tuple[ClaimCheck, ...] = ()

    @classmethod
    def from_pb(cls, msg: pb.LocateResponse) -> LocateResult:
        return _from_fields(
            cls,
            msg,
            method=Method.from_pb(msg.method),
            top_cell=Cell.from_pb(msg.top_cell) if msg.HasField("top_cell") else None,
            prediction_density=tuple(ScaleDensity.from_pb(d) for d in msg.prediction_density),
            neighbours=tuple(Neighbour.from_pb(n) for n in msg.neighbours),
            top_cells=tuple(Cell.from_pb(c) for c in msg.top_cells),
            timings=Timings.from_pb(msg.timings),
            claims=tuple(ClaimCheck.from_pb(c) for c in msg.claims),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the method as its string value)."""
        data = dataclasses.asdict(self)
        data["method"] = self.method.value
        return data


@dataclass(frozen=True)
class ServiceInfo:
    """What GetInfo says is being served, including option defaults and input limits."""

    service_version: str
    model_name: str
    model_version: str
    bundle_id: str
    bundle_source: str
    background_version: str
    num_cells: int
    num_background: int
    embedding_dim: int
    pd_scales_km: tuple[float, ...]
    defaults: LocateOptions
    max_image_bytes: int
    max_image_pixels: int
    preprocessing: str
    bundle_warning: str

    @classmethod
    def from_pb(cls, msg: pb.GetInfoResponse) -> ServiceInfo:
        return _from_fields(
            cls, msg, pd_scales_km=tuple(msg.pd_scales_km), defaults=LocateOptions.from_pb(msg.defaults)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BatchItem:
    """One outcome of ``locate_many``: exactly one of ``result`` and ``error`` is set.

    ``index`` is the position in the input iterable; ``source`` the path for path inputs (None
    for bytes). ``error`` is a ``LocateError`` for a service-side failure or an ``OSError`` when
    the image could not be read locally.
    """

    index: int
    source: str | None
    result: LocateResult | None = None
    error: LocateError | OSError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
