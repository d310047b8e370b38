"""DDP shares of the calibration samples: step k of every rank is a part of the same global batch."""

from __future__ import annotations

import pytest

from clip_prune.data.sampling import PADDING, rank_share


@pytest.mark.parametrize(("num_samples", "batch_size", "world_size"), [(8, 4, 2), (9, 4, 2), (11, 4, 2), (10, 3, 4),
                                                                      (1, 2, 3)])
def test_ranks_split_each_global_batch_and_run_equally_many_steps(num_samples, batch_size, world_size) -> None:
    shares = [rank_share(num_samples, batch_size, world_size, rank) for rank in range(world_size)]
    steps = [[share[k:k + batch_size] for k in range(0, len(share), batch_size)] for share in shares]
    assert len({len(rank_steps) for rank_steps in steps}) == 1, "every rank must run the same number of steps"
    global_batch = batch_size * world_size
    for k in range(len(steps[0])):
        together = sorted(i for rank_steps in steps for i in rank_steps[k] if i != PADDING)
        assert together == list(range(k * global_batch, min((k + 1) * global_batch, num_samples)))
    real = [i for share in shares for i in share if i != PADDING]
    assert sorted(real) == list(range(num_samples))
