"""The training loop and what keeps it honest: learning-rate schedules, checkpoints that resume exactly, the guard
that skips a bad step, and the clean stop at a time limit, Ctrl-C or SIGTERM.

`train` reads as the loop it is: draw a batch, set the rate, take a guarded step, log, checkpoint. The loss is a
ready function of a batch (`common.training_loss(model, k)`, or a chapter's own objective); compilation is one
flag. What a run does before and after (build, evaluate, write) is `experiment.run_experiment`.
"""
import contextlib
import math
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from common import UserError
from devices import Compiled, any_rank, average_gradients, broadcast_, is_main, rank, to_device, world_size

# ---------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------------
IWAE_STAGES = 8  # Burda et al. 2015, sec. 5: stage i = 0..7 lasts 3^i epochs at lr 1e-3 * 10^(-i/7)
IWAE_STAGE_ENDS = [sum(3 ** j for j in range(i + 1)) for i in range(IWAE_STAGES)]  # in epochs: 1, 4, 13, ...
IWAE_EPOCHS = IWAE_STAGE_ENDS[-1]  # 3280


def iwae_lr(step, total_steps, base_lr=1e-3):
    """The paper's schedule, compressed into `total_steps`: the fraction of training done decides the stage."""
    position = IWAE_EPOCHS * step / max(total_steps, 1)
    stage = next((i for i, end in enumerate(IWAE_STAGE_ENDS) if position < end), IWAE_STAGES - 1)
    return base_lr * 10 ** (-stage / 7)


def constant_lr(step, total_steps, base_lr=1e-3):
    return base_lr


HOLD_FRACTION = 0.5  # hold-decay: base_lr for the first half of the steps ...
FINAL_LR_FACTOR = 0.1  # ... then a geometric decay to base_lr / 10 at the last step


def hold_decay_lr(step, total_steps, base_lr=1e-3):
    """base_lr for the first half of training, then geometric decay to base_lr/10: the same shape at any
    --epochs, so that a short run does not spend most of its steps at the final rate (as the paper's schedule,
    compressed, does: two thirds of its steps are at 1e-4)."""
    f = step / max(total_steps, 1)
    if f < HOLD_FRACTION:
        return base_lr
    return base_lr * FINAL_LR_FACTOR ** ((f - HOLD_FRACTION) / (1 - HOLD_FRACTION))


SCHEDULES = {"iwae": iwae_lr, "constant": constant_lr, "hold-decay": hold_decay_lr}


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0  # completed epochs
    perm: torch.Tensor = None  # this epoch's order of the training set
    pos: int = 0  # position in perm
    train_seconds: float = 0.0
    skipped_steps: int = 0
    history: list = field(default_factory=list)  # (step, epoch, mean training bound over the interval)
    test_curve: list = field(default_factory=list)  # after each epoch: (epoch, step, test ELBO, rate, distortion)
    segments: list = field(default_factory=list)  # one dict per sitting: start, end, steps, seconds, hardware
    stopped_by_guard: dict = None  # set when the divergence guard ended training: step, epoch, reason
    recent_grad_norms: list = field(default_factory=list)  # of the last GRAD_NORM_WINDOW finite norms, skipped too
    skips: list = field(default_factory=list)  # the first MAX_SKIPS_LISTED skipped steps: step, loss, norm, threshold


def save_checkpoint(path, model, optimizer, state, config):
    """Written to a temporary file, then renamed: an interrupted write never leaves a broken checkpoint."""
    blob = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
            "state": state.__dict__, "config": config, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}  # the current GPU's only
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _torch_reason(err):
    """torch.load's error in one line: of a weights_only failure, the paragraph that says what it met (not the
    preamble on how the default changed and the advice to turn it off, which this project never takes)."""
    torch_says = ("Weights only load failed", "Please file an issue", "Check the documentation")
    paragraphs = [p for p in (" ".join(p.split()) for p in str(err).split("\n\n")) if p]
    met = [p for p in paragraphs if not p.startswith(torch_says)]
    return (met[0] if met else " ".join(paragraphs))[:200]


