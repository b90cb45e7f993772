"""The README's main job in PyTorch, to tell what its validation accuracy depends on: the same
network as Lanner's (timm's `mobilenetv3_small_050` features, global average pooling, dropout
0.1, one dense unit with Glorot-uniform weights), trained from scratch as `lanner train
--from-scratch` trains it, under several initialisations of the convolution kernels.

    python3 bench/init_from_scratch.py --data data/shapes [--seeds 1 2 3]
        [--variants timm glorot timm-eps glorot-eps] [--threads 2]

Variants: `timm` keeps timm's initialisation (normal, variance 2 / fan-out, BatchNorm epsilon
1e-5: Lanner's `--init timm`); `glorot` draws every convolution kernel from Glorot's uniform
distribution (PyTorch's `xavier_uniform_`, whose fans on a depthwise kernel sum to Keras'; Lanner's
`--init keras`); `-eps` also sets BatchNorm's epsilon to Keras' 1e-3.

Training: images of DATA/train and DATA/validation (one folder per class, two classes) decoded
with PIL and resized to 64x64 bilinear, scaled with ImageNet's mean and standard deviation;
random horizontal flips; batch 16, 20 epochs, Adam(0.002, eps=1e-7), binary cross-entropy on
the logit; validation accuracy after every epoch. Prints, per variant and seed, the best and
the last validation accuracy. Needs torch and timm; downloads nothing.
"""
import argparse
import os
import time

import numpy as np


def load(folder, size):
    from PIL import Image
    import torch

    xs, ys = [], []
    for label, name in enumerate(sorted(os.listdir(folder))):
        for file in sorted(os.listdir(os.path.join(folder, name))):
            image = Image.open(os.path.join(folder, name, file)).convert("RGB").resize((size, size), Image.BILINEAR)
            xs.append(np.asarray(image, dtype=np.float32))
            ys.append(label)
    x = torch.tensor(np.stack(xs)).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std, torch.tensor(ys, dtype=torch.float32)


def run(variant, seed, train, validation, epochs):
    import timm
    import torch

    torch.manual_seed(seed)
    base = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0, global_pool="")
    head = torch.nn.Linear(base.num_features, 1)
    torch.nn.init.xavier_uniform_(head.weight)
    torch.nn.init.zeros_(head.bias)
    if variant.startswith("glorot"):
        for module in base.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.xavier_uniform_(module.weight)
    if variant.endswith("-eps"):
        for module in base.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eps = 1e-3
    dropout = torch.nn.Dropout(0.1)

    def logits(x):
        return head(dropout(base.forward_features(x).mean((2, 3)))).squeeze(1)

    parameters = list(base.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=0.002, eps=1e-7)
    loss = torch.nn.BCEWithLogitsLoss()
    (xt, yt), (xv, yv) = train, validation
    history = []
    for _ in range(epochs):
        base.train()
        dropout.train()
        order = torch.randperm(len(yt))
        for start in range(0, len(yt), 16):
            batch = order[start:start + 16]
            x, y = xt[batch].clone(), yt[batch]
            flip = torch.rand(len(batch)) < 0.5
            x[flip] = x[flip].flip(-1)
            optimizer.zero_grad()
            loss(logits(x), y).backward()
            optimizer.step()
        base.eval()
        dropout.eval()
        with torch.no_grad():
            history.append(((logits(xv) > 0).float() == yv).float().mean().item())
    return max(history), history[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="*", default=["timm", "glorot", "timm-eps", "glorot-eps"],
                        choices=["timm", "glorot", "timm-eps", "glorot-eps"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from machine import machine

    print(machine())
    print(f"torch {torch.__version__}; data {os.path.abspath(args.data)}; {args.epochs} epochs, 64x64, batch 16")
    train = load(os.path.join(args.data, "train"), 64)
    validation = load(os.path.join(args.data, "validation"), 64)
    for variant in args.variants:
        for seed in args.seeds:
            start = time.perf_counter()
            best, last = run(variant, seed, train, validation, args.epochs)
            print(f"{variant:<11} seed {seed}: best val_accuracy {best:.4f}, last {last:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
