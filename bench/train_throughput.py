"""Training-throughput benchmark: images/s of one training step of the seed's MobileNetV3-Large
classifier (batch 32, 224x224) in Lanner, Keras and PyTorch + timm, with the backbone frozen
(phase 1: only the head trains) and fully trainable, same threads, one run.

    python3 bench/train_throughput.py --data DIR [--steps 20] [--warmup 3] [--threads 2]
        [--lanner target/release/lanner] [--skip keras torch lanner]

DIR holds `train/` and `validation/`, one subfolder per class (two classes). Make it with the
project's generator (outside this script; the benchmark never builds anything), with enough
images that Lanner's one epoch lasts a while (1,000 training images = 31 steps):

    cargo build --release -p lanner-data --example make_shapes
    target/release/examples/make_shapes bench/work/shapes --per-class 500 --size 500x375 --seed 1

and `cargo build --release -p lanner` for the Lanner side. Needs tensorflow-cpu (Keras 3), torch
and timm. If the Lanner binary is missing or `lanner train` fails, its column is left out with
a message.

The model on every side: backbone (random weights) with BatchNorm in inference mode (the seed's
`base(x, training=False)`) -> global average pooling -> Dropout(0.1) -> Dense/Linear(960 -> 1),
binary cross-entropy on the logit. "frozen": only the head's weights train, Adam(1e-4); "full":
every backbone layer trains too, RMSprop(1e-5).

- Keras: `MobileNetV3Large(include_top=False, weights=None)` (its Rescaling preprocessing
  included), `model.train_on_batch` (Keras's compiled train function) on batches already in
  memory as tf tensors; no augmentation layers. TF intra-op threads = --threads, inter-op =
  min(2, --threads).
- PyTorch: `timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=0,
  global_pool="")` and its `forward_features` -- conv_stem, bn1 and the blocks, ending in the
  960-channel 1x1 conv as Keras's `include_top=False` does (timm's conv_head, 960 -> 1280, is
  not used and not trained) -- then the head; backbone in `eval()`, and in the frozen case run
  under `torch.no_grad()`. Inputs already scaled to [-1, 1], in memory, NCHW and channels_last.
  `torch.set_num_threads(--threads)`.
- Keras and PyTorch: the same --batches distinct batches of the training images (decoded and
  resized to 224x224 with PIL once, before timing), cycled; --warmup steps untimed, then
  --steps timed steps; images/s = 32 x steps / time of those steps.
- Lanner: `lanner train --arch mobilenet_v3_large --weights none --image-size 224 --batch-size 32`
  on the folder: `--initial-epochs 1 --fine-tune-epochs 0` (frozen) and `--initial-epochs 0
  --fine-tune-epochs 1 --fine-tune-layer 0` (full), RAYON_NUM_THREADS = --threads; the number
  is `train_images_per_second` of OUTPUT_DATA_DIR/metrics.jsonl. It covers a whole training
  epoch: reading and decoding JPEGs, the seed's flip + rotation, and the first steps -- work
  the peers' numbers leave out -- so it understates Lanner's step rate.

Every measurement runs in its own process, one after the other. Prints first the machine line
from bench/machine.py ("CPU model, N cores, date time, load X"), then versions and settings,
then a table of images/s and Lanner's ratio to each peer (above 1 means Lanner is faster).
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
SIZE = 224
BATCH = 32
SETTINGS = ("frozen", "full")
LABELS = {"frozen": "backbone frozen (head only)", "full": "fully trainable"}


def thread_env(threads):
    n = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n,
                TF_NUM_INTRAOP_THREADS=n, TF_NUM_INTEROP_THREADS=str(min(2, threads)),
                RAYON_NUM_THREADS=n, TF_CPP_MIN_LOG_LEVEL="2")


def load_batches(data, batches):
    """`batches` batches of 32 training images as float32 HWC in [0, 255], labels 0/1 as float32.
    Files are shuffled (seed 1) across both classes; fewer images than needed are repeated."""
    import numpy as np
    from PIL import Image

    train = os.path.join(data, "train")
    classes = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    files = [(os.path.join(train, c, f), float(i)) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(train, c)))]
    if not files:
        raise SystemExit(f"{train}: no images")
    order = np.random.default_rng(1).permutation(len(files))
    need = BATCH * batches
    picked = [files[order[i % len(files)]] for i in range(need)]
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR),
                                  dtype=np.float32) for p, _ in picked])
    labels = np.array([y for _, y in picked], dtype=np.float32)
    return [(images[i * BATCH:(i + 1) * BATCH], labels[i * BATCH:(i + 1) * BATCH]) for i in range(batches)]


def timed_steps(step, batches, warmup, steps):
    times = []
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return BATCH * steps / sum(times[warmup:])


# ---------------------------------------------------------------- children

def keras_child(args):
    import tensorflow as tf
    import keras

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, args.threads))
    keras.utils.set_random_seed(1)
    batches = [(tf.constant(x), tf.constant(y[:, None])) for x, y in load_batches(args.data, args.batches)]
    base = keras.applications.MobileNetV3Large(input_shape=(SIZE, SIZE, 3), include_top=False, weights=None)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.1)(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    if args.setting == "frozen":
        base.trainable = False
        optimizer = keras.optimizers.Adam(learning_rate=1e-4)
    else:
        base.trainable = True
        optimizer = keras.optimizers.RMSprop(learning_rate=1e-5)
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    trainable = sum(int(v.numpy().size) for v in model.trainable_weights)
    rate = timed_steps(lambda x, y: model.train_on_batch(x, y), batches, args.warmup, args.steps)
    print(json.dumps({"images_per_second": rate, "trainable_parameters": trainable,
                      "versions": f"tensorflow {tf.__version__}, keras {keras.__version__}"}))


def torch_child(args):
    import torch
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    backbone = timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=0, global_pool="")
    head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(960, 1))
    backbone.eval()  # BatchNorm in inference mode, as the seed's training=False
    head.train()     # dropout on
    # forward_features stops after the blocks (960 channels); conv_head/norm_head are unused.
    features = [p for n, p in backbone.named_parameters() if not n.startswith(("conv_head", "norm_head", "classifier"))]
    if args.setting == "frozen":
        backbone.requires_grad_(False)
        params = list(head.parameters())
        optimizer = torch.optim.Adam(params, lr=1e-4, eps=1e-7)
    else:
        params = features + list(head.parameters())
        optimizer = torch.optim.RMSprop(params, lr=1e-5, alpha=0.9, eps=1e-7)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    batches = [(torch.from_numpy(x).permute(0, 3, 1, 2).div(127.5).sub(1.0).contiguous(memory_format=memory_format),
                torch.from_numpy(y)) for x, y in load_batches(args.data, args.batches)]
    with torch.no_grad():
        shape = tuple(backbone.forward_features(batches[0][0][:1]).shape)
    assert shape == (1, 960, 7, 7), f"forward_features gave {shape}, expected (1, 960, 7, 7)"

    def step(x, y):
        if args.setting == "frozen":
            with torch.no_grad():
                f = backbone.forward_features(x)
        else:
            f = backbone.forward_features(x)
        loss = loss_fn(head(f.mean((2, 3))).squeeze(1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rate = timed_steps(step, batches, args.warmup, args.steps)
    print(json.dumps({"images_per_second": rate, "trainable_parameters": sum(p.numel() for p in params),
                      "threads": torch.get_num_threads(),
                      "versions": f"torch {torch.__version__}, timm {timm.__version__}"}))


def child(args, which, setting, channels_last=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--setting", setting, "--data", args.data,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--batches", str(args.batches)]
    if channels_last:
        cmd.append("--channels-last")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads))
    if proc.returncode != 0:
        print(f"{which} {setting} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- Lanner

def lanner(args, setting):
    binary = os.path.abspath(args.lanner)
    if not os.path.isfile(binary):
        return None
    work = os.path.join(ROOT, "bench", "work", f"throughput-{setting}")
    output_dir = os.path.join(work, "output")
    os.makedirs(work, exist_ok=True)
    epochs = (["--initial-epochs", "1", "--fine-tune-epochs", "0"] if setting == "frozen" else
              ["--initial-epochs", "0", "--fine-tune-epochs", "1", "--fine-tune-layer", "0"])
    cmd = [binary, "train", "--train", os.path.join(args.data, "train"),
           "--validation", os.path.join(args.data, "validation"), "--model-dir", os.path.join(work, "model"),
           "--output-data-dir", output_dir, "--arch", "mobilenet_v3_large", "--weights", "none",
           "--image-size", str(SIZE), "--batch-size", str(BATCH), *epochs, "--learning-rate", "1e-4",
           "--fine-tune-learning-rate", "1e-5", "--drop-out-percentage", "0.1", "--random-rotation", "0.2",
           "--seed", "1", "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads))
    if proc.returncode != 0:
        print(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}",
              flush=True)
        return None
    metrics = os.path.join(output_dir, "metrics.jsonl")
    try:
        rows = [json.loads(line) for line in open(metrics) if line.strip()]
        return {"images_per_second": float(rows[-1]["train_images_per_second"]), "phase": rows[-1].get("phase")}
    except (OSError, ValueError, IndexError, KeyError) as e:
        print(f"no train_images_per_second in {metrics} ({e!r})", flush=True)
        return None


# ---------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with train/ and validation/")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (Keras, PyTorch)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (Keras, PyTorch)")
    parser.add_argument("--batches", type=int, default=4, help="distinct in-memory batches, cycled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lanner", default=LANNER, help="path of the lanner binary")
    parser.add_argument("--skip", nargs="*", default=[], choices=["keras", "torch", "lanner"])
    parser.add_argument("--child", choices=["keras", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = os.path.abspath(args.data)
    if not os.path.isdir(os.path.join(args.data, "train")):
        parser.error(f"{args.data} has no train/ folder (see the docstring for make_shapes)")
    if args.child == "keras":
        return keras_child(args)
    if args.child == "torch":
        return torch_child(args)

    print(machine(), flush=True)
    print(f"MobileNetV3-Large, batch {BATCH}, {SIZE}x{SIZE}, random weights, BatchNorm in inference mode, "
          f"{args.threads} threads; Keras/PyTorch: {args.warmup} warm-up + {args.steps} timed steps on "
          f"{args.batches} in-memory batches; data {args.data}", flush=True)
    use_lanner = "lanner" not in args.skip
    if use_lanner and not os.path.isfile(os.path.abspath(args.lanner)):
        print(f"Lanner binary not found at {os.path.abspath(args.lanner)}: build it with "
              f"`cargo build --release -p lanner` or pass --lanner PATH. Lanner column left out.", flush=True)
        use_lanner = False

    results, versions = {}, set()
    for setting in SETTINGS:
        row = {}
        if "keras" not in args.skip:
            row["keras"] = child(args, "keras", setting)
        if "torch" not in args.skip:
            row["nchw"] = child(args, "torch", setting)
            row["nhwc"] = child(args, "torch", setting, channels_last=True)
        if use_lanner:
            row["lanner"] = lanner(args, setting)
        for r in row.values():
            if r and "versions" in r:
                versions.add(r["versions"])
        results[setting] = row
        print(f"{setting}: " + json.dumps({k: v and round(v["images_per_second"], 1) for k, v in row.items()}),
              file=sys.stderr, flush=True)

    print("; ".join(sorted(versions)))
    params = {f"{who} {setting}": r["trainable_parameters"] for setting, row in results.items()
              for who, r in (("Keras", row.get("keras")), ("PyTorch", row.get("nchw"))) if r}
    if params:
        print("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
    rate = lambda r, k: r.get(k) and r[k]["images_per_second"]
    fmt = lambda v: "-" if not v else f"{v:.1f}"
    ratio = lambda a, b: "-" if not a or not b else f"{a / b:.2f}x"
    print(f"{'images/s':<28} {'Keras':>8} {'torch NCHW':>11} {'torch NHWC':>11} {'Lanner':>8} "
          f"{'L/Keras':>8} {'L/NCHW':>8} {'L/NHWC':>8}")
    for setting, row in results.items():
        k, n, c, l = (rate(row, key) for key in ("keras", "nchw", "nhwc", "lanner"))
        print(f"{LABELS[setting]:<28} {fmt(k):>8} {fmt(n):>11} {fmt(c):>11} {fmt(l):>8} "
              f"{ratio(l, k):>8} {ratio(l, n):>8} {ratio(l, c):>8}")
    print("(L/peer: Lanner images/s over the peer's; above 1 means Lanner is faster. Keras and PyTorch "
          "train on batches already decoded, resized and in memory, without augmentation; Lanner's "
          "number is a whole epoch of `lanner train`, its JPEG loading and flip + rotation included.)")


if __name__ == "__main__":
    main()
