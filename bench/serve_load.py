"""Load test of `lanner serve`: concurrent clients POST one image to /invocations for a fixed
time on this machine (127.0.0.1 only) and report latency percentiles, throughput, the batch
sizes the server formed, and every non-200 answer. Python standard library only.

    python3 bench/serve_load.py --model out/model [--clients 16] [--seconds 20] [--image F.jpg]
    python3 bench/serve_load.py --url http://127.0.0.1:8080      # a server already running

With --model it starts `target/release/lanner serve --port 0` (or --lanner BIN), waits for
/ping, runs the load and stops the server with SIGTERM. Exits non-zero on any 5xx or failed
request. Bounded: at most --seconds of load and --max-requests requests in all.
"""
import argparse
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

from machine import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANNER = os.path.join(ROOT, "target", "release", "lanner")


def start_server(lanner, model, extra):
    process = subprocess.Popen([lanner, "serve", "--model", model, "--port", "0", *extra],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        process.kill()
        sys.exit(f"lanner serve did not start: {line!r}")
    return process, match.group(1)


def request(connection, method, path, body=None, headers=None):
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read()


def wait_ready(host, port, limit=60):
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            connection = http.client.HTTPConnection(host, port, timeout=5)
            if request(connection, "GET", "/ping")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit("the server never answered /ping with 200")


def client(host, port, body, content_type, deadline, budget, results, lock):
    connection = http.client.HTTPConnection(host, port, timeout=60)
    while time.monotonic() < deadline:
        with lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        started = time.monotonic()
        try:
            status, _ = request(connection, "POST", "/invocations", body, {"Content-Type": content_type})
        except (OSError, http.client.HTTPException) as error:
            status = f"failed: {error}"
            connection.close()
            connection = http.client.HTTPConnection(host, port, timeout=60)
        with lock:
            results.append((time.monotonic() - started, status))


def percentile(sorted_values, fraction):
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="serve this model with --lanner (else use --url)")
    parser.add_argument("--url", default=None, help="a running server on this machine")
    parser.add_argument("--lanner", default=LANNER)
    parser.add_argument("--image", help="the image to send (default: a generated JPEG)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--single", type=int, default=50,
                        help="single-image requests from one client before the load (latency without queueing)")
    parser.add_argument("--torch", action="store_true",
                        help="also time single-image prediction in PyTorch + timm on the CPU (same architecture and size)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for lanner serve (repeat), e.g. --server-arg=--max-batch-delay=5")
    args = parser.parse_args()

    process = None
    if args.model:
        process, url = start_server(args.lanner, args.model, args.server_arg)
    elif args.url:
        url = args.url
    else:
        sys.exit("pass --model (to start a server) or --url (a running one)")
    parsed = urllib.parse.urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("this load test only targets a server on this machine (127.0.0.1)")
    host, port = parsed.hostname, parsed.port
    if args.image:
        body = open(args.image, "rb").read()
    else:
        body = generated_jpeg()
    content_type = "image/png" if body.startswith(b"\x89PNG") else "image/jpeg"

    try:
        wait_ready(host, port)
        single = single_image_latencies(host, port, body, content_type, args.single)
        results, lock, budget = [], threading.Lock(), [args.max_requests]
        started = time.monotonic()
        deadline = started + args.seconds
        threads = [threading.Thread(target=client, args=(host, port, body, content_type, deadline, budget, results, lock))
                   for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        _, metrics = request(http.client.HTTPConnection(host, port, timeout=10), "GET", "/metrics")
        metrics = metrics.decode()
        peak = peak_memory_mib(process.pid) if process else None
    finally:
        if process:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
            if code != 0:
                print(f"lanner serve exited with {code} after SIGTERM", file=sys.stderr)

    if single:
        print("single image, one client, ms: p50 {:.1f}  p99 {:.1f}  ({} requests)".format(
            1000 * percentile(single, 0.5), 1000 * percentile(single, 0.99), len(single)))
    if args.torch and single and args.model:
        torch_single = torch_latencies(args.model, body, args.single)
        print("PyTorch CPU (timm, same architecture and size, decode + resize + forward, in process), ms: "
              "p50 {:.1f}  p99 {:.1f}".format(1000 * percentile(torch_single, 0.5), 1000 * percentile(torch_single, 0.99)))
        print("ratio PyTorch p50 / Lanner p50 (over HTTP): {:.2f}".format(
            percentile(torch_single, 0.5) / percentile(single, 0.5)))
    if peak is not None:
        print(f"server peak memory (VmHWM): {peak:.0f} MiB")
    latencies = sorted(latency for latency, status in results if status == 200)
    statuses = {}
    for _, status in results:
        statuses[status] = statuses.get(status, 0) + 1
    server_errors = sum(n for s, n in statuses.items() if not isinstance(s, int) or s >= 500)
    print(f"machine: {machine()}")
    print(f"{args.clients} clients, {elapsed:.1f} s, {len(body)} byte {content_type} per request")
    print(f"requests: {len(results)}  statuses: {statuses}")
    if latencies:
        print(f"throughput: {len(latencies) / elapsed:.1f} requests/s")
        print("latency ms: p50 {:.1f}  p90 {:.1f}  p99 {:.1f}  max {:.1f}".format(
            *(1000 * percentile(latencies, f) for f in (0.5, 0.9, 0.99)), 1000 * latencies[-1]))
    passes = metric(metrics, "lanner_batch_size_count")
    images = metric(metrics, "lanner_batch_size_sum")
    print(f"server: {passes:.0f} forward passes, {images / passes if passes else 0:.1f} images per pass on average")
    if server_errors:
        print(f"FAILED: {server_errors} requests got a 5xx or no answer", file=sys.stderr)
        sys.exit(1)


def single_image_latencies(host, port, body, content_type, count):
    """Seconds of `count` sequential single-image requests on one connection."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        status, _ = request(connection, "POST", "/invocations", body, {"Content-Type": content_type})
        if status == 200:
            seconds.append(time.perf_counter() - start)
    return sorted(seconds)


def peak_memory_mib(pid):
    """The server's peak resident memory so far (Linux's VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def torch_latencies(model_dir, body, count):
    """Seconds per image of the same architecture in PyTorch + timm on the CPU: PIL decode,
    bilinear resize to the model's size, normalisation and the forward pass, one image at a time
    (random weights: the time does not depend on them)."""
    import io
    import json

    import timm
    import torch
    from PIL import Image

    card = json.load(open(os.path.join(model_dir, "lanner.json")))
    size = card["preprocessing"]["image_size"]
    mean = torch.tensor(card["preprocessing"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card["preprocessing"]["std"]).view(1, 3, 1, 1)
    model = timm.create_model(card["timm_name"], pretrained=False, num_classes=card["head"]["outputs"]).eval()
    torch.set_num_threads(os.cpu_count())
    seconds = []
    with torch.inference_mode():
        for _ in range(count + 3):
            start = time.perf_counter()
            image = Image.open(io.BytesIO(body)).convert("RGB").resize((size, size), Image.BILINEAR)
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, size, size, 3)
            x = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
            torch.sigmoid(model(x))
            seconds.append(time.perf_counter() - start)
    return sorted(seconds[3:])


def generated_jpeg():
    """A 500x375 JPEG drawn by the make_shapes example's generator, without Pillow: the
    example writes one, and we read it back."""
    out = os.path.join(ROOT, "bench", "work", "serve-image")
    path = os.path.join(out, "train", "square", "square_00000.jpg")
    if not os.path.exists(path):
        subprocess.run(["cargo", "run", "--release", "-q", "-p", "lanner-data", "--example", "make_shapes", "--",
                        out, "--per-class", "5"], check=True, cwd=ROOT)
    return open(path, "rb").read()


if __name__ == "__main__":
    main()
