"""Worker for test_store_faults.py: one rank of a 2-process gloo group on 127.0.0.1 filling one GradientStore.

First a fill while another live process holds the store's lock (every rank must raise, none hang), then the same
fill once the lock is gone (rank 0 alone takes the lock; the store is complete and the lock given back). Each rank
writes what it saw to ``outdir/rank{r}.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from datatrace.distributed import barrier
from datatrace.projection.lock import LOCK
from datatrace.projection.store import GradientStore

N, DIM, CHUNK = 23, 5, 4


def features() -> torch.Tensor:
    return torch.randn(N, DIM, generator=torch.Generator().manual_seed(0))


def run(rank: int, world_size: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    facts: dict = {}
    try:
        directory = Path(outdir) / "store"
        feats = features()
        store = GradientStore.create(directory, n=N, dim=DIM, chunk_size=CHUNK, fingerprints={"model": "m"})
        lock = directory / LOCK
        if rank == 0:  # held by the test process (alive, on this host)
            lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
        barrier()
        try:
            store.fill(lambda a, b: feats[a:b], progress=False)
            facts["held"] = "filled"
        except Exception as err:
            facts["held"] = f"{type(err).__name__}: {err}"
        if rank == 0:
            lock.unlink()
        barrier()
        store.fill(lambda a, b: feats[a:b], progress=False)
        facts["complete"] = store.complete
        facts["equal"] = bool(torch.equal(store.to_tensor(), feats))
        barrier()
        facts["lock_left"] = lock.exists()
        barrier()  # leave together: a rank tearing down while another works can abort inside gloo
    finally:
        dist.destroy_process_group()
    (Path(outdir) / f"rank{rank}.json").write_text(json.dumps(facts))
