"""Speed: how close each chapter's training and evaluation come to this machine's limit.

For every chapter, in one process: training images/s at the chapter's default batch size (the real
training step: loss, backward, gradient norm, Adam) and evaluation (image, sample) pairs/s through the real
estimator at the chapter's default chunk, on the plain eager path (float32, no compilation, contiguous
tensors) and on the optimized path the scripts take by default on this device (torch.compile; on CUDA also
bf16 autocast for the networks, TF32, channels_last and CUDA graphs).

Utilization = the FLOP rate achieved (the FLOPs of matmuls and convolutions, counted once per model with
torch.utils.flop_counter) / the FLOP rate of a float32 1024x1024 matmul on the same device, measured in the
same run right before each measurement, so that the ratio does not drift with machine noise. Elementwise
work (the likelihoods' exp and log) counts no FLOPs: it is what keeps utilization below 100%.

    python bench.py                          # every chapter, about 4 minutes on 2 CPU cores
    python bench.py --models model03 --seconds 5 --device cpu

It prints a markdown table and writes runs/bench.json; the README's speed table is rendered from the shipped
assets/bench.json (python rendering.py).
"""
import argparse
import importlib
import json
import math
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import data
import devices
import experiment
import training

CHAPTERS = ["model01", "model02", "model03", "model04", "model05", "model06"]
MATMUL_N = 1024


def matmul_rate(device, seconds=0.5):
    """FLOP/s of a float32 MATMUL_N x MATMUL_N matmul (TF32 off: the plain float32 rate)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device=device) for _ in range(2))
    n, elapsed = timed(lambda: a @ b, device, seconds)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * MATMUL_N ** 3 * n / elapsed


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, seconds, warmup=2):
    """Calls of fn and the seconds they took, running for about `seconds` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync(device)
    return n, time.perf_counter() - t0


def fake_batch(chapter, n, device):
    """Data of the chapter's kind: binarized MNIST in {0, 1}, or 8-bit colour values k/255."""
    if chapter.name == "model01":
        return torch.bernoulli(torch.full((n, 1, 28, 28), 0.13, device=device))
    return data.to_unit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device))


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(chapter, device, optimized, seconds):
    """Training images/s and evaluation pairs/s of one chapter on one path, each with its FLOPs and the
    matmul rate measured just before it."""
    torch.manual_seed(0)
    amp = channels_last = optimized and device.type == "cuda"
    model = devices.configure_device(chapter.build().to(device), device, amp, channels_last)
    optimizer = training.make_optimizer(model, lr=1e-4)
    x = devices.to_device(fake_batch(chapter, chapter.batch_size, device), device, channels_last)
    loss_fn = common.training_loss(model, chapter.k)
    model.train()
    train_flops = count_flops(lambda: training.train_step(model, optimizer, loss_fn, x))
    fast_loss = devices.Compiled(loss_fn, optimized, "training",
                                "reduce-overhead" if device.type == "cuda" else None)
    peak_train = matmul_rate(device)
    n, elapsed = timed(lambda: training.train_step(model, optimizer, fast_loss, x), device, seconds)
    train = {"images_per_s": n * len(x) / elapsed, "flops_per_image": train_flops / len(x), "matmul_flops": peak_train}

    # evaluation: one batch of images through the real estimator, S samples each, chunked as the script does
    samples, rows = chapter.eval_samples, experiment.evaluation_rows(chapter.args, device)
    images = max(1, rows // min(samples, rows))
    x_eval = devices.to_device(fake_batch(chapter, images, device), device, channels_last)
    estimate = lambda compile: common.estimate_log_likelihood(model, x_eval, samples, rows, chapter.eval_pmf,
                                                              progress=False, compile=compile)
    # the estimator's work is one encoding per image and S decodings: log_weights with k = S does the same, and it
    # runs with autograd on, which the flop counter's module tracker needs (it fails under the estimator's no_grad)
    with torch.enable_grad():
        eval_flops = count_flops(lambda: common.log_weights(model, x_eval, samples, chapter.eval_pmf))
    peak_eval = matmul_rate(device)
    n, elapsed = timed(lambda: estimate(optimized), device, seconds, warmup=1)
    pairs = images * samples
    evaluation = {"pairs_per_s": n * pairs / elapsed, "flops_per_pair": eval_flops / pairs, "matmul_flops": peak_eval,
                  "samples": samples, "max_rows": rows}
    return train, evaluation


class Chapter:
    """What bench needs of a chapter script: its default model and the defaults of its command line."""

    def __init__(self, name):
        self.name = name
        self.module = importlib.import_module(name)
        self.args = self.module.parser().parse_args([])  # the script's defaults
        self.batch_size, self.k = self.args.batch_size, self.args.k
        self.eval_samples = self.args.eval_samples
        self.eval_pmf = self.module.EVAL_PMF

    def build(self):
        return self.module.build_model(self.args)


def utilization(rate, flops, peak):
    return rate * flops / peak


def markdown(rows):
    lines = ["| chapter | path | training images/s | training utilization | evaluation pairs/s | "
             "evaluation utilization | S, pairs per chunk |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t, e = r["train"], r["eval"]
        lines.append(f"| {r['chapter']} | {r['path']} | {t['images_per_s']:,.0f} | "
                     f"{utilization(t['images_per_s'], t['flops_per_image'], t['matmul_flops']):.0%} | "
                     f"{e['pairs_per_s']:,.0f} | "
                     f"{utilization(e['pairs_per_s'], e['flops_per_pair'], e['matmul_flops']):.0%} | "
                     f"{e['samples']}, {e['max_rows']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=experiment.HelpFormatter)
    p.add_argument("--models", nargs="+", choices=CHAPTERS, default=None,
                   help="chapters to measure (default: every chapter script present)")
    p.add_argument("--seconds", type=experiment.positive_float, default=3.0, help="timed seconds per measurement")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda if available")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default=os.path.join("runs", "bench.json"),
                   help="results JSON ('' = none); the README's speed table reads the shipped assets/bench.json")
    args = p.parse_args(argv)
    try:
        device = experiment.get_device(args.device)
    except common.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or [n for n in CHAPTERS if os.path.exists(os.path.join(os.path.dirname(__file__) or ".", f"{n}.py"))]
    t0 = time.time()
    rows = []
    for name in names:
        chapter = Chapter(name)
        for path, optimized in [("eager", False), ("optimized", True)]:
            train, evaluation = measure(chapter, device, optimized, args.seconds)
            rows.append({"chapter": name, "path": path, "train": train, "eval": evaluation})
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    peaks = [r[key]["matmul_flops"] for r in rows for key in ("train", "eval")]
    hardware = devices.hardware_name(device)
    footer = (f"{hardware}; torch {torch.__version__}; float32 {MATMUL_N}x{MATMUL_N} matmul "
              f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s over the run; {time.time() - t0:.0f} s in all")
    print("\n" + table + "\n\n" + footer)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "hardware": hardware, "torch_version": torch.__version__,
                       "matmul_n": MATMUL_N, "seconds_per_measurement": args.seconds,
                       "command": "python " + " ".join(["bench.py", *(sys.argv[1:] if argv is None else argv)]),
                       "total_seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
