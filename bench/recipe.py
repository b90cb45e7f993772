"""End-to-end recipe benchmark: the seed's Keras transfer-learning script against `lanner train`
with the same settings, on the same data and the same cores, in one invocation.

    python3 bench/recipe.py --data DIR [--arch mobilenet_v3_large|mobilenet_v3_small_050|xception]
        [--initial-epochs N] [--fine-tune-epochs M] [--fine-tune-layer 100] [--threads 2]
        [--from-scratch] [--image-size S] [--patience 2] [--batch-size 32] [--learning-rate 1e-4]
        [--precision f32|bf16]
        [--lanner target/release/lanner] [--skip-keras | --skip-lanner] [--json OUT]

The README's main job against the same job written in Keras:

    python3 bench/recipe.py --data data/shapes --arch mobilenet_v3_small_050 --from-scratch \
        --image-size 64 --batch-size 16 --initial-epochs 12 --fine-tune-epochs 8 \
        --learning-rate 0.002 --random-rotation 0 --patience 20

DIR holds `train/` and `validation/`, one subfolder per class (two classes). Make it with the
project's generator (outside this script; the benchmark never builds anything):

    cargo build --release -p lanner-data --example make_shapes
    target/release/examples/make_shapes bench/work/shapes --per-class 500 --size 500x375 --seed 1

and `cargo build --release -p lanner` for the Lanner side. Needs tensorflow-cpu (Keras 3). If the
Lanner binary is missing, or `lanner train` fails, the Lanner rows are left out with a message
and the Keras rows are still printed (`--skip-lanner` leaves them out on purpose).

What runs, one after the other, each in its own process:

Keras (the seed): `image_dataset_from_directory(shuffle=True, seed=SEED, batch_size, image_size=(S, S))`
for train and validation, labels cast to float, `.prefetch(AUTOTUNE)`; the model is
RandomFlip("horizontal") -> RandomRotation(R) (reflect, bilinear; training only) ->
[xception.preprocess_input for Xception; MobileNetV3Large has its preprocessing built in] ->
base(training=False, weights=None) -> GlobalAveragePooling2D -> Dropout(D) -> Dense(1), a logit;
BinaryCrossentropy(from_logits=True), BinaryAccuracy(threshold=0). Phase 1: backbone frozen,
Adam(1e-4), `fit(epochs=initial_epochs, class_weight={0: 1, 1: 1})`. Phase 2: backbone trainable
except `base.layers[:fine_tune_layer]`, RMSprop(fine_tune_learning_rate), `fit(initial_epoch=N,
epochs=N+M)` -- exactly M epochs, as Lanner runs exactly M -- with the seed's early stopping: an
epoch is best when val_accuracy beats the best so far and val_accuracy + 0.005 > accuracy; after
2 epochs without a best, stop; the best weights are restored at the end. S = 224 for
MobileNetV3, 299 for Xception unless --image-size says otherwise; initial epochs default to 3 / 5
(the seed's). `mobilenet_v3_small_050` is Keras' `MobileNetV3Small(alpha=0.5)`. Seed SEED (--seed, default 1)
(`keras.utils.set_random_seed`). Threads: TF intra-op = --threads, inter-op = min(2, --threads),
tf.data's private pool = --threads, OMP/MKL_NUM_THREADS = --threads.

With --from-scratch (the README's main job), one phase instead of two, as `lanner train
--from-scratch` runs it: the whole model trains from the first epoch, the backbone called
without `training=False` (so BatchNorm uses and updates the batch's statistics, with Keras'
own BatchNorm momentum, 0.999 in its MobileNetV3), Adam(--learning-rate),
`fit(epochs=initial_epochs + fine_tune_epochs)` under the seed's early stopping with
--patience, the best weights restored. A --random-rotation of 0 leaves the RandomRotation layer
out (Lanner skips the rotation then too). --keras-batch-norm-momentum M sets every Keras
BatchNorm layer's momentum to M: 0.9 is Lanner's (timm's and PyTorch's `momentum=0.1`); with
Keras' 0.999 a short run's running statistics are still mostly their initial values when
validation uses them.

--precision bf16 (a CPU with Intel AMX): Keras under the `mixed_bfloat16` policy (every layer
computes in bf16 with f32 variables; the Dense logit in f32, as Keras' guide advises), Lanner
with `--precision bf16`.

Lanner: `lanner train ... --weights none --seed SEED --overwrite` with the same settings, and
RAYON_NUM_THREADS = OMP_NUM_THREADS = --threads. Its per-epoch rows come from
OUTPUT_DATA_DIR/metrics.jsonl (phase "head" is phase 1; "fine_tune" and "from_scratch" are
phase 2). Model and output folders go to bench/work/recipe-ARCH/ (git-ignored).

Reported per implementation: wall time of phase 1 and phase 2 (Keras: each `fit` call, timed
around it; Lanner: the sum of the per-epoch `seconds`, training + validation), epochs run and
seconds per epoch in each phase, the whole process's wall time (Keras: from interpreter start to
the final evaluation, TF import and dataset listing included; Lanner: the `lanner train`
process), and the final validation accuracy (Keras: `evaluate` on validation after the best
weights are restored; Lanner: "best_epoch" of MODEL_DIR/lanner.json if present, else the epoch
metrics.jsonl's rows pick by the same early-stopping rule -- the last epoch if none qualifies,
as Keras then keeps the last weights). Ratios are Lanner's time over Keras's time: below 1 means
Lanner is faster.

Prints first the machine line from bench/machine.py ("CPU model, N cores, date time, load X"),
then the versions and settings, then the table.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

from machine import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANNER = os.path.join(ROOT, "target", "release", "lanner")

# Lanner's --arch, image size, the seed's initial epochs.
ARCHS = {"mobilenet_v3_large": (224, 3), "mobilenet_v3_small_050": (224, 3), "xception": (299, 5)}
MARGIN = 0.005


def thread_env(threads):
    n = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n,
                TF_NUM_INTRAOP_THREADS=n, TF_NUM_INTEROP_THREADS=str(min(2, threads)),
                RAYON_NUM_THREADS=n, TF_CPP_MIN_LOG_LEVEL="2")


def is_best(val_accuracy, accuracy, best):
    """The seed's early-stopping test for one epoch."""
    return val_accuracy > best and val_accuracy + MARGIN > accuracy


