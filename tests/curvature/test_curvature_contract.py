"""The contract every registered curvature route keeps (``datatrace.curvature.available()``).

For each route, fitted on small trained problems of the catalogue (``tests/catalogue.py``) with ``damping=0.1``:

* ``solve`` and ``matvec`` refuse to run before ``fit`` (:class:`NotFittedError`);
* ``solve`` inverts ``matvec``: ``solve(matvec(v)) ~ v`` (each route inverts the curvature it stands for);
* the exact routes (and those exact on these problems) agree with ``torch.linalg.solve`` of the damped dense matrix;
* ``solve`` takes ``(m, p)`` rows and, except the K-FAC family, one ``(p,)`` vector, with the same numbers;
* a zero row solves to a zero row, and no rows to no rows;
* ``info`` names the route and the damping used (what ``Scores.metadata["curvature"]`` reports).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from datatrace.curvature import Curvature, available, make_curvature
from datatrace.data import as_data_source
from datatrace.errors import NotFittedError
from datatrace.gradients.functional import FunctionalModel

DAMPING = 0.1
#: settings that make a route's solve deterministic and tight on these tiny problems
OPTIONS = {
    "cg": {"rtol": 1e-12},
    "lissa": {"depth": 150, "tail": 0.0, "batch_size": 10_000},
}
#: route -> the dense matrix its solve equals on these problems (``None``: an approximation)
DENSE = {
    "exact": "hessian",
    "auto": "gauss-newton",  # the dense matrix fits and is fast: auto picks AUTO_ORDER[0], "gauss-newton"
    "cg": "hessian",
    "arnoldi": "hessian",  # rank 200 >= p: a complete Krylov basis
    "lissa": "hessian",  # full batch: a deterministic series, truncated at depth 150
    "gauss-newton": "gauss-newton",
}
#: relative tolerance of ``solve`` against the dense answer (and of ``solve(matvec(v))`` against ``v``); LiSSA's
#: truncation leaves ``(1 - (lambda_min + damping) / scale)^depth``, about 0.07 in the MLP's flattest direction
TOLERANCE = {"cg": 1e-9, "lissa": 0.1}
#: routes whose ``info["damping"]`` repeats the setting (``"auto"``) rather than the number used
DAMPING_AS_SET = {"kfac", "ekfac"}

PROBLEMS = ["logreg_problem", "mlp_problem"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Setting:
    """A catalogue problem as the routes see it: the functional model, the data and a few right-hand sides."""

    def __init__(self, problem) -> None:
        self.fmodel = FunctionalModel(problem.model.eval(), problem.task)
        self.source = as_data_source(problem.train, "train")
        self.p = self.fmodel.num_params
        grads = self.fmodel.per_example_grads(tuple(t[:4] for t in problem.train))
        rand = torch.randn(2, self.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.V = torch.cat([grads, rand])
        self._dense: dict[str, torch.Tensor] = {}
        self._routes: dict[tuple[str, object], Curvature] = {}

    def dense(self, matrix: str) -> torch.Tensor:
        if matrix not in self._dense:
            if matrix == "hessian":
                self._dense[matrix] = self.fmodel.dense_hessian(self.source)
            else:
                self._dense[matrix] = self.fmodel.dense_gauss_newton(self.source)
        return self._dense[matrix]

    def fitted(self, name: str, damping: object = DAMPING) -> Curvature:
        key = (name, damping)
        if key not in self._routes:
            route = make_curvature(name, damping=damping, **OPTIONS.get(name, {}))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._routes[key] = route.fit(self.fmodel, self.source, progress=False)
        return self._routes[key]


@pytest.fixture(scope="module", params=PROBLEMS)
def setting(request) -> Setting:
    return Setting(request.getfixturevalue(request.param))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny products: one intra-op thread is faster than many on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_route_is_in_the_contract():
    assert set(available()) >= {"exact", "gauss-newton", "cg", "lissa", "arnoldi", "diagonal", "identity"}
    assert set(DENSE) <= set(available())


@pytest.mark.parametrize("name", available())
def test_solve_and_matvec_before_fit_raise_not_fitted(name, logreg_problem):
    route = make_curvature(name, damping=DAMPING, **OPTIONS.get(name, {}))
    V = torch.zeros(2, 15, dtype=torch.float64)
    with pytest.raises(NotFittedError, match="fit"):
        route.solve(V)
    with pytest.raises(NotFittedError, match="fit"):
        route.matvec(V)


@pytest.mark.parametrize("name", available())
def test_fit_returns_the_route_and_info_reports_route_and_damping(name, setting):
    route = make_curvature(name, damping=DAMPING, **OPTIONS.get(name, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert route.fit(setting.fmodel, setting.source, progress=False) is route
    info = route.info
    assert info["route"] == (info["auto_choice"] if name == "auto" else name)
    assert info["damping"] == DAMPING
    assert info == route.info and info is not route.info_  # a copy
    # what Scores.metadata["curvature"] keeps: the scalar entries
    assert any(isinstance(v, (int, float, str, bool)) for v in info.values())


@pytest.mark.parametrize("name", available())
def test_auto_damping_is_reported_as_a_number(name, logreg_problem):
    setting = Setting(logreg_problem)
    info = setting.fitted(name, "auto").info
    if name in DAMPING_AS_SET:
        assert info["damping"] == "auto"
    else:
        assert isinstance(info["damping"], float) and info["damping"] >= 0.0


@pytest.mark.parametrize("name", available())
def test_solve_inverts_matvec(name, setting):
    route = setting.fitted(name)
    x = route.solve(route.matvec(setting.V))
    assert x.shape == setting.V.shape and x.dtype == setting.V.dtype
    assert rel(x, setting.V) < TOLERANCE.get(name, 1e-10)


@pytest.mark.parametrize("name", sorted(DENSE))
def test_exact_routes_match_a_dense_solve_of_the_damped_matrix(name, setting):
    matrix = setting.dense(DENSE[name])
    eye = torch.eye(setting.p, dtype=torch.float64)
    expected = torch.linalg.solve(matrix + DAMPING * eye, setting.V.T).T
    route = setting.fitted(name)
    assert rel(route.solve(setting.V), expected) < TOLERANCE.get(name, 1e-10)
    assert rel(route.matvec(setting.V), setting.V @ (matrix + DAMPING * eye)) < 1e-10


@pytest.mark.parametrize("name", available())
def test_one_vector_and_rows(name, setting):
    route = setting.fitted(name)
    rows = route.solve(setting.V[:1])
    assert rows.shape == (1, setting.p)
    one = route.solve(setting.V[0])
    assert one.shape == (setting.p,)
    torch.testing.assert_close(one, rows[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", available())
def test_zero_rows_solve_to_zero_rows(name, setting):
    route = setting.fitted(name)
    zero = torch.zeros(1, setting.p, dtype=torch.float64)
    x = route.solve(torch.cat([setting.V[:2], zero]))
    assert torch.equal(x[-1], zero[0])
    assert torch.equal(
        route.solve(zero.expand(3, -1).clone()), torch.zeros(3, setting.p, dtype=torch.float64)
    )
    assert route.solve(zero[:0]).shape == (0, setting.p)
