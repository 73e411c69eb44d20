"""Datasets as numpy arrays, and batch iterators.

`load(name)` returns a `Dataset` of train/test arrays for:

* ``mnist1d`` -- the embedded default, generated offline by the `mnist1d`
  package (Greydanus 2020) and cached as ``.npz``; inputs are (N, 40) signals.
  A cache that cannot be read is regenerated with a warning.
* ``digits`` -- scikit-learn's 8x8 handwritten digits, as (N, 8, 8, 1) images.
* ``npz:PATH`` -- the user's own arrays (keys ``x_train, y_train, x_test, y_test``
  and optionally ``num_classes``).
* any tensorflow-datasets name (``mnist``, ``fashion_mnist``, ``cifar10``...),
  read through ``tfds.data_source`` from ``array_record`` files (no TensorFlow
  needed). Preparing a set once (``download=True``) writes those files and
  needs TensorFlow: ``pip install "wspace[prepare]"``.

Inputs are float32, labels int32. uint8 inputs (images, from TFDS or npz) are
scaled to [0, 1] by 1/255; other inputs keep their values. Every `Dataset` is
validated when built: integer labels in [0, num_classes), finite inputs, and
non-empty train and test splits with the same example shape.

`batches` yields ``{"x": ..., "y": ...}`` dicts: seeded shuffles, a number of
epochs, and per-process sharding for multi-host runs. `two_moons` generates the 2-D
toy of two interleaved half-moons (arrays, for estimator studies on tiny networks).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import os
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from wspace.io import atomic_open  # noqa: F401 -- re-exported: data.atomic_open

EMBEDDED = ("mnist1d", "digits")
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
PREPARE_EXTRA = 'pip install "wspace[prepare]"'
_READ_CHUNK = 1024  # records per batched read from a TFDS data source
_READ_THREADS = min(8, os.cpu_count() or 1)  # threads reading and decoding chunks


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train/test arrays and metadata. ``x`` is float32, ``y`` int32 class ids.

    Validated on construction (`ValueError` naming the dataset, split and value):
    integer labels in ``[0, num_classes)``, finite inputs, non-empty splits,
    and test examples of the train examples' shape.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self):
        _validate(self)

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
      download: let TFDS download and prepare the set (as ``array_record``) if
        it is not prepared yet; needs TensorFlow (``pip install "wspace[prepare]"``).
      cache_dir: where the generated mnist1d arrays are cached
        (default ``$WSPACE_CACHE`` or ``~/.cache/wspace``).

    Returns:
      A validated `Dataset`.

    Raises:
      ValueError: unknown name, malformed npz, invalid labels or inputs, a TFDS
        set that is not prepared (or prepared in a format other than
        ``array_record``), or ``download=True`` without TensorFlow.
      OSError: ``download=True`` and the download fails (no network), naming the
        set and ``data_dir``.
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


@dataclasses.dataclass(frozen=True)
class GaussianBatches:
    """Endless batches ``{"x": mean + std * eps}``, ``eps ~ N(0, I)``; each ``iter()`` restarts.

    E.g. the noisy quadratic problem's per-example minima ``c ~ N(1, diag(h))``
    (``mean=1, std=sqrt(h)``; Schaul et al. 2013, arXiv 1206.1106; Zhang et al. 2019,
    arXiv 1907.04164). Batches have shape ``(batch_size, *std.shape)``, float32, from
    ``numpy.random.default_rng(seed)``. With a list of seeds each seed draws its own
    stream and batches carry a leading seed axis (`wspace.training.fit` with ``seed=[...]``).
    """

    mean: float | np.ndarray
    std: np.ndarray
    batch_size: int
    seed: int | tuple[int, ...] | list[int] = 0

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        std, mean = np.asarray(self.std), np.asarray(self.mean)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std >= 0)):
            raise ValueError(f"mean must be finite and std finite and >= 0, got {mean}, {std}")

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        seeds = [self.seed] if isinstance(self.seed, int) else list(self.seed)
        rngs = [np.random.default_rng(s) for s in seeds]
        shape = (self.batch_size, *np.shape(self.std))
        while True:
            x = np.stack([self.mean + self.std * rng.normal(size=shape) for rng in rngs])
            yield {"x": (x[0] if isinstance(self.seed, int) else x).astype(np.float32)}


def seed_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seeds: list[int], **per_seed: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``{"x", "y"}`` batches with a leading seed axis, for steps with seeds as an axis.

    Seed ``seeds[i]``'s slice is the batch ``batches(x, y, batch_size, seed=seeds[i],
    epochs=None)`` draws (each seed its own data order); every batch also carries the
    ``per_seed`` arrays (leading axis ``len(seeds)``) unchanged, e.g. each seed's buffer.
    """
    streams = [batches(x, y, batch_size, seed=s, epochs=None) for s in seeds]
    for group in zip(*streams, strict=True):
        yield {"x": np.stack([b["x"] for b in group]), "y": np.stack([b["y"] for b in group]),
               **per_seed}  # fmt: skip


