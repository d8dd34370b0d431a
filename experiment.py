"""The command line every chapter shares and the run each one makes: `make_parser` (the common flags; a chapter adds
its own), `run_experiment` (open the run, train, evaluate, draw, write the results) and `cli` (a UserError becomes a
one-paragraph message and exit status 2, never a traceback).
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from common import UserError, bits_per_dim, estimate_log_likelihood, mean_and_stderr, training_loss
from devices import (configure_device, end_processes, gather_shards, hardware_name, is_main, rank, seed_everything,
                     shard, start_processes, to_device, world_size)
from evaluation import (IMAGE_STATS_IMAGES, balance_stats, heldout_elbo, image_stats, plot_colour_curves,
                        plot_history, save_grids)
from training import (GRAD_NORM_WINDOW, SCHEDULES, Diverged, Plan, Sitting, SkipGuard, TrainState, finite_or_none,
                      load_checkpoint, make_optimizer, now, restore, train)


STARTED = time.time()  # wall_seconds in the results: the script's work, from its imports to its results


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------
def get_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here. "
                        "Use --device cpu (or auto).")
    return torch.device(name)


def _number(kind, text, smallest, strict):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number, got {text!r}") from None
    if value < smallest or (strict and value == smallest) or value != value:
        raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {smallest}, got {value}")
    return value


def positive_int(text):
    return _number(int, text, 1, strict=False)


def non_negative_int(text):
    return _number(int, text, 0, strict=False)


def positive_float(text):
    return _number(float, text, 0.0, strict=True)


CUDA_EVAL_IMAGES = 16  # images per decoder pass in evaluation on a GPU: a size for its throughput, not measured (no GPU lent)
CUDA_EVAL_MAX_ROWS = 16_384  # and at most this many (sample, image) pairs, for its memory


def evaluation_rows(args, device):
    """--eval-max-rows as given, or the device's default: the chapter's size for a CPU's cache, or on CUDA every
    sample of CUDA_EVAL_IMAGES images in one pass."""
    if args.eval_max_rows:
        return args.eval_max_rows
    if device.type == "cuda":
        return min(args.eval_samples * CUDA_EVAL_IMAGES, CUDA_EVAL_MAX_ROWS)
    return args.cpu_eval_max_rows


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the script's docstring as written and every flag's default (a help that states its own default,
    such as one per device, is left as written)."""

    def _get_help_string(self, action):
        return action.help if "default:" in (action.help or "") else super()._get_help_string(action)


