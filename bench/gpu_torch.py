"""PyTorch's side of the GPU benchmark: images/s of the seed's classifier (timm backbone ->
global average pooling -> dropout -> one logit) on one NVIDIA GPU, in the same step kinds that
`lanner bench` times, one JSON object per line.

    python3 bench/gpu_torch.py [--steps 15] [--warmup 5] [--batch 32 256]
        [--arch mobilenet_v3_large xception] [--precision f32 bf16]

- `frozen`: the backbone in eval() under torch.no_grad(), only the head trains (Adam 1e-4);
  the recipe's phase 1.
- `full`: everything trains, BatchNorm in training mode (Adam 1e-3); `--from-scratch`.
- `inference`: eval() forward under torch.inference_mode().
- f32: NCHW, TF32 matmuls off (true f32, as Lanner computes). bf16: channels_last and
  torch.autocast(bfloat16) with f32 master weights, the usual AMP recipe.
- torch.backends.cudnn.benchmark = True; random weights, one random batch already on the GPU
  (the data pipeline is not timed), --warmup untimed steps, then --steps timed steps with
  torch.cuda.synchronize() at both ends; images/s = batch x steps / time.
"""

import argparse
import json
import time

import timm
import torch

TIMM = {
    "mobilenet_v3_large": ("mobilenetv3_large_100", 224),
    "xception": ("legacy_xception", 299),
}


class Classifier(torch.nn.Module):
    def __init__(self, timm_name):
        super().__init__()
        self.backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="")
        channels = self.backbone.num_features
        if timm_name.startswith("mobilenetv3"):
            # Keras' include_top=False ends at the 960-channel conv: timm's forward_features.
            channels = self.backbone.blocks[-1][-1].conv.out_channels
        self.dropout = torch.nn.Dropout(0.2)
        self.fc = torch.nn.Linear(channels, 1)

    def features(self, x):
        return self.backbone.forward_features(x).mean((2, 3))

    def head(self, pooled):
        return self.fc(self.dropout(pooled))


def time_steps(step, warmup, steps):
    first = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - first
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return first, time.perf_counter() - start


def run(arch, kind, batch, precision, warmup, steps):
    timm_name, size = TIMM[arch]
    model = Classifier(timm_name).cuda()
    x = torch.rand(batch, 3, size, size, device="cuda") * 2 - 1
    y = (torch.arange(batch, device="cuda") % 2).float().unsqueeze(1)
    if precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    if kind == "inference":
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model.head(model.features(x))
    elif kind == "frozen":
        model.backbone.eval()
        model.backbone.requires_grad_(False)
        optimizer = torch.optim.Adam(model.fc.parameters(), lr=1e-4)

        def step():
            with autocast:
                with torch.no_grad():
                    pooled = model.features(x)
                loss = loss_fn(model.head(pooled).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            with autocast:
                loss = loss_fn(model.head(model.features(x)).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    first, seconds = time_steps(step, warmup, steps)
    return {
        "peer": "pytorch",
        "arch": arch,
        "image_size": size,
        "batch_size": batch,
        "step": kind,
        "precision": precision,
        "layout": "channels_last" if precision == "bf16" else "NCHW",
        "images_per_second": batch * steps / seconds,
        "first_step_seconds": first,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--arch", nargs="+", default=list(TIMM), choices=list(TIMM))
    parser.add_argument("--precision", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
    parser.add_argument("--step", nargs="+", default=["frozen", "full", "inference"],
                        choices=["frozen", "full", "inference"])
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(json.dumps({"peer": "pytorch", "torch": torch.__version__, "timm": timm.__version__,
                      "device": torch.cuda.get_device_name(0)}), flush=True)
    for arch in args.arch:
        for batch in args.batch:
            for precision in args.precision:
                for kind in args.step:
                    try:
                        row = run(arch, kind, batch, precision, args.warmup, args.steps)
                    except torch.cuda.OutOfMemoryError:
                        row = {"peer": "pytorch", "arch": arch, "batch_size": batch, "step": kind,
                               "precision": precision, "error": "out of memory"}
                    print(json.dumps(row), flush=True)
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
