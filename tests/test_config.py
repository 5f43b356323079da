"""12-factor settings: flags beat VISLOC_* environment variables, which beat defaults."""

from __future__ import annotations

import dataclasses

import pytest

from swc_service.config import FLAGS, Settings, build_parser, load_settings


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
        (["--workers", "0"], ">= 1"),
        (["--batch-window-ms", "-1"], ">= 0"),
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


@pytest.mark.parametrize(("flag", "bad"), [("--preprocessing", "squash"), ("--model-precision", "int8"),
                                          ("--log-level", "LOUD")])  # fmt: skip
def test_flags_with_choices_refuse_others_on_the_command_line_and_in_the_environment(flag, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        load_settings(["--bundle", "/b", flag, bad], {})
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    name = "VISLOC_" + flag[2:].replace("-", "_").upper()
    with pytest.raises(ValueError, match=f"{name}='{bad}' is not valid .*must be one of"):
        load_settings(["--bundle", "/b"], {name: bad})


def test_booleans_are_switches_and_still_take_true_or_false(capsys):
    assert load_settings(["--bundle", "b", "--exif-transpose"], {}).exif_transpose is True
    assert load_settings(["--bundle", "b", "--allow-bundle-without-probes"], {}).allow_bundle_without_probes is True
    assert load_settings(["--bundle", "b", "--no-prefetch-background"], {}).prefetch_background is False
    assert load_settings(["--bundle", "b", "--exif-transpose", "false"], {}).exif_transpose is False
    assert load_settings(["--bundle", "b"], {"VISLOC_EXIF_TRANSPOSE": "true"}).exif_transpose is True
    with pytest.raises(SystemExit):
        load_settings(["--bundle", "b", "--exif-transpose", "maybe"], {})
    assert "not true/false" in capsys.readouterr().err
    with pytest.raises(ValueError, match="VISLOC_EXIF_TRANSPOSE='maybe'"):
        load_settings(["--bundle", "b"], {"VISLOC_EXIF_TRANSPOSE": "maybe"})


def test_every_flag_says_what_it_does_its_unit_and_its_variable():
    assert set(FLAGS) == {f.name for f in dataclasses.fields(Settings)}
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) >= len(FLAGS)
    for action in actions:
        text = action.help or ""
        words = text.split("(")[0].strip()
        assert len(words) > 8, f"{action.option_strings}: no help beyond the default: {text!r}"
        if not action.option_strings[0].startswith("--no-"):
            assert f"env VISLOC_{action.dest.upper()}" in text, action.option_strings
    help_text = build_parser().format_help()
    for group in ("serving:", "Triton:", "batching:", "limits:", "method:", "admission:", "security:", "logging:"):
        assert group in help_text
    assert "[ms]" in help_text and "[km]" in help_text and "{fp32,fp16}" in help_text
