"""Backbone inference benchmark: Lanner (burn-flex, CPU) against PyTorch + timm on the same
architecture, same batch, same threads, one run.

    python3 bench/backbone_inference.py [--threads 2] [--batch 32] [--runs 5] [--warmup 2]

Needs torch and timm. Builds `cargo build --release -p lanner-models --example
inference_throughput` once, then for each model times a forward pass of the backbone and the
seed's head (global average pooling -> one logit) on a random [batch, 3, S, S] batch: S = 224
for MobileNetV3-Large, 299 for Xception. Weights are random on both sides (the speed of a
forward pass does not depend on them). PyTorch runs in eval mode under
`torch.inference_mode()`, in NCHW and in channels_last. Every measurement runs in its own
process, one after the other, with the same thread count (`RAYON_NUM_THREADS` for Lanner,
`torch.set_num_threads` for PyTorch). Prints images/s and Lanner's ratio to PyTorch.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from machine import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "target", "release", "examples", "inference_throughput")

# Lanner's registry name, timm's name, input size.
MODELS = [
    ("mobilenet_v3_large", "mobilenetv3_large_100", 224),
    ("xception", "legacy_xception", 299),
]


def build():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "lanner-models", "--example", "inference_throughput"],
                   check=True, cwd=ROOT)


def lanner(name, size, batch, runs, warmup, threads):
    cmd = [EXAMPLE, name, "--batch", str(batch), "--size", str(size), "--runs", str(runs),
           "--warmup", str(warmup), "--threads", str(threads)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_second"]


def pytorch(timm_name, size, batch, runs, warmup, threads, channels_last):
    code = f"""
import json, time, torch, timm
torch.set_num_threads({threads})
torch.manual_seed(0)

class Classifier(torch.nn.Module):
    # timm's feature map, then the seed's head: global average pooling -> one logit.
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model({timm_name!r}, pretrained=False, num_classes=0)
        self.classifier = torch.nn.Linear(self.backbone.num_features, 1)

    def forward(self, x):
        return self.classifier(self.backbone.forward_features(x).mean((2, 3)))

model = Classifier().eval()
x = torch.randn({batch}, 3, {size}, {size})
if {channels_last}:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
times = []
with torch.inference_mode():
    for i in range({warmup} + {runs}):
        start = time.perf_counter()
        logits = model(x)
        assert logits.shape == ({batch}, 1)
        times.append(time.perf_counter() - start)
timed = times[{warmup}:]
print(json.dumps({{"images_per_second": {batch} * len(timed) / sum(timed), "threads": torch.get_num_threads()}}))
"""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_second"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=[m[0] for m in MODELS])
    args = parser.parse_args()
    build()
    import torch
    import timm
    print(machine())
    print(f"torch {torch.__version__}, timm {timm.__version__}; batch {args.batch}, {args.threads} threads, "
          f"{args.warmup} warm-up + {args.runs} timed runs each")
    print(f"{'model':<20} {'size':>4} {'Lanner img/s':>13} {'torch NCHW':>11} {'torch NHWC':>11} "
          f"{'ratio NCHW':>11} {'ratio NHWC':>11}")
    for name, timm_name, size in MODELS:
        if name not in args.models:
            continue
        common = (size, args.batch, args.runs, args.warmup, args.threads)
        ours = lanner(name, *common)
        nchw = pytorch(timm_name, *common, channels_last=False)
        nhwc = pytorch(timm_name, *common, channels_last=True)
        print(f"{name:<20} {size:>4} {ours:>13.1f} {nchw:>11.1f} {nhwc:>11.1f} "
              f"{ours / nchw:>10.2f}x {ours / nhwc:>10.2f}x", flush=True)
    print("(ratio: Lanner images/s over PyTorch images/s; above 1 means Lanner is faster)")


if __name__ == "__main__":
    main()
