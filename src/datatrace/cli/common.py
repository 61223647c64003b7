"""The application commands ``datatrace explain | debug | value | audit SPEC``, and what they share.

Each command is a module with ``add_arguments(parser)``, ``run(args) -> exit code`` and a ``run_<name>(...)``
function for use from Python (it returns every number as a JSON-ready dict). They all:

1. load and check the spec file (:func:`datatrace.cli.spec.load_spec`) before any expensive work,
2. fit an influence function on ``train()`` (``--curvature``, default the spec's ``curvature`` or ``"auto"``),
3. run one application of :mod:`datatrace.apps` (the maths lives there, not here),
4. write ``report.html`` (self-contained: plots and pictures embedded as base64 PNG, nothing fetched) and
   ``results.json`` to ``--out``, and print a short summary that says what the numbers mean, with units.

The convention, everywhere: ``score[q, i] ~ f_q(theta without i) - f_q(theta_hat)``, the change of query q's
measurement (by default its loss) if training example i were removed and the model retrained.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from datatrace.cli.demo import check_out_dir
from datatrace.cli.spec import Spec, load_spec
from datatrace.errors import UsageError
from datatrace.fileio import jsonable, write_json

__all__ = [
    "Context",
    "add_common_arguments",
    "conventions",
    "show_examples",
    "start",
]

logger = logging.getLogger("datatrace.cli.common")

#: features shown at most in a tabular feature table
MAX_FEATURES = 40
#: characters of an example's text shown at most
MAX_TEXT = 400


def add_common_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """SPEC, ``--out``, ``--curvature``, ``--damping`` and ``--seed`` (``--quiet`` comes from the CLI)."""
    parser.add_argument(
        "spec",
        metavar="SPEC",
        help="a Python spec file that defines model() + task() (or estimator()), train() and, as the command "
        "needs them, query(), validation(), groups(), train_fn(subset) (see docs/examples/).",
    )
    parser.add_argument(
        "--out",
        default=f"datatrace-{command}",
        metavar="DIR",
        help=f"directory for report.html and results.json (created if missing; default: ./datatrace-{command}).",
    )
    parser.add_argument(
        "--curvature",
        default=None,
        metavar="NAME",
        help="inverse-curvature route: auto, exact, gauss-newton, block-diagonal, cg, lissa, arnoldi, diagonal, "
        "identity (default: the spec's `curvature`, else auto: exact when the Hessian fits in memory).",
    )
    parser.add_argument(
        "--damping",
        default=None,
        metavar="X",
        help="damping added to the curvature's eigenvalues, a number or 'auto' (default: the spec's, else auto).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for PyTorch (default: PyTorch's own choice; 1 is much faster on a busy shared machine).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seeds torch and numpy before the spec runs, and every random choice of the command (default: 0).",
    )


def _damping(value: str | None) -> Any:
    if value is None or value == "auto":
        return value
    try:
        out = float(value)
    except ValueError:
        raise UsageError(
            f"--damping {value!r} is not a number. Fix: pass e.g. --damping 1e-3 or auto."
        ) from None
    if not out >= 0 or math.isinf(out):
        raise UsageError(f"--damping {value!r} must be a finite number >= 0. Fix: pass e.g. --damping 1e-3.")
    return out


@dataclass
class Context:
    """What a command run carries from step to step."""

    command: str
    spec: Spec
    out: Path
    progress: bool
    stream: TextIO
    seed: int
    curvature: Any
    damping: Any
    start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    influence: Any = None

    def fit(self) -> Any:
        """Fit the influence function on train() (timed, logged); returns it."""
        spec = self.spec
        n = spec.n("train")
        params = sum(p.numel() for p in spec.model.parameters())
        logger.info("fitting influence functions on %d training examples, %d parameters", n, params)
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        try:
            self.influence = spec.fit_influence(self.curvature, self.damping, progress=self.progress)
        except ValueError as err:
            if "curvature" in str(err) or "damping" in str(err):
                raise UsageError(str(err)) from err
            raise
        self.timings["influence_seconds"] = time.perf_counter() - t0
        return self.influence

    def curvature_info(self) -> dict[str, Any]:
        info = self.influence.curvature_.info if self.influence is not None else {}
        return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}

    def influence_summary(self) -> dict[str, Any]:
        info = self.curvature_info()
        return {
            "estimator": type(self.influence).__name__,
            "curvature": info,
            "curvature_route": info.get("auto_choice", getattr(self.influence.curvature_, "name", "")),
            "gradient_norm": getattr(self.influence, "gradient_norm_", None),
        }

    def results_header(self) -> dict[str, Any]:
        from datatrace import __version__

        return {
            "command": self.command,
            "datatrace_version": __version__,
            "spec": self.spec.describe(),
            "config": {
                "curvature": _describe_route(
                    self.curvature if self.curvature is not None else self.spec.curvature
                ),
                "damping": self.damping if self.damping is not None else self.spec.damping,
                "seed": self.seed,
            },
        }

    def finish(self, results: dict[str, Any], report: Any, summary: str) -> dict[str, Any]:
        """Write report.html and results.json, print ``summary``; returns the JSON-ready results."""
        t0 = time.perf_counter()
        report_path = self.out / "report.html"
        json_path = self.out / "results.json"
        files = dict(results.get("files", {}))
        files.update({"report": str(report_path), "results": str(json_path)})
        results["files"] = files
        report.save(report_path)
        self.timings["report_seconds"] = time.perf_counter() - t0
        self.timings["total_seconds"] = time.perf_counter() - self.start
        results["timings"] = dict(self.timings)
        write_json(json_path, results)
        lines = [
            summary.rstrip("\n"),
            "",
            f"Report: {report_path}   numbers: {json_path}"
            + "".join(f"   {k}: {v}" for k, v in files.items() if k not in ("report", "results")),
            f"Time: {self.timings['total_seconds']:.1f} s (influence {self.timings.get('influence_seconds', 0):.1f} s)",
            "",
        ]
        self.stream.write("\n".join(lines))
        self.stream.flush()
        return jsonable(results)


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments every ``run_<command>`` takes from the flags of :func:`add_common_arguments`."""
    return {
        "curvature": args.curvature,
        "damping": args.damping,
        "seed": args.seed,
        "progress": not args.quiet,
        "stream": sys.stdout,
        "threads": args.threads,
    }


