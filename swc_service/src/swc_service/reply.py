"""The one place where the data plane's plain results become protobuf replies."""

from __future__ import annotations

from dataclasses import asdict

from visloc_client.preprocessing import PreparedImage
from visloc_client.v1 import locator_pb2 as pb

from . import __version__
from .batcher import BatchedOutput
from .claim import ClaimResult
from .config import Settings
from .prediction import Prediction, ServingState

METHODS = {"swc": pb.METHOD_SWC, "cell": pb.METHOD_CELL}


def locate_response(
    request_id: str,
    state: ServingState,
    image: PreparedImage,
    out: BatchedOutput,
    pred: Prediction,
    stages: dict[str, float],
    claims: tuple[ClaimResult, ...] = (),
) -> pb.LocateResponse:
    """``stages`` maps decode, preprocess, queue, triton, swc, pd, claim (when asked) and total
    to seconds."""
    return pb.LocateResponse(
        request_id=request_id, method=METHODS[pred.method], lat=pred.lat, lon=pred.lon,
        top_cell=pb.Cell(**asdict(pred.top_cell)), confidence=pred.confidence, localizable=pred.localizable,
        model_version=state.model_version, background_version=state.bundle.bundle_id,
        image_width=image.source_width, image_height=image.source_height,
        input_width=image.array.shape[1], input_height=image.array.shape[0], batch_size=out.batch_size,
        neighbours=[pb.Neighbour(**asdict(n)) for n in pred.neighbours],
        prediction_density=[pb.ScaleDensity(**asdict(d)) for d in pred.density],
        top_cells=[pb.Cell(**asdict(c)) for c in pred.top_cells],
        timings=pb.StageTimings(**{f"{stage}_ms": seconds * 1e3 for stage, seconds in stages.items()}),
        claims=[claim_check(c) for c in claims],
    )  # fmt: skip


def claim_check(c: ClaimResult) -> pb.ClaimCheck:
    return pb.ClaimCheck(
        claim=pb.Claim(lat=c.lat, lon=c.lon),
        mass=[pb.ScaleDensity(scale_km=s, density=v) for s, v in zip(c.scales_km, c.mass, strict=True)],
        cell=pb.Cell(**asdict(c.cell)), rank=c.rank, cell_distance_km=c.cell_distance_km, distance_km=c.distance_km,
        neighbours=[pb.ClaimNeighbour(**asdict(n)) for n in c.neighbours],
    )  # fmt: skip


def info_response(
    settings: Settings, state: ServingState, confirmed: bool = True, model_warning: str = ""
) -> pb.GetInfoResponse:
    """``confirmed``: the model check passed on some backend (else model_version is empty and
    ``model_warning`` says why); ``model_warning`` also carries the serving-unchecked warning."""
    s, bundle = settings, state.bundle
    warnings = [w for w in (str(bundle.manifest.get("warning", "")), model_warning) if w]
    defaults = pb.LocateOptions(top_k=s.top_k, eps_km=s.eps_km, conf_scale_km=s.conf_scale_km,
                                conf_threshold=s.conf_threshold)  # fmt: skip
    return pb.GetInfoResponse(
        service_version=__version__, model_name=s.triton_model, model_version=state.model_version if confirmed else "",
        bundle_id=bundle.bundle_id, bundle_source=bundle.source, background_version=bundle.bundle_id,
        bundle_warning=" | ".join(warnings),
        num_cells=bundle.num_cells, num_background=bundle.num_background, embedding_dim=state.embedding_dim,
        pd_scales_km=list(state.density.scales_km), defaults=defaults,
        max_image_bytes=s.max_message_bytes, max_image_pixels=s.max_image_pixels, preprocessing=s.preprocessing,
        exif_transpose=s.exif_transpose, max_input_side=s.max_input_side, accepts_pixels=True,
        fast_decode=s.fast_decode,
    )  # fmt: skip
