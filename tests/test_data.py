import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import wspace as ws


def test_mnist1d_shapes_and_cache(tmp_path):
    ds = ws.data.load("mnist1d", cache_dir=str(tmp_path))
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10 and ds.input_shape == (40,)
    assert os.path.exists(tmp_path / "mnist1d_v1.npz")
    again = ws.data.load("mnist1d", cache_dir=str(tmp_path))  # from the cache
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    default = ws.data.load("mnist1d")  # generation is deterministic: same arrays elsewhere
    np.testing.assert_array_equal(ds.x_test, default.x_test)


def test_digits():
    ds = ws.data.load("digits")
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(30, 5)),
        "y_train": rng.integers(0, 3, 30),
        "x_test": rng.normal(size=(10, 5)),
        "y_test": rng.integers(0, 3, 10),
    }
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    ds = ws.data.load(f"npz:{path}")
    np.testing.assert_allclose(ds.x_train, arrays["x_train"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.num_classes == int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1


def test_npz_errors(tmp_path):
    bad_keys = tmp_path / "bad.npz"
    np.savez(bad_keys, x_train=np.zeros((3, 2)), y_train=np.zeros(3))
    with pytest.raises(ValueError, match="lacks keys.*x_test"):
        ws.data.load(f"npz:{bad_keys}")
    not_zip = tmp_path / "junk.npz"
    not_zip.write_text("not an npz")
    with pytest.raises(ValueError, match="cannot read"):
        ws.data.load(f"npz:{not_zip}")
    ragged = tmp_path / "ragged.npz"
    np.savez(
        ragged,
        x_train=np.zeros((3, 2)),
        y_train=np.zeros(4),
        x_test=np.zeros((1, 2)),
        y_test=np.zeros(1),
    )
    with pytest.raises(ValueError, match="x_train has 3 rows"):
        ws.data.load(f"npz:{ragged}")
    with pytest.raises(ValueError, match="not found"):
        ws.data.load(f"npz:{tmp_path / 'missing.npz'}")


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'nope_xyz'.*mnist1d.*digits.*npz"):
        ws.data.load("nope_xyz")


def test_tfds_unprepared_offline_names_data_dir(tmp_path):
    with pytest.raises(ValueError, match=f"not prepared in data_dir='{tmp_path}'.*download=True"):
        ws.data.load("mnist", data_dir=str(tmp_path))


def test_tfds_path_with_mock_data():
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = ws.data.load("mnist")
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (12, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() <= 1.0  # uint8 scaled
    assert ds.num_classes == 10


def test_batches_deterministic_and_complete():
    x, y = np.arange(100).reshape(50, 2), np.arange(50)
    a = list(ws.data.batches(x, y, 8, seed=3, epochs=2))
    b = list(ws.data.batches(x, y, 8, seed=3, epochs=2))
    c = list(ws.data.batches(x, y, 8, seed=4, epochs=1))
    assert len(a) == 2 * (50 // 8)  # drop_remainder
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u["x"], v["x"])
    assert not np.array_equal(a[0]["y"], c[0]["y"])
    seen = np.concatenate([bt["y"] for bt in a[: 50 // 8]])
    assert len(set(seen)) == len(seen) == 48  # an epoch never repeats an example
    np.testing.assert_array_equal(a[0]["x"][:, 0] // 2, a[0]["y"])  # x and y stay paired
    tail = list(ws.data.batches(x, y, 8, shuffle=False, drop_remainder=False))
    assert len(tail) == 7 and len(tail[-1]["y"]) == 2


def test_batches_split_over_processes():
    x, y = np.arange(64).reshape(32, 2), np.arange(32)
    full = list(ws.data.batches(x, y, 16, seed=1))
    parts = [
        list(ws.data.batches(x, y, 16, seed=1, process_index=i, process_count=4)) for i in range(4)
    ]
    for k, batch in enumerate(full):
        joined = np.concatenate([parts[i][k]["y"] for i in range(4)])
        np.testing.assert_array_equal(joined, batch["y"])
    with pytest.raises(ValueError, match="not divisible"):
        next(ws.data.batches(x, y, 10, process_count=4))
    with pytest.raises(ValueError, match="batch_size must be in"):
        next(ws.data.batches(x, y, 0))


def test_atomic_open_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    with ws.data.atomic_open(str(path)) as f:
        f.write("old")
    with pytest.raises(RuntimeError), ws.data.atomic_open(str(path)) as f:
        f.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp left
