"""Per-case results of every DDP process, each case counted once."""

from __future__ import annotations

import torch.distributed as dist


def gather_cases(rows: list[dict]) -> list[dict]:
    """All processes' per-case rows, each case once, in case-id order.

    A DistributedSampler pads the last batches with repeated cases so every process gets the
    same number; averaging those would weight some cases twice. Rows are therefore gathered as
    objects and deduplicated by ``case_id`` (the last seen wins). Under DDP every process must
    call this (it is a collective); in a single process it only sorts and deduplicates.

    Args:
        rows: this process's rows, each a dict with a ``case_id`` and per-class values.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    unique = {row["case_id"]: row for row in rows}
    return [unique[key] for key in sorted(unique)]
