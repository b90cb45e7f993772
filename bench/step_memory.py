"""The memory a CPU training step takes per input pixel, measured as `StepMemory` in
`crates/lanner-models/src/registry.rs` records it, and printed next to the registry's values:

    python3 bench/step_memory.py [--lanner target/release/lanner] [--archs ...]
        [--small 4] [--large 20]

For each backbone and step kind (frozen: `--step frozen`; from scratch: `--step full`;
fine-tuning everything: `--step fine-tune --fine-tune-layer 0`), `lanner bench` runs one step
at batch --small and at batch --large under `/usr/bin/time -f %M` (peak resident memory), at
224x224 (Xception: 160x160, to keep its runs short). The slope between the two, per image and
per input pixel, is the need the registry should hold; the intercept is the program, the
weights and their optimiser state. `train` refuses a step whose estimate is over the memory
left (`crates/lanner-train/src/step_memory.rs`), so these numbers should not be above what is
measured here.
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

STEPS = {
    "frozen": ["--step", "frozen"],
    "from_scratch": ["--step", "full"],
    "fine_tune_all": ["--step", "fine-tune", "--fine-tune-layer", "0"],
}
ARCHS = [
    "mobilenet_v3_large",
    "mobilenet_v3_large_075",
    "mobilenet_v3_small",
    "mobilenet_v3_small_075",
    "mobilenet_v3_small_050",
    "xception",
]


def peak_kb(lanner, arch, size, batch, step):
    command = [
        "/usr/bin/time", "-f", "%M", lanner, "bench", "--arch", arch,
        "--image-size", str(size), "--batch-size", str(batch),
        "--steps", "1", "--warmup", "0", *step,
    ]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(run.stderr.strip().splitlines()[-1])


def registry_values():
    """`step_memory(frozen, from_scratch, fine_tune_all)` per model name, read from the source."""
    text = Path(__file__).resolve().parent.parent.joinpath(
        "crates/lanner-models/src/registry.rs").read_text()
    values = {}
    for name, *numbers in re.findall(
            r'"(\w+)",\s*(?:timm_name: )?"\w+",[^;]*?step_memory\((\d+), (\d+), (\d+)\)', text, re.S):
        values[name] = dict(zip(STEPS, map(int, numbers)))
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lanner", default="target/release/lanner")
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--small", type=int, default=4)
    parser.add_argument("--large", type=int, default=20)
    args = parser.parse_args()
    recorded = registry_values()
    print("| model | step | bytes per pixel per image | registry | ratio | intercept MB |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs:
        size = 160 if arch == "xception" else 224
        for kind, step in STEPS.items():
            small = peak_kb(args.lanner, arch, size, args.small, step)
            large = peak_kb(args.lanner, arch, size, args.large, step)
            slope = (large - small) * 1024 / (args.large - args.small) / (size * size)
            intercept = (small * 1024 - slope * args.small * size * size) / 1e6
            mine = recorded.get(arch, {}).get(kind)
            ratio = f"{mine / slope:.2f}" if mine else "-"
            print(f"| {arch} | {kind} | {slope:.0f} | {mine or '-'} | {ratio} | {intercept:.0f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
