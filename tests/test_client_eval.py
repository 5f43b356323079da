"""The client's evaluation arithmetic, id matching and metadata loading (no service needed)."""

from __future__ import annotations

import io
import math
import os
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visloc_client import safe_pickle
from visloc_client.dataset import list_images, load_metadata, match_id
from visloc_client.evaluation import (
    RADII_KM,
    accuracy,
    cumulative_accuracy,
    format_split,
    haversine_km,
    median,
    radius_label,
    split_summary,
    summarize,
)
from visloc_client.progress import Progress

# --- haversine -------------------------------------------------------------------------------


def test_haversine_known_distances():
    assert haversine_km(0, 0, 0, 0) == 0
    # A quarter of a great circle: pi/2 * R.
    assert haversine_km(0, 0, 0, 90) == pytest.approx(math.pi / 2 * 6371, rel=1e-12)
    assert haversine_km(90, 0, -90, 0) == pytest.approx(math.pi * 6371, rel=1e-12)
    # One degree of latitude.
    assert haversine_km(10, 20, 11, 20) == pytest.approx(6371 * math.pi / 180, rel=1e-12)
    # Across the antimeridian is short.
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(6371 * math.pi / 180, rel=1e-9)


def _haversine_reference(lat1, lon1, lat2, lon2):
    """The reference's formula written out as it is in its numpy code."""
    lon1, lat1, lon2, lat2 = map(math.radians, [lon1, lat1, lon2, lat2])
    a = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * math.asin(math.sqrt(a)) * 6371


lat = st.floats(-90, 90, allow_nan=False)
lon = st.floats(-180, 180, allow_nan=False)


@given(lat, lon, lat, lon)
def test_haversine_matches_reference_and_is_symmetric(a, b, c, d):
    assert haversine_km(a, b, c, d) == pytest.approx(_haversine_reference(a, b, c, d), rel=1e-12, abs=1e-9)
    assert haversine_km(a, b, c, d) == pytest.approx(haversine_km(c, d, a, b), rel=1e-12, abs=1e-9)
    assert 0 <= haversine_km(a, b, c, d) <= math.pi * 6371 + 1e-6


# --- accuracy and median -----------------------------------------------------------------------


def test_accuracy_is_strict_at_the_radius():
    # Exactly at r does NOT count: Acc@r = mean(error < r).
    errors = [0.1, 1.0, 25.0, 200.0, 750.0, 2500.0]
    s = summarize(errors)
    assert [a for _, a in s.accuracy] == [0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6]
    assert accuracy([0.0999999], 0.1) == 1.0
    assert accuracy([0.1], 0.1) == 0.0


def test_median_even_and_odd_counts():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5  # mean of the middle two, as numpy
    assert median([7.0]) == 7.0
    assert median([]) is None


def test_summary_hand_made():
    errors = [0.05, 0.5, 10.0, 100.0, 500.0, 1000.0, 3000.0, 5000.0]
    s = summarize(errors)
    assert s.count == 8
    assert dict(s.accuracy) == {0.1: 1 / 8, 1.0: 2 / 8, 25.0: 3 / 8, 200.0: 4 / 8, 750.0: 5 / 8, 2500.0: 6 / 8}
    assert s.median_km == (100.0 + 500.0) / 2
    assert s.to_dict()["accuracy"]["0.1"] == 1 / 8
    assert s.to_dict()["accuracy"]["2500"] == 6 / 8


def test_split_by_localizable():
    errors = [0.5, 30.0, 5.0, 3000.0, 100.0]
    localizable = [True, False, True, False, False]
    split = split_summary(errors, localizable)
    assert (split.all.count, split.localizable.count, split.non_localizable.count) == (5, 2, 3)
    assert dict(split.localizable.accuracy)[1.0] == 0.5  # 0.5 < 1, 5.0 is not
    assert dict(split.localizable.accuracy)[25.0] == 1.0
    assert split.localizable.median_km == 2.75
    assert dict(split.non_localizable.accuracy)[200.0] == pytest.approx(2 / 3)
    assert split.non_localizable.median_km == 100.0
    assert split.all.median_km == 30.0


def test_split_with_an_empty_subset_reports_none():
    split = split_summary([1.0, 2.0], [True, True])
    assert split.non_localizable.count == 0
    assert split.non_localizable.median_km is None
    assert all(a is None for _, a in split.non_localizable.accuracy)
    text = format_split(split)
    assert "Non-localizable images: 0 (0.0%)" in text
    assert "Median Error: -" in text
    with pytest.raises(ValueError):
        split_summary([1.0], [True, False])


def test_format_matches_the_reference_layout():
    split = split_summary([0.05, 0.5, 10.0, 3000.0], [True, True, False, False])
    text = format_split(split)
    assert [radius_label(r) for r in RADII_KM] == ["100m", "1km", "25km", "200km", "750km", "2500km"]
    assert "Total predictions: 4" in text
    assert "Acc@100m:\t25.0%" in text
    assert "Acc@1km:\t50.0%" in text
    assert "Acc@2500km:\t75.0%" in text
    assert "Median Error: 5.2km" in text  # (0.5 + 10) / 2 = 5.25 -> 5.2 (round half even)
    assert "Localizable images: 2 (50.0%)" in text
    assert text.index("Localizable images") < text.index("Non-localizable images")


