"""How long `wspace.data.load` takes to read a prepared CIFAR-sized TFDS set.

  python -m benchmarks.data_load [--data_dir=/tmp/wspace_bench_tfds] [--repeats=3]

Defines a local tensorflow-datasets builder, ``wspace_bench_images``: 50,000
train and 10,000 test random 32x32x3 PNG images with 10 classes (CIFAR-10's
shapes), prepares it once in ``array_record`` format in ``--data_dir`` (this
needs TensorFlow: ``pip install "wspace[prepare]"``; later runs reuse it), then
times ``ws.data.load("wspace_bench_images", data_dir=...)`` ``--repeats``
times and prints the median wall and CPU seconds. Reading needs no TensorFlow.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from absl import app, flags

import wspace as ws

flags.DEFINE_string("data_dir", "/tmp/wspace_bench_tfds", "Where the set is prepared.")
flags.DEFINE_integer("repeats", 3, "Timed loads (median reported).")
flags.DEFINE_integer("num_train", 50_000, "Train examples (only used when preparing).")
flags.DEFINE_integer("num_test", 10_000, "Test examples (only used when preparing).")
FLAGS = flags.FLAGS

NAME = "wspace_bench_images"


def _register_builder():
    """Defines (and so registers with TFDS) the benchmark builder."""
    import tensorflow_datasets as tfds

    class WspaceBenchImages(tfds.core.GeneratorBasedBuilder):
        """Random 32x32x3 images with 10 classes; CIFAR-10's shapes, prepared offline."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(32, 32, 3)),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(0, FLAGS.num_train),
                "test": self._generate_examples(1, FLAGS.num_test),
            }

        def _generate_examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                yield i, {"image": image, "label": int(rng.integers(10))}

    return WspaceBenchImages


def main(argv):
    del argv
    builder_cls = _register_builder()
    builder = builder_cls(data_dir=FLAGS.data_dir, file_format="array_record")
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        t0 = time.perf_counter()
        builder.download_and_prepare(file_format="array_record")
        print(f"prepared {NAME} in {FLAGS.data_dir}: {time.perf_counter() - t0:.1f} s wall")
    walls, cpus = [], []
    for _ in range(FLAGS.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        ds = ws.data.load(NAME, data_dir=FLAGS.data_dir)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    print(
        f"ws.data.load({NAME!r}): train {ds.x_train.shape}, test {ds.x_test.shape}, "
        f"{ds.num_classes} classes; median of {FLAGS.repeats}: "
        f"{statistics.median(walls):.2f} s wall, {statistics.median(cpus):.2f} s CPU "
        f"({os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    app.run(main)
