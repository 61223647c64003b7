"""What every command run shares: its options, checked arguments, output folder, timings and the fit -> JSON path.

Each command (``demo``, ``explain``, ``debug``, ``value``, ``audit``) is a module with ``add_arguments(parser)``,
``run(args) -> exit code`` and a ``run_<name>(...)`` function for use from Python that returns every number as a
JSON-ready dict. They all follow one path through a :class:`Run` (the spec commands through its :class:`Context`,
made by :func:`start`, which also loads and checks the spec before any expensive work):

1. check the arguments and the output folder (:func:`check_out_dir`),
2. fit an influence function (:meth:`Run.fit_influence`, :meth:`Context.fit` for a spec; timed, logged, a bad ``--curvature``/``--damping`` is a usage
   error),
3. compute (the maths lives in :mod:`datatrace.apps`, not here),
4. :meth:`Run.finish`: write ``report.html`` (:mod:`datatrace.cli.report`), ``results.json``
   (:func:`datatrace.fileio.write_json`) and every table the command registered with :meth:`Run.defer`, all
   together (:func:`datatrace.cli.files.publish`: a fresh folder swapped in at the end, so an interrupted run leaves
   an earlier run's outputs whole), and print a summary that says what the numbers mean.

The sign convention of every score is :data:`datatrace.scores.MEANING`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from datatrace import __version__
from datatrace.cli.files import publish
from datatrace.cli.spec import load_spec
from datatrace.cli.spec_model import Spec, curvature_arguments, fit_influence
from datatrace.data import DataLike
from datatrace.errors import UsageError
from datatrace.fileio import atomic_write, jsonable, write_json
from datatrace.tasks import Task

__all__ = [
    "SPEC_WARNING",
    "Context",
    "Run",
    "add_common_arguments",
    "add_top_flag",
    "check_int",
    "check_out_dir",
    "check_seed",
    "common_options",
    "run_command",
    "start",
    "using_torch_threads",
]

logger = logging.getLogger("datatrace.cli.context")

SPEC_WARNING = (
    "SPEC is a Python file and it is executed as Python code, with your permissions: only pass spec files you "
    "trust, as you would only run scripts you trust."
)


# --------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """SPEC, ``--out``, ``--curvature``, ``--damping`` and ``--seed`` (``--quiet`` comes from the CLI)."""
    parser.add_argument(
        "spec",
        metavar="SPEC",
        help="a Python spec file that defines model() + task() (or estimator()), train() and, as the command "
        "needs them, query(), validation(), groups(), train_fn(subset) (see docs/examples/). It is executed as "
        "Python code: only pass files you trust.",
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


def add_top_flag(
    parser: argparse.ArgumentParser, default: int, what: str, *, flag: str = "--top", metavar: str = "N"
) -> None:
    """An integer flag (``--top N`` unless ``flag``/``metavar`` say otherwise) for how many examples to list.

    ``default`` is its default value and ``what`` the words of its help text, before ``(default: ...)``.
    """
    parser.add_argument(
        flag, type=int, default=default, metavar=metavar, help=f"{what} (default: {default})."
    )


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
    """Call a command's ``run_<name>(args.spec, args.out, **flags, **common_options(args))``; returns exit code 0,
    or 130 when its ``--verify`` retraining was interrupted (the outputs are written and say so)."""
    results = function(args.spec, args.out, **flags, **common_options(args))
    verification = results.get("verification") if isinstance(results, dict) else None
    return 130 if isinstance(verification, dict) and verification.get("status") == "interrupted" else 0


# --------------------------------------------------------------------------------------------------------------
# Checked arguments
# --------------------------------------------------------------------------------------------------------------
def check_int(name: str, value: Any, minimum: int, fix: str = "") -> int:
    """``value`` if it is an integer >= ``minimum``, else a :class:`UsageError` naming flag ``name`` (then ``fix``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(
            f"{name} {value!r} is not allowed: expected an integer >= {minimum}." + (f" {fix}" if fix else "")
        )
    return value


def check_seed(seed: Any, name: str = "--seed") -> int:
    """``seed`` as an int if it is an integer >= 0, else a :class:`UsageError` naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(
            f"{name}{' ' if name.startswith('-') else '='}{seed!r} is not allowed: expected an integer >= 0. "
            f"Fix: pass e.g. {name + ' 0' if name.startswith('-') else '0'}."
        )
    return int(seed)


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` as a Path, created if needed; a UsageError for an existing file or an uncreatable path."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(
            f"--out {str(path)!r} is an existing file, not a directory. Fix: pass a directory (it is created if "
            "missing), e.g. --out datatrace-out."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"--out {str(path)!r} cannot be created ({err.strerror or err}). Fix: pass a directory you can write."
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {str(path)!r} is not writable. Fix: pass a directory you can write.")
    return path


@contextlib.contextmanager
def using_torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the setting afterwards (None: leave it)."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(previous)


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


def _describe_route(curvature: Any) -> str:
    return curvature if isinstance(curvature, str) else repr(curvature)


# --------------------------------------------------------------------------------------------------------------
# A run
# --------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Run:
    """What a command run carries from step to step: where it writes, what it prints to, its seed and timings."""

    command: str
    out: Path
    progress: bool
    stream: TextIO
    seed: int
    start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    influence: Any = None
    outputs: dict[str, Callable[[Path], Any]] = field(default_factory=dict)

    def defer(self, name: str, write: Callable[[Path], Any]) -> Path:
        """Register output file ``name``, written by ``write(path)`` when :meth:`finish` publishes the run's outputs
        together; returns its final path (``out / name``) for results.json."""
        self.outputs[name] = write
        return self.out / name

    def fit_influence(
        self, model: nn.Module, task: Task, train: DataLike, n_train: int, curvature: Any, damping: Any
    ) -> Any:
        """Fit the influence function on ``train`` (``n_train`` examples; timed as ``influence_seconds``, logged);
        returns it. A ValueError about ``curvature`` or ``damping`` becomes a :class:`UsageError` (exit code 2).
        """
        params = sum(p.numel() for p in model.parameters())
        logger.info("fitting influence functions on %d training examples, %d parameters", n_train, params)
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        try:
            self.influence = fit_influence(model, task, train, curvature, damping, progress=self.progress)
        except ValueError as err:
            if "curvature" in str(err) or "damping" in str(err):
                raise UsageError(str(err)) from err
            raise
        self.timings["influence_seconds"] = time.perf_counter() - t0
        return self.influence

    def curvature_info(self) -> dict[str, Any]:
        """The fitted curvature's scalar facts (route, damping, eigenvalue range, ...)."""
        info = self.influence.curvature_.info if self.influence is not None else {}
        return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}

    def influence_summary(self) -> dict[str, Any]:
        """JSON-ready facts about the fitted influence function."""
        info = self.curvature_info()
        fmodel = getattr(self.influence, "fmodel_", None)
        return {
            "estimator": type(self.influence).__name__,
            "curvature": info,
            "curvature_route": info.get("auto_choice", getattr(self.influence.curvature_, "name", "")),
            "gradient_norm": getattr(self.influence, "gradient_norm_", None),
            # the parameters in scope (every trainable one, or the part a layer-structured route covers) and those
            # a structured route left out, with the reason for each (datatrace.capture.scope)
            "params_in_scope": None if fmodel is None else list(fmodel.space.names),
            "params_left_out": dict(getattr(self.influence, "params_left_out_", {})),
        }

    def finish(
        self, results: dict[str, Any], report: Any, summary: str, time_parts: Sequence[str] = ("influence",)
    ) -> dict[str, Any]:
        """Write report.html, results.json and the :meth:`defer`-ed files together, print ``summary``; returns the
        JSON-ready results.

        The files appear in ``out`` together or not at all (:func:`datatrace.cli.files.publish`). The printed
        trailer names the files and the total time, then the seconds of ``time_parts`` (keys of :attr:`timings`
        without ``_seconds``).
        """
        t0 = time.perf_counter()
        report_path = self.out / "report.html"
        json_path = self.out / "results.json"
        files = dict(results.get("files", {}))
        files.update({"report": str(report_path), "results": str(json_path)})
        results["files"] = files
        text = report.to_html()
        # a command may have timed building the report already; rendering it adds to that
        self.timings["report_seconds"] = self.timings.get("report_seconds", 0.0) + time.perf_counter() - t0
        self.timings["total_seconds"] = time.perf_counter() - self.start
        results["timings"] = dict(self.timings)
        writers = dict(self.outputs)
        writers["report.html"] = lambda path: atomic_write(
            path, lambda tmp: Path(tmp).write_text(text, "utf-8")
        )
        writers["results.json"] = lambda path: write_json(path, results)
        publish(self.out, writers)
        parts = ", ".join(f"{part} {self.timings.get(f'{part}_seconds', 0):.1f} s" for part in time_parts)
        lines = [
            summary.rstrip("\n"),
            "",
            f"Report: {report_path}   numbers: {json_path}"
            + "".join(f"   {k}: {v}" for k, v in files.items() if k not in ("report", "results")),
            f"Time: {self.timings['total_seconds']:.1f} s ({parts})",
            "",
        ]
        self.stream.write("\n".join(lines))
        self.stream.flush()
        return jsonable(results)


