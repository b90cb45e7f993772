"""The GPU table from one `bench/gpu_check.sh` run: Lanner's `lanner bench` rows next to
PyTorch's (`bench/gpu_torch.py`) for the same architecture, batch, precision and step, with the
ratio Lanner / PyTorch.

    python3 bench/gpu_table.py OUT_DIR/stages.txt [--build torch]

Reads the JSON lines each stage printed (stages.txt holds every stage's stdout under a
`===== NAME: rc=N: COMMAND` line). Lanner's `frozen`, `full` and `inference` steps match
PyTorch's steps of the same name; `fine-tune-layer-100` has no PyTorch row.
"""

import argparse
import json
import re

ARCH = {"mobilenet": "mobilenet_v3_large", "xception": "xception"}


def stages(path):
    """Stage name -> the JSON objects its stdout held."""
    found, name = {}, None
    for line in open(path):
        header = re.match(r"===== (\S+): rc=", line)
        if header:
            name = header.group(1)
            found[name] = []
        elif name and line.startswith("{"):
            try:
                found[name].append(json.loads(line))
            except ValueError:
                pass
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages")
    parser.add_argument("--build", default="torch")
    args = parser.parse_args()
    found = stages(args.stages)
    peer = {}
    for row in found.get("torch-peer", []):
        if "images_per_second" in row:
            key = (row["arch"], row["batch_size"], row["precision"], row["step"])
            peer[key] = row["images_per_second"]
    print("| model | batch | precision | step | Lanner images/s | PyTorch images/s | Lanner / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    pattern = re.compile(rf"{args.build}-(mobilenet|xception)-b(\d+)-(f32|bf16)$")
    for name, rows in found.items():
        match = pattern.match(name)
        if not match:
            continue
        arch, batch, precision = ARCH[match.group(1)], int(match.group(2)), match.group(3)
        for row in rows:
            ours = row.get("images_per_second")
            theirs = peer.get((arch, batch, precision, row.get("step")))
            ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
            print(f"| {arch} | {batch} | {precision} | {row.get('step')} | "
                  f"{ours:,.0f} | {f'{theirs:,.0f}' if theirs else '-'} | {ratio} |")


if __name__ == "__main__":
    main()
