"""Where the work runs and how fast: the device's name for the results, seeding, the speed plumbing
(torch.compile with an eager fallback, bf16 autocast for the networks, TF32, channels_last), and the processes of a
run started by torchrun (one per GPU; on CPU, with the gloo backend, how the multi-GPU path is tested).

The chapters never touch this module: `training.train` and `common.estimate_log_likelihood` take one
`compile` flag, and `experiment.run_experiment` applies the device settings to the model it builds.
"""
import os
import platform
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm


def hardware_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU: {cpu}, {threads} thread{'s' if threads != 1 else ''}"


def seed_everything(seed):
    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator


class Compiled:
    """`fn` under torch.compile (static shapes), or `fn` itself if `enabled` is False. If compilation fails
    here (no C++ compiler, an unsupported platform or Python), one warning and then `fn` eagerly: the same
    numbers, only slower. `what` names the path in the warning."""
    _warned = set()

    def __init__(self, fn, enabled=True, what="", mode=None, options=None):
        self.fn, self.what, self.compiled_fn, self.proven = fn, what, None, False
        if enabled:
            try:
                self.compiled_fn = torch.compile(fn, dynamic=False, mode=mode, options=options)
            except Exception as err:  # e.g. "Dynamo is not supported on Python 3.x"
                self._fall_back(err)

    def _fall_back(self, err):
        self.compiled_fn = None
        if self.what not in Compiled._warned:
            Compiled._warned.add(self.what)
            reason = " ".join(str(err).split())[:300]
            print(f"warning: torch.compile is not available for {self.what} here ({type(err).__name__}: {reason}); "
                  f"running eagerly, which gives the same numbers more slowly. Pass --no-compile to skip the "
                  f"attempt.", file=sys.stderr)

    def __call__(self, *args, **kwargs):
        if self.compiled_fn is None:
            return self.fn(*args, **kwargs)
        if self.proven:  # compiled once: any later error is the program's, not the compiler's
            return self.compiled_fn(*args, **kwargs)
        # a failed first call may have drawn from the generators: eager starts where it did
        rng_cpu, rng_cuda = torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        try:
            out = self.compiled_fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # a backend that fails at the first call (missing compiler, ...)
            if "CUDA" in str(err):  # a device error, which eager would meet too
                raise
            self._fall_back(err)
            torch.set_rng_state(rng_cpu)
            if rng_cuda is not None:
                torch.cuda.set_rng_state(rng_cuda)
            return self.fn(*args, **kwargs)
        self.proven = True
        return out


EVAL_COMPILE_OPTIONS = {"freezing": True}  # inference only: see common.evaluation_fn


def in_float32(module):
    """Makes `module` run in float32 under autocast (its input cast up); its weights and state-dict keys stay."""
    if getattr(module, "in_float32", False):
        return
    forward = module.forward

    def float32_forward(x):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float())
    module.forward, module.in_float32 = float32_forward, True


def configure_device(model, device, amp, channels_last):
    """With `amp`: bf16 autocast for the networks but the decoder's last layer (model.decoder_head()), and TF32
    matmuls and convolutions on CUDA (off otherwise, so that --no-amp is float32 throughout); channels_last
    convolutions. Returns the model."""
    tf32 = amp and device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    model.amp_dtype = torch.bfloat16 if amp else None
    if amp:
        in_float32(model.decoder_head())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def to_device(x, device, channels_last=False):
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


# ---------------------------------------------------------------------------------------------------
# Several processes (torchrun): data parallel, rank 0 writes
# ---------------------------------------------------------------------------------------------------
def started_by_torchrun():
    """torchrun sets WORLD_SIZE for each of its processes (readable before the process group is joined)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_processes(device):
    """Under torchrun: joins the process group (NCCL on CUDA, gloo on CPU) and returns this process's device (on
    CUDA, the GPU of its LOCAL_RANK). Otherwise returns `device`."""
    if not started_by_torchrun() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not is_main():  # its bars are disabled, but a disabled bar still starts tqdm's monitor thread, which outlives
        tqdm.monitor_interval = 0  # them: a daemon thread at the interpreter's exit, a known source of rare aborts
    return device


def end_processes(together):
    """Leaves the process group, if joined. `together` (the run ended, or met an error every rank meets): first
    every rank waits for the others, rank 0's writing included, so that none tears its connections down while
    another still works."""
    if not dist.is_initialized():
        return
    if together:
        dist.barrier()
    dist.destroy_process_group()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """The process that prints, and writes checkpoints, grids, curves and results."""
    return rank() == 0


def average_gradients(model, loss, share):
    """Every rank's gradients and loss become the whole batch's: each rank's (a mean over its part of the batch)
    weighted by its `share` of the batch's images, summed over ranks in one all-reduce. A non-finite value on any
    rank reaches every rank, so all take the same decision on the step. Returns the batch's loss."""
    params = list(model.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)]) * share
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()
    return flat[-1]


def any_rank(flag, device):
    """True on every rank when `flag` is true on any (a stop asked of one process stops them all together)."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_(tensor):
    """Rank 0's `tensor`, in place on every rank."""
    if dist.is_initialized():
        dist.broadcast(tensor, 0)
    return tensor


def gather_shards(values):
    """The 1-d tensors that every rank computed for its shard (`shard`), joined in rank order on every rank."""
    if not dist.is_initialized():
        return values
    parts = [None] * world_size()
    dist.all_gather_object(parts, values.cpu())
    return torch.cat(parts)


def shard(x):
    """This rank's contiguous part of x (split as evenly as can be; ranks 0.. take one more where it is uneven)."""
    return x.tensor_split(world_size())[rank()] if dist.is_initialized() else x