def load_checkpoint(path, device):
    """The checkpoint at path, read with weights_only=True: tensors and plain Python values only, so that a crafted
    file cannot run code when it is loaded (a pickle can; torch refuses anything else and so does this)."""
    if not os.path.exists(path):
        raise UserError(f"No checkpoint at {path}. Train first (without --resume), or pass --checkpoint with "
                        f"the path of a checkpoint this script wrote.")
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        reason = _torch_reason(err)
        if isinstance(err, pickle.UnpicklingError) and "global" in reason.lower():  # torch names what it refused
            raise UserError(f"Refused to load {path}: it holds more than tensors and plain values ({reason}), and "
                            f"loading it could run code, so nothing in it was run. This project's checkpoints never "
                            f"hold such things: use a checkpoint this project wrote, from a source you trust.") from None
        raise UserError(f"Cannot read the checkpoint {path} ({type(err).__name__}: {reason}). It is damaged or was "
                        f"not written by this project; delete it and train again, or point --checkpoint "
                        f"at another file.") from None
    try:
        missing = {"model", "optimizer", "state", "config", "rng_cpu", "rng_cuda"} - set(blob)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
        blob["state"] = TrainState(**blob["state"])
    except Exception as err:
        raise UserError(f"Cannot read the checkpoint {path} ({type(err).__name__}: {err}). It was not written by "
                        f"this project; point --checkpoint at another file.") from None
    return blob


def restore(blob, model, optimizer=None, rng=True):
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as err:
        raise UserError(f"The checkpoint does not fit this model ({str(err).splitlines()[0]}). Was it written "
                        f"by another script or with other model flags? Config in the checkpoint: "
                        f"{blob['config']}") from None
    if optimizer is not None and blob["optimizer"] is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if rng:
        torch.set_rng_state(blob["rng_cpu"].cpu())
        rng_cuda = blob["rng_cuda"]
        if isinstance(rng_cuda, list):  # written before only the current GPU's state was kept: every GPU's
            rng_cuda = rng_cuda[0] if rng_cuda else None
        if rng_cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_cuda.cpu())


# ---------------------------------------------------------------------------------------------------
# The guarded step
# ---------------------------------------------------------------------------------------------------
GRAD_NORM_WINDOW = 100  # --skip-grad-ratio compares a step's gradient norm with the median of this many steps' norms
MAX_SKIPS_LISTED = 1000  # skipped steps listed one by one in the results (all are counted)


class Diverged(UserError):
    pass


def make_optimizer(model, lr, eps=1e-8):
    """Adam with its fused kernel (CPU and CUDA): one pass over all parameters; on model01's small step it
    took a third of the time of the foreach version."""
    return torch.optim.Adam(model.parameters(), lr=lr, eps=eps, fused=True)


