"""The page's front-end libraries are exactly what the npm lock names, with their licences.

``client/web/vendor.mjs`` (``make web-vendor``) copies them from ``node_modules`` and writes
``MANIFEST.json``; here the vendored files are checked against that manifest and the manifest
against ``client/web/package-lock.json``, so a hand edit or a lock bump without re-vendoring
fails. Where ``node_modules`` is present (after ``npm ci``) the files are also compared with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "client" / "web"
STATIC = ROOT / "client" / "src" / "visloc_client" / "web" / "static"
VENDOR = STATIC / "vendor"


def _manifest() -> dict:
    return json.loads((VENDOR / "MANIFEST.json").read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vendored_files_match_the_manifest():
    manifest = _manifest()["packages"]
    listed = {VENDOR / name / file for name, entry in manifest.items() for file in entry["files"]}
    present = {p for p in VENDOR.rglob("*") if p.is_file() and p.name != "MANIFEST.json"}
    assert present == listed, "vendor/ holds files that MANIFEST.json does not list (or lacks some): make web-vendor"
    for name, entry in manifest.items():
        assert "LICENSE" in entry["files"], f"{name} is vendored without its licence"
        for file, digest in entry["files"].items():
            assert _sha256(VENDOR / name / file) == digest, f"vendor/{name}/{file} differs from the manifest"


def test_manifest_matches_the_lock():
    lock = json.loads((WEB / "package-lock.json").read_text())["packages"]
    declared = json.loads((WEB / "package.json").read_text())["dependencies"]
    manifest = _manifest()["packages"]
    assert set(manifest) == set(declared)
    for name, entry in manifest.items():
        locked = lock[f"node_modules/{name}"]
        assert entry["version"] == locked["version"] == declared[name], name
        assert entry["integrity"] == locked["integrity"], name
        assert entry["license"] == locked["license"], name


def test_page_loads_only_vendored_or_own_files():
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs, "no references found"
    for ref in refs:
        assert ref.startswith("/static/") or ref.startswith("#"), f"external or odd reference: {ref}"
        if ref.startswith("/static/"):
            assert (STATIC / ref.removeprefix("/static/")).is_file(), ref
    assert "<script>" not in html and " style=" not in html and "on" + "click=" not in html
    js = (STATIC / "app.js").read_text()
    assert "innerHTML" not in js and "eval(" not in js
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", js + (STATIC / "style.css").read_text())


def test_vendored_files_equal_node_modules():
    if not (WEB / "node_modules").is_dir():  # `make test` installs them (npm ci): a run without them proves nothing
        pytest.fail("no client/web/node_modules: run `cd client/web && npm ci` (make test does)")
    for name, entry in _manifest()["packages"].items():
        for file in entry["files"]:
            matches = [
                p
                for p in (WEB / "node_modules" / name).rglob(file)
                if "node_modules" not in p.relative_to(WEB / "node_modules" / name).parts
            ]
            assert any(_sha256(p) == entry["files"][file] for p in matches), f"{name}/{file} differs from node_modules"
