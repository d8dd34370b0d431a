"""Reproduce every result of the README in one command: each run of the story with its defaults, an --eval-only
check of each, the S sweeps, and the summary figure, all into runs/reproduce/ (assets/ is never touched).

    python reproduce.py --list                                 # the runs, and how long each takes on this machine
    python reproduce.py --data-dir DIR                         # everything, one run after another
    python reproduce.py --data-dir DIR --time-limit 170        # stop cleanly within 170 minutes; run it again to go on

It is resumable: a run whose results file exists is skipped, an unfinished one is resumed from its checkpoint.
At the end it prints each reproduced number beside the shipped one (the difference in standard errors).
"""
import argparse
import math
import os
import signal
import subprocess
import sys
import time

import rendering
import results

OUT = os.path.join("runs", "reproduce")
S_SWEEP = ["--s-sweep", "1", "10", "100", "1000"]
RUNS = [  # (results name, script, flags): the story's runs, each as its script's defaults plus the flags it ran with
    ("model01", "model01.py", []),
    ("model02", "model02.py", []),
    ("model02_unbounded", "model02.py", ["--unbounded"]),
    ("model02_unbounded_dequantized", "model02.py", ["--unbounded", "--dequantize"]),
    ("model02_beta0.3679", "model02.py", ["--beta", "0.3679"]),
    ("model03", "model03.py", S_SWEEP),
    ("model03_unbounded", "model03.py", ["--unbounded", *S_SWEEP]),
    ("model04", "model04.py", S_SWEEP),
    ("model04_1component", "model04.py", ["--components", "1"]),
    ("model04_no_autoregression", "model04.py", ["--no-autoregression"]),
    ("model05_logistic_unbounded", "model05.py", ["--obs", "logistic", "--unbounded", "--latent-bounds", "shift"]),
    ("model05_mixture", "model05.py", []),
    ("model06_logistic_unbounded", "model06.py", ["--obs", "logistic", "--unbounded"]),
    ("model06_mixture", "model06.py", []),
]


def hours(script, flags=()):
    """(training hours, evaluation hours) of the script's run with flags (its epochs and samples) at the rates of the
    shipped bench.py table for the script's default model."""
    b = results.load_bench()
    row = next((r for r in (b or {}).get("rows", []) if r["chapter"] == script[:-3] and r["path"] == "optimized"), None)
    if row is None:
        return None
    _, train_h, eval_min = rendering.default_hours(script[:-3], row, flags)
    return train_h, eval_min / 60


def plan():
    """Every step: the training run, then its --eval-only check, as (name, command, results file that marks it done)."""
    steps = []
    for name, script, flags in RUNS:
        ckpt = os.path.join(OUT, f"{name}_checkpoint.pt")
        steps.append((name, [script, "--out-dir", OUT, *flags], os.path.join(OUT, f"{name}_results.json")))
        check = os.path.join(OUT, "checks", name)
        steps.append((f"{name} (check)", [script, "--out-dir", check, *[f for f in flags if f not in S_SWEEP],
                                          "--eval-only", "--checkpoint", ckpt],
                      os.path.join(check, f"{name}_results.json")))
    return steps


def list_plan():
    total = 0.0
    for name, script, flags in RUNS:
        h = hours(script, flags)
        text = "no bench.py rate" if h is None else f"{h[0]:.1f} h training + {h[1] * 60:.0f} min evaluation at the default model's rate"
        total += sum(h) if h else 0
        print(f"{name:32s} python {' '.join([script, *flags])}   ({text}; its check about the evaluation's time again)")
    print(f"about {total:.0f} h in all at bench.py's rates (assets/bench.json), plus the checks")


def call_through_ctrl_c(command):
    """Run `command` and wait for it, Ctrl-C included: the terminal sends Ctrl-C to both, the run stops after its
    step with a checkpoint, and this waits for that (subprocess.call would kill it a quarter of a second later). A
    handler, not SIG_IGN, since the run would inherit an ignored signal."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        return subprocess.call(command)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_steps(data_dir, time_limit):
    deadline = math.inf if time_limit is None else time.time() + 60 * time_limit
    for name, args, done in plan():
        if os.path.exists(done):
            continue
        left = (deadline - time.time()) / 60
        if left < 5:
            print(f"reproduce: out of time before {name}; run the same command again to go on.")
            return 1
        ckpt = os.path.join(OUT, f"{name}_checkpoint.pt")
        extra = ["--resume"] if "--eval-only" not in args and os.path.exists(ckpt) else []
        limit = [] if "--eval-only" in args or time_limit is None else ["--time-limit", f"{left - 2:.0f}"]
        command = [sys.executable, *args, "--data-dir", data_dir, *extra, *limit]
        print("reproduce:", " ".join(command[1:]), flush=True)
        code = call_through_ctrl_c(command)
        if code != 0 or not os.path.exists(done):
            print(f"reproduce: {name} stopped before its end (exit status {code}); run the same command again to "
                  f"go on.")
            return 1 if code == 0 else code
    compare()
    return subprocess.call([sys.executable, "rendering.py", "--summary", "--data-dir", data_dir, "--runs", OUT,
                            "--out", os.path.join(OUT, "summary.png")])


def compare():
    """Each reproduced number beside the shipped one."""
    for name, _, _ in RUNS:
        mine, ours = results.load(name, OUT), results.load(name)
        if mine is None or ours is None:
            continue
        key, se = ("test_bpd", "test_bpd_stderr") if "test_bpd" in ours else ("test_llh_nats", "test_llh_stderr")
        print(f"{name:32s} reproduced {mine[key]:.3f}, shipped {ours[key]:.3f} ± {ours[se]:.3f} "
              f"({(mine[key] - ours[key]) / ours[se]:+.1f} s.e.)")


def main(argv=None):
    from experiment import HelpFormatter, positive_float
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-dir", default="./data", help="where MNIST and CIFAR-10 are, or are downloaded to")
    p.add_argument("--time-limit", type=positive_float, default=None, metavar="MINUTES",
                   help="stop cleanly (checkpoint written) within this many minutes; run again to go on")
    p.add_argument("--list", action="store_true", help="print the runs and their estimated times, run nothing")
    args = p.parse_args(argv)
    if args.list:
        list_plan()
        return 0
    return run_steps(args.data_dir, args.time_limit)


if __name__ == "__main__":
    raise SystemExit(main())
