"""CPU speed of the recipe's steps: Lanner against Keras (tensorflow-cpu) and PyTorch + timm
(NCHW and channels_last), same cores, one run, for MobileNetV3-Large at 224 and Xception at 299,
batch 32:

    python3 bench/cpu_speed.py [--threads 2] [--models mobilenet_v3_large xception]
        [--steps 5] [--warmup 2] [--xception-steps 2] [--lanner target/release/lanner]
        [--rows frozen fine-tune full inference from-scratch frozen-bf16 fine-tune-bf16
                inference-bf16]

Rows (the seed's recipe):
- frozen: phase 1, only the head trains (Adam 1e-4), the backbone frozen;
- fine-tune-100: phase 2 with the seed's --fine-tune-layer 100, RMSprop 1e-5: Keras layers
  base.layers[100:] train (MobileNetV3-Large: from expanded_conv_9, timm `blocks.3.3`;
  Xception: from block11_sepconv2, timm `block11.rep.4`), the rest frozen;
- full: every backbone parameter trains (RMSprop 1e-5), BatchNorm still on its running
  statistics (Lanner: `--step fine-tune --fine-tune-layer 0`);
- inference: the forward pass only;
- frozen-bf16, fine-tune-bf16, inference-bf16 (not in the default rows): those rows in bf16
  with f32 sums and f32 master weights, where the CPU has the instructions for it (Intel AMX):
  Keras under the `mixed_bfloat16` policy (every layer computes in bf16, the Dense head's
  output in f32), PyTorch with the forward pass under `torch.autocast("cpu",
  dtype=torch.bfloat16)`, Lanner with `--precision bf16` (the frozen layers' products on the
  AMX tiles; the trained layers and the head in f32);
- from-scratch (not in the default rows: `--rows from-scratch`): `--from-scratch` training,
  every parameter trains (Adam 1e-4) and BatchNorm normalises with the batch's statistics and
  updates its running ones (Keras: the backbone called without `training=False`; PyTorch: the
  backbone in `train()`; Lanner: `--step full`).
Every model: backbone (random weights) with BatchNorm in inference mode (the seed's
`base(x, training=False)`; in training mode in the from-scratch row) -> global average pooling -> Dropout(0.1) -> Dense(1), binary
cross-entropy on the logit. Input: one random batch of pixels, in memory, reused (no data
loading on any side).

- Keras: `keras.applications.MobileNetV3Large` / `Xception(include_top=False, weights=None)`,
  `model.train_on_batch` / `model.predict_on_batch`; TF intra-op threads = --threads.
- PyTorch: `timm.create_model("mobilenetv3_large_100" | "legacy_xception", num_classes=0,
  global_pool="")` and `forward_features`, backbone in `eval()`, `torch.set_num_threads`;
  frozen rows under `torch.no_grad()` for the backbone, inference under `inference_mode()`.
- Lanner: `lanner bench --arch A --step frozen|fine-tune|inference --json` (the same steps
  through the trainer's `training_step`), RAYON_NUM_THREADS = --threads.

Each framework and row runs in its own process, one after the other: --warmup untimed steps,
then --steps timed ones; images/s = 32 x steps / their time. Prints the machine line, versions,
then the table with Lanner's ratio to each peer and to the best peer (above 1: Lanner faster).
"""
import argparse
import json
import os
import subprocess
import sys
import time

from machine import machine
from train_throughput import thread_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANNER = os.path.join(ROOT, "target", "release", "lanner")
BATCH = 32
ROWS = ("frozen", "fine-tune", "full", "inference", "from-scratch", "frozen-bf16", "fine-tune-bf16",
        "inference-bf16")
DEFAULT_ROWS = ROWS[:4]
LABELS = {"frozen": "backbone frozen", "fine-tune": "fine-tune-layer 100", "full": "fully trainable",
          "inference": "inference", "from-scratch": "from scratch (BatchNorm training)",
          "frozen-bf16": "backbone frozen, bf16", "fine-tune-bf16": "fine-tune-layer 100, bf16",
          "inference-bf16": "inference in bf16"}