def test_cumulative_accuracy_is_strict_and_monotone():
    errors = [1.0, 10.0, 100.0]
    assert cumulative_accuracy(errors, [0.5, 1.0, 1.5, 10.0, 100.0, 1e4]) == [0, 0, 1 / 3, 1 / 3, 2 / 3, 1]
    assert cumulative_accuracy([], [1.0, 2.0]) == [0.0, 0.0]


# --- id matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ids", "expected"),
    [
        ("12345.jpg", {"12345"}, "12345"),  # the stem
        ("12345.jpg", {"12345.jpg"}, "12345.jpg"),  # upstream YFCC keys keep ".jpg"
        ("12345.png", {"12345"}, "12345"),
        ("abc_123_456.jpg", {"abc", "123", "456"}, "abc"),  # first prefix wins
        ("abc_123_456.jpg", {"123_456", "123", "456"}, "123_456"),  # remainder before its prefix
        ("abc_123_456.jpg", {"123", "456"}, "123"),
        ("abc_123_456.jpg", {"456"}, "456"),  # a "_"-separated suffix
        ("abc_123_456.jpg", {"abc_123"}, None),  # not a prefix or suffix form the rule knows
        ("abc_123_456.jpg", {"12"}, None),  # whole segments only
        ("abc_123_456.jpg", {"abc_123_456"}, "abc_123_456"),
        ("a.b_c.jpg", {"c"}, "c"),  # only the last extension is dropped
        ("dir/sub/9_8.jpg", {"8"}, "8"),  # the file name, not the path
        ("nounderscore.jpg", {"other"}, None),
        ("1000269685_5f0d6b9e6a_1234.jpg", {"1000269685"}, "1000269685"),  # im2gps-style names
    ],
)
def test_match_id(name, ids, expected):
    assert match_id(name, ids) == expected


def test_list_images_filters_by_extension(tmp_path):
    for name in ["b.JPG", "a.jpg", "c.png", "notes.txt", "d.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.JPG", "c.png", "d.webp"]
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "a.jpg")


# --- metadata --------------------------------------------------------------------------------


def test_metadata_from_csv(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text("id,lat,lon,extra\nabc,48.8584,2.2945,x\n12345,-33.8568,151.2153,y\n")
    assert load_metadata(path) == {"abc": (48.8584, 2.2945), "12345": (-33.8568, 151.2153)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,lat,lon\na,1,2\n", "header needs id,lat,lon"),
        ("id,lat,lon\na,north,2\n", "not a number"),
        ("id,lat,lon\na,91,2\n", "out of range"),
        ("id,lat,lon\na,1,nan\n", "out of range"),
    ],
)
def test_bad_csv_metadata_is_refused(tmp_path, text, message):
    path = tmp_path / "gt.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_metadata(path)


def test_metadata_from_upstream_pickle(tmp_path):
    data = {"104123223": {"lat": "-16.663606", "lon": "145.563537"}, "7.jpg": {"lat": "1.5", "lon": "-2"}}
    path = tmp_path / "metadata_im2gps.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    assert load_metadata(path) == {"104123223": (-16.663606, 145.563537), "7.jpg": (1.5, -2.0)}


def test_metadata_pickle_with_numpy_scalars(tmp_path):
    """Upstream's yfcc4k pickle holds np.str_ (and floats elsewhere); read without numpy."""
    np = pytest.importorskip("numpy")
    data = {
        "10201275523.jpg": {"lat": np.str_("43.649708"), "lon": np.str_("-79.365637")},
        "2.jpg": {"lat": np.float64(12.25), "lon": np.float32(-3.5)},
        "3.jpg": {"lat": np.array(["-1.5"], dtype=">U4")[0], "lon": np.int64(7)},
    }
    path = tmp_path / "metadata_yfcc4k.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    assert load_metadata(path) == {
        "10201275523.jpg": (43.649708, -79.365637),
        "2.jpg": (12.25, -3.5),
        "3.jpg": (-1.5, 7.0),
    }


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_metadata_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"a": {"lat": "1", "lon": _Evil()}}))
    with pytest.raises(safe_pickle.UnsafePickleError):
        load_metadata(path)
    # numpy object arrays (which could smuggle anything) are refused too.
    np = pytest.importorskip("numpy")
    path.write_bytes(pickle.dumps({"a": {"lat": np.array([1.0]), "lon": "2"}}))
    with pytest.raises(safe_pickle.UnsafePickleError):
        load_metadata(path)
    path.write_bytes(pickle.dumps({"a": {"lat": np.complex128(1j), "lon": "2"}}))
    with pytest.raises(safe_pickle.UnsafePickleError):
        load_metadata(path)


def test_pickle_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a dict"):
        load_metadata(path)
    path.write_bytes(pickle.dumps({"a": (1.0, 2.0)}))
    with pytest.raises(ValueError, match="expected"):
        load_metadata(path)


# --- progress --------------------------------------------------------------------------------


def test_progress_line_shows_count_rate_and_eta():
    out = io.StringIO()
    bar = Progress(10, stream=out, log_interval=0)
    bar._start -= 2.0  # pretend 2 s have passed
    bar.update(4, failed=1)
    line = bar.line()
    assert "4/10" in line and "40%" in line and "img/s" in line and "ETA 0:00:0" in line
    assert "(1 failed)" in line
    bar.close()
    assert out.getvalue().count("\n") == 2  # not a terminal: plain lines, no carriage returns
    silent = io.StringIO()
    Progress(3, stream=silent, enabled=False).update(3)
    assert silent.getvalue() == ""
