"""A Hugging Face Trainer run recorded with ``datatrace.hf_trainer.record_trainer``.

Oracle: the recording is complete only if a replay of it, from the first saved state, with the Trainer's data
order, seeds (hidden dropout), linear warm-up schedule, AdamW parameter groups and gradient clipping, reaches the
Trainer's own final parameters (relative error at float32 rounding).
"""

from __future__ import annotations

import pytest
import torch

import datatrace

transformers = pytest.importorskip("transformers")

from datatrace.hf import SequenceClassificationTask  # noqa: E402
from datatrace.hf_trainer import record_trainer, replay_data  # noqa: E402
from datatrace.run.replay import Replay  # noqa: E402

N, LENGTH, BATCH, EPOCHS = 24, 8, 5, 3


def _config():
    return transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.1,
    )


def _train_set():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (N, LENGTH), generator=g)
    labels = (ids[:, 0] > 30).long()
    mask = torch.ones(LENGTH, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(N)]


def _trainer(tmp_path, **overrides):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config())
    settings = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": BATCH,
        "num_train_epochs": EPOCHS,
        "learning_rate": 5e-3,
        "weight_decay": 0.01,
        "warmup_steps": 2,
        "max_grad_norm": 1.0,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "seed": 3,
        "disable_tqdm": True,
        **overrides,
    }
    args = transformers.TrainingArguments(**settings)
    return transformers.Trainer(model=model, args=args, train_dataset=_train_set())


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trainer")
    trainer = _trainer(tmp_path)
    callback = record_trainer(trainer, tmp_path / "run", checkpoint_every=4)
    trainer.train()
    return trainer, callback.recording


def test_the_recorded_trainer_run_replays_to_its_final_parameters(recorded):
    trainer, recording = recorded
    steps_per_epoch = -(-N // BATCH)
    assert recording.n_steps == steps_per_epoch * EPOCHS
    for epoch in range(EPOCHS):  # each epoch's minibatches are a permutation of the training set
        rows = recording.steps[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
        assert sorted(torch.cat([s.indices for s in rows]).tolist()) == list(range(N))
    lrs = [s.hyper[0]["lr"] for s in recording.steps]
    assert (
        lrs[0] == 0.0 and max(lrs) == pytest.approx(5e-3) and lrs[-1] < lrs[2]
    )  # warm-up, then linear decay
    assert [g["weight_decay"] for g in recording.steps[0].hyper] == [0.01, 0.0]  # the Trainer's two groups
    assert recording.max_grad_norm == 1.0
    torch.manual_seed(0)
    replay = Replay(
        transformers.BertForSequenceClassification(_config()),
        SequenceClassificationTask(),
        recording,
        replay_data(trainer),
    )
    final = replay.run(replay.initial(), replay.n_steps)
    assert replay.check(final, replay.saved(replay.n_steps)) < 1e-5
    trained = dict(trainer.model.named_parameters())
    for name, value in final.params.items():
        torch.testing.assert_close(value, trained[name].detach(), rtol=1e-4, atol=1e-5)


def test_metagradient_scores_the_recorded_trainer_run(recorded):
    trainer, recording = recorded
    query = replay_data(trainer).collate_fn(_train_set()[:3])
    scores = datatrace.Metagradient(
        transformers.BertForSequenceClassification(_config()),
        SequenceClassificationTask(),
        recording,
        progress=False,
    ).fit(replay_data(trainer))
    values = scores.score(query).values
    assert values.shape == (3, N) and bool(torch.isfinite(values).all()) and float(values.abs().max()) > 0


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"gradient_accumulation_steps": 2}, "args.gradient_accumulation_steps"),
        ({"label_smoothing_factor": 0.1}, "args.label_smoothing_factor"),
    ],
)
def test_settings_a_replay_cannot_follow_are_refused_by_name(tmp_path, override, name):
    with pytest.raises(ValueError, match=rf"{name}=.*Fix: train with"):
        record_trainer(_trainer(tmp_path, **override), tmp_path / "run")
