"""Spec files: a small Python file that tells the ``datatrace`` commands about a model and its data.

The commands ``datatrace explain | debug | value | audit SPEC`` load ``SPEC`` with :func:`load_spec`. A spec is
ordinary Python (it is *your* code and it is executed as such; datatrace itself never unpickles anything). It
defines some of the names below, each either as a function without arguments or as a plain value; every function
is called once, when the spec is loaded.

A PyTorch model:

=====================  ========================================================================================
name                   what it gives
=====================  ========================================================================================
``model()``            the **trained** ``torch.nn.Module`` (or an untrained one plus ``weights``)
``weights``            optional: a file with the trained weights, relative to the spec's folder: ``.safetensors``,
                       or a ``state_dict`` saved with ``torch.save`` (read with ``torch.load(weights_only=True)``)
``task()``             the :class:`~datatrace.Task` the model was trained with (loss, weight decay), e.g.
                       ``datatrace.ClassificationTask(weight_decay=1e-3)``
``train()``            the training data exactly as trained on: a tuple ``(X, y)`` of arrays or tensors, a
                       ``Dataset`` or a ``DataLoader``, or a dict of equal-length columns (a tokenizer's
                       ``BatchEncoding`` with ``labels`` added); a Dataset of dicts for Hugging Face models
=====================  ========================================================================================

or a scikit-learn model: ``estimator()`` returning a *fitted* ``LinearRegression``, ``Ridge`` or
``LogisticRegression`` (see :func:`datatrace.from_sklearn`) and ``train()`` returning ``(X, y)`` as given to its
``fit`` (labels in the estimator's own label space). No ``task()`` is needed: it is the estimator's objective. The
commands work on the estimator's exact PyTorch equivalent (the ``nn.Linear`` and task of
:func:`datatrace.from_sklearn`, labels encoded through ``classes_``); ``train_fn`` still receives subsets with the
estimator's own labels.

Optional names, needed by some commands:

=====================  ========================================================================================
``query()``            the examples to explain (``datatrace explain``) or audit for fairness; same form as train
``validation()``       held-out data: ``debug`` ranks training examples by their harm to its loss; ``value``
                       values training data by it; used in place of ``query()`` when that is missing
``train_fn(subset)``   retrains from scratch (or warm-started) on ``subset`` (same form as ``train()``) and
                       returns the model (an ``nn.Module``, or a fitted estimator): ``debug``'s counterfactual
                       check removes the most harmful examples, retrains and measures the validation loss
``groups()``           one group label per example of ``query()`` (or ``validation()``): ``audit --fairness``
``kind``               ``"image"``, ``"tabular"`` or ``"text"``: how reports show examples (default: inferred)
``image_shape``        e.g. ``(8, 8)`` or ``(28, 28)`` or ``(32, 32, 3)``: reshapes a flat input row to a picture
``feature_names``      one name per input column (tabular)
``class_names``        one name per class index (torch classifiers; an estimator has its ``classes_``)
``texts``              a list of strings, one per training example, or ``{"train": [...], "query": [...],
                       "validation": [...]}`` (text)
``tokens(i)``          the token strings of training example ``i``, one per term of the task's
                       ``loss_terms`` (a causal LM's predicted tokens): ``explain`` then shows each proponent's
                       and opponent's score split over its tokens as highlighted text
``display()``          ``{"train": X, "query": X, "validation": X}``: rows to *show* in tabular reports instead of
                       the model's inputs (e.g. the features in their original units before standardising)
``curvature``          inverse-curvature route (default ``"auto"``; ``--curvature`` overrides)
``damping``            damping added to the curvature (default ``"auto"``)
``units``              words for the loss's units (default: ``"nats"`` for classification, ``"squared error
                       units"`` for regression)
=====================  ========================================================================================

A Hugging Face model: ``model()`` returns it (e.g. ``AutoModelForSequenceClassification``, a ``GPT2LMHeadModel``),
``task()`` returns :class:`datatrace.hf.SequenceClassificationTask` or :class:`datatrace.hf.CausalLMTask`, and the
data are dicts (``input_ids``, ``attention_mask``, ``labels``); labels are read at the task's key, and reports show
``texts`` when given (else the token ids). Parameters with ``requires_grad=False`` (a frozen encoder) are outside
the scope of influence; ``results.json`` lists the parameters in scope and those a layer-structured route left out.

What every command does with it: ``score[q, i] ~ f_q(theta without i) - f_q(theta_hat)``, the change of query q's
measurement (its loss, in the units above) if training example i were removed and the model retrained.

:func:`load_spec` checks everything before any expensive work starts: which names are missing for the command
(and which command needs which), the type of every return value, and that model and data fit together (one
forward pass of the loss on two examples of each data set). Every message names the spec file and the function.

Example spec (``digits.py``)::

    import torch, datatrace
    from sklearn.datasets import load_digits

    kind, image_shape = "image", (8, 8)

    def train():
        X, y = load_digits(return_X_y=True)
        return torch.tensor(X[:1000] / 16), torch.tensor(y[:1000])

    def task():
        return datatrace.ClassificationTask(weight_decay=1e-3)

    def model():
        net = torch.nn.Linear(64, 10).double()
        return datatrace.verification.training.fit_full_batch(net, task(), train())
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from datatrace.cli.predictions import Predictions
from datatrace.cli.spec_checks import (
    check_curvature,
    check_data,
    check_display,
    check_estimator,
    check_estimator_data,
    check_forward,
    check_groups,
    check_image_shape,
    check_kind,
    check_names,
    check_str,
    check_texts,
    default_units,
    has,
    load_weights,
    spec_value,
    type_words,
    where,
)
from datatrace.cli.spec_model import KINDS, NEEDS, REQUIREMENTS_TEXT, Spec
from datatrace.data import DataLike
from datatrace.errors import SpecError, SpecRuntimeError
from datatrace.tasks import Task

__all__ = [
    "KINDS",
    "NEEDS",
    "SPEC_NAMES",
    "Predictions",
    "Spec",
    "SpecError",
    "SpecRuntimeError",
    "load_spec",
]

logger = logging.getLogger(__name__)


def load_spec(path: str | os.PathLike[str], command: str | None = None, seed: int | None = 0) -> Spec:
    """Execute the spec file at ``path``, check what it defines and return a :class:`Spec`.

    Args:
        path: the spec file (a ``.py`` file).
        command: a key of :data:`NEEDS` (e.g. ``"explain"``) to check that the spec has what it needs now.
        seed: ``torch.manual_seed`` and ``numpy.random.seed`` before running the spec's code (None: leave them).

    Raises:
        SpecError: a missing or wrongly typed name, or model and data that do not fit together; the message names
            the spec file and the function.
        SpecRuntimeError: the spec's own code raised (chained to the original exception).
    """
    file = Path(path)
    if not file.exists():
        raise SpecError(
            f"spec {file}: no such file. Fix: pass the path of a Python spec file (see docs/examples/)."
        )
    if file.is_dir():
        raise SpecError(
            f"spec {file}: is a directory. Fix: pass the path of a Python spec file, e.g. spec.py."
        )
    if file.suffix != ".py":
        raise SpecError(
            f"spec {file}: expected a Python file ending in .py (a spec is Python code that defines model(), "
            "task() and train()). Fix: pass the spec's .py file."
        )
    file = file.resolve()
    if seed is not None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - spec code may use the global numpy RNG
    namespace = _import(file)
    return _build(file, namespace, command)


def _import(file: Path) -> ModuleType:
    digest = hashlib.sha256(str(file).encode()).hexdigest()[:10]
    name = f"datatrace_spec_{file.stem.replace('-', '_')}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(name, file)
    if loader_spec is None or loader_spec.loader is None:  # pragma: no cover - a .py file always has a loader
        raise SpecError(f"spec {file}: Python cannot load this file. Fix: pass a .py file.")
    module = importlib.util.module_from_spec(loader_spec)
    folder = str(file.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)  # a spec may import helper modules that sit next to it
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except SyntaxError as err:
        sys.modules.pop(name, None)
        raise SpecError(
            f"spec {file}: is not valid Python (line {err.lineno}: {err.msg}). Fix: correct the syntax."
        ) from err
    except Exception as err:
        sys.modules.pop(name, None)
        hint = ""
        if isinstance(err, ModuleNotFoundError) and err.name:
            hint = f" Fix: install the package that provides {err.name!r} (e.g. pip install {err.name})."
        raise SpecRuntimeError(
            f"spec {file}: importing the file raised {type(err).__name__}: {err}.{hint}"
        ) from err
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _build(file: Path, module: ModuleType, command: str | None) -> Spec:
    defined = frozenset(n for n in SPEC_NAMES if has(module, n))
    # -- the model -------------------------------------------------------------------------------------------
    if has(module, "estimator") and has(module, "model"):
        raise SpecError(
            f"spec {file}: defines both estimator() and model(); a spec describes one model. Fix: keep "
            "estimator() for a scikit-learn model or model() + task() for a PyTorch model, not both."
        )
    missing = [n for n in ("train",) if not has(module, n)]
    if not has(module, "estimator"):
        missing = [n for n in ("model", "task") if not has(module, n)] + missing
    if missing:
        listed = " and ".join(f"{n}()" for n in missing)
        raise SpecError(
            f"spec {file}: does not define {listed}. {REQUIREMENTS_TEXT} Fix: add {listed} to {file.name} "
            "(see the datatrace.cli.spec docstring or docs/examples/ for complete specs)."
        )
    train = check_data(file, "train", spec_value(file, module, "train"))
    estimator = None
    if has(module, "estimator"):
        estimator = spec_value(file, module, "estimator")
        model, task = check_estimator(file, estimator, train)
        backend = "sklearn"
    else:
        backend = "torch"
        task = spec_value(file, module, "task")
        if not isinstance(task, Task):
            raise SpecError(
                f"{where(file, 'task')}() returned {type_words(task)}; expected a datatrace.Task. Fix: return e.g. "
                "datatrace.ClassificationTask(weight_decay=...) with the weight decay the model was trained with."
            )
        model = spec_value(file, module, "model")
        if not isinstance(model, nn.Module):
            raise SpecError(
                f"{where(file, 'model')}() returned {type_words(model)}; expected a torch.nn.Module (the trained "
                "model). Fix: return the network, e.g. `return net` (for a scikit-learn model define estimator() "
                "instead)."
            )
        if has(module, "weights"):
            load_weights(file, model, module.weights)
    data: dict[str, DataLike] = {"train": train}
    for split in ("query", "validation"):
        if has(module, split):
            data[split] = check_data(file, split, spec_value(file, module, split))
            if estimator is not None:
                check_estimator_data(file, split, estimator, data[split])

    spec = Spec(
        path=file,
        namespace=module,
        backend=backend,
        model=model,
        task=task,
        data=data,
        estimator=estimator,
        defined=defined,
    )
    for split in data:
        check_forward(spec, split)

    # -- optional names --------------------------------------------------------------------------------------
    if has(module, "train_fn"):
        train_fn = module.train_fn
        if not callable(train_fn):
            raise SpecError(
                f"{where(file, 'train_fn')} is {type_words(train_fn)}; expected a function train_fn(subset) that "
                "retrains on a subset of train() and returns the model. Fix: define it with `def`."
            )
        spec.train_fn = train_fn
    if has(module, "groups"):
        spec.groups = check_groups(spec, spec_value(file, module, "groups"))
    if has(module, "tokens"):
        tokens = module.tokens
        if not callable(tokens):
            raise SpecError(
                f"{where(file, 'tokens')} is {type_words(tokens)}; expected a function tokens(i) returning the "
                "token strings of training example i (one per loss term). Fix: define it with `def`."
            )
        spec.tokens = tokens
    spec.curvature = getattr(module, "curvature", "auto")
    spec.damping = getattr(module, "damping", "auto")
    check_curvature(file, spec.curvature, spec.damping)
    spec.units = check_str(file, module, "units") or default_units(task)
    spec.class_names = check_names(file, module, "class_names")
    spec.feature_names = check_names(file, module, "feature_names")
    spec.image_shape = check_image_shape(spec, getattr(module, "image_shape", None))
    spec.texts = check_texts(spec, spec_value(file, module, "texts") if has(module, "texts") else None)
    spec.display = check_display(
        spec, spec_value(file, module, "display") if has(module, "display") else None
    )
    spec.kind = check_kind(spec, getattr(module, "kind", None))
    if spec.feature_names is not None:
        width = spec.shown("train", [0]).shape[1]
        if len(spec.feature_names) != width:
            raise SpecError(
                f"{where(file, 'feature_names')} has {len(spec.feature_names)} names but the rows shown have "
                f"{width} columns ({'display()' if 'train' in spec.display else 'the model inputs of train()'}). "
                "Fix: give one name per column."
            )
    if command is not None:
        if command not in NEEDS:
            raise ValueError(f"command={command!r} is not one of {sorted(NEEDS)}")
        spec.require(command)
    logger.info(
        "loaded spec %s: %s model, %s",
        file,
        backend,
        ", ".join(f"{spec.n(s)} {s} examples" for s in data),
    )
    return spec


SPEC_NAMES = (
    "model",
    "weights",
    "task",
    "train",
    "estimator",
    "query",
    "validation",
    "train_fn",
    "groups",
    "kind",
    "image_shape",
    "feature_names",
    "class_names",
    "texts",
    "tokens",
    "display",
    "curvature",
    "damping",
    "units",
)
