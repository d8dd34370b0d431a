"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU) and with plain python, on
fake CIFAR-10: a few training steps of model03 and a sharded evaluation, with the noise fixed (each example's
draw is a function of its own posterior) and Adam's eps large (its first steps would otherwise be lr * sign(g), which
turns rounding differences of near-zero gradients into whole steps), so that one process and two can be compared.

    python tests/distributed_check.py DATA_DIR OUT_DIR [--nan-on-rank-1]

Writes OUT_DIR/rank<R>.pt: the weights, the skipped steps, and (rank 0) the per-image log-likelihoods."""
import argparse
import math
import os
import sys
import threading

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import devices  # noqa: E402
import model03  # noqa: E402
import training  # noqa: E402
from common import estimate_log_likelihood, training_loss  # noqa: E402

BATCH, STEPS, EVAL_IMAGES, EVAL_SAMPLES = 7, 15, 7, 3  # 15 steps of 7 cross the first epoch's end (100 images);
# 7 images split 4 + 3 across two processes: the shares differ


def fixed_rsample(self, sample_shape=torch.Size()):
    """A draw that depends only on the example's own posterior: the same in any batch and on any rank."""
    shape = self._extended_shape(sample_shape)
    eps = torch.sin(1000.0 * self.loc + 1.0).expand(shape)
    return self.loc.expand(shape) + self.scale.expand(shape) * eps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    p.add_argument("--nan-on-rank-1", action="store_true", help="make rank 1's loss NaN at its 5th step")
    args = p.parse_args()
    torch.distributions.Normal.rsample = fixed_rsample
    torch.set_num_threads(1)
    device = devices.start_processes(torch.device("cpu"))
    torch.manual_seed(0)
    images = data.load_colour("cifar10", args.data_dir, download=False)
    model = model03.build_model(model03.parser().parse_args([]))
    optimizer = training.make_optimizer(model, 1.0, eps=1e6)  # Adam's step ~ g / eps: no sign of a rounding error
    start = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    loss = training_loss(model, 1)
    if args.nan_on_rank_1:
        calls, plain = [0], loss

        def loss(x):
            calls[0] += 1
            value = plain(x)
            return value * math.nan if devices.rank() == 1 and calls[0] == 5 else value
    plan = training.Plan(batch_size=BATCH, epochs=2, lr_at=training.constant_lr, base_lr=1.0, max_steps=STEPS)
    sitting = training.Sitting(os.path.join(args.out_dir, "check_checkpoint.pt"), {})
    state = training.train(model, optimizer, loss, images, training.TrainState(), plan, sitting, progress=False)
    x = images.test_batch(images.test[:EVAL_IMAGES])
    llh = devices.gather_shards(estimate_log_likelihood(model, devices.shard(x), EVAL_SAMPLES, progress=False))
    whole = estimate_log_likelihood(model, x, EVAL_SAMPLES, progress=False)  # every image in this process
    torch.manual_seed(1)  # one image over two processes: one shard is empty
    single = devices.gather_shards(estimate_log_likelihood(model, devices.shard(x[:1]), EVAL_SAMPLES, progress=False))
    torch.save({"weights": torch.cat([q.detach().reshape(-1) for q in model.parameters()]), "start": start,
                "skipped": state.skipped_steps, "steps": state.step, "llh": llh, "llh_whole": whole, "llh_single": single,
                "history": state.history, "threads": [t.name for t in threading.enumerate()]},
               os.path.join(args.out_dir, f"rank{devices.rank()}.pt"))
    devices.end_processes(together=True)


if __name__ == "__main__":
    main()