def make_parser(doc, *, epochs, batch_size, k, lr, schedule, eval_max_rows, eval_samples=5000,
                skip_grad_norm=math.inf, skip_grad_ratio=math.inf):
    """The flags every modelNN.py keeps; the script adds its own."""
    # no abbreviations: --resume and --eval-only must see which flags a command names (_take_checkpoint_flags)
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--data-dir", default="./data", help="where the dataset is, or is downloaded to")
    p.add_argument("--out-dir", default="runs", help="grids, results JSON, training curve and checkpoint go here "
                                                     "(assets/ holds the shipped reference runs)")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="epochs (the schedule is spread over them)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in all (smoke runs); the schedule still spans --epochs")
    p.add_argument("--time-limit", type=positive_float, default=None, metavar="MINUTES",
                   help="stop training cleanly after this many minutes of this sitting, write the checkpoint and "
                        "print the command that resumes it (for wall-time limits)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="images per optimizer step")
    p.add_argument("--k", type=positive_int, default=k, help="importance samples in the training bound (1 = ELBO)")
    p.add_argument("--lr", type=positive_float, default=lr, help="base learning rate of Adam")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default=schedule,
                   help="learning-rate schedule: constant; hold-decay (the base rate for the first half, then a "
                        "geometric decay to a tenth); iwae (Burda et al.'s 8 stages, compressed into --epochs)")
    p.add_argument("--eval-samples", type=positive_int, default=eval_samples,
                   help="importance samples S for the test log-likelihood")
    p.add_argument("--eval-limit", type=positive_int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--eval-max-rows", type=positive_int, default=None,
                   help=f"(sample, image) pairs per decoder pass in evaluation (default: {eval_max_rows} on CPU, "
                        f"sized for the cache by bench.py; on CUDA, all S samples of {CUDA_EVAL_IMAGES} images, "
                        f"at most {CUDA_EVAL_MAX_ROWS})")
    p.set_defaults(cpu_eval_max_rows=eval_max_rows)
    p.add_argument("--s-sweep", type=positive_int, nargs="+", default=None, metavar="S",
                   help="also estimate log p(x) with each of these numbers of importance samples on the first "
                        "--s-sweep-images test images (how the estimate moves with S)")
    p.add_argument("--s-sweep-images", type=positive_int, default=1000, help="test images for --s-sweep")
    p.add_argument("--curve-images", type=non_negative_int, default=1000,
                   help="after every epoch, the test ELBO (k=1) on the first N test images goes into the results "
                        "(0 = off)")
    p.add_argument("--skip-grad-norm", type=positive_float, default=skip_grad_norm,
                   help="skip (and count) a step whose gradient norm exceeds this, as well as any non-finite step")
    p.add_argument("--skip-grad-ratio", type=positive_float, default=skip_grad_ratio,
                   help=f"also skip a step whose gradient norm exceeds this many times the median of the last "
                        f"{GRAD_NORM_WINDOW} steps, skipped ones included (inf = off): one outlier step can wreck "
                        f"Adam's weights")
    p.add_argument("--max-skips", type=positive_int, default=100, help="stop the run after this many skipped steps in a row")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda if available")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="CPU threads for torch (0 = torch's default: one per physical core)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the training step and the evaluation's log-weights (same numbers, faster; "
                        "falls back to eager with a warning where compilation is unavailable)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the networks only; likelihoods and log-weights stay float32 "
                        "(default: on for CUDA, off for CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the convolutions (default: on for CUDA, off for CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run whose checkpoint is in --out-dir (or --checkpoint)")
    mode.add_argument("--eval-only", action="store_true",
                      help="no training: evaluate --checkpoint and write grids and results")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir holds a checkpoint")
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: <out-dir>/<model>_checkpoint.pt)")
    p.add_argument("--checkpoint-minutes", type=positive_float, default=10.0,
                   help="minutes between checkpoints during training")
    p.add_argument("--no-download", action="store_true", help="never try to download the dataset")
    return p


# flags that may change between a run and its --resume without changing the run
RESUMABLE_CHANGES = {"world_size", "cpu_eval_max_rows", "max_skips", "skip_grad_norm", "skip_grad_ratio", "data_dir",
                     "out_dir", "max_steps", "eval_samples", "eval_limit", "eval_max_rows", "device", "threads",
                     "resume", "overwrite", "eval_only", "checkpoint", "checkpoint_minutes", "no_download",
                     "time_limit", "compile", "amp", "channels_last", "s_sweep", "s_sweep_images"}


def launcher(processes=None):
    """How a run of this many processes (default: this one's) is started: python, or torchrun with the number."""
    processes = processes or world_size()
    return f"torchrun --nproc_per_node={processes}" if processes > 1 else "python"


def resume_command(script, argv):
    argv = [a for a in argv if a != "--overwrite"]
    return f"{launcher()} " + " ".join([script, *argv, *([] if "--resume" in argv else ["--resume"])])


def cli(run, argv):
    """Run `run(argv)`; a UserError becomes a one-paragraph message on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    status = None  # stays None while an unexpected exception passes through
    try:
        run(argv)
        status = 0
    except UserError as err:
        if is_main():  # under torchrun every rank meets the same error: one message
            print(f"error: {err}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops cleanly itself): loading, evaluation, grids
        if is_main():
            print("\nerror: interrupted. A checkpoint written before is kept: the same command with --resume goes on "
                  "from it (a finished training's is evaluated again).", file=sys.stderr)
        status = 130
    finally:
        end_processes(together=status in (0, 2))
    return status


# ---------------------------------------------------------------------------------------------------
# The run every chapter makes
# ---------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One chapter run as it is opened: the model on its device, Adam, the state to continue from, the config that
    trained it (the checkpoint's, when resumed or evaluated), and what the results record of the machine."""
    name: str
    script: str
    command: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    config: dict
    train_config: dict
    ckpt_path: str
    device: torch.device
    channels_last: bool
    hardware: str
    settings: dict  # resolved: amp, tf32, compile, channels_last, world size, evaluation dtype
    model_flags: dict  # the older_checkpoints flags, as the model was built (the results record them)


