"""Resuming an interrupted recording: the resumed run is the run that was interrupted, bit for bit.

Oracle: the same script recorded once without interruption. Interrupted at a step between two saved states and
run again with ``resume=True``, it must give the same steps file, the same saved states and final parameters
(exactly: the state is restored from its file and every step redone with the recorded seed), with a per-step
learning-rate scheduler and a per-epoch one, dropout, Adam and per-step gradients.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import datatrace
from datatrace.errors import StoreCorruptedError
from datatrace.run.recording import Recorder, Recording
from datatrace.run.replay import Replay
from datatrace.run.state import load_state


class Interrupted(Exception):
    pass


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g)
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).long()
    return X, y


def _run(folder, stop_at: int | None = None, resume: bool = False, own_generator: bool = True, **kw):
    """The user's script: a fresh model and optimizer, two schedulers, a shuffling loader, 4 epochs x 5 steps."""
    torch.manual_seed(123)
    X, y = _data()
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-3)
    per_step = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.05 * t))
    per_epoch = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    generator = torch.Generator().manual_seed(7) if own_generator else None
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True, generator=generator)
    task = datatrace.ClassificationTask()
    recorder = Recorder(
        folder,
        model,
        opt,
        seed=3,
        checkpoint_every=3,
        task=task,
        gradient_dim=6,
        n_train=40,
        schedulers=[per_step, per_epoch],
        resume=resume,
        **kw,
    )
    for _ in range(4):
        for xb, yb in recorder.iterate(loader):
            if stop_at is not None and recorder.t > stop_at:
                raise Interrupted
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            per_step.step()
        per_epoch.step()
    return recorder.finish(), model


def _check_replay(recording: Recording) -> None:
    """The replay of the whole recording from its first state reaches its final state (ReplayMismatchError if not)."""
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    replay = Replay(model, datatrace.ClassificationTask(), recording, TensorDataset(*_data()))
    final = replay.run(replay.initial(), replay.n_steps)
    assert replay.check(final, replay.saved(replay.n_steps)) < 1e-5


def test_a_resumed_recording_is_the_uninterrupted_one(tmp_path):
    whole, whole_model = _run(tmp_path / "whole")
    with pytest.raises(Interrupted):
        _run(tmp_path / "cut", stop_at=10)  # dies inside step 10, after the state of step 9 was saved
    manifest = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert manifest["complete"] is False and max(int(t) for t in manifest["checkpoints"]) == 9
    with pytest.raises(ValueError, match="a complete recording"):
        Recording(tmp_path / "cut")
    resumed, resumed_model = _run(tmp_path / "cut", resume=True)
    assert (tmp_path / "whole" / "steps.jsonl").read_text() == (tmp_path / "cut" / "steps.jsonl").read_text()
    for p, q in zip(whole_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert whole.checkpoint_steps == resumed.checkpoint_steps
    for t in whole.checkpoint_steps:
        a, b = whole.state(t), resumed.state(t)
        for name in a.params:
            assert torch.equal(a.params[name], b.params[name]), (t, name)
    grads_a = [load_file(str(tmp_path / "whole" / n)) for n in sorted(whole.manifest["gradients"]["files"])]
    grads_b = [load_file(str(tmp_path / "cut" / n)) for n in sorted(resumed.manifest["gradients"]["files"])]
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        assert all(torch.equal(a[k], b[k]) for k in a)
    _check_replay(resumed)


def test_a_loader_without_its_own_generator_is_named_and_the_recording_stays_consistent(tmp_path, caplog):
    with pytest.raises(Interrupted):
        _run(tmp_path / "cut", stop_at=13, own_generator=False)
    with caplog.at_level(logging.WARNING, logger="datatrace.run.recording"):
        resumed, _ = _run(tmp_path / "cut", resume=True, own_generator=False)
    assert any("differs from the recorded one" in r.getMessage() for r in caplog.records)
    assert resumed.n_steps == 20
    _check_replay(resumed)


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    _run(tmp_path / "done")
    with pytest.raises(ValueError, match=r"resume=True.*is complete.*Recording\(folder\)"):
        _run(tmp_path / "done", resume=True)
    with pytest.raises(Interrupted):
        _run(tmp_path / "cut", stop_at=5)
    with pytest.raises(ValueError, match=r"whose seed is 3 \(this Recorder's: 4\)"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
        Recorder(
            tmp_path / "cut",
            model,
            torch.optim.Adam(model.parameters()),
            seed=4,
            checkpoint_every=3,
            resume=True,
        )
    state = tmp_path / "cut" / "state-00000003.safetensors"
    state.write_bytes(state.read_bytes()[:-3] + b"xyz")
    with pytest.raises(StoreCorruptedError, match="does not match its sha256"):
        _run(tmp_path / "cut", resume=True)
    fresh, _ = _run(tmp_path / "new", resume=True)  # nothing to resume: a new recording
    assert fresh.n_steps == 20


def test_a_loop_of_its_own_skips_the_recorded_steps_and_gets_the_saved_state(tmp_path):
    with pytest.raises(Interrupted):
        _run(tmp_path / "cut", stop_at=4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    recorder = Recorder(
        tmp_path / "cut",
        model,
        torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-3),
        seed=3,
        checkpoint_every=3,
        resume=True,
        n_train=40,
        task=datatrace.ClassificationTask(),
        gradient_dim=6,
    )
    assert recorder.resumed_from == 3 and recorder.t == 3
    X, y = _data()
    recorder.begin_step([0, 1], (X[:2], y[:2]))  # the loop's own step 3: the saved state comes back first
    expected = load_state(tmp_path / "cut" / "state-00000003.safetensors")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), expected.params[name])
    assert recorder.t == 4
