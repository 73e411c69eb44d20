"""Datasets as numpy arrays, and batch iterators.

`load(name)` returns a `Dataset` of train/test arrays for:

* ``mnist1d`` -- the embedded default, generated offline by the `mnist1d`
  package (Greydanus 2020) and cached as ``.npz``; inputs are (N, 40) signals.
* ``digits`` -- scikit-learn's 8x8 handwritten digits, as (N, 8, 8, 1) images.
* ``npz:PATH`` -- the user's own arrays (keys ``x_train, y_train, x_test, y_test``).
* any tensorflow-datasets name (``mnist``, ``fashion_mnist``, ``cifar10``...),
  read through ``tfds.data_source`` (no TensorFlow needed).

Inputs are float32, labels int32. `batches` yields ``{"x": ..., "y": ...}``
dicts: seeded shuffles, a number of epochs, and per-process sharding for
multi-host runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from wspace.io import atomic_open  # noqa: F401 -- re-exported: data.atomic_open

EMBEDDED = ("mnist1d", "digits")
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train/test arrays and metadata. ``x`` is float32, ``y`` int32 class ids."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(40,)`` for mnist1d or ``(28, 28, 1)``."""
        return tuple(self.x_train.shape[1:])


def load(
    name: str = "mnist1d",
    *,
    data_dir: str | None = None,
    download: bool = False,
    cache_dir: str | None = None,
) -> Dataset:
    """Loads a dataset by name as numpy arrays.

    Args:
      name: ``mnist1d``, ``digits``, ``npz:PATH`` or a tensorflow-datasets name.
      data_dir: TFDS data directory (default: TFDS's own, ``~/tensorflow_datasets``).
      download: let TFDS download and prepare the set if it is missing.
      cache_dir: where the generated mnist1d arrays are cached
        (default ``$WSPACE_CACHE`` or ``~/.cache/wspace``).

    Returns:
      A `Dataset`.

    Raises:
      ValueError: unknown name, malformed npz, or a TFDS set that is not prepared.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    if name == "mnist1d":
        return _load_mnist1d(cache_dir)
    if name == "digits":
        return _load_digits()
    if name.startswith("npz:"):
        return _load_npz(name[len("npz:") :])
    return _load_tfds(name, data_dir=data_dir, download=download)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int | None = 1,
    shuffle: bool = True,
    drop_remainder: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{"x", "y"}`` minibatches, reshuffled each epoch.

    Each epoch is a permutation drawn from ``(seed, epoch)``, so a run that
    restarts at epoch e sees the same batches as an uninterrupted one. With
    several processes (multi-host), every process draws the same permutation
    and keeps its own contiguous slice of each global batch: ``batch_size`` is
    the global batch and each process yields ``batch_size // process_count``.

    Args:
      x, y: arrays with the same leading dimension.
      batch_size: global batch size.
      seed: shuffling seed.
      epochs: number of passes; ``None`` for an endless stream.
      shuffle: permute examples each epoch.
      drop_remainder: drop the last incomplete batch (keeps shapes static for jit).
      process_index, process_count: this host's position (``jax.process_index()``,
        ``jax.process_count()``) for multi-host data loading.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y differ in length: {n} vs {len(y)}")
    if batch_size < 1 or (drop_remainder and batch_size > n):
        raise ValueError(f"batch_size must be in [1, {n}] for {n} examples, got {batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by process_count {process_count}"
        )
    local = batch_size // process_count
    epoch = 0
    while epochs is None or epoch < epochs:
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_remainder else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            idx = idx[process_index * local : (process_index + 1) * local]
            yield {"x": x[idx], "y": y[idx]}
        epoch += 1


def standardize(ds: Dataset) -> Dataset:
    """Returns ``ds`` with inputs shifted and scaled by the train set's mean and std."""
    mean, std = ds.x_train.mean(), ds.x_train.std() + 1e-8
    return dataclasses.replace(
        ds,
        x_train=((ds.x_train - mean) / std).astype(np.float32),
        x_test=((ds.x_test - mean) / std).astype(np.float32),
    )


