"""How the commands show their results: the convention in words, set-up tables, examples, ranked sections, text tables.

Reports (:class:`datatrace.cli.report.Report`) show training examples the way the spec's ``kind`` says: pictures
for images, a feature table (one column per example, beside the training mean) for tabular data, the texts for
text. :func:`add_ranked_section` is the one layout of a ranking (bar plot, examples, table) every command uses;
:func:`format_rows` the plain-text table of the printed summaries. :func:`conventions` puts the sign convention of
:data:`datatrace.scores.MEANING` in words with the spec's units.

Token-wise influence: rows that carry ``tokens`` and ``token_scores`` (:func:`attach_token_parts`, from
:func:`datatrace.apps.tokens.token_influence`: the parts of a training sequence's score by the token each loss term
predicts, adding up to the score) are shown by :func:`add_ranked_section` as highlighted text
(:func:`datatrace.cli.report.token_highlight_html`), one colour scale per section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from datatrace.cli.context import Context, Run
from datatrace.cli.report import Report, plot_bars, plot_image_grid, token_highlight_html
from datatrace.cli.spec_model import Spec
from datatrace.errors import bad_value

__all__ = [
    "add_ranked_bars",
    "add_ranked_section",
    "add_timings",
    "add_token_parts",
    "attach_token_parts",
    "conventions",
    "example_records",
    "format_rows",
    "setup_table",
    "show_examples",
]

#: features shown at most in a tabular feature table
MAX_FEATURES = 40
#: characters of an example's text shown at most
MAX_TEXT = 400


def conventions(units: str, what: str = "query") -> str:
    """The sign convention in words, with units."""
    return (
        f"score[q, i] estimates f_q(theta without i) - f_q(theta_hat): how much {what} q's loss (in {units}) would "
        "change if training example i were removed and the model retrained (first-order leave-one-out). "
        f"Positive: removing i would raise the loss, so i helped q (a proponent). Negative: removing i would "
        "lower the loss, so i hurt q (an opponent). Removing a set changes it by about the sum of its members' "
        "scores (first order; check large sets by retraining)."
    )


def setup_table(ctx: Context) -> dict[str, Any]:
    """Key facts for the report's set-up table."""
    spec = ctx.spec
    desc = spec.describe()
    info = ctx.curvature_info()
    rows: dict[str, Any] = {
        "spec file": str(spec.path),
        "model": f"{desc['model']} ({desc['backend']}), {desc['num_params']:,} parameters",
        "task": desc["task"],
        "data": ", ".join(f"{n} {s} examples" for s, n in desc["sizes"].items()),
        "curvature": info.get("auto_choice", getattr(ctx.influence.curvature_, "name", "")),
    }
    if "auto_reason" in info:
        rows["why this curvature"] = info["auto_reason"]
    for key in ("damping", "eigenvalue_min", "eigenvalue_max", "num_negative"):
        if key in info:
            rows[key.replace("_", " ")] = info[key]
    rows["max |grad L| at the trained model (0 at a minimum)"] = getattr(
        ctx.influence, "gradient_norm_", None
    )
    rows["seed"] = ctx.seed
    return rows


def example_records(
    spec: Spec, split: str, indices: Sequence[int], values: Any = None, value_name: str = "score"
) -> list[dict[str, Any]]:
    """JSON rows for examples of ``split``: index, label (in words), and ``value_name`` when given."""
    rows = []
    vals = None if values is None else np.asarray(values, dtype=np.float64)
    for j, i in enumerate(indices):
        row: dict[str, Any] = {"index": int(i), "label": spec.label_text(split, int(i))}
        if vals is not None:
            row[value_name] = float(vals[j])
        text = spec.text(split, int(i))
        if text is not None:
            row["text"] = text
        rows.append(row)
    return rows


