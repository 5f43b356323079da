"""The demo bundle: random (seeded) weights, calibrated so predictions look like a trained model's.

A randomly initialised EfficientNet-B4 with its default BatchNorm statistics maps every image
to nearly the same feature vector (SPEC.md section 7), so random heads would give every photo
the same answer. The BatchNorm statistics are therefore re-estimated on a set of generated
calibration images, as training would have left them, so features vary between photos at
their natural scale; the heads read ``z = (f - mean) / s`` (one scale ``s`` for all dimensions,
which keeps the head well-conditioned). The cell head is sharp like a trained one: an exact
prior makes 30 % of the cells "rarely predicted" (probabilities 1e-13 down to exactly 0), and a
random term, with the temperature chosen so that about half of the calibration images are
localizable, picks the top cell among the others. The retrieval
head's first Linear reads ``z`` of its LayerNorm input and the residual is centred, so
embeddings differ between images.

THIS IS NOT A GEOLOCATION MODEL. Its answers are arbitrary; it exists so the whole stack
runs, and is tested, anywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from swc_service.method import DEFAULT_CONF_SCALE_KM, DEFAULT_CONF_THRESHOLD, DensityIndex, top_cell
from visloc_client.preprocessing import prepare_image
from visloc_export import samples

from .model import VislocNet

CALIBRATION_IMAGES = 32
CALIBRATION_SEED_BASE = 1_000_000  # calibration images never coincide with sample images
RARE_CELLS = 0.3  # fraction of cells a photo almost never lands in (a trained head's far cells)
RARE_LOGITS = (30.0, 150.0)  # their prior logit below the others: p from ~1e-13 down to exactly 0

# Land-like regions: (lat, lon, spread in degrees, weight).
REGIONS = (
    (48.0, 8.0, 7.0, 0.22),  # Europe
    (39.0, -95.0, 10.0, 0.18),  # North America
    (35.0, 115.0, 9.0, 0.12),  # East Asia
    (22.0, 79.0, 6.0, 0.07),  # South Asia
    (-15.0, -55.0, 9.0, 0.08),  # South America
    (5.0, 20.0, 12.0, 0.07),  # Africa
    (-28.0, 140.0, 8.0, 0.05),  # Australia
    (36.0, 138.0, 2.5, 0.06),  # Japan
    (51.5, -0.1, 1.2, 0.05),  # London area
    (40.7, -74.0, 1.2, 0.05),  # New York area
    (-6.0, 107.0, 4.0, 0.05),  # Indonesia
)


def cell_centres(num_cells: int, rng: np.random.Generator) -> np.ndarray:
    """``[M, 2]`` float64 centres clustered over land-like regions."""
    weights = np.array([r[3] for r in REGIONS])
    which = rng.choice(len(REGIONS), size=num_cells, p=weights / weights.sum())
    lat0 = np.array([REGIONS[i][0] for i in which])
    lon0 = np.array([REGIONS[i][1] for i in which])
    spread = np.array([REGIONS[i][2] for i in which])
    lat = np.clip(lat0 + rng.normal(0, 1, num_cells) * spread * 0.6, -70, 75)
    lon = (lon0 + rng.normal(0, 1, num_cells) * spread + 180) % 360 - 180
    return np.stack([lat, lon], axis=1).astype(np.float64)


def cell_sizes(num_cells: int, num_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Rows per cell skewed like upstream: ~15% of cells empty, log-normal tail (cap 451)."""
    nonempty = rng.random(num_cells) >= 0.152
    if not nonempty.any():
        nonempty[0] = True
    w = np.where(nonempty, rng.lognormal(0.0, 1.15, num_cells), 0.0)
    sizes = np.floor(w / w.sum() * num_rows).astype(np.int64)
    short = num_rows - int(sizes.sum())
    if short:
        idx = rng.choice(np.flatnonzero(nonempty), size=short, replace=True)
        np.add.at(sizes, idx, 1)
    return sizes


def background(
    centres: np.ndarray, num_rows: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, labels, row_ids) of a synthetic collection.

    Each cell's rows sit at a few 'sites' near its centre (jitter ~300 m), so SwC clusters.
    """
    sizes = cell_sizes(centres.shape[0], num_rows, rng)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    labels = np.empty((num_rows, 2), dtype=np.float64)
    row_ids = np.empty(num_rows, dtype=np.int64)
    perm = rng.permutation(num_rows)  # pretend upstream held the rows in another order
    for c in np.flatnonzero(sizes):
        a, b = offsets[c], offsets[c + 1]
        n_sites = int(rng.integers(1, 5))
        sites = centres[c] + rng.normal(0, 0.08, (n_sites, 2))
        pick = rng.integers(0, n_sites, b - a)
        labels[a:b] = sites[pick] + rng.normal(0, 0.003, (b - a, 2))
        row_ids[a:b] = np.sort(perm[a:b])
    labels[:, 0] = np.clip(labels[:, 0], -89.9, 89.9)
    labels[:, 1] = (labels[:, 1] + 180) % 360 - 180
    return offsets, labels, row_ids


def fill_features(out: np.ndarray, rng: np.random.Generator, chunk: int = 65536) -> None:
    """Unit-norm random embeddings, written in chunks (upstream scale does not fit in RAM twice)."""
    for a in range(0, out.shape[0], chunk):
        block = rng.standard_normal((min(chunk, out.shape[0] - a), out.shape[1]), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[a : a + block.shape[0]] = block


def write_background(
    w, centres: np.ndarray, num_rows: int, rng: np.random.Generator, features_dtype="float16"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic background's features into a ``BundleWriter`` ``w``; returns its (offsets,
    labels, row_ids) for the writer to save with the cells."""
    from swc_service import bundle as B

    offsets, labels, row_ids = background(centres, num_rows, rng)
    feats = w.open_array(B.FEATURES, np.dtype(features_dtype), (num_rows, B.EMBEDDING_DIM))
    fill_features(feats, rng)
    feats.flush()
    del feats
    return offsets, labels, row_ids


