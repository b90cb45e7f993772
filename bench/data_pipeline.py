"""Data-pipeline benchmark: Lanner's loader against tf.data (`image_dataset_from_directory` +
the seed's Keras augmentation layers) on the same folder of JPEGs, same threads, one run.

    python3 bench/data_pipeline.py [--images 3000] [--workers 2] [--epochs 3]

Needs `cargo build --release` first and `pip install tensorflow-cpu`. Prints images/s for
every configuration and Lanner's ratio to tf.data.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from machine import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANNER = os.path.join(ROOT, "target", "release", "lanner")


def make_data(images):
    out = os.path.join(ROOT, "bench", "work", f"pipeline-{images}")
    train = os.path.join(out, "train")
    if not os.path.isdir(train):
        subprocess.run(["cargo", "run", "--release", "-q", "-p", "lanner-data", "--example", "make_shapes", "--",
                        out, "--per-class", str(images // 2), "--size", "500x375"], check=True, cwd=ROOT)
    return train


def lanner(folder, workers, epochs, augment, cache):
    cmd = [LANNER, "data", folder, "--benchmark", str(epochs), "--workers", str(workers), "--json"]
    if not augment:
        cmd += ["--random-rotation", "0", "--no-flip"]
    if cache:
        cmd.append("--cache")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_second"]


def tfdata(folder, workers, epochs, augment, cache):
    code = f"""
import json, time, tensorflow as tf, keras
tf.config.threading.set_intra_op_parallelism_threads({workers})
tf.config.threading.set_inter_op_parallelism_threads({workers})
ds = keras.utils.image_dataset_from_directory({folder!r}, batch_size=32, image_size=(224, 224),
                                             shuffle=True, seed=1337)
if {cache}:
    ds = ds.cache()
if {augment}:
    aug = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)])
    ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
ds = ds.prefetch(tf.data.AUTOTUNE)
rates = []
for epoch in range({epochs}):
    start = time.perf_counter(); n = 0
    for x, y in ds:
        n += int(x.shape[0])
    rates.append(n / (time.perf_counter() - start))
print(json.dumps(rates))
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    folder = make_data(args.images)
    print(machine())
    print(f"{args.images} JPEGs 500x375 -> batches of 32 at 224x224, {args.workers} threads, {args.epochs} epochs")
    print(f"{'configuration':<34} {'tf.data img/s':>22} {'Lanner img/s':>22} {'ratio':>14}")
    for augment, cache in [(False, False), (False, True), (True, False), (True, True)]:
        name = ("flip+rotation" if augment else "no augmentation") + (", cache" if cache else "")
        tf_rates = tfdata(folder, args.workers, args.epochs, augment, cache)
        ours = lanner(folder, args.workers, args.epochs, augment, cache)
        fmt = lambda rates: " / ".join(f"{r:.0f}" for r in rates)
        ratios = " / ".join(f"{o / t:.1f}x" for o, t in zip(ours, tf_rates))
        print(f"{name:<34} {fmt(tf_rates):>22} {fmt(ours):>22} {ratios:>14}")
    print("(each cell: epoch 1 / epoch 2 / ...; epoch 1 is the first pass over the files)")


if __name__ == "__main__":
    main()
