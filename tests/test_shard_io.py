"""The shard format: round trip, ragged selection, corruption detection, atomic publication."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcore.errors import UserError
from kdcore.shard_io import Block, Shard, ShardSetWriter, open_shards, ragged_take, read_index

FP = {"teacher": "t" * 64, "student": "s" * 64}


def random_block(rng, n, v_t=300, v_s=70000):
    t_len = rng.integers(1, 9, n)
    s_len = rng.integers(1, 12, n)
    return Block(rng.integers(0, v_t, t_len.sum()), t_len, rng.integers(0, v_s, s_len.sum()), s_len)


def write_set(path, blocks, v_t=300, v_s=70000):
    with ShardSetWriter(path, v_t, v_s, FP) as shard_set:
        with shard_set.new_shard() as writer:
            for block in blocks:
                writer.add(block)
        shard_set.close()


def test_round_trip_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    blocks = [random_block(rng, 7), random_block(rng, 5)]
    write_set(tmp_path / "set", blocks)
    (shard,) = open_shards(tmp_path / "set")
    assert shard.ids["teacher"].dtype == np.uint16 and shard.ids["student"].dtype == np.uint32
    assert len(shard) == 12 and read_index(tmp_path / "set")["n_seqs"] == 12
    np.testing.assert_array_equal(shard.ids["teacher"], np.concatenate([b.t_ids for b in blocks]))
    np.testing.assert_array_equal(shard.lengths("student"), np.concatenate([b.s_lengths for b in blocks]))
    part = shard.block(6, 9)
    t_flat = np.concatenate([b.t_ids for b in blocks])
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([b.t_lengths for b in blocks]))])
    np.testing.assert_array_equal(part.t_ids, t_flat[offsets[6]:offsets[9]])
    assert part.t_match is None


def test_ragged_take_matches_python():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 5, 20)
    flat = rng.integers(0, 100, lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    idx = np.array([3, 0, 19, 7, 7])
    got, got_len = ragged_take(flat, offsets, idx)
    want = [x for i in idx for x in flat[offsets[i]:offsets[i + 1]]]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_len, lengths[idx])


def test_match_masks_round_trip(tmp_path):
    write_set(tmp_path / "set", [random_block(np.random.default_rng(2), 4)])
    shard = open_shards(tmp_path / "set")[0]
    t = (np.arange(shard.ids["teacher"].size) % 2).astype(np.uint8)
    s = np.ones(shard.ids["student"].size, np.uint8)
    shard.write_match(t, s)
    again = Shard(shard.dir)
    np.testing.assert_array_equal(again.match["teacher"], t)
    assert again.block(0, 4).s_match.sum() == s.size
    with pytest.raises(ValueError, match="entries"):
        again.write_match(t[:-1], s)


@pytest.mark.parametrize("damage", ["truncate", "offsets", "missing", "big_id", "meta"])
def test_corruption_is_a_one_line_error(tmp_path, damage):
    write_set(tmp_path / "set", [random_block(np.random.default_rng(3), 6)])
    shard_dir = tmp_path / "set" / "shard_00000"
    if damage == "truncate":
        data = (shard_dir / "student_ids.npy").read_bytes()
        (shard_dir / "student_ids.npy").write_bytes(data[:-7])
        culprit = "student_ids.npy"
    elif damage == "offsets":
        off = np.load(shard_dir / "teacher_offsets.npy")
        off[2], off[3] = off[3], off[2] - 1
        np.save(shard_dir / "teacher_offsets.npy", off)
        culprit = "teacher_offsets.npy"
    elif damage == "missing":
        (shard_dir / "teacher_ids.npy").unlink()
        culprit = "teacher_ids.npy"
    elif damage == "big_id":
        meta = json.loads((shard_dir / "shard.json").read_text())
        meta["teacher_vocab_size"] = 5
        (shard_dir / "shard.json").write_text(json.dumps(meta))
        culprit = "teacher_ids.npy"
    else:
        (shard_dir / "shard.json").write_text("{not json")
        culprit = "shard.json"
    with pytest.raises(UserError) as err:
        open_shards(tmp_path / "set")
    message = str(err.value)
    assert culprit in message and "--force" in message and "\n" not in message


def test_failed_writer_leaves_nothing(tmp_path):
    rng = np.random.default_rng(4)
    with pytest.raises(RuntimeError), ShardSetWriter(tmp_path / "set", 300, 300, FP) as shard_set:
        writer = shard_set.new_shard()
        writer.add(random_block(rng, 3, v_s=300))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_out_of_range_ids(tmp_path):
    block = Block(np.array([1, 400]), np.array([2]), np.array([1]), np.array([1]))
    with ShardSetWriter(tmp_path / "set", 300, 300, FP) as shard_set:
        writer = shard_set.new_shard()
        with pytest.raises(ValueError, match="vocabulary size"):
            writer.add(block)
        writer.abort()
        shard_set.abort()
    assert not (tmp_path / "set").exists()