def run_command(function: Callable[..., Any], args: argparse.Namespace, **flags: Any) -> int:
    """Call a command's ``run_<name>(args.spec, args.out, **flags, **common_options(args))``; returns exit code 0."""
    function(args.spec, args.out, **flags, **common_options(args))
    return 0


def add_top_flag(
    parser: argparse.ArgumentParser, default: int, what: str, *, flag: str = "--top", metavar: str = "N"
) -> None:
    """An integer flag (``--top N`` unless ``flag``/``metavar`` say otherwise) for how many examples to list.

    ``default`` is its default value and ``what`` the words of its help text, before ``(default: ...)``.
    """
    parser.add_argument(
        flag, type=int, default=default, metavar=metavar, help=f"{what} (default: {default})."
    )


def check_int(name: str, value: Any, minimum: int, fix: str = "") -> int:
    """``value`` if it is an integer >= ``minimum``, else a :class:`UsageError` naming flag ``name`` (then ``fix``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(
            f"{name} {value!r} is not allowed: expected an integer >= {minimum}." + (f" {fix}" if fix else "")
        )
    return value


def _describe_route(curvature: Any) -> str:
    return curvature if isinstance(curvature, str) else repr(curvature)


def start(
    command: str,
    spec_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    needs: Sequence[str] = (),
    curvature: str | None = None,
    damping: Any = None,
    seed: int = 0,
    progress: bool = True,
    stream: TextIO | None = None,
    threads: int | None = None,
) -> Context:
    """Check the arguments, load the spec (checking ``needs``, keys of :data:`datatrace.cli.spec.NEEDS`)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(
            f"--seed {seed!r} is not allowed: expected an integer >= 0. Fix: pass e.g. --seed 0."
        )
    if threads is not None:
        torch.set_num_threads(check_int("--threads", threads, 1))
    damping = _damping(damping) if isinstance(damping, str) or damping is None else damping
    out = check_out_dir(out_dir)
    t0 = time.perf_counter()
    logger.info("loading spec %s", spec_path)
    spec = load_spec(spec_path, seed=int(seed))
    for need in needs:
        spec.require(need)
    if curvature is not None:
        from datatrace.cli.spec import _curvature_arguments

        try:
            _curvature_arguments(curvature, "auto" if damping is None else damping)
        except ValueError as err:
            raise UsageError(f"--curvature {curvature!r}: {err}") from None
    ctx = Context(
        command=command,
        spec=spec,
        out=out,
        progress=progress,
        stream=sys.stdout if stream is None else stream,
        seed=int(seed),
        curvature=curvature,
        damping=damping,
        start=t0,
    )
    ctx.timings["load_spec_seconds"] = time.perf_counter() - t0
    return ctx


