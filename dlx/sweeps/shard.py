"""Splitting a sweep over processes (``accelerate launch -m dlx sweep spec.yaml``).

Each rank takes every ``world``-th unit (the rows of one prompt and seed stay together, so they
still share their guided prefix), writes its rows to its own database ``out/shards/rank-<r>.sqlite``
(images go to the shared ``out/images``, one file per row), and after a barrier rank 0 merges the
shards into ``out/sweep.sqlite``. Ranks are read from accelerate's ``PartialState`` when the
process was launched distributed (``WORLD_SIZE`` > 1), else the sweep is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Ranks", "ranks", "split"]


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    state: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1 and self.state is not None:
            self.state.wait_for_everyone()

    def device(self, dev):
        """A rank's CUDA device: ``cuda`` becomes ``cuda:<local rank>`` when sharded."""
        import torch

        if self.world > 1 and dev is not None and dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.state.local_process_index)
        return dev

    def shard_db(self) -> str:
        return f"shards/rank-{self.rank}.sqlite"


def ranks() -> Ranks:
    """This process's rank and the world size (1 when not launched distributed)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch
    from accelerate import PartialState

    # without CUDA, accelerate's multi-CPU state (gloo) needs cpu=True
    st = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(st.process_index, st.num_processes, st)


def split(units: list, r: Ranks) -> list:
    """This rank's share of the units (round robin)."""
    return units[r.rank::r.world]


def shard_paths(out: Path) -> list[Path]:
    return sorted((Path(out) / "shards").glob("rank-*.sqlite"))
