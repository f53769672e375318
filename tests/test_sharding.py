"""Data sharding over processes: every row once per epoch, equal micro-batch counts, the 1-process batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from alignkit.data.batches import micro_batches, tail_rows
from alignkit.training.backend import Backend
from alignkit.training.data_order import describe_tail, step_stream

COMBOS = [(rows, batch, world) for rows in (1, 2, 3, 5, 7, 8, 16, 17, 23) for batch in (1, 2, 3, 4)
          for world in (1, 2, 3, 4)]


@pytest.mark.parametrize("rows, batch, world", COMBOS)
def test_ranks_cover_the_epoch_once_with_equal_micro_batch_counts(rows, batch, world):
    data = list(range(rows))
    shards = [micro_batches(data, batch, seed=3, epoch=1, rank=r, world_size=world) for r in range(world)]
    taken = [row for shard in shards for micro in shard for row in micro]
    assert sorted(taken) == data  # the union is the epoch, and no row appears twice
    assert len({len(shard) for shard in shards}) == 1
    assert all(len(micro) <= batch for shard in shards for micro in shard)
    # global batch k of the processes == batch k of one process with batch × world rows
    single = micro_batches(data, batch * world, seed=3, epoch=1)
    assert [sorted(row for shard in shards for row in shard[k]) for k in range(len(single))] == \
        [sorted(b) for b in single]


def test_a_process_without_rows_in_a_step_gets_one_filler_pass_of_weight_zero():
    cfg = SimpleNamespace(batch_size=2, grad_accum=1, seed=0)
    data = list(range(5))  # global batches of 4: [4 rows], [1 row] → the second process has nothing in step 2
    first, second = (step_stream(data, cfg, 0, 0, rank, 2) for rank in (0, 1))
    steps = [(next(first), next(second)) for _ in range(3)]
    (b0, _, _), (b1, _, _) = steps[1]
    assert sorted([len(b0), len(b1)]) == [0, 1] and len((b0 or b1)[0]) == 1
    assert [s[1:] for pair in steps for s in pair] == [(0, 1), (0, 1), (0, 2), (0, 2), (1, 1), (1, 1)]
    ddp = Backend(SimpleNamespace(distributed_type="MULTI_CPU", num_processes=2))
    assert ddp.equal_passes([], "filler") == [("filler", 0.0)]  # the others wait for its gradients
    assert ddp.equal_passes(["a", "b"], "filler") == [("a", 1.0), ("b", 1.0)]
    alone = Backend(SimpleNamespace(distributed_type="NO", num_processes=1))
    assert alone.equal_passes(["a"], "filler") == [("a", 1.0)]


def test_the_short_last_global_batch_is_stated():
    assert tail_rows(17, 4, 2) == 1 and tail_rows(16, 4, 2) == 0
    assert describe_tail(16, 4, 2) == ""
    assert describe_tail(17, 4, 2).startswith("1 rows of the last partial global batch")