def run_experiment(args, argv, *, name, script, build_model, data, eval_pmf, adam_eps=1e-8, extra_grids=None,
                   objective=None, older_checkpoints=None):
    """Seed, build the model, train (or resume, or only load), evaluate log p(x) on the test set, write grids
    (and `extra_grids(model, out_dir, name, eval_pmf)`, if given) and results. eval_pmf: score the probability of
    the 8-bit values and report bits/dim (the colour chapters). `objective`: (a function of the model that returns
    its training loss of a batch, a line that names it for the results); default minus the IWAE bound with --k
    samples. `older_checkpoints`: flags that change the model but not the run's name, each with the value that
    checkpoints written before the flag existed were built with; --resume and --eval-only take them from the
    checkpoint (open_run). Returns the results dict, or None when --time-limit stopped training before its end (and
    on every rank but 0 of a torchrun run, which writes nothing)."""
    run = open_run(args, argv, name, script, build_model, data, adam_eps, older_checkpoints or {})
    make_loss, objective_name = objective or (lambda m: training_loss(m, args.k), f"IWAE bound, k = {args.k}")
    if not args.eval_only and not train_run(run, args, data, make_loss(run.model), eval_pmf, argv):
        return None
    x_test = to_device(data.test_batch(data.test[:args.eval_limit] if args.eval_limit else data.test), run.device,
                       run.channels_last)
    results = evaluate_run(run, args, data, x_test, eval_pmf, extra_grids)
    if results is None:
        return None
    results["objective"] = objective_name
    write_results(run, args, results, eval_pmf)
    if run.state.stopped_by_guard is not None and not args.eval_only:
        guard = run.state.stopped_by_guard
        raise Diverged(f"Training diverged: {guard['reason']} at step {guard['step']} (epoch {guard['epoch']}). "
                       f"The weights of the last step taken were evaluated and written as the result above "
                       f"(stopped_by_guard in {results_path(run, args)}); the checkpoint {run.ckpt_path} holds them. "
                       f"Lower --lr to train further.")
    return results


def _make_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"Cannot create the output folder {path} ({err.strerror}). Pass --out-dir with a folder "
                        f"you can write to.") from None


