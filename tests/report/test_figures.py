"""Plotting helpers in scope_ray.report.figures: each writes a real, non-blank PNG and survives NaN/empty input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scope_ray.report import figures as report


def _check_png(path):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[0] > 10 and arr.shape[1] > 10
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 1, "figure is a single flat colour"
    return arr


def test_cds_histogram(tmp_path):
    rng = np.random.default_rng(0)
    cds = np.concatenate([rng.beta(2, 30, 400), rng.beta(20, 8, 40), [np.nan] * 5])
    out = report.cds_histogram(cds, tmp_path / "sub" / "cds.png", title="CDS", gamma=0.14)
    assert out == tmp_path / "sub" / "cds.png"
    _check_png(out)


def _pixels_of(arr: np.ndarray, hex_colour: str) -> np.ndarray:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(arr.astype(int) - rgb).sum(axis=-1) <= 6)


def test_cds_histogram_draws_the_unscored_pile_in_grey_where_it_is(tmp_path):
    # Scored features all below 0.5; 300 unscored ones (CDS from too few images) piled at exactly 1,
    # 50 with no CDS. The pile must be drawn at the right edge, in grey, and nowhere else.
    rng = np.random.default_rng(1)
    scored = rng.uniform(0.0, 0.45, 2000)
    unscored = np.concatenate([np.ones(300), [np.nan] * 50])
    arr = _check_png(report.cds_histogram(scored, tmp_path / "h.png", title="CDS", gamma=0.2,
                                          unscored_cds=unscored,
                                          sensitivity=[{"gamma": 0.15, "low": 1, "high": 2},
                                                       {"gamma": 0.25, "low": 3, "high": 4}]))
    # A bar is a column with a tall run of its colour (text and legend patches are short).
    grey_bar_cols = np.flatnonzero(_pixels_of(arr, report.GREY).sum(axis=0) >= 60)
    scored_cols = np.flatnonzero((_pixels_of(arr, report.BLUE) | _pixels_of(arr, report.RED)).sum(axis=0) >= 20)
    assert grey_bar_cols.size and scored_cols.size
    # The pile's bar stands right of every scored bar, in the last bin: within the last 3% of the x range.
    assert grey_bar_cols.min() > scored_cols.max()
    x0, x1 = scored_cols.min(), grey_bar_cols.max()  # x = 0 and x = 1, to within a bar edge
    assert grey_bar_cols.min() >= x0 + 0.97 * (x1 - x0)
    # Without the unscored set no grey bar is drawn.
    arr2 = _check_png(report.cds_histogram(scored, tmp_path / "h2.png", title="CDS", gamma=0.2))
    assert not (_pixels_of(arr2, report.GREY).sum(axis=0) >= 60).any()


@pytest.mark.parametrize("gamma", [None, float("nan"), 0.2])
@pytest.mark.parametrize("cds", [np.array([]), np.array([np.nan, np.nan])])
def test_cds_histogram_no_data(tmp_path, cds, gamma):
    _check_png(report.cds_histogram(cds, tmp_path / "c.png", title="empty", gamma=gamma, log_y=True))


def _colour_rows(arr: np.ndarray, hex_colour: str, min_run: int = 1) -> dict[int, float]:
    """Column -> mean row of the pixels of one colour (image rows grow downwards)."""
    mask = _pixels_of(arr, hex_colour)
    return {int(c): float(np.flatnonzero(mask[:, c]).mean()) for c in np.flatnonzero(mask.sum(axis=0) >= min_run)}


def test_awcds_curve(tmp_path):
    centres = np.linspace(0.5, 99.5, 100)
    means = 0.05 + 0.001 * np.exp(centres / 15.0)
    means[[3, 50]] = np.nan
    arr = _check_png(report.awcds_curve(centres, means, tmp_path / "a.png", title="awCDS",
                                        outlier_percentile=98.7))
    # The drawn curve follows the data: it rises to the right (means grow with the percentile), so
    # its right end sits higher (a smaller row) than its left end; the outlier marker (red, dashed)
    # stands at the far right, where 98.7 is.
    blue = _colour_rows(arr, report.BLUE)
    cols = sorted(blue)
    assert len(cols) > 100
    left, right = np.mean([blue[c] for c in cols[:20]]), np.mean([blue[c] for c in cols[-20:]])
    assert right < left - 50
    red_cols = np.flatnonzero(_pixels_of(arr, report.RED).sum(axis=0) >= 40)  # the vertical marker
    assert red_cols.size and red_cols.min() > cols[int(0.9 * len(cols))]


def test_awcds_curve_no_data(tmp_path):
    _check_png(report.awcds_curve([], [], tmp_path / "a.png", title="t"))
    _check_png(report.awcds_curve([10.0, 20.0], [np.nan, np.nan], tmp_path / "b.png", title="t",
                                  outlier_percentile=float("nan")))
    with pytest.raises(ValueError):
        report.awcds_curve([1.0, 2.0], [1.0], tmp_path / "c.png", title="t")


def test_instability_plot(tmp_path):
    s = np.arange(1, 7)
    d_non = np.array([1.49, 1.6, 1.7, 1.8, 1.9, 1.958])
    d_out = np.array([3.1, 3.3, np.nan, 3.5, 3.4, 3.3])
    arr = _check_png(report.instability_plot(s, d_non, d_out, tmp_path / "i.png", title="Table 9"))
    # D_out (red) lies above D_non (blue) wherever both are drawn: its rows are smaller.
    blue, red = _colour_rows(arr, report.BLUE), _colour_rows(arr, report.RED)
    shared = sorted(set(blue) & set(red))
    assert len(shared) > 50
    assert np.mean([red[c] < blue[c] for c in shared]) > 0.9


def test_instability_plot_no_data(tmp_path):
    nan = np.full(3, np.nan)
    _check_png(report.instability_plot([1, 2, 3], [1.0, 1.1, 1.2], nan, tmp_path / "a.png", title="t"))
    _check_png(report.instability_plot([1, 2, 3], nan, nan, tmp_path / "b.png", title="t"))
    _check_png(report.instability_plot([], [], [], tmp_path / "c.png", title="t"))


def test_overlay_changes_only_where_map_is_high():
    image = np.full((8, 8, 3), 128, dtype=np.uint8)
    amap = np.zeros((2, 2))
    amap[0, 1] = 5.0  # top-right patch hot
    amap[1, 0] = 2.5  # bottom-left patch half as hot
    out = report.overlay_map(image, amap)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[:4, :4], image[:4, :4])  # zero patch untouched
    np.testing.assert_array_equal(out[4:, 4:], image[4:, 4:])
    hot = np.abs(out[:4, 4:].astype(int) - 128).sum(axis=-1)
    half = np.abs(out[4:, :4].astype(int) - 128).sum(axis=-1)
    assert (hot > 30).all() and (half > 0).all()
    assert hot.mean() > half.mean()  # alpha grows with activation
    # every pixel of one patch gets the same blend (nearest upsampling)
    assert len(np.unique(out[:4, 4:].reshape(-1, 3), axis=0)) == 1


def test_overlay_zero_and_nan_maps_leave_image_unchanged():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
    for amap in (np.zeros((7, 7)), np.full((7, 7), np.nan), -np.ones((7, 7))):
        np.testing.assert_array_equal(report.overlay_map(image, amap), image)
    # non-divisible sizes still cover the whole image
    assert report.overlay_map(image, rng.random((5, 5))).shape == image.shape


def test_feature_gallery(tmp_path):
    rng = np.random.default_rng(2)
    f, m, size, g = 3, 4, 32, 4
    images = rng.integers(0, 256, (f, m, size, size, 3), dtype=np.uint8)
    maps = rng.random((f, m, g, g))
    maps[0, 1] = 0.0  # all-zero map: plain image
    images[2, 3] = 0  # missing image
    maps[2, 3] = np.nan
    labels = [f"feature {j} · CDS {c:.2f}" for j, c in zip((17, 4, 9), (0.03, 0.5, 0.71))]
    _check_png(report.feature_gallery(images, maps, tmp_path / "g" / "gal.png", title="low-CDS",
                                      row_labels=labels))


def test_feature_gallery_empty_and_bad_labels(tmp_path):
    images = np.zeros((0, 4, 16, 16, 3), dtype=np.uint8)
    maps = np.zeros((0, 4, 2, 2))
    _check_png(report.feature_gallery(images, maps, tmp_path / "e.png", title="t", row_labels=[]))
    with pytest.raises(ValueError):
        report.feature_gallery(np.zeros((2, 1, 8, 8, 3), np.uint8), np.zeros((2, 1, 2, 2)),
                               tmp_path / "x.png", title="t", row_labels=["only one"])


def test_norm_histogram_handles_empty(tmp_path):
    _check_png(report.norm_histogram([], tmp_path / "n.png", title="t", tau=float("nan")))
    _check_png(report.norm_histogram([1.0, 2.0, 300.0], tmp_path / "m.png", title="t", tau=100.0))


def test_table_markdown_exact():
    rows = [
        {"model": "CLIP-B/16", "q": 24576, "gamma": 0.14, "emd": float("nan")},
        {"model": "a|b", "q": 32768.0, "gamma": np.float32(0.2), "emd": 1.4904},
        {"model": "L/14-336", "q": None},
    ]
    cols = [("model", "Model", ""), ("q", "q", "d"), ("gamma", "γ", ".2f"), ("emd", "D̄_out", ".3f")]
    expected = (
        "| Model | q | γ | D̄_out |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| CLIP-B/16 | 24576 | 0.14 | – |\n"
        "| a\\|b | 32768 | 0.20 | 1.490 |\n"
        "| L/14-336 | – | – | – |\n"
    )
    assert report.table_markdown(rows, cols) == expected
    assert report.table_markdown([], cols) == expected.split("| CLIP")[0]
    assert report.table_markdown(rows, []) == ""