def _cache_dir(cache_dir: str | None) -> str:
    default = os.environ.get("WSPACE_CACHE", os.path.join(os.path.expanduser("~"), ".cache"))
    return cache_dir or os.path.join(default, "wspace")


def _load_mnist1d(cache_dir: str | None) -> Dataset:
    path = os.path.join(_cache_dir(cache_dir), "mnist1d_v1.npz")
    if not os.path.exists(path):
        from mnist1d.data import get_dataset_args, make_dataset

        raw = make_dataset(get_dataset_args())  # deterministic: the package seeds with 42
        with atomic_open(path, "wb") as f:
            np.savez(
                f, x_train=raw["x"], y_train=raw["y"], x_test=raw["x_test"], y_test=raw["y_test"]
            )
    with np.load(path) as f:
        arrays = {k: f[k] for k in _NPZ_KEYS}
    return _from_arrays("mnist1d", arrays)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target
    order = np.random.default_rng(0).permutation(len(x))  # fixed split: 1437 train, 360 test
    train, test = order[:1437], order[1437:]
    return _from_arrays(
        "digits", {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}
    )


def _load_npz(path: str) -> Dataset:
    if not os.path.exists(path):
        raise ValueError(f"npz file not found: {path!r}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _NPZ_KEYS if k in f.files}
            present = sorted(f.files)
    except (OSError, EOFError, ValueError, AttributeError) as e:  # not an npz archive
        raise ValueError(f"cannot read {path!r} as an npz file: {e}") from e
    missing = [k for k in _NPZ_KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"npz file {path!r} lacks keys {missing}; it has {present}, needs {list(_NPZ_KEYS)}"
        )
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny or arrays[f"y_{split}"].ndim != 1:
            raise ValueError(
                f"npz file {path!r}: x_{split} has {nx} rows but y_{split} has shape "
                f"{arrays[f'y_{split}'].shape}; labels must be a vector of the same length"
            )
    return _from_arrays(f"npz:{path}", arrays)


def _load_tfds(name: str, *, data_dir: str | None, download: bool) -> Dataset:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises its own DatasetNotFoundError subclasses
        raise ValueError(
            f"unknown dataset {name!r}: use one of {list(EMBEDDED)}, 'npz:PATH', "
            f"or a tensorflow-datasets name (e.g. 'mnist', 'fashion_mnist', 'cifar10')"
        ) from e
    if download:
        builder.download_and_prepare()
    arrays = {}
    for split in ("train", "test"):
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise ValueError(
                f"tensorflow-datasets set {name!r} (split {split!r}) is not prepared in "
                f"data_dir={data_dir or builder.data_dir!r}. On a machine with internet, run "
                f"`wspace.data.load({name!r}, download=True, data_dir=...)` (or "
                f"`tfds build {name} --data_dir=...`) once, then pass that data_dir."
            ) from e
        records = [source[i] for i in range(len(source))]
        arrays[f"x_{split}"] = np.stack([r["image"] for r in records])
        arrays[f"y_{split}"] = np.array([r["label"] for r in records])
    for split in ("train", "test"):
        if arrays[f"x_{split}"].dtype == np.uint8:
            arrays[f"x_{split}"] = arrays[f"x_{split}"] / 255.0
    num_classes = builder.info.features["label"].num_classes
    return _from_arrays(name, arrays, num_classes)


def _from_arrays(name: str, a: dict[str, np.ndarray], num_classes: int | None = None) -> Dataset:
    y_train, y_test = a["y_train"].astype(np.int32), a["y_test"].astype(np.int32)
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(
        name=name,
        x_train=a["x_train"].astype(np.float32),
        y_train=y_train,
        x_test=a["x_test"].astype(np.float32),
        y_test=y_test,
        num_classes=num_classes,
    )