def open_run(args, argv, name, script, build_model, data, adam_eps, older_checkpoints):
    """Device settings, seed, the checkpoint to resume or evaluate, model and Adam, and the checkpoint's state or a
    fresh one (refused where an earlier run's checkpoint would be replaced without --overwrite). With --resume or
    --eval-only, each flag of `older_checkpoints` that the command line leaves out takes the checkpoint's value (a
    checkpoint older than the flag: the value given), and one it names otherwise is refused."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = start_processes(get_device(args.device))
    amp = device.type == "cuda" if args.amp is None else args.amp
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    seed_everything(args.seed)  # the same weights on every rank
    ckpt_path = args.checkpoint or os.path.join(args.out_dir, f"{name}_checkpoint.pt")
    _refuse_to_write_shipped(args, ckpt_path)
    _make_out_dir(args.out_dir)
    args.eval_max_rows = evaluation_rows(args, device)
    blob = None
    if args.eval_only or args.resume:
        blob = load_checkpoint(ckpt_path, device)
        _check_model_name(blob, name, ckpt_path)
        blob["config"] = {**older_checkpoints, **blob["config"]}
        _take_checkpoint_flags(args, argv, blob["config"], older_checkpoints, ckpt_path)
    config = {"model": name, "dataset": data.name, **vars(args), "world_size": world_size()}
    if args.batch_size < world_size():
        raise UserError(f"--batch-size {args.batch_size} is split across {world_size()} processes: pass at least "
                        f"one image per process.")
    model = configure_device(build_model().to(device), device, amp, channels_last)
    optimizer = make_optimizer(model, args.lr, adam_eps)
    state, train_config = TrainState(), config
    if blob is not None:
        _check_checkpoint_fits(blob, name, script, ckpt_path, config, args.resume)
        restore(blob, model, None if args.eval_only else optimizer, rng=args.resume)
        state, train_config = blob["state"], blob["config"]
    elif os.path.exists(ckpt_path) and not args.overwrite:
        _refuse_to_replace(ckpt_path, device, data)
    if rank() > 0:  # the same weights, each rank its own draws
        torch.manual_seed(args.seed + 1_000_003 * rank() + state.step)
    settings = {"amp": amp, "tf32": torch.backends.cuda.matmul.allow_tf32, "compile": args.compile,
                "channels_last": channels_last, "world_size": world_size(), "eval_dtype": "float32",
                "eval_max_rows": args.eval_max_rows}
    hardware = hardware_name(device) + (f", {world_size()} processes" if world_size() > 1 else "")
    return Run(name, script, f"{launcher()} " + " ".join([script, *argv]), model, optimizer, state, config,
               train_config, ckpt_path, device, channels_last, hardware, settings,
               {key: config[key] for key in older_checkpoints})


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")  # the reference runs the README reads


def _refuse_to_write_shipped(args, ckpt_path):
    """Without --overwrite nothing is written into assets/ or a folder in it, where the shipped reference runs and
    their checks are: neither results and grids (--out-dir) nor, unless the run only evaluates, a checkpoint."""
    folders = [args.out_dir] + ([] if args.eval_only else [os.path.dirname(ckpt_path) or "."])
    home = os.path.realpath(SHIPPED)
    shipped = [f for f in folders if os.path.commonpath([os.path.realpath(f), home]) == home]  # or a folder in it
    if shipped and not args.overwrite:
        raise UserError(f"{shipped[0]} holds the shipped reference runs, which the README reads. Write your own run "
                        f"elsewhere (the default --out-dir is runs/), or pass --overwrite to replace them.")


def _refuse_to_replace(ckpt_path, device, data):
    """A fresh run may replace a finished run of the user's own (running a chapter again), never an unfinished one
    (it would be lost) without --overwrite."""
    blob = load_checkpoint(ckpt_path, device)
    state, config = blob["state"], blob["config"]
    planned = config["epochs"] * math.ceil(len(data.train) / config["batch_size"])
    if state.stopped_by_guard is None and state.step < min(planned, config.get("max_steps") or planned):
        raise UserError(f"{ckpt_path} holds an unfinished run (step {state.step} of {planned}). Pass --resume to "
                        f"continue it, --overwrite to start afresh (it is replaced), or another --out-dir.")
    if is_main():
        print(f"{ckpt_path} holds a finished run: starting afresh (its checkpoint, grids and results are replaced; "
              f"--resume instead would evaluate it again).", file=sys.stderr)


def _check_model_name(blob, name, ckpt_path):
    if blob["config"].get("model") != name:
        raise UserError(f"{ckpt_path} was written by {blob['config'].get('model')}, not {name}.")


def _take_checkpoint_flags(args, argv, checkpoint_config, keys, ckpt_path):
    """The checkpoint's value of each flag in `keys`: taken where the command line leaves the flag out, refused
    where it names another value."""
    for key in keys:
        flag, held = "--" + key.replace("_", "-"), checkpoint_config[key]
        named = any(a == flag or a.startswith(flag + "=") for a in argv)
        if named and getattr(args, key) != held:
            raise UserError(f"{ckpt_path} was trained with {flag} {held}, and this command asks for {flag} "
                            f"{getattr(args, key)}. Drop {flag} (the checkpoint's value is used), or train a new run "
                            f"without --resume or --eval-only.")
        setattr(args, key, held)


def _check_checkpoint_fits(blob, name, script, ckpt_path, config, resume):
    trained_on = blob["config"].get("world_size", 1)
    if resume and trained_on != config["world_size"]:
        raise UserError(f"{ckpt_path} was trained by {trained_on} process{'es' * (trained_on > 1)}, and this is "
                        f"{config['world_size']}: --resume it as it was started ({launcher(trained_on)} {script} ... "
                        f"--resume), since its order of batches, random draws and steps follow that number. Or start "
                        f"afresh with --overwrite.")
    if resume:
        changed = {key: (blob["config"].get(key), value) for key, value in config.items()
                   if key not in RESUMABLE_CHANGES and blob["config"].get(key) != value}
        if changed:
            raise UserError("--resume needs the flags of the run it continues; these differ (checkpoint, now): "
                            + ", ".join(f"{key}: {a!r} vs {b!r}" for key, (a, b) in changed.items())
                            + ". Pass the same values, or start afresh with --overwrite.")


def planned_steps(run, data):
    return run.train_config["epochs"] * math.ceil(len(data.train) / run.train_config["batch_size"])


def train_run(run, args, data, loss, eval_pmf, argv):
    """Train this sitting; False when the time limit stopped it before the end (the resume command is printed)."""
    curve_x = to_device(data.test_batch(data.test[:args.curve_images]), run.device, run.channels_last)
    epoch_end = (lambda m: heldout_elbo(m, curve_x, eval_pmf)) if args.curve_images > 0 else None
    plan = Plan(batch_size=args.batch_size, epochs=args.epochs, lr_at=SCHEDULES[args.schedule], base_lr=args.lr,
                max_steps=args.max_steps, time_limit_minutes=args.time_limit,
                checkpoint_minutes=args.checkpoint_minutes)
    guard = SkipGuard(args.skip_grad_norm, args.skip_grad_ratio, args.max_skips)
    run.state = train(run.model, run.optimizer, loss, data, run.state, plan,
                      Sitting(run.ckpt_path, run.config, run.hardware, run.command), guard, epoch_end,
                      compile=args.compile, compile_mode="reduce-overhead" if run.device.type == "cuda" else None,
                      channels_last=run.channels_last)
    planned = planned_steps(run, data)
    if run.state.stopped_by_guard is None and run.state.step < min(planned, args.max_steps or planned):
        if is_main():
            print(f"{run.name}: stopped at the time limit after step {run.state.step} of {planned} (epoch "
                  f"{run.state.epoch}); saved {run.ckpt_path}. Resume with:\n  {resume_command(run.script, argv)}")
        return False
    return True


def evaluate_run(run, args, data, x_test, eval_pmf, extra_grids):
    """log p(x) with S samples, the balance statistics, the S sweep, the grids and image_stats, in that order (the
    order of the random draws that the shipped results were written with). Always in float32: bf16 (--amp) is for
    training only, so that a checkpoint scores the same network on any device. Under torchrun the log-likelihood is
    sharded across the ranks and gathered; the rest is rank 0's, and the other ranks return None."""
    run.model.amp_dtype = None
    t0 = time.time()
    llh = gather_shards(estimate_log_likelihood(run.model, shard(x_test), args.eval_samples, args.eval_max_rows,
                                                eval_pmf, progress=is_main(), compile=args.compile))
    eval_seconds = time.time() - t0
    if not is_main():
        return None
    llh_nats, llh_stderr = mean_and_stderr(llh)
    balance = balance_stats(run.model, x_test, eval_pmf)
    s_sweep = [_s_sweep_row(run, args, data, s, eval_pmf) for s in args.s_sweep or []]
    mean_how = save_grids(run.model, x_test[:64], args.out_dir, run.name, eval_pmf)
    if extra_grids is not None:
        extra_grids(run.model, args.out_dir, run.name, eval_pmf)
    texture = image_stats(run.model, x_test[:IMAGE_STATS_IMAGES], eval_pmf)
    plot_history(run.state.history, os.path.join(args.out_dir, f"{run.name}_curve.png"), f"{run.name} on {data.name}")
    results = _results(run, args, data, llh_nats, llh_stderr, eval_seconds, len(x_test))
    results.update(test_balance=balance, image_stats=texture, s_sweep=s_sweep, samples_mean=mean_how)
    if eval_pmf:
        _add_bits_per_dim(results, x_test[0].numel())
    return results