# ---------------------------------------------------------------- Keras, in a child process

def keras_child(args):
    """Runs the seed's recipe; prints one JSON line (the last line of stdout)."""
    import tensorflow as tf
    import keras

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, args.threads))
    keras.utils.set_random_seed(args.seed)
    if args.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    size = args.image_size

    def load(folder):
        ds = keras.utils.image_dataset_from_directory(folder, shuffle=True, seed=args.seed, batch_size=args.batch_size,
                                                      image_size=(size, size))
        if len(ds.class_names) != 2:
            raise SystemExit(f"{folder}: the recipe is binary, found classes {ds.class_names}")
        options = tf.data.Options()
        options.threading.private_threadpool_size = args.threads
        ds = ds.map(lambda x, y: (x, tf.cast(y, tf.float32))).with_options(options)
        return ds.prefetch(tf.data.AUTOTUNE)

    train = load(os.path.join(args.data, "train"))
    val = load(os.path.join(args.data, "validation"))

    shape = (size, size, 3)
    if args.arch == "xception":
        base = keras.applications.Xception(input_shape=shape, include_top=False, weights=None)
    elif args.arch == "mobilenet_v3_small_050":
        base = keras.applications.MobileNetV3Small(input_shape=shape, alpha=0.5, include_top=False, weights=None)
    else:
        base = keras.applications.MobileNetV3Large(input_shape=shape, include_top=False, weights=None)
    if args.keras_batch_norm_momentum is not None:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = args.keras_batch_norm_momentum
    inputs = keras.Input(shape)
    x = keras.layers.RandomFlip("horizontal")(inputs)
    if args.random_rotation > 0 or not args.from_scratch:
        x = keras.layers.RandomRotation(args.random_rotation, fill_mode="reflect", interpolation="bilinear")(x)
    if args.arch == "xception":
        x = keras.applications.xception.preprocess_input(x)
    # The seed calls the backbone with training=False; from scratch, BatchNorm follows `fit`.
    x = base(x) if args.from_scratch else base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(args.drop_out_percentage)(x)
    model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(x))

    class EpochLog(keras.callbacks.Callback):
        """Per-epoch wall time (training + validation) and metrics, logged to stderr."""
        def __init__(self, phase):
            super().__init__()
            self.phase, self.rows = phase, []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, "phase": self.phase, "seconds": time.perf_counter() - self.start,
                   **{k: float(v) for k, v in (logs or {}).items()}}
            self.rows.append(row)
            print("keras " + json.dumps(row), file=sys.stderr, flush=True)

    class SeedEarlyStopping(keras.callbacks.Callback):
        """Best: val_accuracy > best so far and val_accuracy + 0.005 > accuracy; stop after
        `patience` epochs without a best; restore the best weights when training ends."""
        def __init__(self, patience):
            super().__init__()
            self.patience = patience

        def on_train_begin(self, logs=None):
            self.best, self.wait, self.best_weights, self.best_epoch = -math.inf, 0, None, None

        def on_epoch_end(self, epoch, logs=None):
            if is_best(logs["val_accuracy"], logs["accuracy"], self.best):
                self.best, self.wait, self.best_epoch = logs["val_accuracy"], 0, epoch + 1
                self.best_weights = self.model.get_weights()
            else:
                self.wait += 1
                if self.wait >= self.patience:
                    self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    metrics = lambda: [keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")]
    class_weight = {0: 1.0, 1: 1.0}
    result = {"phase1": {"seconds": 0.0, "epochs": 0}, "phase2": {"seconds": 0.0, "epochs": 0}}

    if args.from_scratch:
        # One phase: everything trains, Adam at the learning rate, early stopping throughout.
        base.trainable = True
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.learning_rate), loss=loss,
                      metrics=metrics())
        log, stop = EpochLog("from_scratch"), SeedEarlyStopping(args.patience)
        start = time.perf_counter()
        model.fit(train, epochs=args.initial_epochs + args.fine_tune_epochs, validation_data=val,
                  class_weight=class_weight, callbacks=[log, stop], verbose=0)
        result["phase2"] = {"seconds": time.perf_counter() - start, "epochs": len(log.rows), "rows": log.rows,
                            "best_epoch": stop.best_epoch}
    else:
        # Phase 1: the head alone.
        base.trainable = False
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.learning_rate), loss=loss, metrics=metrics())
        if args.initial_epochs > 0:
            log = EpochLog("head")
            start = time.perf_counter()
            model.fit(train, epochs=args.initial_epochs, validation_data=val, class_weight=class_weight,
                      callbacks=[log], verbose=0)
            result["phase1"] = {"seconds": time.perf_counter() - start, "epochs": len(log.rows), "rows": log.rows}

        # Phase 2: fine-tuning from layer `fine_tune_layer` on.
        if args.fine_tune_epochs > 0:
            base.trainable = True
            for layer in base.layers[:args.fine_tune_layer]:
                layer.trainable = False
            model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=args.fine_tune_learning_rate),
                          loss=loss, metrics=metrics())
            log, stop = EpochLog("fine_tune"), SeedEarlyStopping(args.patience)
            start = time.perf_counter()
            model.fit(train, initial_epoch=args.initial_epochs, epochs=args.initial_epochs + args.fine_tune_epochs,
                      validation_data=val, class_weight=class_weight, callbacks=[log, stop], verbose=0)
            result["phase2"] = {"seconds": time.perf_counter() - start, "epochs": len(log.rows), "rows": log.rows,
                                "best_epoch": stop.best_epoch}

    val_loss, val_accuracy = model.evaluate(val, verbose=0)
    result.update(val_accuracy=float(val_accuracy), val_loss=float(val_loss),
                  versions=f"tensorflow {tf.__version__}, keras {keras.__version__}")
    print(json.dumps(result))


