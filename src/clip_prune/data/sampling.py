"""Calibration samples split across DDP ranks so that the ranks' batches together form one process's batches.

With a loss that couples the samples of a batch (CLIP's in-batch negatives), the Fisher statistics
of W processes equal one process's at batch W·B only if step k of every rank holds a share of the
same global batch, samples kW·B to (k+1)W·B − 1, and every rank runs the same number of steps
(the ranks exchange embeddings at each step). A rank whose share of the last, short global batch
is empty gets one padding item instead (index `PADDING`), which the loss and the statistics leave out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler

PADDING = -1
"""Dataset index of a padding item: `ImageItems` serves its last item with `index` −1."""


def rank_share(num_samples: int, batch_size: int, world_size: int, rank: int) -> list[int]:
    """This rank's sample indices, in order: B per global batch of W·B, and `PADDING` for an empty share."""
    global_batch = batch_size * world_size
    indices: list[int] = []
    for start in range(0, num_samples, global_batch):
        share = list(range(start + rank, min(start + global_batch, num_samples), world_size))
        indices += share or [PADDING]
    return indices


class GlobalBatchSampler(DistributedSampler):
    """A DistributedSampler (so Lightning leaves it in place) that yields `rank_share` for its rank.

    Args:
        dataset: the calibration items.
        batch_size: the per-rank batch size B of the DataLoader it feeds.
        num_replicas: the number of ranks W.
        rank: this rank.
    """

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = rank_share(len(dataset), batch_size, num_replicas, rank)
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples
