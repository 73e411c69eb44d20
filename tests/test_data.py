import functools
import importlib.machinery
import os
import socket
import subprocess
import sys
import warnings
import zipfile

import jax
import numpy as np
import optax
import pytest

import wspace as ws
from tests.helpers import ROOT


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
    with pytest.raises(ValueError, match="junk.npz' is not an npz archive"):
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


def _write_npz(path, **overrides) -> str:
    """A valid small set (3 classes, 5 features), with some arrays replaced; returns its name."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(12, 5)),
        "y_train": np.arange(12) % 3,
        "x_test": rng.normal(size=(4, 5)),
        "y_test": np.arange(4) % 3,
        **overrides,
    }
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_uint8_images_scaled_to_unit_interval(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (12, 4, 4, 1), dtype=np.uint8)
    x[0, 0, 0, 0], x[0, 0, 1, 0] = 0, 255
    ds = ws.data.load(_write_npz(tmp_path / "u8.npz", x_train=x, x_test=x[:4]))
    assert ds.x_train.dtype == np.float32 and ds.x_train.min() == 0 and ds.x_train.max() == 1
    np.testing.assert_array_equal(ds.x_train, x.astype(np.float32) / np.float32(255))
    counts = np.arange(60).reshape(12, 5)  # other integer inputs keep their values
    ds = ws.data.load(_write_npz(tmp_path / "i64.npz", x_train=counts, x_test=counts[:4]))
    np.testing.assert_array_equal(ds.x_train, counts.astype(np.float32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"y_train": np.arange(12) % 3 * 1.0},
            r"y_train has dtype float64; labels must be integer",
        ),
        ({"y_test": np.array([0, 1, -1, 2])}, r"y_test\[2\] = -1 is not a class id in \[0, 3\)"),
        (
            {"y_train": np.r_[np.arange(11) % 3, 999]},
            r"labels run up to 999.*996 class ids never occur in y_train \(e.g. \[3, 4, 5, 6,",
        ),
        (  # a stated class count: ids must lie below it
            {"y_test": np.array([0, 1, 999, 2]), "num_classes": np.array(10)},
            r"y_test\[2\] = 999 is not a class id in \[0, 10\) \(1 out of range\)",
        ),
        ({"num_classes": np.array(2.5)}, r"num_classes must be a scalar integer"),
        ({"x_test": np.array([[0.0] * 5, [0.0] * 5, [np.nan] * 5, [0.0] * 5])}, r"x_test has non-"),
        (
            {"x_train": np.full((12, 5), np.inf)},
            r"x_train has non-finite.*12 examples, the first at index 0;",
        ),
        ({"x_test": np.zeros((0, 5)), "y_test": np.zeros(0, int)}, r"the test split is empty"),
        ({"x_test": np.zeros((4, 6))}, r"test examples have shape \(6,\) but train .* \(5,\)"),
    ],
    ids=[
        "float",
        "negative",
        "stray_999",
        "above_num_classes",
        "bad_num_classes",
        "nan_x_test",
        "inf_x_train",
        "empty_test",
        "test_width",
    ],
)
def test_npz_validation_names_file_and_value(tmp_path, overrides, message):
    name = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(ValueError, match=message) as err:
        ws.data.load(name)
    assert str(tmp_path / "bad.npz") in str(err.value) and "\n" not in str(err.value)


def test_npz_num_classes_key_allows_absent_classes(tmp_path):
    ds = ws.data.load(_write_npz(tmp_path / "k.npz", num_classes=np.array(10)))
    assert ds.num_classes == 10  # classes 3..9 never occur, as stated


def test_dataset_validates_direct_construction():
    x, y = np.zeros((4, 2), np.float32), np.array([0, 1, 2, 1], np.int32)
    assert ws.data.Dataset("toy", x, y, x, y, 3).num_classes == 3
    with pytest.raises(ValueError, match=r"dataset 'toy': y_train\[2\] = 2 is not a class id in"):
        ws.data.Dataset("toy", x, y, x, y, 2)
    with pytest.raises(ValueError, match="y_train has dtype float32"):
        ws.data.Dataset("toy", x, y.astype(np.float32), x, y, 3)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        ws.data.Dataset("toy", x, y, x, y, 0)
    with pytest.raises(ValueError, match=r"y_train has shape \(3,\) for 4 examples"):
        ws.data.Dataset("toy", x, y[:3], x, y, 3)


def _fake_mnist1d():
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(20, 40)),
        "y_train": np.arange(20) % 10,
        "x_test": rng.normal(size=(10, 40)),
        "y_test": np.arange(10),
    }


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing_key"])
def test_corrupt_mnist1d_cache_is_regenerated_with_a_warning(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(ws.data, "_generate_mnist1d", _fake_mnist1d)  # fast stand-in
    path = tmp_path / "mnist1d_v1.npz"
    good = ws.data.load("mnist1d", cache_dir=str(tmp_path))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    else:
        with zipfile.ZipFile(path) as z:
            kept = {n: z.read(n) for n in z.namelist() if n != "y_test.npy"}
        with zipfile.ZipFile(path, "w") as z:
            for n, data in kept.items():
                z.writestr(n, data)
    with pytest.warns(UserWarning, match=f"mnist1d cache {path} is corrupt.*regenerating"):
        again = ws.data.load("mnist1d", cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again.x_test, good.x_test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cache is whole again: read without a warning
        np.testing.assert_array_equal(
            ws.data.load("mnist1d", cache_dir=str(tmp_path)).y_test, good.y_test
        )


def test_unknown_name_lists_known_ones():
    # With tensorflow-datasets: "unknown dataset"; without it: "not one of ... not installed".
    with pytest.raises(ValueError, match="'nope_xyz'.*mnist1d.*digits.*npz"):
        ws.data.load("nope_xyz")


# --- tensorflow-datasets: tiny builders prepared offline (tfds imported lazily) ----------------


@functools.cache
def _tiny_builders() -> dict:
    """Registers three tiny TFDS builders (once per process); returns {name: class}.

    ``wspace_tiny_digits``: 8x8x1 ``pixels`` and a 3-class ``digit``, declared as
    ``supervised_keys``; ``wspace_tiny_images``: the same data as ``image``/``label``
    without supervised_keys; ``wspace_tiny_unlabelled``: features ``a``/``b`` only.
    20 train and 5 test examples, generated from seeds (no download).
    """
    tfds = pytest.importorskip("tensorflow_datasets")

    def make(class_name, x_key, y_key, supervised):
        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        x_key: tfds.features.Image(shape=(8, 8, 1)),
                        y_key: tfds.features.ClassLabel(num_classes=3),
                    }
                ),
                supervised_keys=(x_key, y_key) if supervised else None,
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

        def _generate_examples(self, split):
            for i, (x, y) in enumerate(zip(*_tiny_examples(split), strict=True)):
                yield i, {x_key: x, y_key: int(y)}

        body = {
            "VERSION": tfds.core.Version("1.0.0"),
            "_info": _info,
            "_split_generators": _split_generators,
            "_generate_examples": _generate_examples,
        }
        return type(class_name, (tfds.core.GeneratorBasedBuilder,), body)

    classes = [
        make("WspaceTinyDigits", "pixels", "digit", True),
        make("WspaceTinyImages", "image", "label", False),
        make("WspaceTinyUnlabelled", "a", "b", False),
    ]
    return {c.name: c for c in classes}


class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    """The standard path finder, blind to ``tensorflow``: as if it were not installed."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return super().find_spec(name, path, target)


def _meta_path_without_tensorflow() -> list:
    """``sys.meta_path`` under which ``import tensorflow`` fails and ``find_spec`` gives None."""
    finder = importlib.machinery.PathFinder
    return [_PathFinderWithoutTensorFlow if f is finder else f for f in sys.meta_path]


def _tiny_examples(split: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images with both 0 and 255 present, labels 0, 1, 2, 0, ... (20 train / 5 test)."""
    n = (20, 5)[split]
    x = np.random.default_rng(split).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    x[0, 0, 0, 0], x[0, 0, 1, 0] = 0, 255
    return x, np.arange(n) % 3


def _check_tiny(ds, name):
    """Shapes, exact 1/255 scaling and labels of a loaded tiny set (TFDS shuffles the order)."""
    assert ds.name == name and ds.num_classes == 3
    assert ds.x_train.shape == (20, 8, 8, 1) and ds.x_test.shape == (5, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    for split, (x, y) in enumerate([(ds.x_train, ds.y_train), (ds.x_test, ds.y_test)]):
        x_ref, y_ref = _tiny_examples(split)
        label_of = {xi.tobytes(): yi for xi, yi in zip(x_ref, y_ref, strict=True)}
        pixels = np.round(x * 255).astype(np.uint8)
        np.testing.assert_array_equal(x, pixels.astype(np.float32) / np.float32(255))
        assert sorted(label_of) == sorted(p.tobytes() for p in pixels)  # every example, once
        assert [label_of[p.tobytes()] for p in pixels] == y.tolist()  # labels stay paired


def test_tfds_builder_prepared_offline_and_trained_on(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")  # preparing encodes with TF: the `prepare` extra, in `dev`
    _tiny_builders()
    monkeypatch.setattr(ws.data, "_READ_CHUNK", 3)  # several chunks (the last one short)...
    monkeypatch.setattr(ws.data, "_READ_THREADS", 2)  # ...read by two threads, kept in order
    ds = ws.data.load("wspace_tiny_digits", data_dir=str(tmp_path), download=True)
    _check_tiny(ds, "wspace_tiny_digits")  # keys from supervised_keys: pixels / digit
    written = os.listdir(tmp_path / "wspace_tiny_digits" / "1.0.0")
    assert any(".array_record-" in f for f in written), written
    again = ws.data.load("wspace_tiny_digits", data_dir=str(tmp_path))  # prepared: just read
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    import tensorflow_datasets as tfds

    source = tfds.data_source("wspace_tiny_digits", split="train", data_dir=str(tmp_path))
    one_by_one = np.stack([source[i]["pixels"] for i in range(len(source))])  # stored order
    np.testing.assert_array_equal(np.round(ds.x_train * 255).astype(np.uint8), one_by_one)

    model = ws.models.ConvNet(channels=(4,), num_classes=ds.num_classes)
    tx = optax.sgd(0.1)
    state = ws.training.init_state(model, tx, ds.x_train[:2], jax.random.PRNGKey(0))
    before = jax.tree.map(np.asarray, state.params)
    step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx)
    state, metrics = step(state, {"x": ds.x_train[:8], "y": ds.y_train[:8]})
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, before)
    assert all(jax.tree.leaves(moved))

    # Reading needs no TensorFlow: a fresh process where `import tensorflow` fails, and
    # where the builder's code is not even defined (TFDS reads the prepared files);
    # download=True on a prepared set prepares nothing, so it needs none either.
    code = (
        "import sys\n"
        "from tests.test_data import _meta_path_without_tensorflow\n"
        "sys.meta_path = _meta_path_without_tensorflow()\n"
        "import wspace as ws\n"
        f"ds = ws.data.load('wspace_tiny_digits', data_dir={str(tmp_path)!r}, download=True)\n"
        "print(ds.x_train.shape, ds.num_classes, float(ds.x_train.max()))"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "(20, 8, 8, 1) 3 1.0"


def test_tfds_set_prepared_as_tfrecord_says_how_to_reprepare(tmp_path):
    pytest.importorskip("tensorflow")
    builder = _tiny_builders()["wspace_tiny_images"](data_dir=str(tmp_path))
    builder.download_and_prepare()  # TFDS's default format: TFRecord, as `tfds build` writes it
    with pytest.raises(ValueError) as err:
        ws.data.load("wspace_tiny_images", data_dir=str(tmp_path), download=True)
    message = str(err.value)
    assert "prepared as ['tfrecord']" in message and "file_format=array_record" in message
    assert "--file_format=array_record" in message and f"delete {builder.data_dir}" in message
    # Following the message works (and reads the default image/label keys):
    import shutil

    shutil.rmtree(builder.data_dir)
    ds = ws.data.load("wspace_tiny_images", data_dir=str(tmp_path), download=True)
    _check_tiny(ds, "wspace_tiny_images")


def test_tfds_download_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
    _tiny_builders()
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    monkeypatch.setattr(sys, "meta_path", _meta_path_without_tensorflow())
    with pytest.raises(ValueError) as err:
        ws.data.load("wspace_tiny_digits", data_dir=str(tmp_path), download=True)
    message = str(err.value)
    assert "needs TensorFlow" in message and 'pip install "wspace[prepare]"' in message
    assert "\n" not in message
    assert not (tmp_path / "wspace_tiny_digits").exists()  # nothing prepared or written


def test_tfds_without_supervised_keys_lists_the_features(tmp_path):
    _tiny_builders()
    with pytest.raises(ValueError, match=r"no \(input, label\) supervised_keys.*\['a', 'b'\]"):
        ws.data.load("wspace_tiny_unlabelled", data_dir=str(tmp_path))


def test_tfds_unprepared_offline_names_data_dir_and_array_record(tmp_path):
    _tiny_builders()
    with pytest.raises(ValueError) as err:
        ws.data.load("wspace_tiny_digits", data_dir=str(tmp_path))
    message = str(err.value)
    assert f"not prepared in data_dir='{tmp_path}'" in message and "download=True" in message
    assert f"tfds build wspace_tiny_digits --data_dir={tmp_path} --file_format=array_record" in (
        message
    )


# --- a real TFDS builder (cifar10) up to its download, with the network cut -------------------


def test_real_tfds_builder_loads_its_download_urls(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    url_infos = tfds.builder(
        "cifar10", data_dir=str(tmp_path)
    ).url_infos  # needs importlib_resources
    assert [url.rsplit("/", 1)[-1] for url in url_infos] == ["cifar-10-binary.tar.gz"]


def test_real_tfds_download_offline_fails_on_the_network(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")  # preparing encodes with TF: the `prepare` extra, in `dev`
    from tensorflow_datasets.core.download import downloader

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # offline even where CI has a network
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS retries 10 times with backoff (~3 min)
    with pytest.raises(OSError) as err:
        ws.data.load("cifar10", download=True, data_dir=str(tmp_path))
    message = str(err.value)
    assert message.startswith("could not download tensorflow-datasets set 'cifar10' into ")
    assert f"data_dir={str(tmp_path)!r}" in message and "ConnectionError" in message
    assert "\n" not in message


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


def test_gaussian_batches_moments_restart_and_seed_axis():
    std = np.sqrt(1.0 / np.arange(1, 5)).astype(np.float32)
    stream = ws.data.GaussianBatches(1.0, std, batch_size=4000, seed=3)
    first = next(iter(stream))["x"]
    assert first.shape == (4000, 4) and first.dtype == np.float32
    assert np.all(np.abs(first.mean(0) - 1.0) < 4 * std / np.sqrt(4000))  # 4 standard errors
    np.testing.assert_allclose(first.std(0), std, rtol=0.05)
    np.testing.assert_array_equal(next(iter(stream))["x"], first)  # iter() restarts
    both = iter(ws.data.GaussianBatches(1.0, std, batch_size=4000, seed=[5, 3]))
    for _ in range(2):  # a seed among several draws its own stream: seed 3 alone
        x = next(both)["x"]
        assert x.shape == (2, 4000, 4)
    alone = iter(stream)
    next(alone)
    np.testing.assert_array_equal(x[1], next(alone)["x"])
    for bad in (dict(batch_size=0), dict(std=-std), dict(mean=np.nan)):
        with pytest.raises(ValueError, match="batch_size|std|mean"):
            ws.data.GaussianBatches(**{"mean": 1.0, "std": std, "batch_size": 2, **bad})


def test_two_moons_is_the_standardised_toy():
    x, y = ws.data.two_moons(41, seed=3)
    assert x.shape == (41, 2) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(y, np.arange(41) % 2)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(x.std(0), 1, rtol=1e-5)
    again, _ = ws.data.two_moons(41, seed=3)
    np.testing.assert_array_equal(x, again)  # a seed gives the same points
    assert not np.array_equal(x, ws.data.two_moons(41, seed=4)[0])
    # without jitter: class 0 on the upper unit half circle about (0, 0), class 1 on the
    # lower one about (0.5, 0.5), then standardised
    raw, y = ws.data.two_moons(400, noise=0.0)
    t = np.random.default_rng(0).uniform(0, np.pi, 400)
    centre = np.where(y[:, None] == 0, [0.0, 0.0], [0.5, 0.5])
    moons = centre + (1 - 2 * y)[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    np.testing.assert_allclose(raw, (moons - moons.mean(0)) / moons.std(0), atol=1e-5)
    for bad in (dict(n=1), dict(n=2.5), dict(n=10, noise=-0.1)):
        with pytest.raises(ValueError, match="two_moons"):
            ws.data.two_moons(**bad)


def test_seed_batches_stack_each_seeds_own_order():
    x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10)
    stream = ws.data.seed_batches(x, y, 4, [3, 5], buf=np.zeros((2, 7)))
    for i, alone in enumerate(
        zip(*(ws.data.batches(x, y, 4, seed=s, epochs=None) for s in (3, 5)), strict=True)
    ):
        batch = next(stream)
        for j, b in enumerate(alone):
            np.testing.assert_array_equal(batch["x"][j], b["x"])
            np.testing.assert_array_equal(batch["y"][j], b["y"])
        assert batch["buf"].shape == (2, 7)
        if i == 5:  # past the first epoch (2 batches of 4 from 10 examples)
            break
