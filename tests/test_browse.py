"""The feature browser's pure parts: which features get a page, and what the pages hold.
(It runs for real, with Ray, the model and Chromium, in tests/test_demo.py.)"""

from __future__ import annotations

import math

from scope_ray.browse import chosen_features, feature_page, index_page
from scope_ray.config import load_config


def _rows(cds: list[float]) -> list[dict]:
    return [{"feature": i, "cds": c, "group": "unscored" if math.isnan(c) else ("high" if c > 0.5 else "low"),
             "unscored_reason": "no usable image" if math.isnan(c) else None, "status": "ok", "images_used": 8,
             "max_act": 1.5, "firing_rate": 0.01} for i, c in enumerate(cds)]


def test_pages_go_to_the_two_ends_of_the_cds_range_and_never_to_unscored_features():
    rows = _rows([0.5, 0.1, float("nan"), 0.9, 0.3, 0.7, 0.0, 0.95])
    assert chosen_features(rows, 4) == [6, 1, 3, 7]  # the two lowest, then the two highest
    assert chosen_features(rows, 5) == [6, 1, 5, 3, 7]
    assert sorted(chosen_features(rows, 100)) == [0, 1, 3, 4, 5, 6, 7]


def test_index_links_only_features_with_a_page_and_escapes_text():
    job = load_config(None)
    rows = _rows([0.1, 0.9])
    rows[1]["status"] = "<b>odd</b>"
    page = index_page(job, {"gamma": 0.5, "gamma_source": "config", "low": 1, "high": 1, "unscored": 0, "tokens": 10},
                      rows, {1})
    assert page.count("<tr>") == 3  # header + one per feature
    assert "<a href='f/1.html'>1</a>" in page and "f/0.html" not in page
    assert "&lt;b&gt;odd&lt;/b&gt;" in page and "<b>odd</b>" not in page
    assert "data-v='0.9'" in page  # sortable by value, not by the rounded text


def test_a_feature_page_shows_both_views_of_each_pair():
    job = load_config(None)
    shown = [{"rank": r, "image_id": f"img{r}", "max_act": 1.0, "score": 0.25, "v1": f"9-{r}-v1.png",
              "v2": f"9-{r}-v2.png"} for r in range(3)]
    page = feature_page(job, _rows([0.9] * 10)[9], shown, (3, None))
    assert page.count("<img alt=") == 6 and page.count("src='../img/9-") == 6
    assert "feature 3" in page and "global scope" in page
