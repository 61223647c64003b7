"""Tests for datatrace.cli.spec: loading spec files, and the messages for every way a spec can be wrong."""

from __future__ import annotations

import contextlib
import io
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from datatrace.cli.spec import NEEDS, Spec, load_spec
from datatrace.errors import SpecError, SpecRuntimeError

torch.set_num_threads(1)

HEADER = """
import numpy as np
import torch
import datatrace
"""

GOOD = """
g = torch.Generator().manual_seed(0)
X = torch.randn(20, 3, generator=g, dtype=torch.float64)
y = torch.arange(20) % 2

def train():
    return X, y

def query():
    return X[:4], y[:4]

def task():
    return datatrace.ClassificationTask(weight_decay=0.1)

def model():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    return datatrace.verification.training.fit_full_batch(net, task(), (X, y))
"""


def write(tmp_path: Path, body: str, name: str = "spec.py") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(body))
    return path


def spec_error(path: Path, cls: type[Exception] = SpecError, **kwargs) -> str:
    with pytest.raises(cls) as info:
        load_spec(path, **kwargs)
    message = str(info.value)
    # every message names the spec file
    assert str(path.resolve()) in message or str(path) in message, message
    return message


# --------------------------------------------------------------------------------------------------------------
# A good spec
# --------------------------------------------------------------------------------------------------------------
def test_good_torch_spec_loads(tmp_path):
    spec = load_spec(write(tmp_path, GOOD + "\nclass_names = ['no', 'yes']\n"), command="explain")
    assert isinstance(spec, Spec)
    assert spec.backend == "torch" and spec.kind == "tabular" and spec.units == "nats"
    assert spec.n("train") == 20 and spec.n("query") == 4 and spec.query_split == "query"
    assert spec.label_text("train", 1) == "yes" and spec.label_texts("train")[:2] == ["no", "yes"]
    preds = spec.predictions("query")
    assert preds.loss.shape == (4,) and preds.predicted.shape == (4,) and preds.correct.dtype == bool
    influence = spec.fit_influence(progress=False)
    assert influence.score(spec.influence_data("query")).values.shape == (4, 20)
    assert spec.describe()["sizes"] == {"train": 20, "query": 4}


def test_values_instead_of_functions_and_spec_folder_on_path(tmp_path):
    (tmp_path / "helper.py").write_text("WIDTH = 3\n")
    body = GOOD.replace(
        "def train():\n    return X, y", "from helper import WIDTH\ntrain = (X[:, :WIDTH], y)"
    )
    spec = load_spec(write(tmp_path, body))
    assert spec.n("train") == 20


def test_weights_file_safetensors_and_torch_state_dict(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = torch.nn.Linear(3, 2).double()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    base = GOOD.replace(
        "def model():\n    torch.manual_seed(0)\n    net = torch.nn.Linear(3, 2).double()\n"
        "    return datatrace.verification.training.fit_full_batch(net, task(), (X, y))",
        "def model():\n    return torch.nn.Linear(3, 2).double()",
    )
    for name in ("w.safetensors", "w.pt"):
        spec = load_spec(write(tmp_path, base + f"\nweights = {name!r}\n"))
        assert torch.equal(spec.model.weight, net.weight)
    # a pickled whole model is refused (weights_only=True): never unpickle
    torch.save(net, tmp_path / "whole.pt")
    message = spec_error(write(tmp_path, base + "\nweights = 'whole.pt'\n"))
    assert "weights" in message and "state_dict" in message
    # keys that do not match the model
    save_file({"other": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    message = spec_error(write(tmp_path, base + "\nweights = 'bad.safetensors'\n"))
    assert "weights" in message and "does not match model()" in message
    message = spec_error(write(tmp_path, base + "\nweights = 'missing.safetensors'\n"))
    assert "does not exist" in message


# --------------------------------------------------------------------------------------------------------------
# Missing names
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["train", "task", "model"])
def test_missing_required_function(tmp_path, name):
    body = GOOD.replace(f"def {name}():", f"def _{name}():")
    message = spec_error(write(tmp_path, body))
    assert f"does not define {name}()" in message
    assert "estimator()" in message  # says what the alternatives are
    assert "explain also needs query()" in message  # and which command needs what


def test_missing_function_for_a_command(tmp_path):
    body = GOOD.replace("def query():", "def _query():")
    message = spec_error(write(tmp_path, body), command="explain")
    assert "`datatrace explain` needs query() (or validation())" in message
    spec = load_spec(write(tmp_path, body))
    for command, needed in (("value", "validation()"), ("audit --fairness", "groups()")):
        with pytest.raises(SpecError, match=needed.replace("(", r"\(").replace(")", r"\)")) as info:
            spec.require(command)
        assert str(spec.path) in str(info.value) and f"datatrace {command}" in str(info.value)
    with pytest.raises(SpecError, match=r"train_fn\(subset\)"):
        spec.require("debug --remove-k")
    assert set(NEEDS) >= {"explain", "debug", "value", "audit --fairness", "audit --memorisation"}


def test_estimator_and_model_together(tmp_path):
    message = spec_error(write(tmp_path, GOOD + "\ndef estimator():\n    return None\n"))
    assert "both estimator() and model()" in message


# --------------------------------------------------------------------------------------------------------------
# Wrong types
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        (
            "    return datatrace.verification.training.fit_full_batch(net, task(), (X, y))",
            "    return {'w': 1}",
            "model()",
        ),
        ("    return datatrace.ClassificationTask(weight_decay=0.1)", "    return 'cross-entropy'", "task()"),
        ("def train():\n    return X, y", "def train():\n    return 'data.csv'", "train()"),
        ("def train():\n    return X, y", "def train():\n    return X, y[:5]", "different lengths"),
        ("def query():\n    return X[:4], y[:4]", "def query():\n    return X[:4], object()", "query()[1]"),
    ],
)
def test_wrong_return_types(tmp_path, old, new, words):
    assert old in GOOD
    message = spec_error(write(tmp_path, GOOD.replace(old, new)))
    assert words in message and "Fix:" in message


