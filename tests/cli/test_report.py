"""Tests for datatrace.cli.report: escaping, atomic saving, embedded figures and the plotting helpers."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from datatrace.cli.report import (
    Report,
    format_value,
    plot_detection_curve,
    plot_estimated_vs_actual,
    plot_image_grid,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(\"x\")</script> & 'quoted'"


def small_figure() -> Figure:
    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    return figure


def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_all_text_is_escaped():
    report = Report(EVIL, subtitle=EVIL)
    report.add_heading(EVIL).add_paragraph(EVIL)
    report.add_table([[EVIL, 1.5], {"a": EVIL, "b": 2}], ["a", EVIL], caption=EVIL)
    report.add_key_values({EVIL: EVIL}, caption=EVIL)
    report.add_figure(small_figure(), caption=EVIL)
    text = report.to_html()
    assert "<script>" not in text
    assert 'alert("x")' not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quoted&#x27;" in text
    # the alt attribute is escaped too (quotes cannot close it)
    assert 'alt="&lt;script&gt;' in text


def test_html_is_self_contained():
    report = Report("Self-contained")
    report.add_paragraph("see https://example.org")  # text may mention a URL; it must not be linked
    report.add_figure(small_figure(), "a figure")
    text = report.to_html()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)
    assert "<link" not in text and "<script" not in text and "@import" not in text and "url(" not in text
    assert "<style>" in text


def test_figure_is_embedded_as_png():
    report = Report("Figures").add_figure(small_figure(), "caption here")
    text = report.to_html()
    images = embedded_pngs(text)
    assert len(images) == 1
    assert images[0].startswith(PNG_SIGNATURE)
    assert "<figcaption>caption here</figcaption>" in text


def test_figure_must_be_a_matplotlib_figure():
    with pytest.raises(ValueError, match=r"figure=.*matplotlib\.figure\.Figure"):
        Report("x").add_figure("not a figure", "caption")  # type: ignore[arg-type]


def test_pyplot_figure_is_embedded_and_closed():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure = plt.figure()
    plt.plot([1, 2, 3])
    number = figure.number
    Report("pyplot").add_figure(figure, "from pyplot")
    assert not plt.fignum_exists(number)


def test_table_formats_and_aligns_numbers():
    report = Report("Table").add_table(
        [[1, 0.123456789, True, None, float("nan")]], ["int", "float", "bool", "none", "nan"]
    )
    text = report.to_html()
    assert '<td class="num">1</td>' in text
    assert '<td class="num">0.1235</td>' in text
    assert "<td>yes</td>" in text
    assert "<td>—</td>" in text
    assert '<td class="num">nan</td>' in text
    assert format_value(np.float32(2.5)) == "2.5"
    assert format_value(np.int64(3)) == "3"


def test_table_row_length_mismatch_names_the_row():
    with pytest.raises(ValueError, match=r"rows\[1\] has 1 cell\(s\) but there are 2 columns"):
        Report("x").add_table([[1, 2], [3]], ["a", "b"])


def test_heading_level_is_checked():
    with pytest.raises(ValueError, match="level=1"):
        Report("x").add_heading("top", level=1)


def test_save_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "sub" / "report.html"
    Report("first").add_paragraph("version one").save(path)
    assert "version one" in path.read_text(encoding="utf-8")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        Report("second").add_paragraph("version two").save(path)
    monkeypatch.undo()
    assert "version one" in path.read_text(encoding="utf-8")  # the old report is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # no temporary file left behind


def test_save_overwrites_and_returns_path(tmp_path: Path):
    path = tmp_path / "r.html"
    Report("one").save(path)
    returned = Report("two").save(str(path))
    assert returned == path
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<title>two</title>" in text


def test_save_to_a_directory_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="directory"):
        Report("x").save(tmp_path)


def test_scatter_title_has_the_correlation():
    rng = np.random.default_rng(0)
    actual = rng.normal(size=(20, 5))
    estimated = actual + 0.1 * rng.normal(size=(20, 5))
    figure = plot_estimated_vs_actual(estimated, actual, title="check")
    title = figure.axes[0].get_title()
    r = np.corrcoef(estimated.ravel(), actual.ravel())[0, 1]
    assert f"Pearson r = {r:.3f}" in title
    assert "100 points" in title
    # the y = x line spans the data
    line = figure.axes[0].lines[0]
    assert np.allclose(line.get_xdata(), line.get_ydata())


def test_scatter_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        plot_estimated_vs_actual(np.zeros(3), np.zeros(4))


def test_image_grid_captions_and_highlight():
    images = np.random.default_rng(0).random((7, 64))
    captions = [f"#{i}\n{0.01 * i:+.3g} nats" for i in range(7)]
    figure = plot_image_grid(
        images,
        captions,
        image_shape=(8, 8),
        ncols=4,
        title="grid",
        highlight=[i == 2 for i in range(7)],
        highlight_label="flipped",
    )
    shown = [ax for ax in figure.axes if ax.images]
    assert len(shown) == 7
    assert shown[3].get_xlabel() == captions[3]
    assert "red outline: flipped" in figure._suptitle.get_text()
    with pytest.raises(ValueError, match="one caption per image"):
        plot_image_grid(images, captions[:3], image_shape=(8, 8))


def test_detection_curve_plot_accepts_curves_and_pairs():
    from datatrace.verification.metrics import detection_curve

    flagged = np.zeros(20, dtype=bool)
    flagged[:4] = True
    curve = detection_curve(np.arange(20, 0, -1), flagged)
    figure = plot_detection_curve({"score": curve, "other": ([0, 0.5, 1], [0, 0.7, 1])}, flagged_fraction=0.2)
    labels = [line.get_label() for line in figure.axes[0].lines]
    assert "random order (expected)" in labels
    assert "perfect order" in labels
    assert any(label.startswith("score (AUC") for label in labels)
    assert "other" in labels


def test_detection_curves_that_coincide_stay_visible():
    """Self-influence and training loss often rank the same examples first (issue 13): identical curves must
    still be told apart, by colour, line style, marker and width, the first drawn widest and underneath."""
    same = ([0, 0.05, 0.1, 1], [0, 0.6, 0.9, 1])
    figure = plot_detection_curve({"self-influence": same, "training loss": same})
    lines = {line.get_label(): line for line in figure.axes[0].lines}
    a, b = lines["self-influence"], lines["training loss"]
    assert a.get_linestyle() != b.get_linestyle() and a.get_marker() != b.get_marker()
    assert a.get_color() != b.get_color() and a.get_linewidth() > b.get_linewidth()
    assert a.get_zorder() < b.get_zorder()


def test_plots_embed_in_a_report(tmp_path: Path):
    report = Report("plots")
    report.add_figure(plot_estimated_vs_actual([0.0, 1.0, 2.0], [0.1, 1.1, 1.9]), "scatter")
    report.add_figure(plot_image_grid(np.zeros((2, 8, 8)), ["a", "b"]), "grid")
    path = report.save(tmp_path / "plots.html")
    assert len(embedded_pngs(path.read_text(encoding="utf-8"))) == 2
