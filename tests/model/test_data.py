import numpy as np
import pytest

from model.data import Batches, open_rows


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
