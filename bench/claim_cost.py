"""What a claim check costs: SwC+PD per image alone, and with one claim (and with its nearby
background images), measured image by image in turn with the service's own functions
(``prediction.predict``, ``claim.check_claim``) at the bundle's scale.

Claims: half a few km from the top cell's centre (the claims worth checking), half anywhere on
Earth (the ocean included). The model outputs are the bundle's network on sample photos, the
top cell moved over every cell size as in step 5.

``python -m bench.claim_cost --bundle .cache/bench/bundle-upstream-scale [--update]``; ``make
bench`` runs it as step 11.
"""

from __future__ import annotations

import os

# As in the service (swc_service/server.py): single-threaded BLAS for the small numpy work.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import dataclasses
import math
import sys
import time

import numpy as np

from bench.postprocess_cost import model_outputs, warm_page_cache
from swc_service.bundle import load_bundle
from swc_service.claim import check_claim
from swc_service.config import Settings
from swc_service.options import resolve_options
from swc_service.prediction import ServingState, predict
from visloc_client.v1 import locator_pb2 as pb


def log(msg: str) -> None:
    print(f"[claim_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(bundle, count: int = 2000, neighbours: int = 5) -> dict:
    outs = model_outputs(bundle)
    state = ServingState.of(bundle)
    settings = Settings(bundle=str(bundle.path))
    opts = resolve_options(pb.LocateOptions(), settings, state.density.scales_km)
    rng = np.random.default_rng(0)
    warm_page_cache(bundle)
    plain, claimed, near = [], [], []
    for i in range(count):
        probs, emb = outs[i % len(outs)][0][0], outs[i % len(outs)][1][0]
        target = int(rng.integers(0, bundle.num_cells))
        probs = np.ascontiguousarray(np.roll(probs, target - int(np.argmax(probs))))
        if i % 2:
            lat, lon = math.degrees(math.asin(rng.uniform(-1, 1))), rng.uniform(-180, 180)
        else:
            lat, lon = bundle.centres[target] + rng.normal(0, 0.05, 2)
            lat, lon = float(np.clip(lat, -90, 90)), float((lon + 180) % 360 - 180)

        def alone(probs=probs, emb=emb) -> float:
            t = time.perf_counter()
            predict(state, probs, emb, opts)
            return time.perf_counter() - t

        one = dataclasses.replace(opts, claims=((lat, lon),))

        def with_claim(probs=probs, emb=emb, one=one) -> float:  # as locator.py runs it
            t = time.perf_counter()
            pred = predict(state, probs, emb, one)
            check_claim(state, probs, emb, one.claims[0], (pred.lat, pred.lon), 0.0, 0, pred.claimed[0])
            return time.perf_counter() - t

        # In turn, the order alternating: the second run of an image finds its cell's rows cached.
        if i % 4 < 2:
            plain.append(alone())
            claimed.append(with_claim())
        else:
            claimed.append(with_claim())
            plain.append(alone())
        pred = predict(state, probs, emb, one)
        t = time.perf_counter()
        at = pred.claimed[0]
        check_claim(state, probs, emb, (lat, lon), (pred.lat, pred.lon), one.claim_radius_km, neighbours, at)
        near.append(time.perf_counter() - t)
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q))  # noqa: E731
    res = {
        "images": count,
        "swc_pd_p50_ms": pct(plain, 50), "swc_pd_p99_ms": pct(plain, 99),
        "with_claim_p50_ms": pct(claimed, 50), "with_claim_p99_ms": pct(claimed, 99),
        "claim_neighbours": neighbours,
        "neighbours_p50_ms": pct(near, 50), "neighbours_p99_ms": pct(near, 99),
    }  # fmt: skip
    res["ratio_p50"] = res["with_claim_p50_ms"] / res["swc_pd_p50_ms"]
    res["ratio_p99"] = res["with_claim_p99_ms"] / res["swc_pd_p99_ms"]
    log(
        f"SwC+PD p50 {res['swc_pd_p50_ms']:.3f} ms, with a claim {res['with_claim_p50_ms']:.3f} ms "
        f"({res['ratio_p50']:.2f}x; p99 {res['ratio_p99']:.2f}x); a claim with {neighbours} nearby images "
        f"p50 {res['neighbours_p50_ms']:.3f} ms"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    from bench.report import step_main

    return step_main(argv, "claim_cost", __doc__, "claims", lambda path, count: measure(load_bundle(path), count))


if __name__ == "__main__":
    sys.exit(main())