MODELS = {
    # name: (image size, timm name, first trainable timm parameter at fine-tune-layer 100)
    "mobilenet_v3_large": (224, "mobilenetv3_large_100", "blocks.3.3."),
    "xception": (299, "legacy_xception", "block11.rep.4."),
}


def base_row(row):
    """The row without its precision, and whether it runs in bf16."""
    return row.removesuffix("-bf16"), row.endswith("-bf16")


def timed(step, warmup, steps):
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return BATCH * steps / sum(times[warmup:])


def keras_child(args):
    import numpy as np
    import tensorflow as tf
    import keras

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, args.threads))
    keras.utils.set_random_seed(1)
    row, bf16 = base_row(args.row)
    if bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    size = MODELS[args.model][0]
    rng = np.random.default_rng(1)
    if args.model == "mobilenet_v3_large":
        # Its Rescaling layer is part of the model: pixels in 0..255.
        base = keras.applications.MobileNetV3Large(input_shape=(size, size, 3), include_top=False, weights=None)
        x = rng.uniform(0, 255, (BATCH, size, size, 3)).astype("float32")
    else:
        base = keras.applications.Xception(input_shape=(size, size, 3), include_top=False, weights=None)
        x = rng.uniform(-1, 1, (BATCH, size, size, 3)).astype("float32")
    y = (np.arange(BATCH) % 2).astype("float32")[:, None]
    inputs = keras.Input((size, size, 3))
    # From scratch, BatchNorm trains: Keras' default call, in training mode within train_on_batch.
    base_out = base(inputs) if row == "from-scratch" else base(inputs, training=False)
    features = keras.layers.GlobalAveragePooling2D()(base_out)
    # The logit in f32 under mixed precision too, as Keras' guide advises for the last layer.
    logit = keras.layers.Dense(1, dtype="float32")(keras.layers.Dropout(0.1)(features))
    model = keras.Model(inputs, logit)
    x, y = tf.constant(x), tf.constant(y)
    if row == "inference":
        rate = timed(lambda: model.predict_on_batch(x), args.warmup, args.steps)
    else:
        base.trainable = row != "frozen"
        if row == "fine-tune":
            for layer in base.layers[:100]:
                layer.trainable = False
        optimizer = (keras.optimizers.Adam(learning_rate=1e-4) if row in ("frozen", "from-scratch")
                     else keras.optimizers.RMSprop(learning_rate=1e-5))
        model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))
        rate = timed(lambda: model.train_on_batch(x, y), args.warmup, args.steps)
    print(json.dumps({"images_per_second": rate, "versions": f"tensorflow {tf.__version__}, keras {keras.__version__}"}))


