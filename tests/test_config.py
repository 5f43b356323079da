"""12-factor settings: flags beat VISLOC_* environment variables, which beat defaults."""

from __future__ import annotations

import pytest

from swc_service.config import load_settings


def test_flags_env_and_defaults():
    env = {"VISLOC_BUNDLE": "/b", "VISLOC_TRITON_URL": "triton:8001", "VISLOC_MAX_BATCH": "8",
           "VISLOC_PD_SCALES_KM": "2500,1,25", "VISLOC_EXIF_TRANSPOSE": "true"}  # fmt: skip
    s = load_settings(["--max-batch", "4"], env)
    assert s.bundle == "/b" and s.triton_url == "triton:8001"
    assert s.max_batch == 4  # the flag wins
    assert s.pd_scales_km == (1.0, 25.0, 2500.0) and s.exif_transpose is True
    assert s.port == 50051 and s.batch_window_ms == 2.0
    assert "triton_url = 'triton:8001'" in s.describe()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--conf-scale-km", "30"], "not one of pd_scales_km"),
        (["--preprocessing", "squash"], "preprocessing must be one of"),
        (["--workers", "0"], ">= 1"),
        (["--batch-window-ms", "-1"], ">= 0"),
        (["--model-precision", "int8"], "model_precision must be one of"),
        (["--triton-url", "triton"], "not HOST:PORT"),
        (["--triton-url", "dns://ns/triton:8001"], "no DNS authority"),
        (["--triton-resolve-interval-s", "0"], "must be > 0"),
    ],
)
def test_bad_settings_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        load_settings(["--bundle", "/b", *argv], {})


def test_bundle_is_required():
    with pytest.raises(SystemExit, match="--bundle"):
        load_settings([], {})


def test_admission_limits_derive_from_the_batcher_and_callers_from_the_file(tmp_path):
    callers = tmp_path / "callers"
    callers.write_text("mapper:0123456789abcdef0123\n")
    env = {"VISLOC_ADMISSION_CODEL_TARGET_MS": "0", "VISLOC_AUTH_TOKEN": "shared-token-0123456"}
    s = load_settings(["--bundle", "b", "--max-batch", "8", "--callers-file", str(callers)], env=env)
    cfg = s.admission_config()
    assert (cfg.initial_limit, cfg.min_limit, cfg.max_limit) == (8, 1, 32)
    assert (cfg.caller_max_queued, cfg.codel_target_s, cfg.interactive_budget_s) == (128, None, 5.0)
    assert s.callers() == {"0123456789abcdef0123": "mapper", "shared-token-0123456": "default"}
    assert load_settings(["--bundle", "b"], env={}).callers() is None  # auth off: every call "anonymous"
    with pytest.raises(ValueError, match="min_limit"):
        load_settings(["--bundle", "b", "--admission-min-limit", "20"], env={})
