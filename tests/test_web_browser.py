"""The web page end to end, in a real headless browser: Debian's chromium (/usr/bin/chromium,
no browser download) driven by Playwright, against the live demo stack (real Triton, real
Locate service). ``make test`` installs chromium when it is missing.

Screenshots are saved as artifacts under .cache/artifacts/web/ (and the test's tmp dir);
``VISLOC_WEB_DOCS_IMG=1`` (``make web-screenshots``) also refreshes docs/img/web-*.png.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port

from visloc_client import LocatorClient
from visloc_client.web import WebApp, WebConfig, messages, start
from visloc_export.samples import photo_bytes

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("VISLOC_WEB_ARTIFACTS", ROOT / ".cache" / "artifacts" / "web"))
DOCS_IMG = ROOT / "docs" / "img"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Seeded sample photos: the first that the demo bundle finds localizable with SwC neighbours,
# and the first it does not (found by asking the service, so a new demo model needs no edit).
_SEEDS: dict[bool, int] = {}


def _seed(client, localizable: bool) -> int:
    if localizable not in _SEEDS:
        for seed in range(64):
            r = client.locate(photo_bytes(seed), neighbours=10, top_cells=5)
            if r.localizable == localizable and (r.neighbours or not localizable):
                _SEEDS[localizable] = seed
                break
        else:
            raise AssertionError(f"no sample photo of 64 is {'' if localizable else 'not '}localizable on the demo")
    return _SEEDS[localizable]


pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (make web-browser)"),
    pytest.mark.timeout(300),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (requirements-dev.txt)")


@pytest.fixture(scope="module")
def web(live_target):
    """The web app on a free loopback port, calling the live Locate service."""
    client = LocatorClient(live_target, timeout=60)
    server = start(WebApp(client, WebConfig()), "127.0.0.1", free_port())
    try:
        yield server.url.rstrip("/"), client
    finally:
        server.shutdown()
        server.server_close()
        client.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page plus everything that would mean trouble: script errors, console errors (a CSP
    violation is one), and requests that leave the page's own origin. As a context manager it
    opens the page, and on a failure leaves a screenshot and the page's problems as artifacts."""

    def __init__(self, browser, base: str, name: str, **context):
        self.base, self.name = base, name
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on(
            "console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        self.page.on(
            "request",
            lambda r: None if r.url.startswith((base, "blob:", "data:")) else self.problems.append(f"request {r.url}"),
        )

    def __enter__(self) -> Watched:
        try:
            self.page.goto(self.base + "/")
            self.page.wait_for_selector("#demo-banner:not([hidden])")
            self.page.wait_for_selector("#map path.land", state="attached")
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(Exception):
                    self.page.screenshot(path=str(ARTIFACTS / f"FAILED-{self.name}.png"), full_page=True)
                (ARTIFACTS / f"FAILED-{self.name}.txt").write_text(
                    f"{exc_type.__name__}: {exc}\n\nproblems:\n" + "\n".join(self.problems) + "\n"
                )
        finally:
            self.context.close()


def _photo(tmp_path: Path, seed: int) -> tuple[Path, bytes]:
    data = photo_bytes(seed)
    path = tmp_path / f"photo_{seed}.jpg"
    path.write_bytes(data)
    return path, data


def _save(page, tmp_path: Path, name: str, *, docs: bool = False, **options) -> Path:
    out = tmp_path / name
    page.screenshot(path=str(out), **options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out, ARTIFACTS / name)
    if docs and os.environ.get("VISLOC_WEB_DOCS_IMG") == "1":
        from PIL import Image

        # 256 colours (octree keeps the markers' colours) and optimised: a third of the size.
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        with Image.open(out) as im:
            palette = im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
            palette.save(DOCS_IMG / name, optimize=True)
    return out


def _check_answer(page, expected) -> None:
    """What the page shows equals a direct ``client.locate`` of the same bytes."""
    page.wait_for_selector("#marker", state="attached", timeout=60_000)
    value = lambda sel: float(page.get_attribute(sel, "data-value"))  # noqa: E731
    assert math.isclose(value("#lat"), expected.lat, abs_tol=1e-9)
    assert math.isclose(value("#lon"), expected.lon, abs_tol=1e-9)
    assert math.isclose(value("#confidence"), expected.confidence, abs_tol=1e-9)
    assert page.inner_text("#lat") == f"{expected.lat:.5f}"
    assert page.inner_text("#lon") == f"{expected.lon:.5f}"
    assert page.inner_text("#confidence") == f"{expected.confidence:.3f}"
    assert page.inner_text("#confidence-label") == "Confidence (PD at 25 km)"
    assert page.inner_text("#verdict") == messages.verdict(expected.localizable)
    assert page.get_attribute("#method", "data-value") == expected.method.value
    marker = page.locator("#marker")
    assert math.isclose(float(marker.get_attribute("data-lat")), expected.lat, abs_tol=1e-9)
    assert math.isclose(float(marker.get_attribute("data-lon")), expected.lon, abs_tol=1e-9)
    assert marker.bounding_box()["width"] > 10  # drawn, not just present
    # The evidence: every neighbour on the map and in the table, the chosen cluster marked.
    chosen = sum(n.in_prediction for n in expected.neighbours)
    assert page.locator("#map .m-evidence").count() == chosen
    assert page.locator("#map .m-neighbour").count() == len(expected.neighbours) - chosen
    assert page.locator("#neighbours tbody tr").count() == len(expected.neighbours)
    assert page.locator("#neighbours tbody tr.in-prediction").count() == chosen
    assert page.locator("#cells tbody tr").count() == len(expected.top_cells)
    assert page.locator("#pd-chart circle.pt").count() == len(expected.prediction_density)
    assert page.locator("#pd-chart circle.pt-conf").count() == 1
    assert page.inner_text("#model-version") == expected.model_version
    assert page.inner_text("#background-version") == expected.background_version
    assert page.is_hidden("#error")