def calibration_batch(count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    return [prepare_image(samples.photo(CALIBRATION_SEED_BASE + i, (400, 300))) for i in range(count)]


def reestimate_batchnorm(net: VislocNet, images: torch.Tensor) -> torch.Tensor:
    """Set every BatchNorm's statistics to those of ``images`` and return their features.

    Random convolutions with the default statistics (mean 0, variance 1) shrink or blow up
    activations layer by layer until every photo has the same features. With the statistics
    re-estimated on photos, as a trained network has them, each layer's output has unit
    variance across photos, so features vary at their natural scale. One pass in BatchNorm
    training mode (everything else in eval: no drop-connect) gives the exact batch statistics;
    the running variance is then made the biased one that pass normalised with, so the
    returned features are the ones the eval-mode network computes.
    """
    bns = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    counts: dict[torch.nn.Module, int] = {}
    hooks = [bn.register_forward_hook(lambda m, inp, out: counts.__setitem__(m, inp[0].numel() // inp[0].shape[1]))
             for bn in bns]  # fmt: skip
    net.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch gives its own statistics
        bn.train()
    try:
        feats = net.features(net.normalize(images))
    finally:
        for h in hooks:
            h.remove()
        net.eval()
    for bn in bns:
        n = counts[bn]
        bn.running_var.mul_((n - 1) / n)  # torch stores the unbiased variance
        bn.momentum = 0.01
    return feats


@torch.no_grad()
def build_demo_net(num_cells: int, centres: np.ndarray, seed: int) -> tuple[VislocNet, dict]:
    """Seeded random network with calibrated heads; returns it and the calibration record."""
    torch.manual_seed(seed)
    net = VislocNet(num_cells).eval()
    net.cell_head.mvmf.mus.copy_(torch.from_numpy(centres.T.copy()))
    nn_init = torch.nn.init
    for lin in (net.rrm_head.res.fc1, net.rrm_head.res.fc2):
        nn_init.xavier_uniform_(lin.weight)
        nn_init.zeros_(lin.bias)

    images = torch.from_numpy(np.stack(calibration_batch()))
    feats = reestimate_batchnorm(net, images).double()
    # One scale for all dimensions: dividing each by its own spread would amplify the float32
    # noise of near-constant dimensions into the logits (an ill-conditioned head that no
    # export could match). With re-estimated statistics the features vary at their own scale.
    mu = feats.mean(0)
    sigma = feats.std(0).square().mean().sqrt() + 1e-12
    z = (feats - mu) / sigma
    dims = feats.shape[1]

    # Cell head: logits = s * W0 z + prior. The prior is exact (a bias: no float32 noise from
    # the features): most cells 0, the rest "rarely predicted" at -30 .. -150, so their
    # probabilities are 1e-13 .. 0 (below 1e-20 for most of them, exactly 0 in float32 for
    # many), as a trained head's far cells are. The temperature s of the random term picks
    # the top cell among the others; it is chosen so that about half the calibration images
    # are localizable. Folded into the one Linear over the features.
    w0 = torch.randn(num_cells, dims, dtype=torch.float64) / dims**0.5
    rare = torch.rand(num_cells, dtype=torch.float64) < RARE_CELLS
    prior = torch.where(rare, -torch.empty(num_cells, dtype=torch.float64).uniform_(*RARE_LOGITS), 0.0)
    density = DensityIndex(centres, (DEFAULT_CONF_SCALE_KM,))

    def localizable_fraction(s: float) -> float:
        probs = torch.softmax(s * z @ w0.T + prior, dim=1).float().numpy()  # served as float32
        conf = [density.density(top_cell(p), p)[0] for p in probs]
        return float(np.mean(np.asarray(conf) > DEFAULT_CONF_THRESHOLD))

    lo, hi = 0.1, 100.0
    for _ in range(40):  # geometric bisection towards half localizable
        s = (lo * hi) ** 0.5
        if localizable_fraction(s) < 0.5:
            lo = s
        else:
            hi = s
    scale = (lo * hi) ** 0.5
    w = scale * w0 / sigma
    lin = net.cell_head.mixture_weights.seq_model[0]
    lin.weight.copy_(w.float())
    lin.bias.copy_((prior - w @ mu).float())

    # Retrieval head: fc1 reads the standardised LayerNorm output; the residual sum is centred.
    rrm = net.rrm_head
    x0 = rrm.norm(feats.float()).double()
    x_mu, x_sigma = x0.mean(0), x0.std(0) + 1e-12
    w1 = rrm.res.fc1.weight.double() / x_sigma
    rrm.res.fc1.weight.copy_(w1.float())
    rrm.res.fc1.bias.copy_((-(w1 @ x_mu)).float())
    pre = rrm.res.fc2(torch.relu(rrm.res.fc1(x0.float()))).double() + x0
    rrm.res.fc2.bias.copy_((rrm.res.fc2.bias.double() - pre.mean(0)).float())

    record = {
        "seed": seed,
        "calibration_images": CALIBRATION_IMAGES,
        "temperature": scale,
        "rare_cells": RARE_CELLS,
        "batchnorm": "re-estimated on the calibration images",
        "calibration_localizable_fraction": localizable_fraction(scale),
    }
    return net, record
