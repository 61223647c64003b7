"""Shared plumbing of the multi-process tests: spawn ranks of a gloo group on 127.0.0.1 and collect what they wrote.

A worker module defines a top-level ``run(rank, world_size, port, outdir)`` (picklable, for the ``spawn`` start
method) that calls :func:`run_rank` with its own SPMD program; the test calls :func:`spawn` and then
:func:`load_ranks`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

Program = Callable[[], tuple[dict[str, torch.Tensor], dict]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rank(rank: int, world_size: int, port: int, outdir: str, program: Program) -> None:
    """One rank: join the gloo group, run ``program`` (it returns tensors and JSON facts), write them to
    ``outdir/rank{r}.safetensors`` and ``outdir/rank{r}.json``."""
    torch.set_num_threads(1)
    logging.getLogger("datatrace").setLevel(logging.ERROR)  # not the "not at a minimum" warnings of every fit
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        tensors, facts = program()
        dist.barrier()  # leave together: a rank tearing down while another works can abort inside gloo
    finally:
        dist.destroy_process_group()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(outdir) / f"rank{rank}.safetensors"))
    (Path(outdir) / f"rank{rank}.json").write_text(json.dumps(facts))


def spawn(run: Callable[..., None], world_size: int, outdir: str, deadline_s: float = 120.0) -> None:
    """Start ``world_size`` ranks of ``run`` and wait; fail the test (and stop them) if they hang."""
    ctx = mp.start_processes(
        run, args=(world_size, free_port(), outdir), nprocs=world_size, join=False, start_method="spawn"
    )
    stop = time.monotonic() + deadline_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > stop:
            for process in ctx.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(
                f"the {world_size} gloo ranks did not finish within {deadline_s:.0f} s (a collective hung)"
            )


def load_ranks(outdir: Path, world_size: int) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    tensors = [load_file(str(outdir / f"rank{r}.safetensors")) for r in range(world_size)]
    facts = [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(world_size)]
    return tensors, facts
