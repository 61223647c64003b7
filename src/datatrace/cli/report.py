"""Self-contained HTML reports and the plots that go in them.

A :class:`Report` collects headings, paragraphs, tables, key/value lists and matplotlib figures and writes one
HTML file that needs nothing else to be read: the CSS is inline, every figure is a PNG embedded as base64, and
no script, font or style sheet is fetched from anywhere. Every piece of text is HTML-escaped, so data values
(labels, file names, user strings) cannot break or inject markup. :meth:`Report.save` writes atomically
(:func:`datatrace.fileio.atomic_write`), so a reader never sees half a report.

The plotting helpers build figures with ``matplotlib.figure.Figure`` and the Agg canvas directly: they never
touch ``pyplot`` or the global backend, so they work headless and do not disturb a user's own plotting.

* :func:`plot_estimated_vs_actual`: estimated against actual effects (e.g. influence against leave-one-out
  retraining), with the ``y = x`` line and the correlation in the title.
* :func:`plot_image_grid`: a grid of small images with a caption each (e.g. proponents and opponents of a query
  with their scores), optionally outlined (e.g. known-mislabelled examples).
* :func:`plot_detection_curve`: fraction of flagged examples found against fraction inspected, for one or more
  rankings, beside the random and the perfect order.

Token-wise influence (:func:`datatrace.apps.tokens.token_influence`: a training sequence's score split over the
tokens its loss terms predict, ``score[q, i] = sum_t s_{q,i,t}``) is shown as highlighted text by
:func:`token_highlight_html` and :meth:`Report.add_token_influence`: each token's background is blue for a positive
part and red for a negative one, its strength ``|s_t| / max_t |s_t|``, positive parts underlined solid and negative
ones dashed (a cue that does not rely on colour), and the number in the token's ``title`` (shown on hover).

Example:
    >>> import numpy as np
    >>> from datatrace.cli.report import Report, plot_estimated_vs_actual
    >>> report = Report("Influence check")
    >>> report.add_paragraph("Scores estimate f(theta without i) - f(theta) in nats.")
    Report(title='Influence check', blocks=1)
    >>> _ = report.add_table([[0, 0.12], [7, -0.03]], ["train index", "score (nats)"])
    >>> fig = plot_estimated_vs_actual(np.arange(5.0), np.arange(5.0) + 0.1)
    >>> _ = report.add_figure(fig, "Estimated against actual change.")
    >>> _ = report.add_token_influence(["The", " cat"], [0.02, -0.005], score=0.015, units="nats")
    >>> html_text = report.to_html()
    >>> "<table" in html_text and "data:image/png;base64," in html_text and 'class="tok pos"' in html_text
    True
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy.stats import rankdata

from datatrace import __version__
from datatrace.errors import bad_value, describe
from datatrace.fileio import atomic_write

__all__ = [
    "Report",
    "format_value",
    "plot_bars",
    "plot_detection_curve",
    "plot_estimated_vs_actual",
    "plot_histogram",
    "plot_image_grid",
    "token_highlight_html",
]

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: #1d2330;
       font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1000px; margin: 0 auto; padding: 28px 32px 48px; background: #fff;
       min-height: 100vh; box-shadow: 0 0 0 1px #e3e6eb; }
h1 { font-size: 1.75em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.3em; margin: 1.8em 0 0.5em; padding-bottom: 0.2em; border-bottom: 1px solid #e3e6eb; }
h3 { font-size: 1.1em; margin: 1.4em 0 0.4em; }
h4, h5, h6 { font-size: 1em; margin: 1.2em 0 0.3em; }
p { margin: 0.5em 0 0.9em; white-space: pre-line; }
.subtitle { color: #5b6475; margin: 0 0 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.93em; }
caption { caption-side: top; text-align: left; color: #5b6475; padding-bottom: 0.35em; }
th, td { border: 1px solid #dfe3e8; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fafbfc; }
table.kv th { width: 16em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6eb; }
figcaption { color: #444c5a; font-size: 0.93em; margin-top: 0.35em; }
.tokens { margin: 0.4em 0 1.2em; padding: 8px 10px; border: 1px solid #e3e6eb; border-radius: 4px;
          font: 14px/1.9 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap;
          overflow-wrap: anywhere; }
.tokens .cap { display: block; font: 600 0.9em/1.4 -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
               color: #444c5a; margin-bottom: 0.3em; white-space: normal; }
.tok { border-radius: 2px; color: #111; padding: 0 1px; }
.tok.pos { border-bottom: 2px solid #1f4e8c; }
.tok.neg { border-bottom: 2px dashed #8e2a1f; }
.tok-legend { font-size: 0.9em; color: #444c5a; margin: 0.2em 0 0.4em; }
.tok-legend .tok { padding: 0 0.35em; margin: 0 0.2em; }
footer { margin-top: 3em; color: #8a93a3; font-size: 0.85em; border-top: 1px solid #e3e6eb; padding-top: 0.8em; }
"""