def test_function_returning_none_or_taking_arguments(tmp_path):
    message = spec_error(
        write(tmp_path, GOOD.replace("def train():\n    return X, y", "def train():\n    X"))
    )
    assert "train() returned None" in message
    message = spec_error(write(tmp_path, GOOD.replace("def train():", "def train(path):")))
    assert "train() takes arguments (path)" in message


def test_train_fn_must_be_callable(tmp_path):
    message = spec_error(write(tmp_path, GOOD + "\ntrain_fn = 3\n"))
    assert "train_fn" in message and "train_fn(subset)" in message


# --------------------------------------------------------------------------------------------------------------
# Model and data that do not fit
# --------------------------------------------------------------------------------------------------------------
def test_shape_mismatch_between_model_and_data(tmp_path):
    body = GOOD.replace(
        "net = torch.nn.Linear(3, 2).double()", "net = torch.nn.Linear(5, 2).double()"
    ).replace(
        "    return datatrace.verification.training.fit_full_batch(net, task(), (X, y))", "    return net"
    )
    message = spec_error(write(tmp_path, body))
    assert "model() and train() do not fit together" in message
    assert "(2, 3)" in message  # the shapes of the 2 examples tried
    assert "Linear(in_features=5" in message  # and what the model expects
    assert "mat1 and mat2" in message  # with torch's own words


def test_shape_mismatch_in_query_only(tmp_path):
    body = GOOD.replace("def query():\n    return X[:4], y[:4]", "def query():\n    return X[:4, :2], y[:4]")
    message = spec_error(write(tmp_path, body))
    assert "model() and query() do not fit together" in message


def test_loss_not_per_example(tmp_path):
    body = GOOD + textwrap.dedent(
        """
        class MeanTask(datatrace.Task):
            def loss(self, model, batch):
                return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

        def task():
            return MeanTask()
        """
    )
    message = spec_error(write(tmp_path, body))
    assert "reduction='none'" in message and "shape ()" in message


def test_float_labels_for_classification(tmp_path):
    body = GOOD.replace("def train():\n    return X, y", "def train():\n    return X, y.double()").replace(
        "    return datatrace.verification.training.fit_full_batch(net, task(), (X, y))", "    return net"
    )
    message = spec_error(write(tmp_path, body))
    assert "do not fit together" in message and "integer class labels" in message


# --------------------------------------------------------------------------------------------------------------
# The spec's own code fails
# --------------------------------------------------------------------------------------------------------------
def test_function_that_raises(tmp_path):
    body = GOOD.replace(
        "def train():\n    return X, y", "def train():\n    raise FileNotFoundError('data.csv')"
    )
    with pytest.raises(SpecRuntimeError) as info:
        load_spec(write(tmp_path, body))
    assert "train() raised FileNotFoundError: data.csv" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_import_error_and_syntax_error(tmp_path):
    with pytest.raises(SpecRuntimeError, match="pip install not_a_real_package_xyz"):
        load_spec(write(tmp_path, "import not_a_real_package_xyz\n"))
    message = spec_error(write(tmp_path, "def train(:\n"))
    assert "not valid Python" in message and "line" in message


def test_bad_paths(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.py")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)
    other = tmp_path / "spec.txt"
    other.write_text("x = 1")
    with pytest.raises(SpecError, match=r"ending in \.py"):
        load_spec(other)


# --------------------------------------------------------------------------------------------------------------
# Optional names
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("groups = ['a', 'b', 'a']", "groups() returned 3 labels but query() has 4 examples"),
        ("groups = ['a'] * 4", "single group"),
        ("image_shape = (2, 2)", "image_shape = (2, 2) holds 4 values, but one input of train() has 3"),
        ("feature_names = ['a', 'b']", "feature_names has 2 names but the rows shown have 3 columns"),
        ("kind = 'video'", "kind = 'video'; expected one of"),
        ("kind = 'image'", "kind = 'image' but the spec sets no image_shape"),
        ("texts = ['a'] * 3", "texts['train'] has 3 strings but train() has 20 examples"),
        ("display = lambda: {'train': np.zeros((5, 3))}", "display()['train'] has shape (5, 3)"),
        ("curvature = 'magic'", "curvature"),
        ("units = 3", "units is int"),
    ],
)
def test_optional_names_checked(tmp_path, extra, words):
    message = spec_error(write(tmp_path, GOOD + "\n" + extra + "\n"))
    assert words in message, message


