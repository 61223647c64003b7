"""Metagradient attribution and the recorded training run: exactness against finite differences of the actual
weighted run (float64), the replay's memory bound, the recorder's contract and its refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import datatrace
from datatrace.attributors.metagradient import Metagradient
from datatrace.errors import StoreCorruptedError
from datatrace.gradients.functional import BoundFunction
from datatrace.run.metagradient import graph_bytes, metagradients
from datatrace.run.recording import Recorder, Recording
from datatrace.run.replay import Replay, ReplayMismatchError
from datatrace.verification import metrics, retrain, verify
from datatrace.verification.training import fit_minibatch
from datatrace.verification.verify import _single_model_verdict

N, BATCH, DECAY = 24, 8, 1e-2


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 3, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).long()
    Xq = torch.randn(3, 3, generator=g, dtype=torch.float64)
    return (X, y), (Xq, (Xq[:, 0] > 0).long())


def make_model(batch_norm: bool) -> nn.Module:
    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Linear(3, 5)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, 2)]
    return nn.Sequential(*layers).double()


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "sgd-momentum":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def record(folder, kind: str, batch_norm: bool, train, task, epochs: int = 3, every: int = 4) -> Recording:
    """The user's own loop: shuffled minibatches, a learning-rate schedule, the task's loss plus its L2 term."""
    X, y = train
    model = make_model(batch_norm)
    opt = make_optimizer(kind, model)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    recorder = Recorder(folder, model, opt, n_train=N, checkpoint_every=every)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(N, generator=order)
        for start in range(0, N, BATCH):
            idx = perm[start : start + BATCH]
            recorder.begin_step(idx)
            loss = task.loss(model, (X[idx], y[idx])).mean()
            loss = loss + 0.5 * DECAY * sum((p * p).sum() for p in model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return recorder.finish()


def assert_finite_differences(
    replay: Replay, measure, grads: torch.Tensor, examples: tuple[int, ...]
) -> None:
    """``grads[:, i]`` equals the central difference of the replayed run's measurement in example ``i``'s weight."""

    def f(weights: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return measure(replay.run(replay.initial(), replay.n_steps, weights))

    ones, h = torch.ones(N, dtype=torch.float64), 1e-5
    for i in examples:
        e = torch.zeros(N, dtype=torch.float64)
        e[i] = h
        fd = (f(ones + e) - f(ones - e)) / (2 * h)
        assert torch.allclose(grads[:, i], fd, rtol=1e-6, atol=1e-9), (i, grads[:, i], fd)


def clipped_loop(recorder: Recorder, model: nn.Module, opt, task, train, starts, max_norm: float) -> None:
    """A loop that clips the gradient norm to ``max_norm`` before each step."""
    X, y = train
    for start in starts:
        idx = torch.arange(start, start + BATCH)
        recorder.begin_step(idx)
        loss = task.loss(model, (X[idx], y[idx])).mean()
        loss = loss + 0.5 * DECAY * sum((p * p).sum() for p in model.parameters())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()


def final_measurement(replay: Replay, task, query):
    fn = BoundFunction(replay.model, task.measurement)
    return lambda state: replay.evaluate(state, fn, query)


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("kind", ["sgd", "sgd-momentum", "adam", "adamw"])
def test_metagradient_equals_finite_differences_of_the_weighted_run(tmp_path, data, kind, batch_norm):
    train, query = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    recording = record(tmp_path, kind, batch_norm, train, task)
    replay = Replay(make_model(batch_norm), task, recording, train)
    measure = final_measurement(replay, task, query)
    result = metagradients(replay, measure, n_query=3, segment=3)
    assert result.replay_error < 1e-12

    assert_finite_differences(replay, measure, result.grads, (0, 7, 19))


def test_replay_reproduces_the_recorded_run_and_its_batchnorm_statistics(tmp_path, data):
    train, _ = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    recording = record(tmp_path, "adam", True, train, task)
    replay = Replay(make_model(True), task, recording, train)
    final = replay.run(replay.initial(), replay.n_steps)
    saved = replay.saved(replay.n_steps)
    for name, value in saved.params.items():
        assert torch.allclose(final.params[name], value, atol=1e-12)
    for name, value in saved.buffers.items():
        assert torch.equal(final.buffers[name], value) or torch.allclose(
            final.buffers[name], value, atol=1e-12
        )
    # the graph step's differentiable running statistics equal PyTorch's in-place ones
    state = replay.saved(4)
    graph_state, _ = replay.step(state, 4, graph=True)
    plain_state, _ = replay.step(state, 4)
    for name in ("1.running_mean", "1.running_var"):
        assert torch.allclose(graph_state.buffers[name].detach(), plain_state.buffers[name], atol=1e-14)


@pytest.mark.parametrize("every", [4, 1000])
def test_reverse_pass_holds_order_sqrt_t_states(tmp_path, data, every):
    train, query = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    recording = record(tmp_path, "sgd-momentum", False, train, task, epochs=12, every=every)
    T = recording.n_steps  # 36 steps
    replay = Replay(make_model(False), task, recording, train)
    result = metagradients(replay, final_measurement(replay, task, query), n_query=3)
    root = math.ceil(math.sqrt(T))
    longest = max(b - a for a, b in zip(recording.checkpoint_steps[:-1], recording.checkpoint_steps[1:]))
    k = longest if longest <= 4 * root else root  # one level while the saved stretches are short enough
    assert result.segment == k == (4 if every == 4 else 6)
    bound = (math.ceil(longest / k) if longest > k else 1) + min(k, longest) + 2
    assert result.max_states_held <= bound
    assert result.max_states_held < T / 2
    # the same gradients whatever the checkpointing
    again = metagradients(replay, final_measurement(replay, task, query), n_query=3, segment=T)
    assert torch.allclose(result.grads, again.grads, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("every", [4, 1000])
def test_holding_the_segments_graphs_gives_the_same_metagradient(tmp_path, data, every):
    train, query = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    recording = record(tmp_path, "adam", True, train, task, epochs=4, every=every)
    replay = Replay(make_model(True), task, recording, train)
    measure = final_measurement(replay, task, query)
    rebuilt = metagradients(replay, measure, n_query=3, segment=3)
    per_step = graph_bytes(replay)
    assert per_step > replay.initial().nbytes()  # a graph holds at least the step's output state
    held = metagradients(replay, measure, n_query=3, segment=3, graph_budget=3 * per_step)
    assert not rebuilt.info["held_graphs"] and held.info["held_graphs"]
    assert held.info["graph_bytes_per_step"] == per_step
    assert held.max_states_held == rebuilt.max_states_held
    assert torch.allclose(held.grads, rebuilt.grads, rtol=1e-10, atol=1e-13)
    too_small = metagradients(replay, measure, n_query=3, segment=3, graph_budget=3 * per_step - 1)
    assert not too_small.info["held_graphs"]


def test_metagradient_attributor_scores_are_minus_the_derivative_and_match_removal(tmp_path, data):
    train, query = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    recording = record(tmp_path, "sgd", False, train, task)
    attributor = Metagradient(make_model(False), task, recording, progress=False, query_batch_size=2).fit(
        train
    )
    scores = attributor.score(query)
    assert scores.values.shape == (3, N)
    replay = attributor.replay_
    grads = metagradients(replay, final_measurement(replay, task, query), n_query=3).grads
    assert torch.allclose(scores.values, -grads, rtol=1e-10, atol=1e-14)
    meta = scores.metadata
    assert meta["estimator"] == "Metagradient" and meta["reverse_passes"] == 2
    assert meta["held_graphs"] and meta["graph_bytes_per_step"] > 0  # a tiny run's graphs fit the budget
    json.dumps(meta)
    rebuilt = Metagradient(make_model(False), task, recording, progress=False, hold_graphs=False).fit(train)
    again = rebuilt.score(query)
    assert not again.metadata["held_graphs"] and again.metadata["graph_bytes_per_step"] is None
    assert torch.allclose(again.values, scores.values, rtol=1e-10, atol=1e-14)
    # first order: the score predicts the change when one example is dropped from the run (weight 0)
    with torch.no_grad():
        measure = final_measurement(replay, task, query)
        base = measure(replay.run(replay.initial(), replay.n_steps))
        for i in (3, 11):
            w = torch.ones(N, dtype=torch.float64)
            w[i] = 0
            actual = measure(replay.run(replay.initial(), replay.n_steps, w)) - base
            assert torch.allclose(scores.values[:, i], actual, rtol=0.1, atol=2e-4)
    model = attributor.fitted_model
    assert not model.training
    saved = replay.saved(replay.n_steps)
    assert torch.equal(dict(model.named_parameters())["0.weight"].detach(), saved.params["0.weight"])


def test_verify_checks_a_metagradient_against_replays_of_its_recorded_run(tmp_path, data):
    train, query = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    recording = record(tmp_path, "sgd", False, train, task)
    attributor = Metagradient(make_model(False), task, recording, progress=False).fit(train)
    check = verify(attributor, train, None, query, n_retrains=10, progress=False)
    assert check.method == "single-model" and check.n_retrains == 10
    truth = retrain.single_model_subsets(
        make_model(False),
        task,
        recording,
        train,
        retrain.evaluator(task, query),
        n_subsets=10,
        fraction=0.9,
        progress=False,
    )
    assert np.array_equal(check.truth.masks, truth.masks) and np.allclose(check.truth.outputs, truth.outputs)
    assert (~truth.masks).sum(axis=1).tolist() == [round(0.1 * N)] * 10
    scores = attributor.score(query).values.numpy()
    assert check.agreement["lds"] == pytest.approx(
        float(metrics.lds(scores, truth.masks, truth.outputs).mean)
    )
    # a smooth float64 SGD run is linear in its data at this scale: the scores are right in their units (with
    # Adam the same run's actual changes are about 1.45x the predicted ones: still within the verdict's range)
    assert check.agreement["lds"] > 0.95 and 0.9 < check.agreement["calibration_slope"] < 1.15
    assert check.verdict == "trustworthy"
    for value, verdict in ((0.5, "use rankings only"), (0.1, "not trustworthy here")):
        said, why = _single_model_verdict({"lds": value, "calibration_slope": 1.0})
        assert said == verdict and "BatchNorm" in why
    assert _single_model_verdict({"lds": 0.95, "calibration_slope": 3.0})[0] == "use rankings only"
    json.dumps(check.to_dict())
    with pytest.raises(ValueError, match="train_fn"):
        verify(attributor, train, None, query, method="subsets", progress=False)
    influence = datatrace.InfluenceFunction(make_model(False), task, progress=False).fit(train)
    with pytest.raises(ValueError, match="recorded run"):
        verify(influence, train, None, query, method="single-model", progress=False)


def test_single_model_subsets_are_replays_without_the_removed_examples(tmp_path, data):
    train, query = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    recording = record(tmp_path, "adam", True, train, task)
    evaluate = retrain.evaluator(task, query)
    result = retrain.single_model_subsets(
        make_model(True), task, recording, train, evaluate, n_subsets=4, fraction=0.75, progress=False
    )
    assert result.outputs.shape == (4, 1, 3) and result.masks.shape == (4, N)
    assert (result.masks.sum(1) == 18).all()
    # the same masks as subsets() draws with the same random_state
    plain = retrain.subsets(
        lambda d: object(), train, lambda m: np.zeros(3), n_subsets=4, fraction=0.75, progress=False
    )
    assert np.array_equal(plain.masks, result.masks)
    replay = Replay(make_model(True), task, recording, train)
    w = torch.as_tensor(result.masks[2], dtype=torch.float64)
    expected = evaluate(replay.model_at(replay.run(replay.initial(), replay.n_steps, w)))
    assert np.allclose(result.outputs[2, 0], expected)
    scores = Metagradient(make_model(True), task, recording, progress=False).fit(train).score(query)
    lds = metrics.lds(scores.values.numpy(), result.masks, result.outputs)
    assert np.isfinite(lds.mean)


def test_recorder_iterates_a_dataloader_and_fit_minibatch_records(tmp_path, data):
    (X, y), _ = data
    task = datatrace.ClassificationTask()
    model = make_model(False)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    dataset = TensorDataset(X, y)
    loader = DataLoader(dataset, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3))
    recorder = Recorder(tmp_path / "loop", model, opt, checkpoint_every=3)
    seen = []
    for batch in recorder.iterate(loader):
        seen.append(batch[0])
        loss = task.loss(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    recording = recorder.finish()
    assert recording.n_train == N and recording.n_steps == len(seen) == 5
    for step, inputs in zip(recording.steps, seen):
        assert torch.equal(X[step.indices], inputs)
    assert int(recording.examples_per_step().sum()) == N
    Replay(make_model(False), task, recording, loader).check(
        Replay(make_model(False), task, recording, loader).run(recording.state(0), 5), recording.state(5)
    )
    # fit_minibatch's record_to: the recording replays to the returned model
    trained = fit_minibatch(
        make_model(True), task, (X, y), epochs=2, batch_size=8, seed=0, record_to=tmp_path / "fm"
    )
    replay = Replay(make_model(True), task, Recording(tmp_path / "fm"), (X, y))
    final = replay.run(replay.initial(), replay.n_steps)
    for name, p in trained.named_parameters():
        assert torch.allclose(final.params[name], p, atol=1e-12)


def test_refusals_name_the_problem(tmp_path, data):
    train, _ = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    model = make_model(False)
    with pytest.raises(ValueError, match="optimizer"):
        Recorder(tmp_path / "a", model, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="amsgrad"):
        Recorder(tmp_path / "b", model, torch.optim.Adam(model.parameters(), amsgrad=True))
    # an interrupted run (no finish) is refused, never read as a whole one
    recorder = Recorder(tmp_path / "c", model, torch.optim.SGD(model.parameters(), lr=0.1), n_train=N)
    recorder.begin_step([0, 1])
    with pytest.raises(ValueError, match="complete recording"):
        Recording(tmp_path / "c")
    with pytest.raises(ValueError, match="indices"):
        recorder.begin_step([N])
    with pytest.raises(ValueError, match="already holds"):
        Recorder(tmp_path / "c", model, torch.optim.SGD(model.parameters(), lr=0.1))
    # a tampered state file is detected
    recording = record(tmp_path / "d", "sgd", False, train, task)
    with pytest.raises(ValueError, match="hold_graphs"):
        Metagradient(model, task, recording, hold_graphs="yes")
    path = tmp_path / "d" / "state-00000004.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptedError, match="sha256"):
        recording.state(4)
    # a loop that did something the replay does not (gradient clipping) is caught against the checkpoints
    X, y = train
    model = make_model(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    recorder = Recorder(tmp_path / "e", model, opt, n_train=N, checkpoint_every=2)
    clipped_loop(recorder, model, opt, task, train, range(0, N, BATCH), 1e-3)  # the recorder is not told
    clipped = recorder.finish()
    with pytest.raises(ReplayMismatchError, match="max_grad_norm"):
        Metagradient(make_model(False), task, clipped, progress=False).fit(train).score(data[1])
    with pytest.raises(ValueError, match="examples"):
        Replay(make_model(False), task, clipped, (X[:5], y[:5]))


def test_recorded_gradient_clipping_is_replayed_and_differentiated(tmp_path, data):
    (X, y), query = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    model = make_model(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    recorder = Recorder(tmp_path, model, opt, n_train=N, checkpoint_every=3, max_grad_norm=0.05)
    grad_norms = []
    hook = model[0].weight.register_hook(lambda g: grad_norms.append(float(g.norm())))
    clipped_loop(recorder, model, opt, task, (X, y), [0, 8, 16, 4, 12], 0.05)
    hook.remove()
    assert min(grad_norms) > 0.05  # clipping was active on every step
    replay = Replay(make_model(True), task, recorder.finish(), (X, y))
    measure = final_measurement(replay, task, query)
    result = metagradients(replay, measure, n_query=3)
    assert result.replay_error < 1e-12

    assert_finite_differences(replay, measure, result.grads, (2, 13))


def test_recorded_tracin_equals_its_formula_from_the_run(tmp_path, data):
    """Every step's rows are P^T grad l_i(theta_t) at that step's parameters; the scores are sum_t (lr_t/B)
    P^T grad f_q(theta_c(t)) . row, checked against gradients recomputed from the replayed states."""
    from datatrace.attributors.tracin_recorded import RecordedTracIn
    from datatrace.gradients.functional import FunctionalModel
    from datatrace.projection.random import RandomProjector

    (X, y), query = data
    task = datatrace.ClassificationTask(weight_decay=DECAY)
    fit_minibatch(make_model(False), task, (X, y), epochs=2, batch_size=8, optimizer="sgd", lr=0.1, seed=0,
                  record_to=tmp_path, checkpoint_every=2, gradient_dim=16)  # fmt: skip
    recording = Recording(tmp_path)
    tracin = RecordedTracIn(make_model(False), task, recording).fit((X, y))
    scores = tracin.score(query).values
    replay = tracin.replay_
    expected = torch.zeros(3, N, dtype=torch.float64)
    state = replay.initial()
    for t, step in enumerate(recording.steps):
        anchor = max(c for c in recording.checkpoint_steps if c <= t)
        fq = FunctionalModel(replay.model_at(replay.saved(anchor)), task)
        ft = FunctionalModel(replay.model_at(state), task)
        proj = RandomProjector(dim=16, random_state=0).fit(ft, n_points=N)
        q = proj.project(fq.per_example_measurement_grads(query))
        rows = proj.project(ft.per_example_grads((X[step.indices], y[step.indices])))
        expected[:, step.indices] += step.hyper[0]["lr"] / len(step.indices) * (q @ rows.T)
        state = replay.step(state, t)[0].detached()
    assert torch.allclose(scores, expected, rtol=1e-8, atol=1e-12)
    own = tracin.self_influence()
    assert own.shape == (N,) and bool((own > 0).all())
    with pytest.raises(ValueError, match="per-step gradients"):
        RecordedTracIn(make_model(False), task, record(tmp_path / "plain", "sgd", False, (X, y), task))


def test_a_loader_with_its_own_collate_fn_is_recorded_and_replayed(tmp_path):
    """Variable-length token sequences padded per batch by the loader's collate_fn (the Hugging Face form)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 6, (N,), generator=g)
    sequences = [torch.randint(1, 10, (int(k),), generator=g) for k in lengths]
    labels = [int(s.sum()) % 2 for s in sequences]

    class Sequences(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": sequences[i], "labels": labels[i]}

    def pad(items: list[dict]) -> dict:
        ids = nn.utils.rnn.pad_sequence([it["input_ids"] for it in items], batch_first=True)
        return {"input_ids": ids, "labels": torch.tensor([it["labels"] for it in items])}

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(10, 4, padding_idx=0)
            self.head = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids).sum(1))

    task = datatrace.ClassificationTask(input_key="input_ids")
    loader = DataLoader(Sequences(), batch_size=6, shuffle=True, collate_fn=pad)
    model = Bag().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorder = Recorder(tmp_path, model, opt, checkpoint_every=3)
    for _ in range(2):
        for batch in recorder.iterate(loader):
            loss = task.loss(model, batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    recording = recorder.finish()
    query = DataLoader(torch.utils.data.Subset(Sequences(), [0, 1, 2]), batch_size=3, collate_fn=pad)
    attributor = Metagradient(Bag().double(), task, recording, progress=False).fit(loader)
    scores = attributor.score(query)
    assert scores.values.shape == (3, N) and bool(torch.isfinite(scores.values).all())
    assert attributor.last_run_["replay_relative_error"] < 1e-12  # replayed with the loader's padding
    # the loader's own collate_fn is needed: the plain dataset cannot be stacked
    with pytest.raises(ValueError, match="pad"):
        Metagradient(Bag().double(), task, recording, progress=False).fit(Sequences()).score(query)


def test_iterating_a_loader_over_another_dataset_is_refused(tmp_path, data):
    (X, y), _ = data
    model = make_model(False)
    recorder = Recorder(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), n_train=N + 1)
    with pytest.raises(ValueError, match="n_train"):
        next(iter(recorder.iterate(DataLoader(TensorDataset(X, y), batch_size=4))))
