"""The optimized paths give the numbers of the plain eager one: torch.compile (training loss and gradients,
the frozen evaluation), bf16 autocast of the networks, channels_last; and bench.py runs."""
import importlib
import json
import math
import os

import pytest
import torch
import torch._inductor.config as inductor_config

import bench
import common
import devices

CHAPTERS = [name for name in bench.CHAPTERS if os.path.exists(os.path.join(os.path.dirname(bench.__file__), f"{name}.py"))]


def chapter_model(name, seed=0):
    module = importlib.import_module(name)
    torch.manual_seed(seed)
    return module.build_model(module.parser().parse_args([]))


def fake_x(name, n):
    g = torch.Generator().manual_seed(1)
    if name == "model01":
        return torch.bernoulli(torch.full((n, 1, 28, 28), 0.2), generator=g)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255


@pytest.fixture
def same_random_numbers():
    """Inductor draws its own random numbers unless fallback_random is set; with it, the same seed gives the
    same z in the compiled and the eager graph."""
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", CHAPTERS)
def test_compiled_training_loss_and_gradients_match_eager(name, same_random_numbers):
    model = chapter_model(name)
    x = fake_x(name, 4)
    eval_k = 5 if name == "model01" else 1
    loss_fn = common.training_loss(model, eval_k)
    fast = devices.Compiled(loss_fn, True, "training test")
    assert fast.compiled_fn is not None

    def loss_and_grads(fn):
        torch.manual_seed(3)
        model.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_e, grads_e = loss_and_grads(loss_fn)
    loss_c, grads_c = loss_and_grads(fast)
    assert fast.compiled_fn is not None  # it really ran compiled (no silent fallback)
    assert loss_c == pytest.approx(loss_e, rel=1e-4)
    for g_e, g_c in zip(grads_e, grads_c):
        assert torch.allclose(g_c, g_e, rtol=1e-3, atol=1e-3 * g_e.abs().max().item() + 1e-6)