def standardize(ds: Dataset) -> Dataset:
    """Returns ``ds`` with inputs shifted and scaled by the train set's mean and std.

    Inputs whose float32 statistics overflow (finite values near 3.4e38) are standardised
    in float64; inputs too large even for that are a `ValueError` naming the overflow.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = ds.x_train.mean(), ds.x_train.std() + 1e-8
        if not (np.isfinite(mean) and np.isfinite(std)):  # a float32 sum overflowed
            x64 = ds.x_train.astype(np.float64)
            mean, std = x64.mean(), x64.std() + 1e-8
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise ValueError(
            f"dataset {ds.name!r}: standardising x_train overflows (largest |x| = "
            f"{float(np.abs(ds.x_train).max()):.3g}); rescale the inputs"
        )
    return dataclasses.replace(
        ds,
        x_train=((ds.x_train - mean) / std).astype(np.float32),
        x_test=((ds.x_test - mean) / std).astype(np.float32),
    )


def two_moons(n: int, *, noise: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half-moons in 2-D, standardised: the classic toy of two classes.

    Point ``i`` has label ``y = i % 2`` and angle ``t ~ U[0, pi]``: class 0 lies on
    ``(cos t, sin t)``, class 1 on ``(0.5 - cos t, 0.5 - sin t)``; Gaussian jitter of sd
    ``noise`` is added, then each coordinate is standardised (mean 0, sd 1).

    Args:
      n: number of points (>= 2; the classes alternate, so they differ by at most one).
      noise: sd of the jitter (>= 0).
      seed: seed of ``numpy.random.default_rng``.

    Returns:
      ``(x, y)``: float32 ``(n, 2)`` inputs and int32 ``(n,)`` labels in {0, 1}.
    """
    if not isinstance(n, int | np.integer) or n < 2:
        raise ValueError(f"two_moons needs an int n >= 2, got {n!r}")
    if not 0 <= noise < np.inf:
        raise ValueError(f"two_moons needs a finite noise >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = rng.uniform(0, np.pi, n)
    x = np.stack(
        [np.cos(t) + y * (1 - 2 * np.cos(t)) - 0.5 * y, np.sin(t) * (1 - 2 * y) + 0.5 * y], 1
    )
    x = x + noise * rng.normal(size=x.shape)
    x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float32), y.astype(np.int32)


def cache_root(path: str | None = None) -> str:
    """The library's cache folder (generated data, compiled programs).

    ``path`` if given, else ``$WSPACE_CACHE/wspace``, else ``~/.cache/wspace``.
    """
    default = os.environ.get("WSPACE_CACHE", os.path.join(os.path.expanduser("~"), ".cache"))
    return path or os.path.join(default, "wspace")