def test_drop_a_photo_and_see_where_and_why(web, browser, tmp_path):
    base, client = web
    path, data = _photo(tmp_path, _seed(client, True))
    with Watched(browser, base, "desktop", viewport={"width": 1280, "height": 900}) as w:
        page = w.page
        assert "DEMO" in page.inner_text("#demo-banner")
        assert "sha256" in page.inner_text("#service-line")
        page.set_input_files("#file", str(path))
        page.wait_for_selector("body[data-state=result]", timeout=60_000)
        expected = client.locate(data, neighbours=10, top_cells=5)
        assert expected.localizable and expected.neighbours  # the seed's point
        _check_answer(page, expected)
        assert page.is_visible("#preview")
        _save(page, tmp_path, "web-desktop.png", docs=True, full_page=True)
        # Around the prediction: the same markers, closer.
        page.click("#view-region")
        assert page.get_attribute("#view-region", "aria-pressed") == "true"
        assert page.locator("#map .m-evidence").count() == sum(n.in_prediction for n in expected.neighbours)
        assert page.locator("#map .scale-bar").count() == 1
        _save(page, tmp_path, "web-region.png", full_page=False)
        assert w.problems == []


def test_the_claim_box_shows_the_belief_around_a_claimed_place(web, browser, tmp_path):
    """Type a claimed place, send the photo: the mass around it at every scale (next to the
    prediction's), the rank of its cell, the photos near it, a marker; then click another place
    on the map: the claim is that place and the photo is checked again."""
    base, client = web
    path, data = _photo(tmp_path, _seed(client, True))
    claim = (48.8584, 2.2945)
    with Watched(browser, base, "claim", viewport={"width": 1280, "height": 900}) as w:
        page = w.page
        page.fill("#claim", "48.8584, 2.2945")
        page.set_input_files("#file", str(path))
        page.wait_for_selector("#claim-check:not([hidden])", timeout=60_000)
        expected = client.locate(data, claims=[claim], claim_neighbours=10)
        (check,) = expected.claims
        rows = page.locator("#claim-mass tbody tr")
        assert rows.count() == len(check.mass) == len(expected.prediction_density)
        for i, d in enumerate(check.mass):
            assert float(rows.nth(i).get_attribute("data-scale")) == d.scale_km
            assert math.isclose(float(rows.nth(i).get_attribute("data-mass")), d.density, abs_tol=1e-12)
        assert page.get_attribute("#claim-summary", "data-rank") == str(check.rank)
        assert "48.85840" in page.inner_text("#claim-summary") or "48.8584" in page.inner_text("#claim-summary")
        marker = page.locator("#claim-marker")
        assert (float(marker.get_attribute("data-lat")), float(marker.get_attribute("data-lon"))) == claim
        near = page.locator("#claim-neighbours tbody tr")
        assert near.count() == max(1, len(check.neighbours))
        assert page.locator("#map .m-claim-neighbour").count() <= len(check.neighbours)
        _save(page, tmp_path, "web-claim.png", docs=True, full_page=True)
        # A click on the map: that place becomes the claim, and the photo is checked against it.
        box = page.locator("#map").bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.35)
        picked = page.input_value("#claim")
        lat, lon = (float(v) for v in picked.split(","))
        assert (lat, lon) != claim and abs(lat) <= 90 and abs(lon) <= 180
        page.wait_for_function(
            "lat => { const m = document.querySelector('#claim-marker'); "
            "return m && Math.abs(Number(m.dataset.lat) - lat) < 1e-9; }",
            arg=lat, timeout=60_000,
        )  # fmt: skip
        again = client.locate(data, claims=[(lat, lon)]).claims[0]
        assert page.get_attribute("#claim-summary", "data-rank") == str(again.rank)
        # A claim that is not a place: said so, nothing sent.
        page.fill("#claim", "91, 0")
        page.click("#claim-check-button")
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error-title") == "The claimed location is not valid"
        assert w.problems == []