def grad_norm(model):
    """The gradients' total 2-norm, as clip_grad_norm_ computes it, without rescaling them."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(grads, math.inf)


def train_step(model, optimizer, loss_fn, x, threshold=math.inf, share=None):
    """One Adam step on loss_fn(x), unless the loss or the gradient norm is not finite or the norm exceeds
    `threshold` (a number, or a 0-dim float32 tensor on the device). Decided on the device, so the host never waits
    for it: fused Adam's found_inf (a gradient scaler's switch) makes the update, step count included, a no-op.
    With several processes, x is this rank's part of the batch, `share` its fraction of the batch's images, and
    the gradients and loss are the whole batch's before anything is decided (`devices.average_gradients`).
    Returns the loss, the gradient norm and whether the step was taken, as tensors on the device."""
    loss = loss_fn(x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if share is not None:
        loss = average_gradients(model, loss, share)
    norm = grad_norm(model)
    taken = torch.isfinite(loss) & torch.isfinite(norm) & (norm <= threshold)
    optimizer.found_inf = (~taken).float()
    optimizer.step()
    return loss.detach(), norm, taken


def finite_or_none(value):
    """JSON has no infinity or NaN: such a number (an unset threshold, a non-finite loss) is written as null."""
    return value if value is None or math.isfinite(value) else None


@dataclass
class SkipGuard:
    """Skips a step whose loss or gradient norm is not finite, or whose norm exceeds `max_norm` or `ratio` times
    the median norm of the last GRAD_NORM_WINDOW steps with a finite norm, skipped ones included (once there are
    that many); counts and lists the skips in the TrainState, and stops the run (state.stopped_by_guard) after
    `max_in_a_row` skips in a row. Counting the skipped norms skips a spike but follows a lasting rise after half a
    window: a median of the steps taken only stays where the rise began, and skips every step until the run stops
    (chapter 6's free logistic, whose gradient norms rose as its scales sharpened, stopped so in its first epoch).

    The decision is made on the device (`threshold`, then `train_step`; the recent norms are kept there too); the
    host learns of it when it `read`s the steps since the last read, which the loop does every step on a CPU and
    every plan.log_every steps on a GPU (so there a stop by the guard comes up to that many steps late)."""
    max_norm: float = math.inf
    ratio: float = math.inf
    max_in_a_row: int = 100
    in_a_row: int = 0

    def start(self, state, device):
        """The recent norms (state.recent_grad_norms) on the device, oldest first, and no steps pending."""
        recent = state.recent_grad_norms[-GRAD_NORM_WINDOW:]
        self.norms = torch.zeros(GRAD_NORM_WINDOW, dtype=torch.float64, device=device)
        if recent:
            self.norms[GRAD_NORM_WINDOW - len(recent):] = torch.tensor(recent, dtype=torch.float64)
        self.count = torch.tensor(len(recent), device=device)
        self.max_norm_t = torch.tensor(self.max_norm, dtype=torch.float64, device=device)
        self.pending, self.pending_host = [], []

    def threshold(self):
        """This step's largest gradient norm, a float64 0-dim tensor on the device."""
        if not math.isfinite(self.ratio):
            return self.max_norm_t
        s, half = self.norms.sort().values, GRAD_NORM_WINDOW // 2
        median = s[half] if GRAD_NORM_WINDOW % 2 else (s[half - 1] + s[half]) / 2  # as statistics.median
        return torch.where(self.count >= GRAD_NORM_WINDOW, torch.clamp(self.ratio * median, max=self.max_norm),
                           self.max_norm_t)

    def after_step(self, where, loss, norm, taken, threshold):
        """Keeps the step's norm among the recent ones where it is finite, taken or not, and the step's record for
        the next `read`. `where`: (the step's number, the epoch it was in, the completed epochs after it, its
        learning rate)."""
        finite = torch.isfinite(norm)
        self.norms = torch.where(finite, torch.cat([self.norms[1:], norm.double().view(1)]), self.norms)
        self.count = self.count + finite
        self.pending.append(torch.stack([loss.double(), norm.double(), taken.double(), threshold]))
        self.pending_host.append(where)

    def read(self, state, log):
        """The steps since the last read, on the host (one wait for the device): counted, listed, logged."""
        if not self.pending:
            return
        rows = torch.stack(self.pending).tolist()
        for (step, epoch, epochs_after, lr), (loss, norm, taken, threshold) in zip(self.pending_host, rows):
            self._record(state, step, epoch, loss, norm, bool(taken), threshold)
            log.step(step, epochs_after, -loss if taken else None, lr)
        self.pending, self.pending_host = [], []

    def _record(self, state, step, epoch, loss, norm, taken, threshold):
        if math.isfinite(norm):
            state.recent_grad_norms = state.recent_grad_norms[1 - GRAD_NORM_WINDOW:] + [norm]
        if taken:
            self.in_a_row = 0
            return
        state.skipped_steps += 1
        self.in_a_row += 1
        if len(state.skips) < MAX_SKIPS_LISTED:
            state.skips.append({"step": step, "loss": finite_or_none(loss), "grad_norm": finite_or_none(norm),
                                "threshold": finite_or_none(threshold)})
        if self.in_a_row >= self.max_in_a_row and state.stopped_by_guard is None:
            # the skipped steps left the weights as the last step taken made them: keep those, as a result
            state.stopped_by_guard = {
                "step": step, "epoch": epoch, "skipped_in_a_row": self.in_a_row,
                "reason": f"{self.in_a_row} steps in a row had a non-finite loss or a gradient norm above "
                          f"{threshold:g} (last loss {loss:.4g}, gradient norm {norm:.4g})"}


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
def now():
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


@dataclass
class Plan:
    """How long and how fast: the schedule spans `epochs`; training ends there, at `max_steps`, or after
    `time_limit_minutes` of this sitting."""
    batch_size: int
    epochs: int
    lr_at: callable
    base_lr: float
    max_steps: int = None
    time_limit_minutes: float = None
    checkpoint_minutes: float = 10.0
    log_every: int = 100


@dataclass
class Sitting:
    """One sitting of a run: where its checkpoint goes, the run's config, and what state.segments records of it."""
    ckpt_path: str
    config: dict
    hardware: str = ""
    command: str = ""


class _Batches:
    """The batches of an epoch: the training set, in an order drawn at each epoch's start (state.perm, saved with
    the checkpoint, and a copy on the device so that indexing never waits for a copy), from state.pos on. Every
    batch has batch_size images, so that one compiled graph serves a run: an epoch's short last batch is filled up
    with the epoch's first images (as torch's DistributedSampler pads). With several processes, rank 0's order is
    every rank's, and each takes its part of every batch."""

    def __init__(self, state, train_x, batch_size):
        self.state, self.train_x, self.batch_size, self.perm, self.perm_device = state, train_x, batch_size, None, None
        self.offsets = torch.arange(batch_size, device=train_x.device)

    def next(self):
        """This process's images of the next batch, and their share of the batch (None with one process)."""
        state = self.state
        if state.perm is None:
            state.perm, state.pos = torch.randperm(len(self.train_x)), 0
        if self.perm is not state.perm:
            self.perm, self.perm_device = state.perm, broadcast_(state.perm.to(self.train_x.device))
            if world_size() > 1:
                state.perm = self.perm = self.perm_device.cpu()
        batch = self.perm_device[(state.pos + self.offsets) % len(self.perm_device)]
        if world_size() == 1:
            return self.train_x[batch], None
        mine = batch.tensor_split(world_size())[rank()]
        return self.train_x[mine], len(mine) / len(batch)


def train(model, optimizer, loss, data, state, plan, sitting, guard=None, epoch_end=None, compile=False,
          compile_mode=None, channels_last=False, progress=True, read_every=None):
    """Minimise `loss` (a function of a batch) with Adam until the plan's end, its step limit or its time limit
    (then the checkpoint is written and the caller sees state.step short of the end). The training set stays one
    tensor on the model's device (no DataLoader); `guard` (a SkipGuard) decides on the device which steps are
    taken, and the host reads its decisions and the losses every `read_every` steps (default: every step on a CPU,
    every plan.log_every on a GPU, so that the GPU never waits for the host). Checkpoints: every
    plan.checkpoint_minutes, at the end, at the time limit, after the step under way on Ctrl-C or SIGTERM (_Stop);
    `state` resumes exactly (the epoch's order, the position in it, the RNG). `epoch_end(model)`, if given, runs
    after every epoch and its tuple goes into state.test_curve. The sitting is recorded in state.segments.

    Under torchrun every rank runs this loop on its part of each batch, with the same state; the ranks agree on
    stopping (time limit, Ctrl-C, SIGTERM) when the host reads, and only rank 0 writes and shows progress."""
    device = next(model.parameters()).device
    train_x = data.train.to(device)
    total_steps = plan.epochs * math.ceil(len(train_x) / plan.batch_size)
    last_step = total_steps if plan.max_steps is None else min(total_steps, plan.max_steps)
    if state.step >= last_step:  # a finished run resumed (to evaluate it again): no new training segment
        return state
    read_every = read_every or (1 if device.type == "cpu" else plan.log_every)
    guard = guard or SkipGuard()
    guard.start(state, device)
    loss_fn = Compiled(loss, compile, "training", compile_mode)
    batches = _Batches(state, train_x, plan.batch_size)
    log = _Log(state, last_step, plan.log_every, progress and is_main())
    checkpoint = _Checkpointer(state, sitting, model, optimizer, before=lambda: guard.read(state, log))
    deadline = math.inf if plan.time_limit_minutes is None else time.time() + 60 * plan.time_limit_minutes
    stop = _Stop(deadline, device)
    state.stopped_by_guard = None
    model.train()
    try:
        with stop.on_signals():
            while state.step < last_step and not stop.now() and state.stopped_by_guard is None:
                images, share = batches.next()
                x = to_device(data.train_batch(images), device, channels_last)
                lr = plan.lr_at(state.step, total_steps, plan.base_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                threshold = guard.threshold()
                outcome = train_step(model, optimizer, loss_fn, x, threshold.float(), share)
                epoch = state.epoch
                state.step, state.pos = state.step + 1, state.pos + plan.batch_size
                if state.pos >= len(train_x):
                    state.epoch, state.perm = state.epoch + 1, None
                guard.after_step((state.step, epoch, state.epoch, lr), *outcome, threshold)
                read = state.step % read_every == 0 or state.epoch > epoch or state.step == last_step
                if read:
                    guard.read(state, log)
                    stop.check()
                if state.epoch > epoch and epoch_end is not None:
                    state.test_curve.append((state.epoch, state.step, *epoch_end(model)))
                    model.train()
                if read:  # every rank at the same steps: a save reads the guard, which may stop the run
                    checkpoint.every(plan.checkpoint_minutes)
            stop.take_signal()  # one that landed during the last step stops the run before its evaluation
            checkpoint()
    except KeyboardInterrupt:  # a second signal
        log.close()
        raise _stopped_at_once(state, sitting, checkpoint) from None
    log.close()
    if stop.asked:
        raise UserError(f"Interrupted at step {state.step}; saved {sitting.ckpt_path}. Continue with the same "
                        f"command and --resume.")
    return state


def _stopped_at_once(state, sitting, checkpoint):
    """The error for a second signal: a step or a save may have been half done, so nothing more is written."""
    step = checkpoint.saved_step if checkpoint.saved_step is not None else checkpoint.segment["first_step"]
    then = (f"{sitting.ckpt_path} holds step {step}: continue from there with the same command and --resume."
            if step > 0 else "no checkpoint of this run was written: run the same command again to start afresh.")
    return UserError(f"Stopped at once at step {state.step}, without a checkpoint (a step or a save may have been "
                     f"under way); {then}")


class _Stop:
    """When training stops early: at the deadline, or when Ctrl-C or SIGTERM asks. A signal is noted, and training
    stops after the step under way, so that the checkpoint holds whole steps and resumes exactly; with one process a
    second signal stops it at once (KeyboardInterrupt, no checkpoint). With several, at each `check` (when the host
    reads) every rank learns whether any rank has passed its deadline or been asked, so that all stop after the same
    step."""

    def __init__(self, deadline, device):
        self.deadline, self.device, self.asked, self.agreed = deadline, device, False, False
        self.signalled = False  # set by the handler only: a signal that lands while the ranks agree waits for the next

    def now(self):
        if world_size() == 1:
            self.take_signal()
            return self.asked or time.time() >= self.deadline
        return self.agreed

    def take_signal(self):
        """With one process, a signal noted so far asks to stop (with several, `check` decides it for all)."""
        if world_size() == 1:
            self.asked = self.asked or self.signalled

    def check(self):
        if world_size() > 1:  # asked on any rank means asked on every rank (the same message and exit status)
            self.asked = any_rank(self.asked or self.signalled, self.device)
            self.agreed = self.asked or any_rank(time.time() >= self.deadline, self.device)

    @contextlib.contextmanager
    def on_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM (a scheduler's wall-time kill, `kill PID`; background jobs ignore Ctrl-C)
        ask training to stop. Off the main thread it does nothing."""
        def note(signum, frame):
            if world_size() == 1 and self.signalled:
                raise KeyboardInterrupt  # a second signal: at once
            self.signalled = True
            if world_size() == 1:
                try:
                    print("\nStopping after this step, with a checkpoint (a second Ctrl-C stops at once, without "
                          "one).", file=sys.stderr)
                except (OSError, RuntimeError):  # a closed stderr, or a write under way (a reentrant call)
                    pass
        try:
            previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)
                        if signal.getsignal(sig) is not signal.SIG_IGN}  # a job started to ignore one keeps to it
        except ValueError:  # not the main thread
            previous = {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                if handler is not None:  # None: a handler installed outside Python, which cannot be put back
                    signal.signal(sig, handler)


class _Log:
    """The progress bar, and state.history: the mean training bound over every `every` steps."""

    def __init__(self, state, last_step, every, progress):
        self.state, self.last_step, self.every, self.running = state, last_step, every, []
        self.bar = tqdm(total=last_step, initial=min(state.step, last_step), desc="train", unit="step",
                        disable=not progress, dynamic_ncols=True)

    def step(self, step, epoch, bound, lr):
        """After step number `step` (`epoch` epochs completed), whose bound was `bound` (None: skipped)."""
        state = self.state
        if bound is not None:
            self.running.append(bound)
        if self.running and (step % self.every == 0 or step == self.last_step):
            state.history.append((step, epoch, sum(self.running) / len(self.running)))
            postfix = {"bound": f"{state.history[-1][2]:.2f}", "lr": f"{lr:.1e}", "epoch": epoch,
                       "skipped": state.skipped_steps}
            if state.test_curve:
                postfix["test_elbo"] = f"{state.test_curve[-1][2]:.2f}"
            self.bar.set_postfix(postfix)
            self.running = []
        self.bar.update(1)

    def close(self):
        self.bar.close()


class _Checkpointer:
    """Writes the checkpoint and keeps the sitting's segment in state.segments up to date."""

    def __init__(self, state, sitting, model, optimizer, before=None):
        """`before()` runs before each save (it brings the host's record of the steps up to date)."""
        self.state, self.sitting, self.model, self.optimizer, self.before = state, sitting, model, optimizer, before
        self.t_start = self.last_save = time.time()
        self.saved_step = None  # the step of this sitting's last checkpoint
        self.t0 = self.t_start - state.train_seconds
        self.segment = {"start": now(), "end": None, "first_step": state.step, "last_step": state.step,
                        "seconds": 0.0, "hardware": sitting.hardware, "command": sitting.command}
        state.segments.append(self.segment)

    def __call__(self):
        if self.before is not None:
            self.before()
        t = time.time()
        self.state.train_seconds = t - self.t0
        self.segment.update(end=now(), last_step=self.state.step, seconds=round(t - self.t_start, 1))
        if is_main():  # every rank holds the same weights and state
            save_checkpoint(self.sitting.ckpt_path, self.model, self.optimizer, self.state, self.sitting.config)
        self.saved_step = self.state.step

    def every(self, minutes):
        due = time.time() - self.last_save > 60 * minutes
        if world_size() > 1:  # the ranks' clocks differ: save when any is due, all together
            due = any_rank(due, next(self.model.parameters()).device)
        if due:
            self()
            self.last_save = time.time()
