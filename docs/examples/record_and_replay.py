"""Record your own training loop, then ask which training examples made a test prediction, exactly for that run.

    python docs/examples/record_and_replay.py --out /tmp/dt_run

1. A plain PyTorch loop (DataLoader with shuffling, Adam, a cosine learning-rate schedule, dropout) trains an MLP on
   scikit-learn's digits, wrapped in ``datatrace.Recorder``: it notes each step's examples, seed and learning rate,
   saves a state every ``--checkpoint-every`` steps, and collects 64-dimensional projected per-example gradients.
2. ``datatrace.Metagradient`` differentiates the recorded run and scores every training example for a few test
   images: ``score[q, i] ~`` the change of test image ``q``'s loss if ``i`` were dropped from this very run.
   ``datatrace.RecordedTracIn`` gives the cheap first-order view from the gradients collected during training.
3. The check: the run is replayed without the 10 strongest proponents of the first test image (same order and
   seeds; ``Replay.run`` with their weights set to 0), and the loss change predicted by the sum of their scores is
   printed beside the actual one.

Writes ``results.json`` to ``--out`` (scores' top proponents, timings, the check).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import datatrace
from datatrace.run.replay import Replay


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-query", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=40)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train = TensorDataset(X[: args.n_train], y[: args.n_train])
    query = (X[-args.n_query :], y[-args.n_query :])
    task = datatrace.ClassificationTask(weight_decay=1e-4)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))

    # 1. the user's own loop, recorded
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(train, batch_size=32, shuffle=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))
    recorder = datatrace.Recorder(
        out / "run", model, optimizer, checkpoint_every=args.checkpoint_every, task=task, gradient_dim=64,
        n_train=len(train), overwrite=True,
    )  # fmt: skip
    start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        for batch in recorder.iterate(loader):
            loss = task.loss(model, batch).mean()
            loss = loss + 0.5 * 1e-4 * sum((p * p).sum() for p in model.parameters())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    recording = recorder.finish()
    train_seconds = time.perf_counter() - start

    # 2. exact attribution of this run, and TracIn from the recorded gradients
    start = time.perf_counter()
    metagradient = datatrace.Metagradient(build(), task, recording, progress=False).fit(train)
    scores = metagradient.score(query)
    meta_seconds = time.perf_counter() - start
    tracin = datatrace.RecordedTracIn(build(), task, recording).fit(train).score(query)
    agreement = float(torch.corrcoef(torch.stack([scores.values[0].double(), tracin.values[0]]))[0, 1])

    # 3. replay the run without the 10 strongest proponents of the first query
    top = torch.topk(scores.values[0], 10).indices
    replay = Replay(build(), task, recording, train)
    weights = torch.ones(len(train))
    weights[top] = 0.0
    evaluate = datatrace.retrain.evaluator(task, query)
    base = evaluate(replay.model_at(replay.saved(replay.n_steps)))
    without = evaluate(replay.model_at(replay.run(replay.initial(), replay.n_steps, weights)))
    result = {
        "steps": recording.n_steps,
        "train_seconds": train_seconds,
        "metagradient_seconds": meta_seconds,
        "top_proponents_of_query_0": [int(i) for i in top],
        "their_labels": [int(train[int(i)][1]) for i in top],
        "query_0_label": int(query[1][0]),
        "predicted_loss_change": float(scores.values[0, top].sum()),
        "actual_loss_change": float(without[0] - base[0]),
        "pearson_metagradient_vs_recorded_tracin_query_0": agreement,
        "metadata": scores.metadata,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"{recording.n_steps} recorded steps ({train_seconds:.1f} s); metagradient for {args.n_query} queries "
        f"{meta_seconds:.1f} s. Dropping the 10 strongest proponents of test image 0 (label {result['query_0_label']},"
        f" proponent labels {result['their_labels']}) from the run: loss change predicted "
        f"{result['predicted_loss_change']:+.3f}, actual {result['actual_loss_change']:+.3f}. "
        f"Pearson with TracIn over the recorded steps: {agreement:.2f}."
    )
    return result


if __name__ == "__main__":
    main()