def show_examples(
    report: Report,
    spec: Spec,
    split: str,
    indices: Sequence[int],
    captions: Sequence[str],
    *,
    title: str,
    query: tuple[str, int, str] | None = None,
    highlight: Sequence[bool] | None = None,
    highlight_label: str | None = None,
) -> None:
    """Show examples ``indices`` of ``split`` the way the spec's ``kind`` says.

    ``captions`` are one short text per example (e.g. ``"#12 label 3\\n+0.021 nats"``). ``query`` is ``(split,
    index, caption)`` of an example to show beside them (the query being explained). Images: a picture grid with
    the query first. Tabular: one column per example, one row per feature, the query's column first. Text: a table
    of the texts.
    """
    indices = [int(i) for i in indices]
    if not indices:
        return
    if spec.kind == "image" and spec.image_shape is not None:
        rows = [spec.inputs(split, indices)]
        caps = list(captions)
        flags = list(highlight) if highlight is not None else [False] * len(indices)
        if query is not None:
            rows.insert(0, spec.inputs(query[0], [query[1]]))
            caps.insert(0, query[2])
            flags.insert(0, False)
        images = np.concatenate(rows).reshape(-1, *spec.image_shape)
        if images.ndim == 4:  # colour: scale into [0, 1] for display
            low, high = float(images.min()), float(images.max())
            images = (images - low) / (high - low or 1.0)
        report.add_figure(
            plot_image_grid(
                images,
                caps,
                ncols=min(6, len(caps)),
                title=title,
                highlight=flags if any(flags) else None,
                highlight_label=highlight_label,
            ),
            title + (" (the first picture is the query)" if query is not None else ""),
        )
        return
    if spec.kind == "text" and split in spec.texts:
        table = []
        if query is not None:
            table.append(["query", query[2], _clip(spec.text(query[0], query[1]) or "—")])
        for i, cap in zip(indices, captions):
            table.append([f"#{i}", cap, _clip(spec.text(split, i) or "—")])
        report.add_table(table, ["example", "label and score", "text"], caption=title)
        return
    # tabular: one column per example, the query's first, after the training mean of each feature
    shown = spec.shown(split, indices)
    columns = ["feature", "training mean"]
    blocks = [_training_mean(spec)]
    if query is not None:
        columns.append(f"query #{query[1]}")
        blocks.append(spec.shown(query[0], [query[1]])[0])
    for j, i in enumerate(indices):
        flag = highlight is not None and bool(highlight[j])
        columns.append(f"#{i}" + (" ⚑" if flag else ""))
    blocks += list(shown)
    width = shown.shape[1]
    names = spec.feature_names or [f"x{j}" for j in range(width)]
    header_rows = [["label / score", "—"] + ([query[2].replace("\n", " ")] if query is not None else [])]
    header_rows[0] += [c.replace("\n", " ") for c in captions]
    table = header_rows + [
        [names[j]] + [_cell(b[j]) for b in blocks] for j in range(min(width, MAX_FEATURES))
    ]
    caption = title
    if width > MAX_FEATURES:
        caption += f" (first {MAX_FEATURES} of {width} features)"
    if highlight_label and highlight is not None and any(highlight):
        caption += f"; ⚑ = {highlight_label}"
    report.add_table(table, columns, caption=caption)


