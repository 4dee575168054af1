import numpy as np
import pytest

from model.data import Batches, eval_batches, open_mask, open_rows


def rows(n=40, t=9):
    return np.arange(n * t, dtype=np.uint16).reshape(n, t)


def test_an_epoch_visits_every_row_once_in_a_seeded_order():
    r = rows()
    b = Batches(r, batch_size=4, seed=3)
    seen = np.concatenate([b.indices(k) for k in range(b.per_epoch)])
    assert sorted(seen) == list(range(40))
    again = Batches(r, batch_size=4, seed=3)
    assert all((again.indices(k) == b.indices(k)).all() for k in range(15))
    assert not all((Batches(r, 4, seed=4).indices(k) == b.indices(k)).all() for k in range(5))
    assert not (b.indices(0) == b.indices(b.per_epoch)).all()  # the next epoch is reshuffled


def test_ranks_get_disjoint_slices_of_each_global_batch():
    r = rows()
    slices = [Batches(r, 4, seed=0, rank=k, world=2).indices(5) for k in range(2)]
    assert not set(slices[0]) & set(slices[1]) and len(slices[0]) == len(slices[1]) == 4


def test_targets_are_inputs_shifted_by_one():
    x, y = Batches(rows(), 4, seed=0).get(2)
    assert x.shape == (4, 8) and (x[:, 1:] == y[:, :-1]).all()


def test_loader_memory_maps_the_npy_copy(tmp_path):
    r = rows()
    np.save(tmp_path / "train.npy", r)
    (tmp_path / "train-00000.parquet").write_bytes(b"")  # the loader must not need to read it
    m = open_rows([tmp_path / "train-00000.parquet"])
    assert isinstance(m, np.memmap) and (np.asarray(m) == r).all()


def test_too_few_rows_say_what_to_change():
    with pytest.raises(ValueError, match="micro_batch_size"):
        Batches(rows(3), 4, seed=0)


def sharded(tmp_path, r, sizes=(17, 0, 9, 14), parquet=True, npy=True):
    """r cut into shards of the given sizes, written the way the tokenize stage writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files, at = [], 0
    for i, n in enumerate(sizes):
        part = r[at : at + n]
        at += n
        name = tmp_path / f"train-{i:05d}"
        if npy:
            np.save(f"{name}.npy", part)
            files.append(tmp_path / f"{name.name}.npy")
        if parquet:
            col = pa.FixedSizeListArray.from_arrays(pa.array(part.ravel(), pa.uint16()), r.shape[1])
            pq.write_table(pa.table({"tokens": col}), f"{name}.parquet")
            files.append(tmp_path / f"{name.name}.parquet")
    assert at == len(r)
    return files[::-1]  # the order callers list them in must not matter


def test_rows_over_shard_files_read_like_one_array(tmp_path):
    r = rows()
    s = open_rows(sharded(tmp_path, r))
    assert len(s) == 40 and s.shape == (40, 9) and s.dtype == r.dtype
    assert (np.asarray(s) == r).all()
    for key in (0, 16, 17, 26, 39, -1, slice(10, 30), slice(0, 40), slice(16, 18), slice(5, 35, 3), slice(39, 45),
                np.array([0, 16, 17, 25, 26, 39]), np.array([30, 2, 17])):
        assert (np.asarray(s[key]) == r[key]).all(), key
    assert (s[np.array([3, 20]), 1:] == r[np.array([3, 20]), 1:]).all()
    with pytest.raises(IndexError):
        s[np.array([40])]


def test_batches_and_resume_over_shards_equal_one_array(tmp_path):
    r = rows()
    one, many = Batches(r, 4, seed=7), Batches(open_rows(sharded(tmp_path, r)), 4, seed=7)
    for k in range(2 * one.per_epoch + 3):  # across epochs
        (x1, y1), (x2, y2) = one.get(k), many.get(k)
        assert (one.indices(k) == many.indices(k)).all() and (x1 == x2).all() and (y1 == y2).all()
    resumed = Batches(open_rows(sharded(tmp_path, r)), 4, seed=7)  # a fresh loader at a checkpointed position
    for k in range(13, 20):
        assert (resumed.get(k)[0] == one.get(k)[0]).all()
    evals = list(eval_batches(open_rows(sharded(tmp_path, r)), 6, max_batches=10))
    assert all((a[0] == b[0]).all() for a, b in zip(evals, eval_batches(r, 6, max_batches=10))) and len(evals) == 7


def test_parquet_only_shards_and_per_shard_masks(tmp_path):
    r = rows()
    s = open_rows(sharded(tmp_path, r, npy=False))
    assert len(s) == 40 and (np.asarray(s) == r).all()
    mask = r % 3 == 0
    at = 0
    for i, n in enumerate((17, 0, 9, 14)):
        np.save(tmp_path / f"train-{i:05d}.mask.npy", mask[at : at + n])
        at += n
    got = open_mask(sharded(tmp_path, r))
    assert (np.asarray(got) == mask).all() and (got[np.array([1, 30])] == mask[[1, 30]]).all()


def test_shards_stay_memory_maps(tmp_path):
    s = open_rows(sharded(tmp_path, rows()))
    assert not isinstance(s, np.ndarray) and all(isinstance(p, np.memmap) for p in s.parts if len(p))
