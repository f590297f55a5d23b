"""Data-parallel fitting on ``torch.distributed``: the process group and its reductions.

A fit launched by ``torchrun --nproc_per_node=N`` (which sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``) joins the process group on its first call to
:func:`setup`: gloo for a flow on the CPU, nccl for one on CUDA (each rank on the GPU
``LOCAL_RANK``). Without those variables everything runs in one process, unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: torch.device, enabled: bool = True) -> tuple[int, int]:
    """Join (or find) the process group; return ``(rank, world_size)``, ``(0, 1)`` alone.

    ``enabled=False``: ``(0, 1)`` whatever the environment or an existing group says.
    """
    if not enabled:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return 0, 1
    # torch._dynamo imported while a process group exists keeps that group alive after
    # destroy_process_group (seen with torch 2.13; torch.optim imports it), so its gloo
    # threads outlive the interpreter and may free a finished collective's tensors during
    # shutdown: an abort ("terminate called without an active exception") in 5 of 78
    # two-process fits. Imported first, the group is torn down with destroy_process_group.
    import torch._dynamo  # noqa: F401

    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def backend() -> str | None:
    """The process group's backend (``"gloo"``, ``"nccl"``), or ``None`` alone."""
    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return None


def _for_group(device: torch.device) -> torch.device:
    """Where the group's collectives take their tensors: this GPU for nccl, else ``device``.

    nccl reduces CUDA tensors only: the small tensors of these helpers go to the GPU, so
    that a CPU flow in an nccl group reaches ``fit``'s refusal, which says what to do.
    """
    if (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_backend() == "nccl"
        and device.type != "cuda"
    ):
        return torch.device("cuda", torch.cuda.current_device())
    return device


def disagreeing(exact: list[float], close: list[float], device: torch.device) -> list[int]:
    """The ranks whose values differ from rank 0's (``[]`` when alone, or all agree).

    ``exact`` must be equal (counts, seeds, digests); ``close`` equal up to a relative
    ``1e-9`` (sums of the data, which another device may round otherwise). Every rank
    gets the same answer, so all of them can raise, none left waiting.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    device = _for_group(device)
    mine = torch.tensor([*exact, *close], dtype=torch.float64, device=device)
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    n = len(exact)
    same = torch.equal(mine[:n], theirs[:n]) and bool(
        torch.isclose(mine[n:], theirs[n:], rtol=1e-9, atol=0.0).all()
    )
    flags = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    flags[dist.get_rank()] = float(not same)
    dist.all_reduce(flags)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag > 0]


def is_main() -> bool:
    """Whether this process is rank 0 (or alone): the one that writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def sum_all(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over every rank (float64); the values themselves when alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_for_group(device))
    dist.all_reduce(tensor)
    return tensor.tolist()


class PendingFlags:
    """Flags being or-ed over every rank in the background; :meth:`wait` gives them."""

    def __init__(self, flags: list[bool], device: torch.device) -> None:
        self._tensor = torch.tensor([float(f) for f in flags], device=_for_group(device))
        self._work = None
        if dist.is_available() and dist.is_initialized():
            self._work = dist.all_reduce(self._tensor, async_op=True)

    def wait(self) -> list[bool]:
        """Block until every rank has contributed; the or of each flag."""
        if self._work is not None:
            self._work.wait()
        return [value > 0 for value in self._tensor.tolist()]


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (``value`` itself when alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_for_group(device))
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def barrier() -> None:
    """Wait for every rank (nothing when alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