def attach_token_parts(
    rows: Sequence[dict[str, Any]],
    token_parts: Mapping[int, tuple[Sequence[str], Any]],
    value_key: str = "score",
) -> list[dict[str, Any]]:
    """``rows`` of :func:`example_records` with ``tokens`` and ``token_scores`` added for every training index in
    ``token_parts`` (``{index: (token strings, parts)}``; other rows unchanged, copies returned).

    The parts of example ``i`` are ``s_t`` with ``sum_t s_t = row[value_key]`` (its score on the query,
    :func:`datatrace.apps.tokens.token_influence`): one per token, finite, adding up to the row's value within
    :data:`datatrace.cli.report.TOKEN_SUM_RTOL`; otherwise a ValueError names ``token_parts[i]``.
    """
    if not isinstance(token_parts, Mapping):
        raise bad_value(
            "token_parts",
            token_parts,
            "expected a mapping training index -> (tokens, parts)",
            "pass e.g. {12: (['The', ' cat'], [0.01, -0.002])}",
        )
    by_index = {int(row["index"]): row for row in rows}
    unknown = sorted(set(int(i) for i in token_parts) - set(by_index))
    if unknown:
        raise bad_value(
            "token_parts",
            f"keys {unknown[:5]}",
            f"indices of the rows shown ({sorted(by_index)[:10]})",
            "compute token parts for the proponents and opponents being reported",
        )
    out = []
    for row in rows:
        row = dict(row)
        i = int(row["index"])
        if i in token_parts:
            entry = token_parts[i]
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise bad_value(
                    f"token_parts[{i}]",
                    entry,
                    "expected a pair (tokens, parts)",
                    "pass (list of str, values)",
                )
            tokens, parts = entry
            try:  # every check of the report's renderer, with the row's score: its errors name the argument
                token_highlight_html(tokens, parts, score=row[value_key], legend=False)
            except ValueError as err:
                raise ValueError(f"token_parts[{i}]: {err}") from None
            row["tokens"] = [str(t) for t in tokens]
            row["token_scores"] = np.asarray(parts, dtype=np.float64).reshape(-1).tolist()
        out.append(row)
    return out


def add_token_parts(
    report: Report, rows: Sequence[dict[str, Any]], value_key: str, units: str, title: str
) -> None:
    """Highlighted text of every row with ``token_scores`` (:func:`attach_token_parts`), one colour scale for all
    of them (the largest ``|part|`` among them), then one legend."""
    shown = [row for row in rows if row.get("token_scores") is not None]
    if not shown:
        return
    scale = max(max((abs(v) for v in row["token_scores"]), default=0.0) for row in shown)
    report.add_paragraph(
        f"{title}: each training example's score split over its tokens (the part of its effect on the query that "
        "comes through predicting that token; the parts add up to the score). One colour scale for all examples "
        "below."
    )
    for j, row in enumerate(shown):
        report.add_token_influence(
            row["tokens"],
            row["token_scores"],
            score=row[value_key],
            units=units,
            scale=scale if scale > 0 else None,
            caption=f"#{row['index']} ({row['label']}): {row[value_key]:+.4g} {units}",
            legend=j == len(shown) - 1,
        )


def add_ranked_bars(
    report: Report,
    rows: Sequence[dict[str, Any]],
    value_key: str,
    *,
    title: str,
    xlabel: str,
    caption: str,
    highlight_key: str | None = None,
    highlight_label: str | None = None,
) -> None:
    """A bar plot of ``row[value_key]`` for ``rows`` of :func:`example_records`, labelled ``#index (label)``.

    ``title``, ``xlabel`` and ``caption`` are the plot's words; ``highlight_key`` names a bool of the rows whose
    bars get a black edge, explained by ``highlight_label``.
    """
    report.add_figure(
        plot_bars(
            [row[value_key] for row in rows],
            [f"#{row['index']} ({row['label']})" for row in rows],
            title=title,
            xlabel=xlabel,
            highlight=None if highlight_key is None else [row.get(highlight_key, False) for row in rows],
            highlight_label=highlight_label,
        ),
        caption,
    )


