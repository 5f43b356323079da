"""The ``visloc`` command: locate images, evaluate a dataset, describe the service.

Everything goes through the live service; the CLI only reads files, fetches URLs on the
caller's machine, and does the evaluation arithmetic on what the service returns.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visloc_client import __version__, limits, tracing
from visloc_client._common import LOAD_BALANCING_POLICIES, Claimed, TLSConfig
from visloc_client.client import LocatorClient
from visloc_client.dataset import list_images, load_metadata, match_id
from visloc_client.errors import LocateError
from visloc_client.evaluation import (
    CLAIM_DISTANCES_KM,
    CLAIM_FAR,
    RADII_KM,
    claim_roc,
    false_claims,
    format_claim_roc,
    format_split,
    format_target,
    haversine_km,
    parse_goal,
    risk_coverage,
    roc_curve,
    split_summary,
    target_threshold,
)
from visloc_client.fetch import DEFAULT_MAX_BYTES, FetchError, fetch_url, is_url
from visloc_client.progress import Progress
from visloc_client.results import LocateOptions, LocateResult
from visloc_client.upload import MODES
from visloc_client.web.serve import add_arguments as web_arguments

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _err(message: str) -> None:
    print(f"visloc: {message}", file=sys.stderr)


def _describe(error: BaseException) -> str:
    if isinstance(error, LocateError):
        return f"{error.code.name}: {error.reason}"
    return f"{type(error).__name__}: {error}"


# --- arguments -------------------------------------------------------------------------------


def _connection_args(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Connection options, accepted before or after the subcommand. On the subcommands the
    defaults are suppressed so that they only override what the main parser already set."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=default(os.environ.get("VISLOC_TARGET", DEFAULT_TARGET)),
        help="HOST:PORT of the Locate service, or any gRPC target such as dns:///NAME:PORT "
        f"(env VISLOC_TARGET; default {DEFAULT_TARGET})",
    )
    g.add_argument("--tls", action="store_true", default=default(False), help="use TLS (system roots)")
    g.add_argument("--ca", default=default(None), help="PEM root certificates (implies --tls)")
    g.add_argument("--cert", default=default(None), help="client certificate for mutual TLS")
    g.add_argument("--key", default=default(None), help="client private key for mutual TLS")
    g.add_argument(
        "--auth-token-file",
        dest="token_file",
        metavar="FILE",
        default=default(os.environ.get("VISLOC_AUTH_TOKEN_FILE") or None),
        help="file holding the bearer token the service requires (env VISLOC_AUTH_TOKEN_FILE; "
        "else the token itself from env VISLOC_AUTH_TOKEN): the service's own names",
    )
    g.add_argument(
        "--token-file",
        dest="token_file",
        metavar="FILE",
        action=_Deprecated,
        default=argparse.SUPPRESS,
        help="deprecated: use --auth-token-file",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=default(30.0),
        help="seconds per call, retries included (default 30)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=default(3),
        help="retries on UNAVAILABLE, with backoff (default 3)",
    )
    g.add_argument(
        "--load-balancing",
        choices=LOAD_BALANCING_POLICIES,
        default=default("pick_first"),
        help="how calls are spread over the addresses the target resolves to: pick_first (the "
        "default: all to one) or round_robin (each call to the next; with a headless Kubernetes "
        "Service, e.g. --target dns:///swc-service.visloc.svc.cluster.local:50051, over all pods)",
    )
    g.add_argument(
        "--preprocess",
        choices=MODES,
        default=default("auto"),
        help="where photos are preprocessed: auto (the default: here, when the model input is smaller "
        "than the file, e.g. a phone photo; needs Pillow and numpy), client (here whenever possible) or "
        "server (send the files). The answers are the same, bit for bit",
    )


class _Deprecated(argparse.Action):
    """An old spelling of an option: still works, with a warning naming the new one."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        _err(f"{option_string} is deprecated; use --auth-token-file")
        setattr(namespace, self.dest, values)