def _s_sweep_row(run, args, data, s, eval_pmf):
    sweep_x = to_device(data.test_batch(data.test[:args.s_sweep_images]), run.device, run.channels_last)
    t_s = time.time()
    nats, stderr = mean_and_stderr(estimate_log_likelihood(run.model, sweep_x, s, args.eval_max_rows, eval_pmf,
                                                           compile=args.compile))
    return {"S": s, "images": len(sweep_x), "llh_nats": nats, "stderr": stderr, "seconds": round(time.time() - t_s, 1)}


def _results(run, args, data, llh_nats, llh_stderr, eval_seconds, eval_images):
    state, tc, planned = run.state, run.train_config, planned_steps(run, data)
    results = {
        "model": run.name, "dataset": data.name, "parameters": sum(p.numel() for p in run.model.parameters()),
        "test_llh_nats": llh_nats, "test_llh_stderr": llh_stderr,
        "eval_samples": args.eval_samples, "eval_images": eval_images, "eval_seconds": round(eval_seconds, 1),
        "eval_hardware": run.hardware, "eval_compiled": args.compile,
        "k": tc["k"], "epochs": tc["epochs"], "epochs_completed": state.epoch,
        "steps": state.step, "planned_steps": planned, "shortened": state.step < planned,
        "batch_size": tc["batch_size"], "lr": tc["lr"], "schedule": tc["schedule"],
        "seed": tc["seed"], "skipped_steps": state.skipped_steps, "skips": state.skips,
        "skip_grad_norm": finite_or_none(tc.get("skip_grad_norm")),
        "skip_grad_ratio": finite_or_none(tc.get("skip_grad_ratio")),
        "train_seconds": round(state.train_seconds, 1), "train_device": tc["device"],
        "train_segments": state.segments, "test_curve_images": tc.get("curve_images", 0),
        "test_curve": [dict(zip(("epoch", "step", "elbo_nats", "rate_nats", "distortion_nats"), row))
                       for row in state.test_curve],
        "device": str(run.device), "hardware": run.hardware, "torch_version": torch.__version__,
        "command": run.command, "eval_only": args.eval_only, "settings": run.settings, "finished": now(),
        **run.model_flags,
    }
    if state.stopped_by_guard is not None:
        results["stopped_by_guard"] = state.stopped_by_guard
    return results