def test_readable_errors_then_recovery(web, browser, tmp_path):
    base, client = web
    with Watched(browser, base, "errors", viewport={"width": 1280, "height": 900}) as w:
        page = w.page
        # Not an image at all: refused by the web app before the service is called.
        notes = tmp_path / "notes.txt"
        notes.write_text("These are my holiday notes, not a photo.\n")
        page.set_input_files("#file", str(notes))
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error-title") == "This file is not a photo the service can read"
        assert "It looks like text" in page.inner_text("#error-message")
        assert page.is_hidden("#error-reason") and page.is_hidden("#answer")
        assert page.locator("#marker").count() == 0
        _save(page, tmp_path, "web-error.png", full_page=False)

        # Looks like a JPEG but is cut short: the service refuses it and says why.
        path, data = _photo(tmp_path, _seed(client, False))
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(data[:400])
        page.set_input_files("#file", str(broken))
        page.wait_for_selector("#error-reason:not([hidden])")
        assert page.inner_text("#error-title") == "The service could not use this image"
        assert page.inner_text("#error-reason").startswith("The service said: ")
        assert page.locator("#marker").count() == 0

        # A good photo after the errors: the error goes, the answer comes.
        page.set_input_files("#file", str(path))
        page.wait_for_selector("body[data-state=result]", timeout=60_000)
        expected = client.locate(data, neighbours=10, top_cells=5)
        assert not expected.localizable
        _check_answer(page, expected)
        # The console shows one failed request per refused upload (the browser logs non-2xx
        # fetches); anything else is a problem.
        problems = [p for p in w.problems if "the server responded with a status of" not in p]
        assert problems == []


def test_phone_width_and_keyboard(web, browser, tmp_path):
    base, client = web
    path, data = _photo(tmp_path, _seed(client, False))
    with Watched(browser, base, "phone", viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True) as w:
        page = w.page
        # Keyboard: Tab reaches the file input, its focus is visible, Space opens the chooser.
        # (A listener from the start turns on Playwright's file-chooser interception before
        # the key is pressed; enabling it inside expect_file_chooser can race the keypress.)
        page.on("filechooser", lambda _chooser: None)
        page.wait_for_timeout(100)
        for _ in range(6):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "file":
                break
        assert page.evaluate("document.activeElement.id") == "file"
        outline = page.evaluate(
            "(() => { const s = getComputedStyle(document.querySelector('label[for=file]'));"
            " return [s.outlineStyle, s.outlineWidth]; })()"
        )
        assert outline[0] != "none" and outline[1] != "0px", outline
        with page.expect_file_chooser() as chooser:
            page.keyboard.press("Space")
        chooser.value.set_files(str(path))
        page.wait_for_selector("body[data-state=result]", timeout=60_000)
        _check_answer(page, client.locate(data, neighbours=10, top_cells=5))
        # Readable at 390 px: nothing wider than the screen (wide tables scroll in their box).
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert page.evaluate("document.body.scrollWidth") <= 390
        box = page.locator("#map").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
        # The map-view buttons are reachable and work from the keyboard too.
        page.focus("#view-region")
        page.keyboard.press("Enter")
        assert page.get_attribute("#view-region", "aria-pressed") == "true"
        page.focus("#view-world")
        page.keyboard.press("Enter")
        _save(page, tmp_path, "web-phone.png", docs=True, full_page=True)
        assert w.problems == []


def test_optional_tiles_from_a_configured_server(live_target, browser, tmp_path):
    """Tiles are off by default; configured, the page draws them (Web Mercator) from that
    server only, and the CSP lets exactly that origin through."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (170, 200, 230)).save(buf, format="PNG")
    tile = buf.getvalue()
    asked: list[str] = []

    class Tiles(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(tile)))
            self.end_headers()
            self.wfile.write(tile)

        def log_message(self, *args):
            pass

    tiles = ThreadingHTTPServer(("127.0.0.1", free_port()), Tiles)
    threading.Thread(target=tiles.serve_forever, args=(0.1,), daemon=True).start()
    tiles_base = f"http://127.0.0.1:{tiles.server_address[1]}"
    client = LocatorClient(live_target, timeout=60)
    config = WebConfig(tiles_url=tiles_base + "/{z}/{x}/{y}.png", tiles_attribution="test tiles")
    server = start(WebApp(client, config), "127.0.0.1", free_port())
    base = server.url.rstrip("/")
    try:
        with Watched(browser, base, "tiles", viewport={"width": 1000, "height": 800}) as w:
            page = w.page
            page.wait_for_function("document.querySelectorAll('#map image.tile').length > 0")
            assert "test tiles" in page.inner_text("#map-credit")
            path, _ = _photo(tmp_path, _seed(client, True))
            page.set_input_files("#file", str(path))
            page.wait_for_selector("#marker", state="attached", timeout=60_000)
            page.click("#view-region")
            page.wait_for_function("document.querySelectorAll('#map image.tile').length > 0")
            page.wait_for_load_state("networkidle")
            _save(page, tmp_path, "web-tiles.png", full_page=False)
            zooms = {int(p.split("/")[1]) for p in asked}
            assert 0 <= min(zooms) <= 3 and max(zooms) >= 8, zooms  # world view, then zoomed in
            leaving = [p for p in w.problems if not p.startswith(f"request {tiles_base}/")]
            assert leaving == []
    finally:
        server.shutdown()
        server.server_close()
        client.close()
        tiles.shutdown()
        tiles.server_close()