def keras(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--keras-child", "--data", args.data, "--arch", args.arch,
           "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--initial-epochs", str(args.initial_epochs), "--fine-tune-epochs", str(args.fine_tune_epochs),
           "--fine-tune-layer", str(args.fine_tune_layer), "--learning-rate", repr(args.learning_rate),
           "--fine-tune-learning-rate", repr(args.fine_tune_learning_rate),
           "--drop-out-percentage", repr(args.drop_out_percentage), "--random-rotation", repr(args.random_rotation),
           "--image-size", str(args.image_size), "--patience", str(args.patience), "--seed", str(args.seed),
           "--precision", args.precision]
    if args.from_scratch:
        cmd.append("--from-scratch")
    if args.keras_batch_norm_momentum is not None:
        cmd += ["--keras-batch-norm-momentum", repr(args.keras_batch_norm_momentum)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=thread_env(args.threads))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"Keras run failed (exit {proc.returncode}); see its output above. Keras rows left out.", flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["total_seconds"] = wall
    return result


# ---------------------------------------------------------------- Lanner

def lanner_best(rows, model_dir):
    """The final validation accuracy and the epoch it comes from."""
    try:
        with open(os.path.join(model_dir, "lanner.json")) as f:
            best = json.load(f).get("best_epoch")
    except (OSError, ValueError, AttributeError):
        best = None
    if isinstance(best, dict) and "val_accuracy" in best:
        return float(best["val_accuracy"]), best.get("epoch"), "lanner.json"
    if isinstance(best, int) and not isinstance(best, bool):
        for row in rows:
            if row["epoch"] == best:
                return row["val_accuracy"], best, "lanner.json"
    # The seed's rule over the fine-tuning epochs; without a best there, the last epoch.
    chosen, top = None, -math.inf
    for row in rows:
        if row["phase"] != "head" and is_best(row["val_accuracy"], row["accuracy"], top):
            chosen, top = row, row["val_accuracy"]
    chosen = chosen or rows[-1]
    return chosen["val_accuracy"], chosen["epoch"], "metrics.jsonl"


