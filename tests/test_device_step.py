"""The training step decided on the device (no host-device wait per step) and the float32 head under --amp."""
import math
import statistics
import types

import pytest
import torch

import devices
import training

STEPS, BATCH, N = 260, 8, 40  # 52 epochs of 5 steps: past the ratio guard's window of 100 steps


def spiky_loss(model):
    """A loss whose gradient norm jumps 1000-fold at some steps and is NaN at others (by call count)."""
    calls = [0]

    def loss(x):
        calls[0] += 1
        value = (model(x) ** 2).mean() * (1.0 + 0.1 * (calls[0] % 7))
        if calls[0] in (30, 150, 151, 200):
            value = value * 1000.0
        if calls[0] in (60, 170):
            value = value * math.nan
        return value
    return loss


def fresh():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, torch.randn(N, 3)


def host_decided(max_norm, ratio):
    """The step as it was decided on the host before: clip_grad_norm_'s norm, statistics.median of the recent
    norms, a Python comparison, and optimizer.step() only for a step taken."""
    model, x = fresh()
    loss, optimizer = spiky_loss(model), training.make_optimizer(model, 1e-3)
    recent, skipped, perm = [], [], None
    for step in range(STEPS):
        if step % (N // BATCH) == 0:
            perm = torch.randperm(N)
        batch = x[perm[(step % (N // BATCH)) * BATCH:][:BATCH]]
        value = loss(batch)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        threshold = max_norm
        if math.isfinite(ratio) and len(recent) >= training.GRAD_NORM_WINDOW:
            threshold = min(max_norm, ratio * statistics.median(recent))
        if torch.isfinite(norm):  # skipped or not
            recent = recent[1 - training.GRAD_NORM_WINDOW:] + [norm.item()]
        if bool(torch.isfinite(value) and torch.isfinite(norm) and norm <= threshold):
            optimizer.step()
        else:
            skipped.append(step + 1)
    return model, optimizer, recent, skipped


def device_decided(tmp_path, max_norm, ratio, read_every):
    model, x = fresh()
    optimizer = training.make_optimizer(model, 1e-3)
    data = types.SimpleNamespace(train=x, train_batch=lambda b: b)
    plan = training.Plan(batch_size=BATCH, epochs=STEPS * BATCH // N, lr_at=training.constant_lr, base_lr=1e-3)
    state = training.train(model, optimizer, spiky_loss(model), data, training.TrainState(), plan,
                           training.Sitting(str(tmp_path / f"run{read_every}.pt"), {}),
                           training.SkipGuard(max_norm, ratio), progress=False, read_every=read_every)
    return model, optimizer, state


@pytest.mark.parametrize("read_every", [1, 7])
@pytest.mark.parametrize("max_norm, ratio", [(math.inf, 10.0), (50.0, math.inf), (50.0, 10.0)])
def test_a_skip_decided_on_the_device_is_the_hosts_decision(tmp_path, max_norm, ratio, read_every):
    """The same steps are skipped (NaN, above the fixed ceiling, above 10x the median), the weights, Adam's moments
    and step counts come out bit for bit the same, and so does the record of the recent norms, whether the host
    reads the decisions every step or every 7."""
    ref_model, ref_opt, ref_recent, ref_skipped = host_decided(max_norm, ratio)
    model, optimizer, state = device_decided(tmp_path, max_norm, ratio, read_every)
    assert state.step == STEPS and [s["step"] for s in state.skips] == ref_skipped and ref_skipped
    assert state.skipped_steps == len(ref_skipped)
    assert state.recent_grad_norms == ref_recent
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], ref_opt.state[q][key])


def test_the_guard_stops_at_the_same_step_however_often_the_host_reads(tmp_path):
    """A stop after 3 skips in a row (the loss is NaN from the 6th step on) is recorded at the step that made it,
    the 8th, whether the host reads every step or every 3 (then it learns of it a step later)."""
    stops = []
    for read_every in (1, 3):
        model, x = fresh()
        calls = [0]

        def loss(b):
            calls[0] += 1
            return (model(b) ** 2).mean() * (math.nan if calls[0] >= 6 else 1.0)
        data = types.SimpleNamespace(train=x, train_batch=lambda b: b)
        plan = training.Plan(batch_size=BATCH, epochs=10, lr_at=training.constant_lr, base_lr=1e-3)
        state = training.train(model, training.make_optimizer(model, 1e-3), loss, data, training.TrainState(), plan,
                               training.Sitting(str(tmp_path / f"stop{read_every}.pt"), {}),
                               training.SkipGuard(max_in_a_row=3), progress=False, read_every=read_every)
        stops.append(state.stopped_by_guard)
    assert stops[0] is not None and stops[0]["step"] == 8 and stops[0] == stops[1]


def test_under_amp_the_decoder_head_runs_in_float32():
    """--amp: bf16 for the networks, float32 for the layer that writes p(x|z)'s parameters (and the same weights,
    the same state-dict keys)."""
    import model03
    model = model03.build_model(types.SimpleNamespace(unbounded=True))
    keys = list(model.state_dict())
    devices.configure_device(model, torch.device("cpu"), amp=True, channels_last=False)
    seen = {}
    model.decoder.net[-2].register_forward_hook(lambda m, i, o: seen.update(body=o.dtype))
    model.decoder.net[-1].register_forward_hook(lambda m, i, o: seen.update(head=o.dtype))
    with torch.no_grad():
        model.decode(torch.randn(2, model03.LATENT_DIM))
    assert seen == {"body": torch.bfloat16, "head": torch.float32}
    assert list(model.state_dict()) == keys


def test_every_batch_has_one_shape_so_a_run_compiles_once(tmp_path):
    """20 images in batches of 8: the third batch of an epoch is filled up with the epoch's first images, so every
    epoch sees every image and a compiled run compiles no more graphs than one whose batches divide the data."""
    def run(n, compile, seen=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        x = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, 2)], 1)

        def loss(b):
            if seen is not None:
                seen.append(b[:, 0].long().tolist())
            return (model(b) ** 2).mean()
        data = types.SimpleNamespace(train=x, train_batch=lambda b: b)
        plan = training.Plan(batch_size=8, epochs=2, lr_at=training.constant_lr, base_lr=1e-3)
        torch._dynamo.reset()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        training.train(model, training.make_optimizer(model, 1e-3), loss, data, training.TrainState(), plan,
                       training.Sitting(str(tmp_path / f"n{n}{compile}.pt"), {}), compile=compile, progress=False)
        return torch._dynamo.utils.counters["stats"]["unique_graphs"] - before

    seen = []
    run(20, False, seen)
    assert [len(b) for b in seen] == [8] * 6
    for epoch in (seen[:3], seen[3:]):
        images = sum(epoch, [])
        assert sorted(set(images)) == list(range(20)) and images[20:] == images[:4]  # the last 4: the first 4 again
    assert run(20, True) == run(24, True) > 0
