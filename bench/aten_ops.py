"""ATen operations per step: how many operations Lanner's `torch` build and PyTorch + timm
each issue for one step of the recipe, counted on the CPU. On a GPU every issued operation is
at least one kernel launch plus the host time to dispatch it, so at small batches, where
PyTorch's own step takes a few milliseconds, this count decides whether the GPU waits for
the host.

    python3 bench/aten_ops.py --lanner target/release/lanner [--arch mobilenet_v3_large xception]
        [--rows frozen fine-tune full from-scratch inference]

Needs the `torch` build of `lanner` (`cargo build --release -p lanner --features torch`), the
PyTorch it was built against importable (with timm), and g++: the script compiles
bench/aten_ops.cpp against that PyTorch and preloads it into every process it runs. It counts
the operations the framework itself issues: outermost ATen calls, and for PyTorch also the
calls made directly by its autograd backward nodes (not the operations ATen runs inside an
operation), and separately those that are more than a view, a no-op conversion or the read
of a CPU scalar (on a GPU: the kernel launches). Each row runs twice in fresh processes, with 2 and with 6 steps after one warm-up
step; per step = the difference / 4, so model building and the first step cancel out.

Rows (the seed's recipe, as bench/cpu_speed.py runs them): frozen (phase 1, Adam on the
head), fine-tune (phase 2, --fine-tune-layer 100, RMSprop; BatchNorm on running statistics),
full (every layer trains, BatchNorm on running statistics, RMSprop), from-scratch (every layer
trains, BatchNorm on batch statistics, Adam: `lanner bench --step full` and bench/gpu_torch.py's
`full`), inference. Both sides: f32, NCHW (the f32 default on a GPU), batch 2 at 64x64 (the
count does not depend on the size). PyTorch's optimizers run with foreach=True, their default
for CUDA tensors (one multi-tensor operation per update stage, not one per parameter).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from cpu_speed import MODELS

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = ("frozen", "fine-tune", "full", "from-scratch", "inference")
SIZE, BATCH = 64, 2
SHORT, LONG = 2, 6


def torch_child(args):
    import timm
    import torch

    torch.manual_seed(1)
    _, timm_name, first_trainable = MODELS[args.arch]
    backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="")
    head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(backbone.num_features, 1))
    x = torch.rand(BATCH, 3, SIZE, SIZE).mul(2).sub(1)
    y = (torch.arange(BATCH) % 2).float().unsqueeze(1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if args.row == "inference":
        backbone.eval()

        def step():
            with torch.inference_mode():
                head(backbone.forward_features(x).mean((2, 3)))
    else:
        names = [n for n, _ in backbone.named_parameters()
                 if not n.startswith(("conv_head", "norm_head", "classifier", "fc"))]
        if args.row == "frozen":
            trainable = set()
        elif args.row == "fine-tune":
            start = next(i for i, n in enumerate(names) if n.startswith(first_trainable))
            trainable = set(names[start:])
        else:
            trainable = set(names)
        params = list(head.parameters())
        for name, p in backbone.named_parameters():
            p.requires_grad_(name in trainable)
            if name in trainable:
                params.append(p)
        backbone.train(args.row == "from-scratch")
        if args.row in ("frozen", "from-scratch"):
            optimizer = torch.optim.Adam(params, lr=1e-4, eps=1e-7, foreach=True)
        else:
            optimizer = torch.optim.RMSprop(params, lr=1e-5, alpha=0.9, eps=1e-7, foreach=True)

        def step():
            if args.row == "frozen":
                with torch.no_grad():
                    pooled = backbone.forward_features(x).mean((2, 3))
            else:
                pooled = backbone.forward_features(x).mean((2, 3))
            loss = loss_fn(head(pooled), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for _ in range(1 + args.steps):
        step()


# Operations that only make a new view of a tensor or hand it back unchanged (a `to` to the
# device and type it already has): host time, but no kernel and no pass over memory.
VIEWS = {"aten::reshape", "aten::view", "aten::slice", "aten::select", "aten::transpose", "aten::t",
         "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::detach",
         "aten::alias", "aten::as_strided", "aten::lift_fresh", "aten::to"}
# Operations that run on the host only in the GPU setting: `item` reads a CPU scalar here
# (PyTorch's Adam keeps its step counters on the CPU unless `capturable`, and reads each
# one per parameter to compute the bias corrections).
HOST_ONLY = {"aten::item"}


def count(command, library, env):
    """(issued operations, issued operations other than VIEWS and HOST_ONLY) of one run."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "ops")
        env = dict(env, LD_PRELOAD=library, ATEN_OPS_OUT=out)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            lines = f.read().splitlines()
    no_kernel = sum(int(n) for n, name in (line.split(" ", 1) for line in lines[1:])
                    if name in VIEWS or name in HOST_ONLY)
    issued = int(lines[0].split()[0])
    return issued, issued - no_kernel