# --------------------------------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Data helpers
# --------------------------------------------------------------------------------------------------------------
def take(data: Any, indices: Sequence[int]) -> Any:
    """Examples ``indices`` of ``data`` in the same form (tuple of arrays/tensors, or a ``Subset``)."""
    from torch.utils.data import DataLoader, Dataset, Subset

    idx = [int(i) for i in indices]
    if isinstance(data, (tuple, list)):
        out = []
        for a in data:
            if isinstance(a, torch.Tensor):
                out.append(a[torch.as_tensor(idx, dtype=torch.long)])
            else:
                out.append(np.asarray(a)[idx])
        return tuple(out)
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset):
        return Subset(data, idx)
    raise TypeError(f"cannot take examples from {type(data).__name__}")  # pragma: no cover - checked by spec


def read_flagged(path: str | os.PathLike[str], n: int) -> np.ndarray:
    """A bool mask of length ``n`` from a file of training indices.

    Accepted: text with integers separated by commas, spaces or new lines (``#`` starts a comment), a ``.json``
    list of integers, or a ``.npy`` array (read with ``allow_pickle=False``): integers are indices, booleans a
    mask of length ``n``.
    """
    import json

    file = Path(path)
    if not file.is_file():
        raise UsageError(
            f"--flagged {str(file)!r}: no such file. Fix: pass a file of flagged training indices."
        )
    try:
        if file.suffix == ".npy":
            values = np.load(file, allow_pickle=False)
        elif file.suffix == ".json":
            values = np.asarray(json.loads(file.read_text()))
        else:
            tokens = []
            for line in file.read_text().splitlines():
                line = line.split("#", 1)[0]
                tokens += [t for t in line.replace(",", " ").split() if t]
            values = np.asarray([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OSError) as err:
        raise UsageError(
            f"--flagged {str(file)!r} could not be read as training indices ({err}). Fix: write one integer index "
            "per line (or a JSON list, or a .npy array)."
        ) from None
    values = np.asarray(values).reshape(-1)
    if values.dtype == bool:
        if values.size != n:
            raise UsageError(
                f"--flagged {str(file)!r} holds a mask of {values.size} booleans but train() has {n} examples. "
                f"Fix: give one boolean per training example, or a list of indices."
            )
        mask = values
    else:
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise UsageError(
                f"--flagged {str(file)!r} holds non-integers. Fix: list integer training indices."
            )
        bad = values[(values < 0) | (values >= n)]
        if bad.size:
            raise UsageError(
                f"--flagged {str(file)!r} contains index {int(bad[0])}, out of range for {n} training examples. "
                f"Fix: list indices between 0 and {n - 1}."
            )
        mask = np.zeros(n, dtype=bool)
        mask[values.astype(np.int64)] = True
    if not mask.any():
        raise UsageError(f"--flagged {str(file)!r} flags no training example. Fix: list at least one index.")
    return mask


def write_csv(path: Path, columns: dict[str, Any]) -> Path:
    """Write equal-length columns to ``path`` (full float precision)."""
    names = list(columns)
    arrays = [list(np.asarray(columns[c]).tolist()) for c in names]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for row in zip(*arrays):
            writer.writerow([repr(v) if isinstance(v, float) else v for v in row])
    return path


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


# --------------------------------------------------------------------------------------------------------------
# Showing examples in a report
# --------------------------------------------------------------------------------------------------------------
def show_examples(
    report: Any,
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
    from datatrace.cli.report import plot_image_grid

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


def add_ranked_bars(
    report: Any,
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
    from datatrace.cli.report import plot_bars

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
    report: Any,
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
) -> None:
    """Ranked training examples in ``report``: a bar plot of their values, the examples themselves, then a table.

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
    report.add_table(
        [[row["index"], row["label"]] + [row[key] for key, _ in columns] for row in rows],
        ["train index", "label"] + [header for _, header in columns],
        caption=caption,
    )


def add_timings(report: Any, ctx: Context) -> Any:
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