@dataclass(kw_only=True)
class Context(Run):
    """A run of a spec command: the loaded :class:`~datatrace.cli.spec_model.Spec` and the curvature flags."""

    spec: Spec
    curvature: Any
    damping: Any

    def fit(self) -> Any:
        """Fit the influence function on the spec's ``train()`` (``--curvature``/``--damping`` or the spec's)."""
        spec = self.spec
        return self.fit_influence(
            spec.model,
            spec.task,
            spec.encoded("train"),
            spec.n("train"),
            spec.curvature if self.curvature is None else self.curvature,
            spec.damping if self.damping is None else self.damping,
        )

    def results_header(self) -> dict[str, Any]:
        """The first keys of results.json: command, version, spec and configuration."""
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
    seed = check_seed(seed)
    if threads is not None:
        torch.set_num_threads(check_int("--threads", threads, 1))
    damping = _damping(damping) if isinstance(damping, str) or damping is None else damping
    out = check_out_dir(out_dir)
    t0 = time.perf_counter()
    logger.info("loading spec %s", spec_path)
    spec = load_spec(spec_path, seed=seed)
    for need in needs:
        spec.require(need)
    if curvature is not None:
        try:
            curvature_arguments(curvature, "auto" if damping is None else damping)
        except ValueError as err:
            raise UsageError(f"--curvature {curvature!r}: {err}") from None
    ctx = Context(
        command=command,
        spec=spec,
        out=out,
        progress=progress,
        stream=sys.stdout if stream is None else stream,
        seed=seed,
        curvature=curvature,
        damping=damping,
        start=t0,
    )
    ctx.timings["load_spec_seconds"] = time.perf_counter() - t0
    return ctx