def lanner(args):
    binary = os.path.abspath(args.lanner)
    if not os.path.isfile(binary):
        print(f"Lanner binary not found at {binary}: build it with `cargo build --release -p lanner` "
              f"or pass --lanner PATH. Lanner rows left out.", flush=True)
        return None
    size = args.image_size
    work = os.path.join(ROOT, "bench", "work", f"recipe-{args.arch}")
    model_dir, output_dir = os.path.join(work, "model"), os.path.join(work, "output")
    os.makedirs(work, exist_ok=True)
    cmd = [binary, "train", "--train", os.path.join(args.data, "train"),
           "--validation", os.path.join(args.data, "validation"), "--model-dir", model_dir,
           "--output-data-dir", output_dir, "--arch", args.arch, "--weights", "none", "--image-size", str(size),
           "--batch-size", str(args.batch_size), "--initial-epochs", str(args.initial_epochs),
           "--fine-tune-epochs", str(args.fine_tune_epochs), "--fine-tune-layer", str(args.fine_tune_layer),
           "--learning-rate", repr(args.learning_rate), "--fine-tune-learning-rate", repr(args.fine_tune_learning_rate),
           "--drop-out-percentage", repr(args.drop_out_percentage), "--random-rotation", repr(args.random_rotation),
           "--patience", str(args.patience), "--seed", str(args.seed), "--precision", args.precision,
           "--overwrite"]
    if args.from_scratch:
        cmd.append("--from-scratch")
    cmd.extend(args.lanner_arg)
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    # Lanner's own output goes to stderr, so a failure explains itself above the table.
    proc = subprocess.run(cmd, stdout=sys.stderr, env=thread_env(args.threads))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"`lanner train` failed (exit {proc.returncode}); see its output above. Lanner rows left out.",
              flush=True)
        return None
    metrics = os.path.join(output_dir, "metrics.jsonl")
    try:
        rows = [json.loads(line) for line in open(metrics) if line.strip()]
    except OSError as e:
        print(f"`lanner train` wrote no {metrics} ({e}). Lanner rows left out.", flush=True)
        return None
    if not rows:
        print(f"{metrics} is empty. Lanner rows left out.", flush=True)
        return None
    result = {"total_seconds": wall, "rows": rows}
    for key, phases in (("phase1", ("head",)), ("phase2", ("fine_tune", "from_scratch"))):
        mine = [r for r in rows if r["phase"] in phases]
        result[key] = {"seconds": sum(r["seconds"] for r in mine), "epochs": len(mine)}
    result["val_accuracy"], result["best_epoch"], result["best_from"] = lanner_best(rows, model_dir)
    return result


# ---------------------------------------------------------------- report