def test_optional_names_used(tmp_path):
    body = GOOD + textwrap.dedent(
        """
        kind = 'text'
        texts = {'train': [f'text {i}' for i in range(20)], 'query': ['q0', 'q1', 'q2', 'q3']}
        groups = lambda: np.array([0, 1, 0, 1])
        feature_names = ['a', 'b', 'c']
        display = lambda: {'train': np.ones((20, 3))}
        def train_fn(subset):
            return model()
        """
    )
    spec = load_spec(write(tmp_path, body), command="audit --fairness")
    assert spec.kind == "text" and spec.text("query", 2) == "q2"
    assert spec.groups.tolist() == [0, 1, 0, 1]
    assert spec.shown("train", [0, 1]).tolist() == [[1.0] * 3] * 2
    assert spec.shown("query", [0]).shape == (1, 3)  # no display rows for query: the model inputs
    assert spec.retrain_fn() is spec.train_fn


# --------------------------------------------------------------------------------------------------------------
# scikit-learn estimators
# --------------------------------------------------------------------------------------------------------------
SKLEARN = """
from sklearn.linear_model import LogisticRegression

rng = np.random.default_rng(0)
X = rng.normal(size=(40, 3))
y = np.where(X[:, 0] + 0.5 * rng.normal(size=40) > 0, "yes", "no")

def train():
    return X, y

def query():
    return X[:5], y[:5]

def estimator():
    return LogisticRegression(tol=1e-10, max_iter=10_000).fit(X, y)

def train_fn(subset):
    Xs, ys = subset
    assert set(ys.tolist()) <= {"yes", "no"}  # labels come back in the estimator's own space
    return LogisticRegression(tol=1e-10, max_iter=10_000).fit(Xs, ys)
"""


def test_sklearn_spec_with_string_labels(tmp_path):
    spec = load_spec(write(tmp_path, SKLEARN), command="explain")
    assert spec.backend == "sklearn" and spec.label_text("train", 0) == str(spec.data["train"][1][0])
    _, y_enc = spec.encoded("train")
    assert y_enc.dtype == np.int64 and set(y_enc.tolist()) == {0, 1}
    # the penalty C * sum -> datatrace's mean form 1 / (C n)
    assert spec.task.weight_decay == pytest.approx({"weight": 1.0 / 40})
    influence = spec.fit_influence(progress=False)
    assert influence.gradient_norm_ < 1e-6  # the estimator sits at the minimum of the rebuilt objective
    model = spec.retrain_fn()(spec.source("train").subset(list(range(30))))
    assert spec.loss_metric("query")(model) > 0


def test_sklearn_spec_errors(tmp_path):
    message = spec_error(write(tmp_path, SKLEARN.replace("return X[:5], y[:5]", "return X[:5, :2], y[:5]")))
    assert "query()[0] has shape (5, 2), but estimator() was fitted on 3 feature(s)" in message
    message = spec_error(
        write(tmp_path, SKLEARN.replace("return X[:5], y[:5]", 'return X[:5], ["maybe"] * 5'))
    )
    assert "query() does not fit estimator()" in message and "maybe" in message
    body = SKLEARN.replace(
        "return LogisticRegression(tol=1e-10, max_iter=10_000).fit(X, y)\n\ndef train_fn",
        "from sklearn.tree import DecisionTreeClassifier\n    return DecisionTreeClassifier().fit(X, y)\n\ndef train_fn",
    )
    message = spec_error(write(tmp_path, body))
    assert (
        "estimator() returned a model datatrace cannot use" in message and "DecisionTreeClassifier" in message
    )


# --------------------------------------------------------------------------------------------------------------
# Through the command line
# --------------------------------------------------------------------------------------------------------------
def test_cli_reports_spec_errors_with_exit_code_2(tmp_path):
    from datatrace.cli.main import main

    body = GOOD.replace("def task():", "def _task():")
    path = write(tmp_path, body)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["explain", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "datatrace explain: error: spec" in err.getvalue() and "task()" in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_missing_package_inside_a_function(tmp_path):
    body = GOOD.replace("def train():\n    return X, y", "def train():\n    import not_a_real_package_xyz")
    with pytest.raises(
        SpecRuntimeError, match=r"train\(\) raised ModuleNotFoundError.*pip install not_a_real"
    ):
        load_spec(write(tmp_path, body))