def _token(token_file: str | None) -> str | None:
    """The bearer token, read as the service reads its own: a file, else VISLOC_AUTH_TOKEN
    (the old VISLOC_TOKEN still works, with a warning)."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"auth token file {token_file} is empty")
        return token
    if token := os.environ.get("VISLOC_AUTH_TOKEN"):
        return token
    if token := os.environ.get("VISLOC_TOKEN"):
        _err("VISLOC_TOKEN is deprecated; use VISLOC_AUTH_TOKEN")
        return token
    return None


def _option_args(parser: argparse.ArgumentParser, *, returns: bool) -> None:
    g = parser.add_argument_group("Locate options (unset: the server's defaults)")
    g.add_argument("--top-k", type=int, help="neighbours considered by SwC")
    g.add_argument("--eps-km", type=float, help="DBSCAN radius in km")
    g.add_argument("--conf-scale-km", type=float, help="PD scale that gives the confidence")
    g.add_argument("--conf-threshold", type=float, help="localizable when confidence > this")
    if returns:
        g.add_argument("--neighbours", type=int, default=0, help="SwC neighbours to return")
        g.add_argument("--top-cells", type=int, default=0, help="most probable cells to return")
        c = parser.add_argument_group("claim check (docs/client.md: how to read it)")
        c.add_argument(
            "--claim", dest="claims", action="append", type=parse_claim, metavar="LAT,LON",
            help="a location the photo is said to be from: the model's probability mass around it at every PD "
            "scale, the rank of its cell, its distance from the prediction (repeatable)",
        )  # fmt: skip
        c.add_argument("--claim-radius-km", type=float, help="radius of the background search around a claim")
        c.add_argument("--claim-neighbours", type=int, help="background images near each claim to return")


def parse_claim(text: str) -> tuple[float, float]:
    """``LAT,LON`` in degrees (``48.8584,2.2945``, spaces allowed); the ranges are checked here
    and by the service."""
    try:
        return limits.parse_claim(text.replace(" ", ""))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``LocateOptions`` fields given on the command line."""
    names = (f.name for f in dataclasses.fields(LocateOptions))
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def attach_claims(argv: Sequence[str]) -> list[str]:
    """``--claim -33.9,151.2`` as ``--claim=-33.9,151.2``: argparse reads a value that starts with
    ``-`` and is not a plain number as an option, and would refuse half of the Earth's claims."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":  # the rest are positionals
            out += [arg, *args]
            break
        if arg == "--claim":
            value = next(args, None)
            if value is None:
                out.append(arg)
            elif value.startswith("-") and not value.startswith("--") and "," in value:  # LAT,LON
                out.append(f"--claim={value}")
            else:
                out += [arg, value]
        else:
            out.append(arg)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse, with ``--claim`` taking a value that starts with '-' (:func:`attach_claims`)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        return super().parse_known_args(attach_claims(sys.argv[1:] if args is None else args), namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="visloc", description="Ask the visloc Locate service where photos were taken.")
    parser.add_argument("--version", action="version", version=f"visloc {__version__}")
    _connection_args(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _connection_args(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "locate",
        parents=[common],
        help="locate images, URLs or stdin",
        description="One line per image: name, lat, lon, confidence, localizable, method "
        "(tab-separated), or JSON lines with --json. Exits 1 if any image failed.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE|URL|-", help="files, http(s) URLs, or - for stdin")
    _option_args(p, returns=True)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="largest URL or stdin body to read (default 20 MiB)",
    )
    p.add_argument("--fetch-timeout", type=float, default=30.0, help="seconds to fetch a URL")
    p.set_defaults(func=cmd_locate)

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="evaluate a labelled image folder through the service",
        description="Acc@{0.1,1,25,200,750,2500}km and the median error, for all, localizable "
        "and non-localizable images, as the reference evaluation reports them; failures are "
        "counted and listed. Ctrl-C prints the partial report. Selective prediction: the "
        "risk-coverage curve of every served PD scale goes into the report (and --risk-plot); "
        "--accuracy-target picks the lowest confidence threshold that reaches a goal.",
    )
    p.add_argument("--images", required=True, help="folder of images (not recursive)")
    p.add_argument(
        "--metadata",
        help="upstream .pkl or a CSV with header id,lat,lon (default: GPS from each photo's EXIF; "
        "needs Pillow: pip install 'visloc-client[exif]')",
    )
    p.add_argument(
        "--accuracy-target",
        metavar="ACC@KM",
        help="e.g. 0.7@25: the lowest threshold whose kept photos reach Acc@25km >= 70%%, with its "
        "coverage and bootstrap confidence intervals, for every PD scale",
    )
    p.add_argument("--risk-plot", help="write the risk-coverage curves here (PNG; needs matplotlib)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--concurrency", type=int, default=16, help="images in flight (default 16)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--plot", help="write a cumulative accuracy plot here (PNG; needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    c = p.add_argument_group("claim check (docs/client.md: how to read it)")
    c.add_argument(
        "--claims", dest="check_claims", action="store_true",
        help="also check claims: each photo's own coordinates (true) against another photo's at least "
        f"{'/'.join(f'{d:g}' for d in CLAIM_DISTANCES_KM)} km away (false, drawn with --seed): ROC AUC and the "
        "true-accept rate at --claims-far for every PD scale",
    )  # fmt: skip
    c.add_argument("--claims-far", type=float, default=CLAIM_FAR, help=f"false-accept rate (default {CLAIM_FAR})")
    c.add_argument("--claims-bootstrap", type=int, default=200, help="bootstrap resamples for claims (default 200)")
    c.add_argument("--claims-plot", help="write the claim ROC curves here (PNG; needs matplotlib)")
    _option_args(p, returns=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", parents=[common], help="what the service is serving")
    p.add_argument("--json", action="store_true", help="the service's answer as one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "web",
        parents=[common],
        help="serve the web page: drop a photo, see where it was taken (docs/web.md)",
        description="One page in front of the Locate service, which it calls through this client.",
    )
    web_arguments(p)
    p.set_defaults(func=cmd_web)
    return parser


def _client(args: argparse.Namespace) -> LocatorClient:
    tls: bool | TLSConfig = False
    if args.tls or args.ca or args.cert or args.key:
        tls = TLSConfig(ca=args.ca, cert=args.cert, key=args.key)
    token = _token(args.token_file)
    # pick_first is gRPC's default: leave the service config unset for it.
    balancing = None if args.load_balancing == "pick_first" else args.load_balancing
    return LocatorClient(
        args.target, tls=tls, token=token, timeout=args.timeout, retries=args.retries, load_balancing=balancing,
        preprocess=args.preprocess,
    )  # fmt: skip


# --- locate ----------------------------------------------------------------------------------


def _read_stdin(max_bytes: int) -> bytes:
    data = sys.stdin.buffer.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FetchError(f"stdin: more than the limit of {max_bytes} bytes")
    return data


def _load_input(spec: str, args: argparse.Namespace) -> bytes:
    if spec == "-":
        return _read_stdin(args.max_bytes)
    if is_url(spec):
        return fetch_url(spec, max_bytes=args.max_bytes, timeout=args.fetch_timeout)
    return Path(spec).read_bytes()


def result_line(name: str, result: LocateResult) -> str:
    """name, lat, lon, confidence, localizable, method; then a column per claim (the mass at
    every scale, the rank of the claim's cell, the km from the prediction)."""
    flag = "localizable" if result.localizable else "not-localizable"
    line = f"{name}\t{result.lat:.6f}\t{result.lon:.6f}\t{result.confidence:.4f}\t{flag}\t{result.method.value}"
    for c in result.claims:
        mass = " ".join(f"{d.scale_km:g}km={d.density:.4f}" for d in c.mass)
        line += f"\tclaim {c.lat:.6f},{c.lon:.6f}: mass {mass}; cell rank {c.rank}; {c.distance_km:.1f} km away"
    return line


def cmd_locate(args: argparse.Namespace) -> int:
    options = _options(args)
    failed = 0
    with _client(args) as client:
        for spec in args.images:
            name = "<stdin>" if spec == "-" else spec
            try:
                result = client.locate(_load_input(spec, args), **options)
            except (OSError, LocateError) as err:
                failed += 1
                _err(f"{name}: {_describe(err)}")
                if args.json:
                    error = err.to_dict() if isinstance(err, LocateError) else {"code": "LOCAL", "reason": str(err)}
                    print(json.dumps({"source": name, "error": error}), flush=True)
                continue
            if args.json:
                print(json.dumps({"source": name, **result.to_dict()}), flush=True)
            else:
                print(result_line(name, result), flush=True)
    return EXIT_FAILED if failed else 0


# --- info ------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            info = client.info()
        except LocateError as err:
            _err(_describe(err))
            return EXIT_FAILED
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    d = info.defaults
    rows = [
        ("service", info.service_version),
        ("model", f"{info.model_name} {info.model_version}"),
        ("bundle", f"{info.bundle_id} ({info.bundle_source})"),
        ("background", f"{info.background_version}: {info.num_background} images"),
        ("cells", str(info.num_cells)),
        ("embedding dim", str(info.embedding_dim)),
        ("PD scales (km)", ", ".join(f"{s:g}" for s in info.pd_scales_km)),
        ("preprocessing", info.preprocessing),
        (
            "defaults",
            f"top_k={d.top_k} eps_km={d.eps_km} conf_scale_km={d.conf_scale_km} "
            f"conf_threshold={d.conf_threshold} neighbours={d.neighbours} top_cells={d.top_cells}",
        ),
        ("max image bytes", str(info.max_image_bytes)),
        ("max image pixels", str(info.max_image_pixels)),
    ]
    if info.bundle_warning:
        rows.append(("WARNING", info.bundle_warning))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


# --- web -------------------------------------------------------------------------------------


def cmd_web(args: argparse.Namespace) -> int:
    from visloc_client.web.serve import serve

    return serve(args, _client(args))


# --- evaluate --------------------------------------------------------------------------------

_LISTED = 20  # with --out, the console lists this many failures; the report lists them all


def _ground_truth(
    args: argparse.Namespace, files: list[Path]
) -> tuple[list[tuple[Path, str]], dict[str, tuple[float, float]], list[str]]:
    """(jobs, id -> (lat, lon), files without ground truth): from --metadata, else EXIF GPS."""
    jobs: list[tuple[Path, str]] = []
    no_metadata: list[str] = []
    if args.metadata:
        metadata = load_metadata(args.metadata)
        for path in files:
            image_id = match_id(path.name, metadata)
            if image_id is None:
                no_metadata.append(path.name)
            else:
                jobs.append((path, image_id))
        return jobs, metadata, no_metadata
    from visloc_client.exif import GPSError, gps_from_bytes

    metadata = {}
    for path in files:
        try:
            metadata[path.name] = gps_from_bytes(path.read_bytes())
            jobs.append((path, path.name))
        except GPSError as err:
            no_metadata.append(f"{path.name}: {err}")
    return jobs, metadata, no_metadata


def _selective(args: argparse.Namespace, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Risk-coverage curves per served PD scale and, with --accuracy-target, the threshold."""
    scales = sorted({float(s) for r in records for s in r["prediction_density"]})
    goal = parse_goal(args.accuracy_target) if args.accuracy_target else None
    radii = tuple(sorted(set(RADII_KM) | ({goal[1]} if goal else set())))
    errors = [r["error_km"] for r in records]
    out: dict[str, Any] = {"radii_km": list(radii), "curves": {}, "target": None}
    for scale in scales:
        conf = [r["prediction_density"].get(f"{scale:g}", 0.0) for r in records]
        out["curves"][f"{scale:g}"] = [p.to_dict() for p in risk_coverage(errors, conf, radii)]
    if goal:
        out["target"] = {
            f"{scale:g}": target_threshold(
                errors,
                [r["prediction_density"].get(f"{scale:g}", 0.0) for r in records],
                goal[0],
                goal[1],
                resamples=args.bootstrap,
                seed=args.seed,
            )
            for scale in scales
        }
    return out


def _plot_risk(path: str, selective: dict[str, Any], radius_km: float, name: str) -> None:
    from visloc_client.plot import plot_risk_coverage

    key = f"{radius_km:g}"
    curves = [
        (f"PD {scale} km", [(p["coverage"], p["accuracy"][key]) for p in points])
        for scale, points in selective["curves"].items()
    ]
    targets = selective["target"] or {}
    chosen = [(f"PD {s} km", t["coverage"], t["accuracy_at_threshold"]) for s, t in targets.items() if t["reached"]]
    goal = next(iter(targets.values()))["accuracy"] if targets else None
    plot_risk_coverage(path, curves, radius_km=radius_km, goal=goal, chosen=chosen, title=f"Risk and coverage: {name}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    if not 0 < args.claims_far < 1:
        _err(f"--claims-far must be in (0, 1), got {args.claims_far}")
        return EXIT_USAGE
    if args.plot or args.risk_plot or args.claims_plot:
        from visloc_client.plot import require_matplotlib

        try:
            require_matplotlib()
        except RuntimeError as err:
            _err(str(err))
            return EXIT_USAGE
    try:
        if args.accuracy_target:
            parse_goal(args.accuracy_target)
        if not args.metadata:
            from visloc_client.exif import require_pillow

            require_pillow()
        files = list_images(args.images)
        jobs, metadata, no_metadata = _ground_truth(args, files)
    except (OSError, ValueError, RuntimeError) as err:
        _err(_describe(err))
        return EXIT_USAGE
    # Photos the metadata lists that the folder lacks: the denominator a reader compares with.
    missing = sorted(set(metadata) - {image_id for _, image_id in jobs}) if args.metadata else []
    listed = f"; {len(missing)} of the metadata's {len(metadata)} photos are not in the folder" if args.metadata else ""
    print(
        f"evaluating {len(jobs)} images against {args.target} ({len(no_metadata)} of {len(files)} have no "
        f"metadata{listed})",
        file=sys.stderr,
    )
    if missing and len(missing) > 0.01 * len(metadata):
        share = 100 * len(missing) / len(metadata)
        _err(
            f"warning: {len(missing)} of the {len(metadata)} photos in {args.metadata} ({share:.1f} %) are missing "
            f"from {args.images}: the results are over {len(jobs)} photos, not {len(metadata)}"
        )
    inputs: list[Any] = [path for path, _ in jobs]
    claim_plan: list[dict[float, int | None]] = []
    if args.check_claims:
        points = [metadata[image_id] for _, image_id in jobs]
        claim_plan = false_claims(points, CLAIM_DISTANCES_KM, seed=args.seed)
        inputs = [
            Claimed(path, (points[i], *(points[j] for j in plan.values() if j is not None)))
            for i, ((path, _), plan) in enumerate(zip(jobs, claim_plan))
        ]

    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    progress = Progress(len(jobs), enabled=not args.no_progress)
    interrupted = False
    stream_error: LocateError | None = None
    start = time.monotonic()
    with _client(args) as client:
        items = client.locate_many(inputs, concurrency=args.concurrency, ordered=False, **_options(args))
        try:
            with contextlib.closing(items):
                for item in items:
                    path, image_id = jobs[item.index]
                    if item.result is None:
                        failures.append(_failure(path.name, image_id, item.error))
                    else:
                        record = _record(path.name, image_id, metadata[image_id], item.result)
                        if args.check_claims:
                            record["claims"] = _claim_record(item.result, claim_plan[item.index])
                        records.append(record)
                    progress.update(failed=int(item.result is None))
        except KeyboardInterrupt:
            interrupted = True
        except LocateError as err:
            stream_error = err
    progress.close()
    elapsed = time.monotonic() - start

    records.sort(key=lambda r: r["file"])
    split = split_summary([r["error_km"] for r in records], [r["localizable"] for r in records])
    not_run = len(jobs) - len(records) - len(failures)
    selective = _selective(args, records)
    report = {
        "target": args.target,
        "images": str(args.images),
        "metadata": str(args.metadata) if args.metadata else None,
        "ground_truth": "metadata" if args.metadata else "exif",
        "options": _options(args),
        "complete": not_run == 0,
        "interrupted": interrupted,
        "stream_error": stream_error.to_dict() if stream_error else None,
        "elapsed_s": round(elapsed, 3),
        "counts": {
            "files": len(files),
            "evaluated": len(records),
            "failed": len(failures),
            "no_metadata": len(no_metadata),
            "not_run": not_run,
            **({"metadata_photos": len(metadata), "missing": len(missing)} if args.metadata else {}),
        },
        "missing_first": missing[:_LISTED],
        "summary": split.to_dict(),
        "selective": selective,
        "claims": _claims_report(args, records) if args.check_claims else None,
        "records": records,
        "failures": failures,
        "no_metadata": no_metadata,
    }

    print(format_split(split))
    if selective["target"]:
        print("\nSelective prediction (lowest confidence threshold reaching the target)")
        for scale, result in selective["target"].items():
            print(f"  {format_target(float(scale), result)}")
    if report["claims"]:
        c = report["claims"]
        print(f"\nClaim check: {c['true_claims']} true claims against false claims (seed {args.seed}); "
              "a claim is accepted when the model's mass around it >= the threshold")  # fmt: skip
        for distance, by_scale in c["results"].items():
            for scale, result in by_scale.items():
                print(f"  {format_claim_roc(float(distance), float(scale), result)}")
    if args.metadata:
        print(f"\nPhotos in the metadata: {len(metadata)}; evaluated {len(records)}; missing from the folder "
              f"{len(missing)}")  # fmt: skip
        if missing:
            more = f" ... and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
            print(f"  first missing: {', '.join(missing[:_LISTED])}{more}")
    _print_list(f"Failed images: {len(failures)}", [_failure_line(f) for f in failures], args.out)
    _print_list(f"Images without metadata: {len(no_metadata)}", no_metadata, args.out)
    if interrupted:
        print(f"\nInterrupted: partial report, {not_run} of {len(jobs)} images not evaluated")
    if stream_error:
        print(f"\nStopped by a stream failure ({_describe(stream_error)}): {not_run} images not evaluated")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"report: {args.out}", file=sys.stderr)
    if args.plot:
        from visloc_client.plot import plot_cumulative

        loc = [r["error_km"] for r in records if r["localizable"]]
        non = [r["error_km"] for r in records if not r["localizable"]]
        plot_cumulative(
            args.plot,
            [("all", [r["error_km"] for r in records]), ("localizable", loc), ("non-localizable", non)],
            title=f"Cumulative accuracy: {Path(args.images).name}",
        )
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.claims_plot and report["claims"]:
        from visloc_client.plot import plot_claim_roc

        curves = report["claims"]["curves"]
        panels = [
            (f"false claims >= {float(d):g} km", [(f"mass within {float(s):g} km", pts) for s, pts in by_scale.items()])
            for d, by_scale in curves.items()
        ]
        plot_claim_roc(args.claims_plot, panels, far=args.claims_far, title=f"Claim check: {Path(args.images).name}")
        print(f"claims ROC plot: {args.claims_plot}", file=sys.stderr)
    if args.risk_plot:
        goal = parse_goal(args.accuracy_target) if args.accuracy_target else (None, 25.0)
        _plot_risk(args.risk_plot, selective, goal[1], Path(args.images).name)
        print(f"risk-coverage plot: {args.risk_plot}", file=sys.stderr)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failures or stream_error else 0


def _claim_record(result: LocateResult, plan: dict[float, int | None]) -> dict[str, Any]:
    """The masses of one photo's true claim and of its false claim at each distance, by scale."""

    def masses(i: int) -> dict[str, float]:
        return {f"{d.scale_km:g}": d.density for d in result.claims[i].mass}

    out: dict[str, Any] = {"true": masses(0), "true_rank": result.claims[0].rank, "false": {}}
    i = 1
    for distance, j in plan.items():
        if j is not None:
            out["false"][f"{distance:g}"] = masses(i)
            i += 1
    return out


def _claims_report(args: argparse.Namespace, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per false-claim distance and PD scale: AUC, the true-accept rate at --claims-far, its threshold."""
    scales = sorted({float(s) for r in records for s in r["claims"]["true"]})
    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, Any]] = {}
    for distance in CLAIM_DISTANCES_KM:
        d = f"{distance:g}"
        results[d], curves[d] = {}, {}
        for scale in scales:
            s = f"{scale:g}"
            true = [r["claims"]["true"][s] for r in records]
            false = [r["claims"]["false"][d][s] for r in records if d in r["claims"]["false"]]
            results[d][s] = claim_roc(true, false, far=args.claims_far, resamples=args.claims_bootstrap,
                                      seed=args.seed)  # fmt: skip
            curves[d][s] = roc_curve(true, false) if true and false else []
    return {
        "true_claims": len(records),
        "distances_km": list(CLAIM_DISTANCES_KM),
        "far_target": args.claims_far,
        "seed": args.seed,
        "results": results,
        "curves": curves,
    }


def _record(name: str, image_id: str, gt: tuple[float, float], result: LocateResult) -> dict[str, Any]:
    return {
        "file": name,
        "id": image_id,
        "gt_lat": gt[0],
        "gt_lon": gt[1],
        "pred_lat": result.lat,
        "pred_lon": result.lon,
        "error_km": haversine_km(gt[0], gt[1], result.lat, result.lon),
        "confidence": result.confidence,
        "localizable": result.localizable,
        "prediction_density": {f"{d.scale_km:g}": d.density for d in result.prediction_density},
        "method": result.method.value,
    }


def _failure(name: str, image_id: str, error: BaseException | None) -> dict[str, Any]:
    if isinstance(error, LocateError):
        code, reason = error.code.name, error.reason
    else:
        code, reason = "LOCAL", f"{type(error).__name__}: {error}"
    return {"file": name, "id": image_id, "code": code, "reason": reason}


def _failure_line(failure: dict[str, Any]) -> str:
    return f"{failure['file']}: {failure['code']}: {failure['reason']}"


def _print_list(title: str, lines: list[str], out: str | None) -> None:
    if not lines:
        return
    print(f"\n{title}")
    shown = lines if out is None else lines[:_LISTED]
    for line in shown:
        print(f"  {line}")
    if len(shown) < len(lines):
        print(f"  ... and {len(lines) - len(shown)} more (all listed in {out})")


def _traced(args: argparse.Namespace, provider: Any) -> int:
    """The command, as one span ``visloc <command>`` when tracing (each call a child of it);
    ``visloc web`` serves for hours: its calls are traces of their own."""
    if provider is None or args.command == "web":
        return int(args.func(args))
    from opentelemetry import trace

    with trace.get_tracer("visloc_client").start_as_current_span(f"visloc {args.command}"):
        return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # OTEL_* variables: this command's calls are traced and exported (the tracing extra)
        provider = tracing.configure("visloc")
    except tracing.TracingConfigError as err:
        _err(f"tracing: {err}")
        return EXIT_USAGE
    try:
        return _traced(args, provider)
    except ValueError as err:  # bad option values, e.g. a negative --neighbours
        _err(str(err))
        return EXIT_USAGE
    except OSError as err:  # e.g. an unreadable --auth-token-file or TLS file
        _err(_describe(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if provider is not None:
            provider.shutdown()  # export the spans before the process ends


if __name__ == "__main__":
    sys.exit(main())