def table(ks, ln, from_scratch):
    def seconds(r, key):
        return None if r is None else r[key]["seconds"]

    def per_epoch(r, key):
        return None if r is None or r[key]["epochs"] == 0 else r[key]["seconds"] / r[key]["epochs"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    def ratio(a, b):
        return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

    lines = [f"{'':<30} {'Keras':>10} {'Lanner':>10} {'Lanner/Keras':>13}"]
    phases = ((("from scratch", "phase2"),) if from_scratch
              else (("phase 1 (head)", "phase1"), ("phase 2 (fine-tuning)", "phase2")))
    for label, key in phases:
        k, l = seconds(ks, key), seconds(ln, key)
        lines.append(f"{label + ', s':<30} {fmt(k, '.1f'):>10} {fmt(l, '.1f'):>10} {ratio(l, k):>13}")
        k, l = per_epoch(ks, key), per_epoch(ln, key)
        lines.append(f"{'  s per epoch':<30} {fmt(k, '.1f'):>10} {fmt(l, '.1f'):>10} {ratio(l, k):>13}")
        k = None if ks is None else ks[key]["epochs"]
        l = None if ln is None else ln[key]["epochs"]
        lines.append(f"{'  epochs run':<30} {fmt(k, 'd'):>10} {fmt(l, 'd'):>10}")
    k = None if ks is None else ks["total_seconds"]
    l = None if ln is None else ln["total_seconds"]
    lines.append(f"{'whole process, s':<30} {fmt(k, '.1f'):>10} {fmt(l, '.1f'):>10} {ratio(l, k):>13}")
    k = None if ks is None else ks["val_accuracy"]
    l = None if ln is None else ln["val_accuracy"]
    lines.append(f"{'final val accuracy':<30} {fmt(k, '.4f'):>10} {fmt(l, '.4f'):>10}")
    k = "-" if ks is None else ks["phase2"].get("best_epoch") or "last"
    l = "-" if ln is None else ln["best_epoch"]
    lines.append(f"{'  from epoch':<30} {k:>10} {l:>10}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with train/ and validation/")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="mobilenet_v3_large")
    parser.add_argument("--initial-epochs", type=int, help="default: 3 for MobileNetV3, 5 for Xception")
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--fine-tune-layer", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--fine-tune-learning-rate", type=float, default=1e-5)
    parser.add_argument("--drop-out-percentage", type=float, default=0.1)
    parser.add_argument("--random-rotation", type=float, default=0.2)
    parser.add_argument("--image-size", type=int, help="default: 224 for MobileNetV3, 299 for Xception")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train everything from the first epoch, BatchNorm on batch statistics")
    parser.add_argument("--seed", type=int, default=1, help="both sides' random seed")
    parser.add_argument("--patience", type=int, default=2, help="early stopping's patience (the seed's: 2)")
    parser.add_argument("--keras-batch-norm-momentum", type=float,
                        help="every Keras BatchNorm layer's momentum (default: Keras' own; 0.9 is Lanner's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                        help="bf16: Keras' mixed_bfloat16 policy and `lanner train --precision bf16`")
    parser.add_argument("--lanner", default=LANNER, help="path of the lanner binary")
    parser.add_argument("--lanner-arg", action="append", default=[],
                        help="one more argument for `lanner train` (repeat it), e.g. --lanner-arg=--no-cache")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-keras", action="store_true")
    skip.add_argument("--skip-lanner", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keras-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.initial_epochs is None:
        args.initial_epochs = ARCHS[args.arch][1]
    if args.image_size is None:
        args.image_size = ARCHS[args.arch][0]
    args.data = os.path.abspath(args.data)
    for split in ("train", "validation"):
        if not os.path.isdir(os.path.join(args.data, split)):
            parser.error(f"{args.data} has no {split}/ folder (see the docstring for make_shapes)")
    if args.keras_child:
        keras_child(args)
        return

    line = machine()
    print(line, flush=True)
    if args.from_scratch:
        plan = (f"from scratch {args.initial_epochs + args.fine_tune_epochs} epochs (Adam {args.learning_rate:g}, "
                f"everything trains, BatchNorm on batch statistics, early stopping patience {args.patience})")
    else:
        plan = (f"phase 1 {args.initial_epochs} epochs (Adam {args.learning_rate:g}), "
                f"phase 2 {args.fine_tune_epochs} epochs (RMSprop {args.fine_tune_learning_rate:g}, layers "
                f"{args.fine_tune_layer}+, early stopping patience {args.patience})")
    print(f"{args.arch}, image {args.image_size}, batch {args.batch_size}, weights none, seed {args.seed}, "
          f"{args.threads} threads, {args.precision}; {plan}; dropout {args.drop_out_percentage:g}, "
          f"rotation {args.random_rotation:g}; data {args.data}", flush=True)
    if args.keras_batch_norm_momentum is not None:
        print(f"Keras BatchNorm momentum {args.keras_batch_norm_momentum:g}", flush=True)
    ks = None if args.skip_keras else keras(args)
    ln = None if args.skip_lanner else lanner(args)
    if ks:
        print(ks["versions"])
    print(table(ks, ln, args.from_scratch))
    print("(Lanner/Keras: Lanner's time over Keras's time; below 1 means Lanner is faster. "
          "Phase times include validation.)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": line, "settings": {k: v for k, v in vars(args).items() if k != "keras_child"},
                       "keras": ks, "lanner": ln}, f, indent=1)


if __name__ == "__main__":
    main()