def format_value(value: Any, digits: int = 4) -> str:
    """Text for a table cell: floats with ``digits`` significant digits, everything else as ``str``."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    if value is None:
        return "—"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _cell(value: Any, tag: str = "td") -> str:
    cls = ' class="num"' if tag == "td" and _is_number(value) else ""
    return f"<{tag}{cls}>{html.escape(format_value(value))}</{tag}>"


class Report:
    """An HTML report built block by block and written as one self-contained file.

    Args:
        title: the page title and top heading.
        subtitle: an optional line under the title.

    Every ``add_*`` method returns the report, so calls can be chained.
    """

    def __init__(self, title: str, subtitle: str | None = None) -> None:
        if not isinstance(title, str):
            raise bad_value("title", title, "expected a string", "pass the report's title as text")
        self.title = title
        self.subtitle = subtitle
        self._blocks: list[str] = []

    def __repr__(self) -> str:
        return f"Report(title={self.title!r}, blocks={len(self._blocks)})"

    # -- blocks ------------------------------------------------------------------------------------------------
    def add_heading(self, text: str, level: int = 2) -> Report:
        """A section heading; ``level`` 2 to 6 (level 1 is the report's title)."""
        if isinstance(level, bool) or not isinstance(level, int) or not 2 <= level <= 6:
            raise bad_value("level", level, "expected an int from 2 to 6", "use level=2 for a section")
        self._blocks.append(f"<h{level}>{html.escape(str(text))}</h{level}>")
        return self

    def add_paragraph(self, text: str) -> Report:
        """A paragraph of plain text (escaped; line breaks are kept)."""
        self._blocks.append(f"<p>{html.escape(str(text))}</p>")
        return self

    def add_table(
        self,
        rows: Iterable[Sequence[Any] | Mapping[str, Any]],
        columns: Sequence[str],
        caption: str | None = None,
    ) -> Report:
        """A table with a header row ``columns`` and one line per element of ``rows``.

        A row is a sequence of cells in the order of ``columns`` or a mapping from column name to cell (missing
        names give an empty cell). Floats are shown with 4 significant digits and right-aligned.
        """
        if isinstance(columns, str) or not isinstance(columns, Sequence):
            raise bad_value("columns", columns, "expected a sequence of column names", "pass e.g. ['a', 'b']")
        columns = [str(c) for c in columns]
        body = []
        for r, row in enumerate(rows):
            if isinstance(row, Mapping):
                cells = [row.get(c, "") for c in columns]
            elif isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
                raise bad_value(
                    f"rows[{r}]", row, "expected a sequence of cells or a mapping", "pass a list per row"
                )
            else:
                cells = list(row)
                if len(cells) != len(columns):
                    raise ValueError(
                        f"rows[{r}] has {len(cells)} cell(s) but there are {len(columns)} columns {columns}. "
                        "Fix: give every row one cell per column."
                    )
            body.append("<tr>" + "".join(_cell(c) for c in cells) + "</tr>")
        head = "<tr>" + "".join(_cell(c, "th") for c in columns) + "</tr>"
        cap = f"<caption>{html.escape(str(caption))}</caption>" if caption else ""
        self._blocks.append(f"<table>{cap}<thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")
        return self

    def add_key_values(self, values: Mapping[str, Any], caption: str | None = None) -> Report:
        """A two-column table of names and values (e.g. settings or headline numbers)."""
        if not isinstance(values, Mapping):
            raise bad_value("values", values, "expected a mapping of name -> value", "pass a dict")
        rows = "".join(f"<tr>{_cell(str(k), 'th')}{_cell(v)}</tr>" for k, v in values.items())
        cap = f"<caption>{html.escape(str(caption))}</caption>" if caption else ""
        self._blocks.append(f'<table class="kv">{cap}<tbody>{rows}</tbody></table>')
        return self

    def add_figure(self, figure: Figure, caption: str = "", dpi: int = 110, close: bool = True) -> Report:
        """Embed a matplotlib figure as a base64 PNG (nothing is written to disk, nothing linked).

        ``close=True`` releases a figure that was made with ``pyplot`` once it is embedded.
        """
        if not isinstance(figure, Figure):
            raise bad_value(
                "figure", figure, "expected a matplotlib.figure.Figure", "pass e.g. plot_image_grid(...)"
            )
        if not hasattr(figure.canvas, "print_figure"):  # pragma: no cover - a figure without a canvas
            FigureCanvasAgg(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        if close and "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(figure)
        alt = html.escape(caption or "figure", quote=True)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._blocks.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{encoded}">{cap}</figure>')
        return self

    def add_token_influence(
        self,
        tokens: Sequence[str],
        values: Any,
        *,
        score: float | None = None,
        units: str = "",
        scale: float | None = None,
        caption: str | None = None,
        legend: bool = True,
    ) -> Report:
        """A training sequence's token-wise influence as highlighted text (:func:`token_highlight_html`, same
        arguments), with its colour legend unless ``legend=False``."""
        self._blocks.append(
            token_highlight_html(
                tokens, values, score=score, units=units, scale=scale, caption=caption, legend=legend
            )
        )
        return self

    # -- output ------------------------------------------------------------------------------------------------
    def to_html(self) -> str:
        """The whole report as one HTML document."""
        title = html.escape(self.title)
        subtitle = f'<p class="subtitle">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{title}</h1>\n{subtitle}\n"
            + "\n".join(self._blocks)
            + f"\n<footer>Made by datatrace {html.escape(__version__)} on {html.escape(stamp)}.</footer>\n"
            "</main>\n</body>\n</html>\n"
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report to ``path`` atomically (:func:`datatrace.fileio.atomic_write`); returns the path."""
        try:
            path = Path(path)
        except TypeError:
            raise bad_value("path", path, "expected a file path", "pass e.g. 'report.html'") from None
        if path.is_dir():
            raise bad_value("path", str(path), "it is a directory", "pass a file name such as 'report.html'")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_html()

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)

        atomic_write(path, write)
        return path


# --------------------------------------------------------------------------------------------------------------
# Token-wise influence as highlighted text
# --------------------------------------------------------------------------------------------------------------
#: the parts must add up to the example's score within this fraction of ``max(|score|, sum_t |s_t|)`` (rounding of
#: the sum; parts of another example or query miss it by far more)
TOKEN_SUM_RTOL = 1e-4
#: background colours of positive and negative parts (the blue and red of :func:`plot_bars`) and the opacity of the
#: strongest part (dark text stays above 7:1 contrast on either)
_POSITIVE_RGB = (47, 109, 181)
_NEGATIVE_RGB = (192, 57, 43)
_MAX_ALPHA = 0.6


def _token_legend(units: str, scale: float) -> str:
    unit = f" {units}" if units else ""
    pos = f"rgba({_POSITIVE_RGB[0]}, {_POSITIVE_RGB[1]}, {_POSITIVE_RGB[2]}, {_MAX_ALPHA})"
    neg = f"rgba({_NEGATIVE_RGB[0]}, {_NEGATIVE_RGB[1]}, {_NEGATIVE_RGB[2]}, {_MAX_ALPHA})"
    return (
        '<div class="tok-legend" role="note">'
        f'<span class="tok pos" style="background: {pos}">blue, solid underline</span>'
        "a positive part: through predicting this token the training example helped the query (removing it would "
        "raise the query's measurement by that much); "
        f'<span class="tok neg" style="background: {neg}">red, dashed underline</span>'
        "a negative part: it hurt the query. The stronger the colour, the larger |part| (strongest: "
        f"{html.escape(format_value(scale))}{html.escape(unit)}); hover a token for its number. The parts add up "
        "to the example's score.</div>"
    )


def token_highlight_html(
    tokens: Sequence[str],
    values: Any,
    *,
    score: float | None = None,
    units: str = "",
    scale: float | None = None,
    caption: str | None = None,
    legend: bool = True,
) -> str:
    """A self-contained HTML fragment showing a training sequence's tokens highlighted by their parts of its score.

    ``values[t] = s_t``, the part of the example's leave-one-out effect on the query that comes through the loss
    term of token ``t`` (:func:`datatrace.apps.tokens.token_influence`; ``sum_t s_t = score[q, i]``). Each token's
    background is blue for ``s_t > 0`` and red for ``s_t < 0``, with opacity ``0.6 |s_t| / scale``; positive tokens
    are underlined solid and negative ones dashed; ``title`` (hover) gives the token, its position, ``s_t`` in
    ``units`` and, with ``score``, its signed share ``s_t / score``. Every token and caption is HTML-escaped; the
    fragment uses only inline styles and the report's CSS.

    Args:
        tokens: the token strings in order (e.g. ``tokenizer.convert_ids_to_tokens(ids)``), one per part.
        values: ``(len(tokens),)`` finite numbers, e.g. ``token_influence(inf, query, [i])[q, 0, :len(tokens)]``
            (``token_influence`` pads shorter examples with zeros after their last token).
        score: the example's score on the query; when given, ``values`` must add up to it (within
            :data:`TOKEN_SUM_RTOL`), or a ValueError names ``values``.
        units: the measurement's units for the hover text and the legend (e.g. ``"nats"``).
        scale: the ``|s_t|`` drawn at full strength (default: the largest ``|s_t|``; pass one value to several
            examples to compare them).
        caption: a line shown above the text.
        legend: add the colour legend under the text.
    """
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise bad_value(
            "tokens",
            tokens,
            "expected a sequence of token strings",
            "pass e.g. tokenizer.convert_ids_to_tokens(ids)",
        )
    for t, token in enumerate(tokens):
        if not isinstance(token, str):
            raise bad_value(f"tokens[{t}]", token, "expected a str", "decode the token ids to strings first")
    parts = _as_1d("values", values)
    if parts.size != len(tokens):
        raise bad_value(
            "values",
            describe(values),
            f"one part per token: {len(tokens)} tokens but {parts.size} values",
            "pass values[:len(tokens)] of the example's row of token_influence (it pads shorter examples with "
            "zeros) and the example's own tokens",
        )
    if not np.isfinite(parts).all():
        raise bad_value("values", describe(values), "expected finite numbers", "check the token-wise scores")
    total = float(parts.sum())
    if score is not None:
        if isinstance(score, (bool, np.bool_)) or not _is_number(score) or not math.isfinite(float(score)):
            raise bad_value("score", score, "expected a finite number (the example's score)", "pass a float")
        score = float(score)
        tolerance = TOKEN_SUM_RTOL * max(abs(score), float(np.abs(parts).sum()), np.finfo(np.float64).tiny)
        if abs(total - score) > tolerance:
            raise bad_value(
                "values",
                describe(values),
                f"token parts that add up to the example's score {score:.6g}; they add up to {total:.6g} (allowed "
                f"difference {tolerance:.3g})",
                "pass the row of token_influence for the same query and training example as the score",
            )
    largest = float(np.abs(parts).max()) if parts.size else 0.0
    if scale is None:
        scale = largest
    elif isinstance(scale, (bool, np.bool_)) or not _is_number(scale) or not float(scale) > 0:
        raise bad_value(
            "scale", scale, "expected a number > 0", "pass None (the largest |part|) or e.g. 0.01"
        )
    scale = float(scale)
    unit = f" {units}" if units else ""
    spans = []
    for t, (token, part) in enumerate(zip(tokens, parts.tolist())):
        words = f"{token!r} (token {t}): {part:+.4g}{unit}"
        if score:
            words += f", {100 * part / score:+.1f}% of the example's score {score:+.4g}{unit}"
        strength = min(1.0, abs(part) / scale) if scale > 0 else 0.0
        if part > 0:
            kind, rgb = "pos", _POSITIVE_RGB
        elif part < 0:
            kind, rgb = "neg", _NEGATIVE_RGB
        else:
            kind, rgb = "zero", None
        style = (
            f' style="background: rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {_MAX_ALPHA * strength:.3f})"'
            if rgb
            else ""
        )
        spans.append(
            f'<span class="tok {kind}"{style} title="{html.escape(words, quote=True)}">'
            f"{html.escape(token, quote=True)}</span>"
        )
    head = f'<span class="cap">{html.escape(str(caption))}</span>' if caption else ""
    summary = f"the parts add up to {total:+.4g}{unit}"
    body = f'<div class="tokens" aria-label="{html.escape(summary, quote=True)}">{head}{"".join(spans)}</div>'
    return body + (_token_legend(units, scale) if legend else "")


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _as_1d(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise bad_value(name, values, "expected numbers", "pass a numpy array or tensor") from None
    return arr


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else float("nan")


def _ranks(a: np.ndarray) -> np.ndarray:
    return rankdata(a).astype(np.float64)


def plot_estimated_vs_actual(
    estimated: Any,
    actual: Any,
    *,
    title: str = "Estimated vs actual change",
    xlabel: str = "actual change (retrained)",
    ylabel: str = "estimated change",
    max_points: int = 20000,
    seed: int = 0,
) -> Figure:
    """Scatter of estimated against actual values with the ``y = x`` line; the title gives the Pearson and
    Spearman correlations of all the values passed (before any thinning for display).

    Both inputs are flattened (e.g. ``(n_query, m)`` leave-one-out matrices: one point per pair). Above
    ``max_points`` a random sample (seeded) is drawn, the correlations still use every point.
    """
    est, act = _as_1d("estimated", estimated), _as_1d("actual", actual)
    if est.shape != act.shape:
        raise ValueError(
            f"estimated has {est.size} values but actual has {act.size}: they must pair up one to one. "
            "Fix: pass arrays of the same shape."
        )
    keep = np.isfinite(est) & np.isfinite(act)
    est, act = est[keep], act[keep]
    if est.size < 2:
        raise ValueError(f"need at least 2 finite pairs to plot, got {est.size}. Fix: pass more values.")
    pearson = _pearson(est, act)
    spearman = _pearson(_ranks(est), _ranks(act))
    shown_est, shown_act = est, act
    if est.size > max_points:
        pick = np.random.default_rng(seed).choice(est.size, max_points, replace=False)
        shown_est, shown_act = est[pick], act[pick]
    figure = _figure(5.6, 5.0)
    ax = figure.add_subplot()
    alpha = 0.6 if shown_est.size <= 2000 else 0.25
    ax.scatter(shown_act, shown_est, s=9, alpha=alpha, color="#2f6db5", linewidths=0, label="pairs")
    low = float(min(est.min(), act.min()))
    high = float(max(est.max(), act.max()))
    pad = 0.04 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="#c0392b", lw=1.2, label="y = x")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.axhline(0, color="#9aa3b0", lw=0.6, zorder=0)
    ax.axvline(0, color="#9aa3b0", lw=0.6, zorder=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\nPearson r = {pearson:.3f}, Spearman ρ = {spearman:.3f} ({est.size:,} points)")
    ax.legend(loc="upper left", frameon=False)
    ax.ticklabel_format(style="sci", scilimits=(-3, 3))
    return figure


def plot_image_grid(
    images: Any,
    captions: Sequence[str] | None = None,
    *,
    image_shape: tuple[int, ...] | None = None,
    ncols: int = 5,
    title: str | None = None,
    highlight: Sequence[bool] | None = None,
    highlight_label: str | None = None,
    cmap: str = "gray_r",
    cell_size: float = 1.7,
) -> Figure:
    """Small images in a grid, a caption under each (e.g. index, label and score).

    Args:
        images: ``(k, h, w)`` grey, ``(k, h, w, 3|4)`` colour, or ``(k, d)`` flat with ``image_shape``.
        captions: one string per image (may have line breaks).
        image_shape: the shape to reshape flat rows to, e.g. ``(8, 8)``.
        ncols: images per row.
        title: figure title.
        highlight: one bool per image; True outlines the image in red (e.g. a known-flipped label).
        highlight_label: words for what a red outline means, added under the title.
        cmap: colour map for grey images.
    """
    arr = np.asarray(images)
    if image_shape is not None:
        arr = arr.reshape(arr.shape[0], *image_shape)
    if arr.ndim not in (3, 4) or arr.shape[0] == 0:
        raise bad_value(
            "images",
            describe(arr),
            "expected a non-empty (k, h, w) or (k, h, w, channels) array, or flat rows with image_shape",
            "pass image_shape=(h, w) for flat rows",
        )
    k = arr.shape[0]
    if captions is not None and len(captions) != k:
        raise ValueError(f"{k} images but {len(captions)} captions. Fix: pass one caption per image.")
    if highlight is not None and len(highlight) != k:
        raise ValueError(f"{k} images but {len(highlight)} highlight flags. Fix: pass one bool per image.")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise bad_value("ncols", ncols, "expected an int >= 1", "pass e.g. ncols=5")
    ncols = min(ncols, k)
    nrows = math.ceil(k / ncols)
    lines = max((str(c).count("\n") + 1 for c in captions), default=0) if captions else 0
    extra = 0.5 if title else 0.0
    figure = _figure(cell_size * ncols, (cell_size + 0.16 * lines) * nrows + extra)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for j, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if j >= k:
            ax.set_axis_off()
            continue
        ax.imshow(arr[j], cmap=cmap if arr.ndim == 3 else None, interpolation="nearest")
        if captions is not None:
            ax.set_xlabel(str(captions[j]), fontsize=8)
        flagged = highlight is not None and bool(highlight[j])
        for spine in ax.spines.values():
            spine.set_edgecolor("#d0021b" if flagged else "#c8ccd2")
            spine.set_linewidth(2.5 if flagged else 0.8)
        if flagged:
            h, w = arr.shape[1], arr.shape[2]
            ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="#d0021b", lw=2.5))
    if title:
        if highlight_label and highlight is not None and any(highlight):
            title = f"{title}\n(red outline: {highlight_label})"
        figure.suptitle(title, fontsize=10)
    return figure


#: colour, line style and marker of the curves of :func:`plot_detection_curve`, in order
_CURVE_STYLES = (
    ("#2f6db5", "-", "o"),
    ("#e67e22", "--", "s"),
    ("#8e44ad", "-.", "^"),
    ("#c0392b", ":", "D"),
)


def plot_detection_curve(
    curves: Mapping[str, Any],
    *,
    title: str = "Detection curve",
    flagged_fraction: float | None = None,
    marks: Sequence[float] = (0.05, 0.1),
    xlabel: str = "fraction of examples inspected (in ranking order)",
    ylabel: str = "fraction of flagged examples found",
) -> Figure:
    """Fraction of flagged examples found against fraction inspected, for several rankings.

    Args:
        curves: ``{label: curve}`` where a curve is a :class:`datatrace.verification.metrics.DetectionCurve` (anything with
            ``fraction_inspected`` and ``fraction_found``; its ``auc`` goes in the legend) or an ``(x, y)`` pair.
        flagged_fraction: share of examples that are flagged; draws the best possible curve.
        marks: inspected fractions to mark with a vertical dotted line.
    The diagonal is the expected curve of a random inspection order. Rankings often find the same examples
    (self-influence and training loss both start with the mislabelled ones), so their curves can coincide: each
    curve gets its own colour, line style, width and markers, and earlier curves are drawn wider and underneath,
    so every one stays visible where they overlap.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise bad_value(
            "curves", curves, "expected a non-empty mapping label -> curve", "pass {'name': curve}"
        )
    figure = _figure(6.0, 4.6)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="#8a93a3", lw=1.2, ls="--", label="random order (expected)")
    if flagged_fraction is not None and 0 < flagged_fraction <= 1:
        x = np.linspace(0, 1, 201)
        ax.plot(
            x, np.minimum(1.0, x / flagged_fraction), color="#27ae60", lw=1.0, ls=":", label="perfect order"
        )
    for k, (label, curve) in enumerate(curves.items()):
        if hasattr(curve, "fraction_inspected") and hasattr(curve, "fraction_found"):
            x, y = np.asarray(curve.fraction_inspected), np.asarray(curve.fraction_found)
            auc = getattr(curve, "auc", None)
            name = f"{label} (AUC {float(auc):.3f})" if auc is not None else str(label)
        else:
            try:
                x, y = (np.asarray(v, dtype=np.float64) for v in curve)
            except (TypeError, ValueError):
                raise bad_value(
                    f"curves[{label!r}]", curve, "expected a DetectionCurve or an (x, y) pair", "pass one"
                ) from None
            name = str(label)
        style = _CURVE_STYLES[k % len(_CURVE_STYLES)]
        ax.plot(
            x,
            y,
            color=style[0],
            ls=style[1],
            marker=style[2],
            lw=max(1.2, 3.2 - 0.8 * k),
            markersize=5,
            markevery=(0.03 * k, 0.1),
            zorder=2 + k,
            label=name,
        )
    for m in marks:
        ax.axvline(float(m), color="#c8ccd2", lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return figure


def plot_bars(
    values: Any,
    labels: Sequence[str],
    *,
    title: str | None = None,
    xlabel: str = "",
    highlight: Sequence[bool] | None = None,
    highlight_label: str | None = None,
) -> Figure:
    """Horizontal bars, one per value, top to bottom in the order given (e.g. the scores of the top proponents
    and opponents of a query). Positive values are blue, negative red; a highlighted bar gets a black edge.

    Args:
        values: ``(k,)`` numbers.
        labels: one label per bar (e.g. ``"#12 label 3"``).
        title: figure title.
        xlabel: words for the values, with units.
        highlight: one bool per bar; True draws a thick black edge (e.g. a known-mislabelled example).
        highlight_label: words for what a black edge means, added under the title.
    """
    v = _as_1d("values", values)
    if v.size == 0:
        raise bad_value("values", values, "expected at least one value", "pass a non-empty array")
    if len(labels) != v.size:
        raise ValueError(f"{v.size} values but {len(labels)} labels. Fix: pass one label per value.")
    if highlight is not None and len(highlight) != v.size:
        raise ValueError(
            f"{v.size} values but {len(highlight)} highlight flags. Fix: pass one bool per value."
        )
    figure = _figure(6.4, 0.9 + 0.28 * v.size)
    ax = figure.add_subplot()
    y = np.arange(v.size)
    colours = ["#2f6db5" if x >= 0 else "#c0392b" for x in v]
    flagged = [bool(h) for h in highlight] if highlight is not None else [False] * v.size
    ax.barh(
        y,
        v,
        color=colours,
        edgecolor=["#111111" if f else "none" for f in flagged],
        linewidth=[2.0 if f else 0.0 for f in flagged],
    )
    ax.set_yticks(y, [str(label) for label in labels], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="#6b7380", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    if title:
        text = title
        if highlight_label and any(flagged):
            text = f"{title}\n(black edge: {highlight_label})"
        ax.set_title(text, fontsize=10)
    return figure


def plot_histogram(
    values: Any,
    *,
    title: str | None = None,
    xlabel: str = "",
    marks: Mapping[str, float] | None = None,
    bins: int = 50,
    log: bool = False,
) -> Figure:
    """A histogram of ``values`` (non-finite ones dropped) with labelled vertical lines at ``marks``
    (e.g. ``{"z = 3": threshold}``); ``log=True`` puts the counts on a log scale."""
    v = _as_1d("values", values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise bad_value("values", values, "expected at least one finite value", "pass finite numbers")
    figure = _figure(6.0, 3.6)
    ax = figure.add_subplot()
    ax.hist(v, bins=bins, color="#2f6db5", alpha=0.85, log=log)
    for k, (label, x) in enumerate((marks or {}).items()):
        ax.axvline(
            float(x), color=("#c0392b", "#27ae60", "#8e44ad")[k % 3], lw=1.2, ls="--", label=str(label)
        )
    if marks:
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("number of examples")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    if title:
        ax.set_title(title, fontsize=10)
    return figure