def _add_bits_per_dim(results, num_dims):
    results["test_bpd"] = bits_per_dim(results["test_llh_nats"], num_dims)
    results["test_bpd_stderr"] = results["test_llh_stderr"] / (num_dims * math.log(2))
    for row in results["test_curve"]:
        row["elbo_bpd"] = bits_per_dim(row["elbo_nats"], num_dims)
    for row in results["s_sweep"]:
        row["bpd"] = bits_per_dim(row["llh_nats"], num_dims)


def results_path(run, args):
    return os.path.join(args.out_dir, f"{run.name}_results.json")


def write_results(run, args, results, eval_pmf):
    """<name>_results.json (written whole or not at all), the colour runs' curves, and the one-line summary."""
    path = results_path(run, args)
    results["wall_seconds"] = round(time.time() - STARTED, 1)
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(f"{path}.tmp", path)
    if eval_pmf:
        plot_colour_curves([os.path.join(args.out_dir, f) for f in sorted(os.listdir(args.out_dir))
                            if f.endswith("_results.json")], os.path.join(args.out_dir, "colour_curves.png"))
    print(f"{run.name}: test log p(x) = {results['test_llh_nats']:.2f} +- {results['test_llh_stderr']:.2f} nats"
          + (f" = {results['test_bpd']:.3f} bits/dim" if eval_pmf else "")
          + f" (S={args.eval_samples}, {results['eval_images']} test images); wrote {path}")