@pytest.mark.parametrize("name", CHAPTERS)
def test_frozen_compiled_estimate_matches_eager(name, same_random_numbers):
    model = chapter_model(name)
    x = fake_x(name, 3)
    pmf = name != "model01"

    def estimate(compile):
        torch.manual_seed(5)
        return common.estimate_log_likelihood(model, x, 20, 40, pmf, progress=False, compile=compile)

    eager, fast = estimate(False), estimate(True)
    assert common.evaluation_fn(model, compile=True).compiled_fn is not None  # the frozen graph served it
    assert torch.allclose(fast, eager, rtol=1e-5, atol=1e-3)
    # a changed weight must not be served from the frozen graph
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    assert not torch.allclose(estimate(True), fast, rtol=1e-5, atol=1e-3)
    assert torch.allclose(estimate(True), estimate(False), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", CHAPTERS)
def test_bf16_autocast_and_channels_last_run_on_cpu(name):
    """The GPU's paths, exercised on CPU: bf16 networks (likelihoods in float32) and channels_last tensors
    give the float32 bound to within bf16's precision."""
    model = chapter_model(name)
    x = fake_x(name, 4)
    pmf = name != "model01"
    torch.manual_seed(7)
    ref = common.iwae_bound(model, x, 2, pmf)["bound"]
    devices.configure_device(model, torch.device("cpu"), amp=True, channels_last=True)
    torch.manual_seed(7)
    out = common.iwae_bound(model, devices.to_device(x, torch.device("cpu"), channels_last=True), 2, pmf)["bound"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out, ref, rtol=0.05)
    model.amp_dtype = None
    torch.manual_seed(7)
    out = common.iwae_bound(model, devices.to_device(x, torch.device("cpu"), channels_last=True), 2, pmf)["bound"]
    assert torch.allclose(out, ref, rtol=1e-4)


def test_unavailable_compiler_falls_back_with_one_warning(capsys):
    def broken_backend(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    fn = lambda t: (t * 2).sum()
    wrapped = devices.Compiled(fn, True, "a test path")
    wrapped.compiled_fn = torch.compile(fn, backend=broken_backend)
    t = torch.ones(3)
    assert wrapped(t).item() == 6.0 and wrapped(t).item() == 6.0
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile is not available for a test path") == 1
    assert "Traceback" not in err and "--no-compile" in err


def test_a_fall_back_gives_the_numbers_eager_gives(capsys):
    # a backend that draws from the generator before it fails (as a compiled graph with random ops that cannot
    # load its kernel) must not shift the draws of the eager call that replaces it: a resumed run would differ
    def draws_then_fails(t):
        torch.rand(5)
        raise RuntimeError("the compiled kernel did not load")

    fn = lambda t: t + torch.rand(3)
    wrapped = devices.Compiled(fn, True, "a path that draws")
    wrapped.compiled_fn = draws_then_fails
    torch.manual_seed(3)
    expected = fn(torch.zeros(3))
    torch.manual_seed(3)
    assert torch.equal(wrapped(torch.zeros(3)), expected)
    assert "not available for a path that draws" in capsys.readouterr().err


def test_after_a_first_good_call_errors_are_raised_not_hidden_by_a_fall_back(capsys):
    calls = [0]

    def flaky(t):
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError("an error of the program itself")
        return t.sum()

    wrapped = devices.Compiled(flaky, True, "a proven path")
    wrapped.compiled_fn = flaky  # stands for the compiled function: it worked on the first call
    assert wrapped(torch.ones(2)).item() == 2.0
    with pytest.raises(RuntimeError, match="of the program itself"):
        wrapped(torch.ones(2))
    assert "warning" not in capsys.readouterr().err


def test_a_device_error_at_the_first_call_is_raised():
    def oom(t):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    wrapped = devices.Compiled(lambda t: t.sum(), True, "a path on a full GPU")
    wrapped.compiled_fn = oom
    with pytest.raises(torch.cuda.OutOfMemoryError):
        wrapped(torch.ones(2))


def test_bench_runs_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "model01", "--seconds", "0.2", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| model01 | eager |" in text and "| model01 | optimized |" in text
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        for part, rate in [("train", "images_per_s"), ("eval", "pairs_per_s")]:
            assert row[part][rate] > 0 and row[part]["matmul_flops"] > 0
    # FLOPs of one training image of model01: 3 (forward + 2 backward) x 2 x the k=5 MLP passes, give or take
    # the encoder's backward; each MLP pass is 2 x (784*200 + 200*200 + 200*100) = 0.43 MFLOP
    mlp = 2 * (784 * 200 + 200 * 200 + 200 * 100)
    decoder = 2 * (50 * 200 + 200 * 200 + 200 * 784)
    assert rows[0]["eval"]["flops_per_pair"] == pytest.approx(decoder, rel=0.05)
    assert 3 * (mlp + 5 * decoder) * 0.8 < rows[0]["train"]["flops_per_image"] < 3 * (mlp + 5 * decoder) * 1.2


def test_estimate_pads_to_one_shape_and_compiles_once(monkeypatch, same_random_numbers):
    """A short last chunk of samples is masked out and a short last batch of images is padded and dropped: the
    numbers are those of unpadded work, and a compiled evaluation compiles one graph however S and N fall."""
    def fixed_rsample(self, sample_shape=torch.Size()):  # every sample of an image the same: S cannot matter
        shape = self._extended_shape(sample_shape)
        return self.loc.expand(shape) + self.scale.expand(shape) * torch.sin(1000.0 * self.loc + 1.0).expand(shape)

    monkeypatch.setattr(torch.distributions.Normal, "rsample", fixed_rsample)
    x = fake_x("model03", 7)

    def estimate(s, rows, compile=False):
        """The estimate, and how many graphs a compiled one compiled (a fresh model: a fresh frozen graph)."""
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        llh = common.estimate_log_likelihood(chapter_model("model03"), x, s, rows, True, progress=False,
                                             compile=compile)
        return llh, torch._dynamo.utils.counters["stats"]["unique_graphs"] - before

    one_by_one, _ = estimate(1, 1)
    assert torch.allclose(estimate(11, 8)[0], one_by_one, atol=1e-6)  # two chunks of 6 samples: the second holds 5
    assert torch.allclose(estimate(2, 10)[0], one_by_one, atol=1e-6)  # batches of 5 images: the second holds 2
    _, graphs_whole = estimate(12, 6, compile=True)  # two whole chunks of 6 samples, one image per pass
    padded_samples, graphs_samples = estimate(11, 6, compile=True)
    padded_images, graphs_images = estimate(2, 10, compile=True)
    assert torch.allclose(padded_samples, one_by_one, atol=1e-3)
    assert torch.allclose(padded_images, one_by_one, atol=1e-3)
    assert graphs_samples == graphs_images == graphs_whole > 0  # a short chunk or pass compiled nothing of its own


def test_evaluation_chunks_per_device_type():
    """--eval-max-rows: the chapter's CPU size, every sample of a few images per pass on CUDA, or as given."""
    import experiment
    import model04
    args = model04.parser().parse_args([])
    assert experiment.evaluation_rows(args, torch.device("cpu")) == model04.EVAL_MAX_ROWS
    assert experiment.evaluation_rows(args, torch.device("cuda")) == args.eval_samples * experiment.CUDA_EVAL_IMAGES
    many = model04.parser().parse_args(["--eval-samples", "5000"])
    assert experiment.evaluation_rows(many, torch.device("cuda")) == experiment.CUDA_EVAL_MAX_ROWS
    given = model04.parser().parse_args(["--eval-max-rows", "37"])
    assert experiment.evaluation_rows(given, torch.device("cuda")) == 37
