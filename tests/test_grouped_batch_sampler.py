import numpy as np
import pytest

from grouped_batch_sampler import GroupedBatchSampler


def lengths(n: int = 103, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 60, size=n)


def test_every_index_once_per_epoch():
    sampler = GroupedBatchSampler(lengths(), 8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 13
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    assert sum(len(b) < 8 for b in batches) == 1


def test_drop_last_and_cap():
    assert len(GroupedBatchSampler(lengths(), 8, drop_last=True)) == 12
    assert all(len(b) == 8 for b in GroupedBatchSampler(lengths(), 8, drop_last=True))
    capped = GroupedBatchSampler(lengths(), 8, num_batches=5)
    assert len(list(capped)) == 5
    with pytest.raises(ValueError, match="num_batches"):
        GroupedBatchSampler(lengths(), 8, num_batches=14)


def test_grouping_reduces_padding():
    lens = lengths(2000)

    def padding(group: bool) -> int:
        sampler = GroupedBatchSampler(lens, 16, group_by_size=group, seed=3)
        return sum(int(lens[b].max()) * len(b) - int(lens[b].sum()) for b in sampler)

    assert padding(True) < 0.1 * padding(False)
    spans = [np.ptp(lens[b] // 4) for b in GroupedBatchSampler(lens, 16, seed=3)]
    assert np.mean(np.array(spans) <= 1) > 0.9


def test_order_depends_on_seed_and_epoch_only():
    a, b = GroupedBatchSampler(lengths(), 8, seed=5), GroupedBatchSampler(lengths(), 8, seed=5)
    first = [x.tolist() for x in a]
    assert first == [x.tolist() for x in b]
    a.set_epoch(1)
    assert [x.tolist() for x in a] != first
    assert [x.tolist() for x in GroupedBatchSampler(lengths(), 8, seed=6)] != first


def test_resume_mid_epoch_yields_the_rest():
    full = GroupedBatchSampler(lengths(), 8, seed=2)
    full.set_epoch(3)
    expected = [x.tolist() for x in full]
    interrupted = GroupedBatchSampler(lengths(), 8, seed=2)
    interrupted.set_epoch(3)
    it = iter(interrupted)
    seen = [next(it).tolist() for _ in range(4)]
    state = interrupted.state_dict()
    assert state == {"epoch": 3, "batches_done": 4}
    restored = GroupedBatchSampler(lengths(), 8, seed=2)
    restored.load_state_dict(state)
    assert seen + [x.tolist() for x in restored] == expected
    with pytest.raises(ValueError, match="data changed"):
        restored.load_state_dict({"epoch": 0, "batches_done": 99})
