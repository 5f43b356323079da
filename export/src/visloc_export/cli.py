"""``visloc-export``: build bundles (demo, upstream), verify parity, place the model for Triton."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swc_service.bundle import BundleError, load_bundle


def _options(args: argparse.Namespace, *names: str) -> dict:
    return {name: getattr(args, name) for name in names}


def _written(kind: str, b) -> int:
    print(f"{kind} bundle {b.bundle_id} written to {b.path} (M={b.num_cells}, N={b.num_background})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .build import build_demo

    names = ("cells", "background", "seed", "features_dtype", "overwrite", "accept_parity_failure")
    return _written("demo", build_demo(args.out, **_options(args, *names)))


def _cmd_upstream(args: argparse.Namespace) -> int:
    from .build import import_upstream

    names = (
        "backbone",
        "mvmf",
        "rrm",
        "background",
        "assignments",
        "features_dtype",
        "overwrite",
        "accept_parity_failure",
    )
    return _written("upstream", import_upstream(args.out, **_options(args, *names)))


def _network(args: argparse.Namespace, bundle, command: str):
    """The network a bundle's model.onnx was exported from, as a float64-capable reference:
    rebuilt from its seed (demo bundles) or loaded from the upstream checkpoints."""
    from .build import demo_net_for
    from .model import load_upstream
    from .reference import TorchReference

    ckpts = (args.backbone, args.mvmf, args.rrm)
    if any(ckpts) and not all(ckpts):
        raise SystemExit(f"{command}: give all of --backbone, --mvmf and --rrm, or none (demo bundles)")
    if not all(ckpts) and bundle.source != "demo":
        raise ValueError(
            f"{command}: bundle {bundle.path} is a {bundle.source} bundle: pass the checkpoints its model was "
            f"exported from (--backbone, --mvmf, --rrm)"
        )
    return TorchReference(load_upstream(*ckpts) if all(ckpts) else demo_net_for(bundle))


def _cmd_verify(args: argparse.Namespace) -> int:
    from .parity import check_parity, parity_batches

    b = load_bundle(args.bundle)
    model = _network(args, b, "verify")
    if model.net.num_cells != b.num_cells:
        print(f"parity FAILED: the network has M={model.net.num_cells} cells, bundle {b.bundle_id}'s model "
              f"M={b.num_cells}: not the same model")  # fmt: skip
        return 1
    images = [Path(p).read_bytes() for p in args.images] if args.images else None
    report, _ = check_parity(model, b.model_path, b.centres, parity_batches(images), arithmetics=("fp32",))
    if args.checksums:
        bad = b.verify_checksums()
        print(json.dumps({"checksums_ok": not bad, "mismatched": bad}))
        if bad:
            return 1
    print(json.dumps({k: v for k, v in report.as_dict().items() if k != "cases"}))
    print("\n".join([report.summary(), *(f"  {f}" for f in report.failures)]))
    return 0 if report.ok else 1


def _cmd_fetch(args: argparse.Namespace) -> int:
    try:
        from .fetch import Fetcher, resolve_names
    except ImportError as exc:
        raise RuntimeError(f"fetch needs urllib3 ({exc}): pip install 'visloc-export[fetch]'") from None

    fetcher = Fetcher(Path(args.out), base_url=args.base_url, progress=not args.no_progress)
    try:
        records = fetcher.fetch(resolve_names(args.only))
    except KeyboardInterrupt:
        print("visloc-export: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    total = sum(r["bytes"] for r in records.values())
    print(f"{len(records)} files, {total} bytes in {args.out} (sources: {Path(args.out) / 'SOURCES.json'})")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .index import Options, build_index, summary_line

    options = Options(
        batch_size=args.batch_size or (16 if args.triton else 1),
        concurrency=args.concurrency,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        features_dtype=args.features_dtype,
        threads=args.threads,
    )
    b = build_index(
        args.base,
        args.out,
        photos=args.photos,
        photo_list=args.list,
        extend=args.extend,
        triton_url=args.triton,
        triton_model=args.triton_model,
        options=options,
    )
    print(summary_line(b))
    return 0


def _cmd_add_probes(args: argparse.Namespace) -> int:
    from .probes import add_to_bundle

    before = load_bundle(args.bundle)
    if before.probes is not None and before.probes.reference is not None:
        print(f"{before.path} already has probes with a float64 reference; nothing to do")
        return 0
    b = add_to_bundle(args.bundle, _network(args, before, "add-probes"))
    shapes = ", ".join(f"{a.shape[1]}x{a.shape[0]}" for a in b.probes.images)
    what = "the float64 reference of its" if before.probes is not None else "probes with the float64 reference of"
    print(
        f"added {what} {len(b.probes.images)} probes ({shapes}) to {b.path}, model {b.model_version}; "
        f"bundle {b.bundle_id} unchanged otherwise"
    )
    return 0


def _cmd_place(args: argparse.Namespace) -> int:
    from swc_service.triton_config import place_model

    dest = place_model(args.bundle, args.repository)
    print(f"placed {dest} (config sized for the bundle's cells)")
    return 0


def _checkpoint_args(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("network", what)
    group.add_argument("--backbone", help="efficientnet_backbone.pt")
    group.add_argument("--mvmf", help="mvmf_head.pt")
    group.add_argument("--rrm", help="rrm_head.pt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visloc-export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="a demo bundle with random seeded weights (NOT a real model)")
    d.add_argument("--out", required=True, help="the bundle directory to write (must not exist: see --overwrite)")
    d.add_argument("--cells", type=int, default=2000, help="M (upstream: 31145)")
    d.add_argument("--background", type=int, default=50_000, help="N (upstream: 763265)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights and the synthetic background")
    d.set_defaults(func=_cmd_demo)

    u = sub.add_parser("upstream", help="import the upstream checkpoints and background collection")
    u.add_argument("--backbone", required=True, help="efficientnet_backbone.pt")
    u.add_argument("--mvmf", required=True, help="mvmf_head.pt")
    u.add_argument("--rrm", required=True, help="rrm_head.pt")
    u.add_argument("--background", required=True, help="back_coll_features.hdf5")
    u.add_argument("--assignments", required=True, help="cells_assignments.pkl")
    u.add_argument("--out", required=True, help="the bundle directory to write (must not exist: see --overwrite)")
    u.set_defaults(func=_cmd_upstream)

    for s in (d, u):
        s.add_argument(
            "--features-dtype",
            choices=["float16", "float32"],
            default="float16",
            help="background embedding storage (float32 = the reference's precision)",
        )
        s.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
        s.add_argument(
            "--accept-parity-failure",
            action="store_true",
            help="write the bundle even if the ONNX parity gate fails (recorded in the manifest; "
            "GetInfo's bundle warning says so)",
        )

    v = sub.add_parser(
        "verify",
        help="the parity gate again: the bundle's ONNX against its network in float64; non-zero exit on failure",
    )
    v.add_argument("--bundle", required=True, help="the bundle whose model.onnx to check")
    _checkpoint_args(v, "upstream bundles: the checkpoint files (demo bundles: rebuilt from their seed)")
    v.add_argument("--images", nargs="*", help="image files (default: generated images of 4 shapes)")
    v.add_argument("--checksums", action="store_true", help="also check every file's sha256")
    v.set_defaults(func=_cmd_verify)

    i = sub.add_parser(
        "index",
        help="a bundle whose background is your own geotagged photos (docs/indexing.md)",
        description="Embed photos with the base bundle's model (same preprocessing as Locate), put each "
        "in the cell with the nearest centre, and write a new bundle. Skipped photos are listed in "
        "index-report.json inside it. An interrupted run resumes when rerun with the same arguments.",
    )
    i.add_argument("--base", required=True, help="the bundle whose model and cells to use")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--photos", help="folder: every file under it (recursively), GPS from EXIF")
    src.add_argument("--list", help="CSV with the header path,lat,lon (paths relative to the CSV)")
    i.add_argument("--out", required=True, help="the new bundle (must not exist)")
    i.add_argument("--extend", action="store_true", help="keep the base background (and its row ids)")
    i.add_argument("--triton", metavar="URL", help="embed through this Triton (gRPC HOST:PORT) instead of in-process")
    i.add_argument("--triton-model", default="visloc", help="model name on Triton (default visloc)")
    i.add_argument("--batch-size", type=int, help="photos per model call (default 1 in-process, 16 on Triton)")
    i.add_argument("--concurrency", type=int, default=4, help="model calls in flight (default 4)")
    i.add_argument("--workers", type=int, default=2, help="threads reading and preprocessing photos")
    i.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    i.add_argument("--checkpoint-every", type=int, default=2048, help="photos between checkpoints")
    i.add_argument("--features-dtype", choices=["float16", "float32"], default="float16",
                   help="background embedding storage (float32 = the reference's precision)")  # fmt: skip
    i.set_defaults(func=_cmd_index)

    a = sub.add_parser(
        "add-probes",
        help="record probe images, the outputs of the bundle's own model.onnx and the network's float64 "
        "reference (bundles written before probes or before the reference); the gate runs first",
    )
    a.add_argument("bundle")
    _checkpoint_args(a, "upstream bundles: the checkpoint files its model was exported from")
    a.set_defaults(func=_cmd_add_probes)

    f = sub.add_parser(
        "fetch",
        help="download the upstream model files (resumable, verified, recorded in DIR/SOURCES.json)",
    )
    f.add_argument("--out", required=True, help="DIR to download into")
    f.add_argument("--base-url", help="take every file from this mirror: BASE_URL/<file name>")
    f.add_argument("--only", nargs="+", metavar="NAME", help="only these files (default: all)")
    f.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    f.set_defaults(func=_cmd_fetch)

    m = sub.add_parser("place", help="put a bundle's model.onnx into a Triton model repository")
    m.add_argument("--bundle", required=True, help="the bundle whose model.onnx to place")
    m.add_argument("--repository", default="model_repository",
                   help="the Triton model repository (its config.pbtxt is sized for the bundle's cells)")  # fmt: skip
    m.set_defaults(func=_cmd_place)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BundleError, ValueError, OSError, RuntimeError) as exc:
        print(f"visloc-export: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