def add_ranked_section(
    report: Report,
    spec: Spec,
    rows: Sequence[dict[str, Any]],
    *,
    value_key: str,
    title: str,
    value_format: Callable[[float], str],
    columns: Sequence[tuple[str, str]],
    caption: str,
    max_tabular: int | None = None,
    xlabel: str | None = None,
    bar_caption: str = "",
    examples_title: str | Callable[[int], str] | None = None,
    query: tuple[str, int, str] | None = None,
    highlight_key: str | None = None,
    highlight_label: str | None = None,
    units: str = "",
) -> None:
    """Ranked training examples in ``report``: a bar plot of their values, the examples themselves (with their
    token-wise influence as highlighted text for rows that carry it, :func:`attach_token_parts`), then a table.

    Args:
        rows: records of :func:`example_records` (``index``, ``label``, ...) of ``train()``, in rank order; none:
            nothing is added.
        value_key: the key of the value plotted and written under each example.
        title: the bar plot's title, and the examples' unless ``examples_title``.
        value_format: the words for a value under an example (after ``#index (label)``), e.g. ``"+0.021 nats"``.
        columns: ``(key, header)`` of the table's columns after ``train index`` and ``label``; ``caption``: its
            caption.
        max_tabular: tabular data show at most this many examples (one column each); None: all.
        xlabel: the bar plot's axis words; None: no bar plot. ``bar_caption``: the plot's caption.
        examples_title: the examples' title, or a function of how many are shown that gives it.
        query: ``(split, index, caption)`` of a query to show beside the examples (see :func:`show_examples`).
        highlight_key: a bool of the rows to highlight in the plot and the examples, explained by
            ``highlight_label``.
        units: the values' units, for the token-wise highlights.
    """
    if not rows:
        return
    if xlabel is not None:
        add_ranked_bars(
            report,
            rows,
            value_key,
            title=title,
            xlabel=xlabel,
            caption=bar_caption,
            highlight_key=highlight_key,
            highlight_label=highlight_label,
        )
    shown = rows if spec.kind != "tabular" or max_tabular is None else rows[:max_tabular]
    if examples_title is None:
        examples_title = title
    elif callable(examples_title):
        examples_title = examples_title(len(shown))
    show_examples(
        report,
        spec,
        "train",
        [row["index"] for row in shown],
        [f"#{row['index']} ({row['label']})\n{value_format(row[value_key])}" for row in shown],
        title=examples_title,
        query=query,
        highlight=None if highlight_key is None else [row.get(highlight_key, False) for row in shown],
        highlight_label=highlight_label,
    )
    add_token_parts(
        report,
        shown,
        value_key,
        units,
        f"Token-wise influence of the {examples_title[:1].lower()}{examples_title[1:]}",
    )
    report.add_table(
        [[row["index"], row["label"]] + [row[key] for key, _ in columns] for row in rows],
        ["train index", "label"] + [header for _, header in columns],
        caption=caption,
    )


def add_timings(report: Report, ctx: Run) -> Report:
    """The report's closing "Timing" section (seconds of each step of ``ctx``); returns ``report``."""
    report.add_heading("Timing")
    report.add_key_values({k.replace("_", " "): v for k, v in ctx.timings.items()}, caption="Seconds")
    return report


def _training_mean(spec: Spec) -> np.ndarray:
    rows = spec.shown("train", range(spec.n("train")))
    try:
        return rows.astype(np.float64).mean(axis=0)
    except (TypeError, ValueError):  # non-numeric display columns
        return np.full(rows.shape[1], np.nan)


def _cell(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    return str(value)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def format_rows(
    rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], indent: str = "    "
) -> list[str]:
    """Plain-text table lines: ``columns`` are ``(key, header, format)``."""
    if not rows:
        return [indent + "(none)"]
    rows = [{k: ("yes" if v else "no") if isinstance(v, bool) else v for k, v in r.items()} for r in rows]
    widths = []
    for key, header, fmt in columns:
        cells = [format(r[key], fmt) if r.get(key) is not None else "—" for r in rows]
        widths.append(max(len(header), *(len(c) for c in cells)))
    out = [indent + "  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))]
    for r in rows:
        cells = [format(r[k], f) if r.get(k) is not None else "—" for k, _, f in columns]
        out.append(indent + "  ".join(str(c).rjust(w) for c, w in zip(cells, widths)))
    return out