def _load_mnist1d(cache_dir: str | None) -> Dataset:
    path = os.path.join(cache_root(cache_dir), "mnist1d_v1.npz")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return _from_arrays("mnist1d", {k: f[k] for k in _NPZ_KEYS})
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as e:
            warnings.warn(
                f"mnist1d cache {path} is corrupt ({type(e).__name__}: {e}); regenerating it",
                stacklevel=3,
            )
    arrays = _generate_mnist1d()
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: kwargs vs allow_pickle
    return _from_arrays("mnist1d", arrays)


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """The mnist1d package's default set (deterministic: the package seeds with 42)."""
    from mnist1d.data import get_dataset_args, make_dataset

    raw = make_dataset(get_dataset_args())
    x_train, y_train, x_test, y_test = raw["x"], raw["y"], raw["x_test"], raw["y_test"]
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


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
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):  # np.load would try it as pickled data
        raise ValueError(
            f"{path!r} is not an npz archive (a zip of .npy arrays, as np.savez writes); it "
            f"starts with {head!r}; save the arrays with np.savez(path, x_train=..., ...)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in (*_NPZ_KEYS, "num_classes") if k in f.files}
            present = sorted(f.files)
    except (OSError, EOFError, ValueError, AttributeError, zipfile.BadZipFile, zlib.error) as e:
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
    num_classes = arrays.pop("num_classes", None)
    if num_classes is not None:
        if num_classes.shape != () or not np.issubdtype(num_classes.dtype, np.integer):
            raise ValueError(
                f"npz file {path!r}: num_classes must be a scalar integer, got {num_classes!r}"
            )
        num_classes = int(num_classes)
    return _from_arrays(f"npz:{path}", arrays, num_classes)


def _import_tfds(name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError(
            f"dataset {name!r} is not one of {list(EMBEDDED)} or 'npz:PATH'; other names are "
            f"tensorflow-datasets sets, and tensorflow-datasets is not installed "
            f"(pip install tensorflow-datasets)"
        ) from e
    return tfds


def _require_tensorflow(name: str) -> None:
    """Preparing a TFDS set encodes its features with TensorFlow; reading does not."""
    try:
        found = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(
            f"preparing tensorflow-datasets set {name!r} (download=True) needs TensorFlow, "
            f"which is not installed: {PREPARE_EXTRA} (reading a prepared set does not need it)"
        )


def _tfds_keys(name: str, info) -> tuple[str, str]:
    """Input and label feature names: the builder's ``supervised_keys``, else image/label."""
    keys = info.supervised_keys
    if keys is not None and len(keys) >= 2 and all(isinstance(k, str) for k in keys[:2]):
        return keys[0], keys[1]
    features = list(info.features.keys()) if info.features is not None else []
    if "image" in features and "label" in features:
        return "image", "label"
    raise ValueError(
        f"tensorflow-datasets set {name!r} has no (input, label) supervised_keys "
        f"(got {keys!r}) and no 'image'/'label' features; its features are {features}"
    )


def _prepare_hint(name: str, data_dir: str) -> str:
    return (
        f"run `wspace.data.load({name!r}, download=True, data_dir={data_dir!r})` once on a "
        f"machine with internet and TensorFlow ({PREPARE_EXTRA}), or "
        f"`tfds build {name} --data_dir={data_dir} --file_format=array_record` (the tfds "
        f"command line also needs apache-beam)"
    )


def _load_tfds(name: str, *, data_dir: str | None, download: bool) -> Dataset:
    tfds = _import_tfds(name)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"unknown dataset {name!r}: use one of {list(EMBEDDED)}, 'npz:PATH', "
            f"or a tensorflow-datasets name (e.g. 'mnist', 'fashion_mnist', 'cifar10')"
        ) from None  # tfds's own message lists its whole catalogue (hundreds of lines)
    x_key, y_key = _tfds_keys(name, builder.info)
    root = str(builder.data_dir_root)
    if download and not builder.is_prepared():
        _require_tensorflow(name)
        _download_and_prepare(builder, name, root)
    if builder.is_prepared():
        formats = {f.value for f in builder.info.available_file_formats()}
        if not formats & {"array_record", "parquet"}:
            raise ValueError(
                f"tensorflow-datasets set {name!r} in {builder.data_dir} is prepared as "
                f"{sorted(formats)}, which wspace cannot read (it reads random-access "
                f"file_format=array_record, without TensorFlow). Re-prepare it as "
                f"array_record: delete {builder.data_dir}, then " + _prepare_hint(name, root)
            )
        missing = [s for s in ("train", "test") if s not in builder.info.splits]
        if missing:
            raise ValueError(
                f"tensorflow-datasets set {name!r} has no {missing} split; it has "
                f"{sorted(builder.info.splits)}, wspace needs 'train' and 'test'"
            )
    arrays = {}
    for split in ("train", "test"):
        try:
            source = builder.as_data_source(split=split)
        except Exception as e:  # tfds raises assorted errors for missing files
            if builder.is_prepared():
                raise
            raise ValueError(
                f"tensorflow-datasets set {name!r} is not prepared in data_dir={root!r}: "
                + _prepare_hint(name, root)
                + ", then pass that data_dir."
            ) from e
        arrays[f"x_{split}"], arrays[f"y_{split}"] = _read_source(source, x_key, y_key)
    num_classes = getattr(builder.info.features[y_key], "num_classes", None)
    return _from_arrays(name, arrays, num_classes)


def _download_and_prepare(builder, name: str, root: str) -> None:
    """Downloads and prepares a TFDS set as array_record; a failed download is one clear line."""
    try:
        builder.download_and_prepare(file_format="array_record")
    except OSError as e:  # requests' and urllib's network errors are OSErrors
        cause = str(e).splitlines()[0] if str(e) else ""
        raise OSError(
            f"could not download tensorflow-datasets set {name!r} into data_dir={root!r} "
            f"({type(e).__name__}: {cause[:200]}); check the network, or prepare the set on a "
            f"machine with internet and copy its data_dir here"
        ) from e


def _read_source(source, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole random-access source in batched ``__getitems__`` calls.

    Chunks of `_READ_CHUNK` records are read and decoded by up to `_READ_THREADS`
    threads (image decoding releases the GIL) and copied in order into one array.
    """
    n = len(source)

    def read(start):
        records = source.__getitems__(range(start, min(start + _READ_CHUNK, n)))
        return start, np.stack([r[x_key] for r in records]), np.asarray([r[y_key] for r in records])

    starts = range(0, n, _READ_CHUNK)
    x: Any = None  # allocated when the first chunk shows shape and dtype
    y: Any = None
    with concurrent.futures.ThreadPoolExecutor(max(1, min(_READ_THREADS, len(starts)))) as pool:
        for start, xs, ys in pool.map(read, starts):
            if x is None:
                x = np.empty((n, *xs.shape[1:]), xs.dtype)
                y = np.empty((n, *ys.shape[1:]), ys.dtype)
            x[start : start + len(xs)] = xs
            y[start : start + len(ys)] = ys
    if x is None:  # an empty split; `Dataset` names it
        return np.zeros((0,), np.float32), np.zeros((0,), np.int32)
    return x, y


def _to_float32(x: np.ndarray) -> np.ndarray:
    """uint8 inputs (images) scaled to [0, 1] by 1/255; any other dtype keeps its values."""
    if x.dtype == np.uint8:
        x = x.astype(np.float32)
        x /= np.float32(255)  # in place: no float64 copy of a whole image set
        return x
    return x.astype(np.float32, copy=False)


def _from_arrays(name: str, a: dict[str, np.ndarray], num_classes: int | None = None) -> Dataset:
    for split in ("train", "test"):
        y = a[f"y_{split}"]
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"dataset {name!r}: y_{split} has dtype {y.dtype}; labels must be integer "
                f"class ids (e.g. y.astype(int) if they are whole numbers)"
            )
    y_train, y_test = a["y_train"], a["y_test"]
    labels = np.concatenate([y_train.ravel(), y_test.ravel()])
    if num_classes is None and y_train.size:  # else `_validate` names the empty split
        lo, hi = int(labels.min()), int(labels.max())
        num_classes = max(hi, 0) + 1  # a negative label is named by `_validate`
        absent = np.setdiff1d(np.arange(num_classes), y_train)
        if lo >= 0 and len(absent):
            raise ValueError(
                f"dataset {name!r}: labels run up to {hi}, so the class count would be "
                f"{num_classes}, but {len(absent)} class ids never occur in y_train (e.g. "
                f"{absent[:5].tolist()}); fix the stray label {hi} or state the class count "
                f"(an npz file's `num_classes` key)"
            )
    return Dataset(
        name=name,
        x_train=_to_float32(a["x_train"]),
        y_train=_to_int32(y_train),
        x_test=_to_float32(a["x_test"]),
        y_test=_to_int32(y_test),
        num_classes=num_classes if num_classes is not None else 1,
    )


def _to_int32(y: np.ndarray) -> np.ndarray:
    """Integer labels as int32; out-of-range ids are left for `_validate` to name."""
    if y.size and (y.min() < np.iinfo(np.int32).min or y.max() > np.iinfo(np.int32).max):
        return y.astype(np.int64)
    return y.astype(np.int32, copy=False)


def _all_finite(x: np.ndarray) -> bool:
    if not np.issubdtype(x.dtype, np.inexact):
        return True
    # Fast path: a float64 sum is finite iff no entry is NaN or inf, unless the sum overflows
    # (only float64 inputs near 1e308 can), and then the entries are checked one by one.
    return bool(np.isfinite(x.sum(dtype=np.float64))) or bool(np.isfinite(x).all())


def _validate(ds: Dataset) -> None:
    """Checks a `Dataset` at the boundary, before any training (see the class docstring)."""
    where = f"dataset {ds.name!r}"
    k = ds.num_classes
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"{where}: num_classes must be an integer >= 1, got {k!r}")
    for split in ("train", "test"):
        x, y = np.asarray(getattr(ds, f"x_{split}")), np.asarray(getattr(ds, f"y_{split}"))
        if x.ndim < 1 or len(x) == 0:
            raise ValueError(f"{where}: the {split} split is empty (x_{split} shape {x.shape})")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{where}: y_{split} has shape {y.shape} for {len(x)} examples; labels must "
                f"be a vector of the same length"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{where}: y_{split} has dtype {y.dtype}; labels must be integer class ids"
            )
        bad = np.flatnonzero((y < 0) | (y >= k))
        if len(bad):
            raise ValueError(
                f"{where}: y_{split}[{bad[0]}] = {y[bad[0]]} is not a class id in [0, {k}) "
                f"({len(bad)} out of range)"
            )
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{where}: x_{split} has dtype {x.dtype}; inputs must be numeric")
        if not _all_finite(x):
            rows = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
            raise ValueError(
                f"{where}: x_{split} has non-finite values (NaN or inf) in {len(rows)} "
                f"examples, the first at index {rows[0]}; inputs must be finite"
            )
    if ds.x_test.shape[1:] != ds.x_train.shape[1:]:
        raise ValueError(
            f"{where}: test examples have shape {tuple(ds.x_test.shape[1:])} but train "
            f"examples have {tuple(ds.x_train.shape[1:])}; they must match"
        )