def torch_child(args):
    import torch
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    size, timm_name, first_trainable = MODELS[args.model]
    backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="")
    channels = backbone.num_features
    head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(channels, 1))
    row, bf16 = base_row(args.row)
    backbone.train(row == "from-scratch")
    head.train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    backbone = backbone.to(memory_format=fmt)
    x = torch.rand(BATCH, 3, size, size).mul(2).sub(1).contiguous(memory_format=fmt)
    y = (torch.arange(BATCH) % 2).float()
    if row == "inference":
        def step():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                head(backbone.forward_features(x).mean((2, 3)))
        rate = timed(step, args.warmup, args.steps)
    else:
        # Parameters of forward_features, in registration (= forward) order.
        names = [n for n, _ in backbone.named_parameters()
                 if not n.startswith(("conv_head", "norm_head", "classifier", "fc"))]
        if row == "frozen":
            trainable = set()
        elif row in ("full", "from-scratch"):
            trainable = set(names)
        else:
            start = next(i for i, n in enumerate(names) if n.startswith(first_trainable))
            trainable = set(names[start:])
        params = []
        for n, p in backbone.named_parameters():
            p.requires_grad_(n in trainable)
            if n in trainable:
                params.append(p)
        params += list(head.parameters())
        optimizer = (torch.optim.Adam(params, lr=1e-4, eps=1e-7) if row in ("frozen", "from-scratch")
                     else torch.optim.RMSprop(params, lr=1e-5, alpha=0.9, eps=1e-7))
        loss_fn = torch.nn.BCEWithLogitsLoss()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if row == "frozen":
                    with torch.no_grad():
                        f = backbone.forward_features(x)
                else:
                    f = backbone.forward_features(x)
                logit = head(f.mean((2, 3))).squeeze(1)
            loss = loss_fn(logit.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rate = timed(step, args.warmup, args.steps)
    print(json.dumps({"images_per_second": rate, "versions": f"torch {torch.__version__}, timm {timm.__version__}"}))


def child(args, which, model, row, steps, channels_last=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--model", model, "--row", row,
           "--steps", str(steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if channels_last:
        cmd.append("--channels-last")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads))
    if proc.returncode != 0:
        print(f"{which} {model} {row} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lanner(args, model, row, steps):
    size = MODELS[model][0]
    # "full" as the peers run it: every layer trains, BatchNorm on its running statistics (the
    # seed's phase 2 with --fine-tune-layer 0). `lanner bench --step full` is --from-scratch,
    # BatchNorm in training mode: the from-scratch row.
    row, bf16 = base_row(row)
    step, layer = {"full": ("fine-tune", "0"), "from-scratch": ("full", "100")}.get(row, (row, "100"))
    precision = "bf16" if bf16 else "f32"
    cmd = [os.path.abspath(args.lanner), "bench", "--arch", model, "--image-size", str(size),
           "--batch-size", str(BATCH), "--step", step, "--fine-tune-layer", layer, "--steps", str(steps),
           "--warmup", str(args.warmup), "--device", "cpu", "--precision", precision, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads))
    if proc.returncode != 0:
        print(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"images_per_second": result["images_per_second"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rows", nargs="*", default=list(DEFAULT_ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (MobileNetV3)")
    parser.add_argument("--xception-steps", type=int, default=2, help="timed steps (Xception)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lanner", default=LANNER)
    parser.add_argument("--skip", nargs="*", default=[], choices=["keras", "torch", "lanner"])
    parser.add_argument("--child", choices=["keras", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "keras":
        return keras_child(args)
    if args.child == "torch":
        return torch_child(args)
    if "lanner" not in args.skip and not os.path.isfile(args.lanner):
        parser.error(f"no Lanner binary at {args.lanner}: run `cargo build --release -p lanner`")

    print(machine(), flush=True)
    print(f"batch {BATCH}, random weights and pixels, {args.threads} threads, {args.warmup} warm-up steps, "
          f"{args.steps} timed steps ({args.xception_steps} for Xception)", flush=True)
    table, versions = [], set()
    for model in args.models:
        steps = args.xception_steps if model == "xception" else args.steps
        for row in args.rows:
            r = {}
            if "keras" not in args.skip:
                r["keras"] = child(args, "keras", model, row, steps)
            if "torch" not in args.skip:
                r["nchw"] = child(args, "torch", model, row, steps)
                r["nhwc"] = child(args, "torch", model, row, steps, channels_last=True)
            if "lanner" not in args.skip:
                r["lanner"] = lanner(args, model, row, steps)
            versions.update(v["versions"] for v in r.values() if v and "versions" in v)
            table.append((model, row, {k: v and v["images_per_second"] for k, v in r.items()}))
            print(f"{model} {row}: " + json.dumps({k: v and round(v, 2) for k, v in table[-1][2].items()}),
                  file=sys.stderr, flush=True)
    print("; ".join(sorted(versions)))
    fmt = lambda v: "-" if not v else f"{v:.1f}"
    ratio = lambda a, b: "-" if not a or not b else f"{a / b:.2f}x"
    print(f"| model | images/s | Keras | PyTorch NCHW | PyTorch channels_last | Lanner | "
          f"L/Keras | L/NCHW | L/channels_last | L/best peer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, row, r in table:
        k, n, c, l = (r.get(key) for key in ("keras", "nchw", "nhwc", "lanner"))
        best = max([v for v in (k, n, c) if v] or [0])
        print(f"| {model} | {LABELS[row]} | {fmt(k)} | {fmt(n)} | {fmt(c)} | {fmt(l)} | {ratio(l, k)} | "
              f"{ratio(l, n)} | {ratio(l, c)} | {ratio(l, best)} |")


if __name__ == "__main__":
    main()
