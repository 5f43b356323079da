"""The parity gate on 20 demo seeds and the margins of wrong models (slow: ~35 min on 2 cores;
`make test-slow`, or `make gate-seeds` for the report). The session's demo seed is covered by
tests/test_parity.py and tests/test_model_check.py in every run."""

from __future__ import annotations

import numpy as np
import pytest

from bench.gate_seeds import CELLS, OTHER_SEED, WRONG, seed_run
from visloc_export import demo

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def other():
    net, _ = demo.build_demo_net(CELLS, demo.cell_centres(CELLS, np.random.default_rng(OTHER_SEED)), OTHER_SEED)
    return net


@pytest.mark.parametrize("seed", range(20))
def test_every_seed_passes_the_gate_and_every_wrong_model_is_refused(seed, other, tmp_path):
    r = seed_run(seed, other, tmp_path)
    assert r["ok"] and r["ratio"] < 1, r["distance"]
    for which in WRONG:
        for precision, verdict in r["wrong"][which].items():
            assert not verdict["ok"] and verdict["ratio"] > 1.5, (which, precision, verdict)