def per_step(make_command, library, env):
    short = count(make_command(SHORT), library, env)
    long = count(make_command(LONG), library, env)
    return [(b - a) / (LONG - SHORT) for a, b in zip(short, long)]


def lanner_command(lanner, arch, row):
    def make(steps):
        step, layer = {"full": ("fine-tune", "0"), "from-scratch": ("full", "100")}.get(row, (row, "100"))
        return [lanner, "bench", "--device", "libtorch-cpu", "--arch", arch, "--image-size", str(SIZE),
                "--batch-size", str(BATCH), "--step", step, "--fine-tune-layer", layer,
                "--warmup", "0", "--steps", str(steps), "--json"]
    return make


def build_library(folder):
    from torch.utils import cpp_extension

    library = os.path.join(folder, "libaten_ops.so")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib_dir = cpp_extension.library_paths()[0]
    subprocess.run(["g++", "-shared", "-fPIC", "-O2", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=1",
                    *includes, os.path.join(HERE, "aten_ops.cpp"), f"-L{lib_dir}", "-ltorch_cpu",
                    "-lc10", f"-Wl,-rpath,{lib_dir}", "-o", library], check=True)
    return library, lib_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lanner", required=True, help="the torch build of lanner")
    parser.add_argument("--arch", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.arch = args.arch[0]
        return torch_child(args)

    import torch

    with tempfile.TemporaryDirectory() as folder:
        library, lib_dir = build_library(folder)
        # The lanner binary loads libtorch from LD_LIBRARY_PATH: the same copy as the counter.
        paths = [lib_dir] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        env = dict(os.environ, LD_LIBRARY_PATH=":".join(paths), OMP_NUM_THREADS="2",
                   LANNER_MEMORY_FORMAT="nchw")
        print(f"ATen operations issued per step; PyTorch {torch.__version__}, batch {BATCH}, "
              f"{SIZE}x{SIZE}, f32, NCHW")
        print("all: every issued operation; compute: less those that only make a view, hand "
              "their input back or read a CPU scalar (no kernel)")
        print(f"{'model':<20} {'step':<14} {'Lanner all':>10} {'PyTorch all':>11} {'ratio':>6} "
              f"{'Lanner compute':>14} {'PyTorch compute':>15} {'ratio':>6}")
        for arch in args.arch:
            for row in args.rows:
                lanner = per_step(lanner_command(args.lanner, arch, row), library, env)
                peer = per_step(lambda steps: [sys.executable, os.path.abspath(__file__), "--child",
                                               "--lanner", "-", "--arch", arch, "--row", row,
                                               "--steps", str(steps)], library, env)
                print(f"{arch:<20} {row:<14} {lanner[0]:>10.0f} {peer[0]:>11.0f} "
                      f"{lanner[0] / peer[0]:>6.2f} {lanner[1]:>14.0f} {peer[1]:>15.0f} "
                      f"{lanner[1] / peer[1]:>6.2f}", flush=True)
                print(json.dumps({"arch": arch, "step": row, "lanner": lanner, "pytorch": peer}),
                      file=sys.stderr)


if __name__ == "__main__":
    main()
