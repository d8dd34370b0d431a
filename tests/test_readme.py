"""README.md against the results files: every rendered block (rendering.py) is what the files say, every shipped
run is in it, and every extra --eval-only file is of the shipped checkpoint it claims to re-evaluate."""
import json
import os
import re

import pytest

import rendering
import results
from rendering import commands
from results import CHECKS, IMAGE_STATS, QUICK_LOOK, json_files, load


def readme():
    with open(rendering.README) as f:
        return f.read()


def test_readme_blocks_are_the_results_files():
    found = rendering.blocks(readme())
    assert set(found) == set(rendering.TABLES), "README.md must hold every rendered block, between its markers"
    for name, render in rendering.TABLES.items():
        assert found[name] == render(), f"README block '{name}' differs from the results files: run python rendering.py"


def test_every_results_file_is_in_the_readme():
    text = readme()
    for name, r in results.shipped():
        number = f"{r['test_bpd']:.3f}" if "test_bpd" in r else f"{r['test_llh_nats']:.2f}"
        assert number in text, f"assets/{name}_results.json: {number} is not in README.md"


def test_no_machine_path_before_the_appendix():
    story = readme().split("## Appendix")[0]
    assert "../shared" not in story and "/root/" not in story


def test_every_image_stats_run_is_of_the_shipped_checkpoint():
    for folder in [IMAGE_STATS, QUICK_LOOK]:
        suffix = "_eval_only.json" if folder == IMAGE_STATS else "_results.json"
        for name, r in json_files(folder, suffix):
            run = load(name)
            assert run is not None, f"{folder}/{name}{suffix} has no assets/{name}_results.json"
            assert r["eval_only"] and r["train_segments"] == run["train_segments"], \
                f"{folder}/{name}{suffix} is of another checkpoint than assets/{name}_*: re-run or delete it"


def test_every_check_is_of_the_shipped_checkpoint():
    """A re-evaluation left over from an earlier checkpoint of the same name would compare two different models."""
    for name, c in json_files(CHECKS, "_eval_only.json"):
        r = load(name)
        assert r is not None, f"{CHECKS}/{name}_eval_only.json has no assets/{name}_results.json"
        assert c["eval_only"] and not r["eval_only"], f"{name}: the check must be --eval-only, the run must not"
        assert c["train_segments"] == r["train_segments"], \
            f"{CHECKS}/{name}_eval_only.json is of another checkpoint than assets/{name}_*: re-run the check or delete it"


def test_the_quick_look_is_a_short_eval_only_run_of_a_shipped_checkpoint():
    (name, r), = json_files(QUICK_LOOK, "_results.json")
    assert re.search(rf"--checkpoint assets/{name}_checkpoint.pt", r["command"]) and r["eval_images"] <= 500
    assert r["wall_seconds"] < 120
    assert "--out-dir" not in r["command"]  # the README's expected line says it wrote into runs/, the default


def test_a_run_of_several_sittings_shows_each_sittings_command():
    one = {"command": "python m.py --epochs 9", "train_segments": [{"command": "python m.py --epochs 9"}]}
    assert commands(one) == "`python m.py --epochs 9`"
    old = {"command": "python m.py --resume", "train_segments": [{}, {}]}  # results from before segments had commands
    assert commands(old) == "`python m.py --resume`"
    run = {"command": "python m.py --resume", "train_segments": [
        {}, {"command": "python m.py --resume --time-limit 9"}, {"command": "python m.py --resume"}]}
    assert commands(run) == ("trained in 3 sittings: (this sitting's command was not recorded); "
                             "`python m.py --resume --time-limit 9`; `python m.py --resume`")
    evaluated_later = {"command": "python m.py --resume", "train_segments": [{"command": "python m.py"}]}
    assert commands(evaluated_later) == "trained in 1 sitting: `python m.py`; evaluated by `python m.py --resume`"


def test_every_image_the_readme_shows_is_shipped():
    for path in re.findall(r"\]\((assets/[^)]+\.png)\)", readme()):
        assert os.path.exists(os.path.join(results.ROOT, path)), f"README.md shows {path}, which is not in assets/"


def test_chapter_6_shows_the_rate_per_latent_map_and_the_worst_layers_ratio(tmp_path, monkeypatch):
    """A model06 run's layers are summed per latent map size (from the units per layer: 8 maps each); a layer's
    ratio is to its median or to 1 nat, whichever is larger, so an unused layer is not judged on noise."""
    import json
    balance = {"latent_units": [2048, 512, 512, 128, 128, 8],
               "rate_per_layer_nats": [300.0, 100.0, 50.0, 40.0, 0.0, 10.0],
               "rate_per_layer_median_nats": [290.0, 90.0, 40.0, 30.0, 0.01, 0.5],
               "rate_per_layer_max_nats": [600.0, 900.0, 80.0, 60.0, 0.7, 30.0],
               "active_units": [1000, 200, 100, 128, 0, 3], "rate_nats": 500.0, "images": 10000}
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "model06_mixture_results.json").write_text(json.dumps({"test_balance": balance}))
    monkeypatch.setattr(results, "ROOT", str(tmp_path))
    rows = rendering.render_latents_ch6().splitlines()[2:6]  # one run: its name is in the sentence, not the rows
    assert rows == ["| 16x16 | 1 | 2048 | 300.0 | 60% | 1000 of 2048 | 600.0 | 2.1 | yes |",
                    "| 8x8 | 2 | 512 | 150.0 | 30% | 300 of 1024 | 900.0 | 10.0 | yes |",  # 900/90
                    "| 4x4 | 2 (1 unused) | 128 | 40.0 | 8% | 128 of 256 | 60.0 | 2.0 | yes |",  # 0.7/1
                    "| 1x1 | 1 (1 unused) | 8 | 10.0 | 2% | 3 of 8 | 30.0 | 30.0 | no |"]  # 30/1
    assert "Rates of `model06_mixture` over the 10,000 test images" in rendering.render_latents_ch6()
    logistic = dict(balance, rate_per_layer_nats=[200.0, 100.0, 50.0, 40.0, 0.0, 10.0], rate_nats=400.0)
    (tmp_path / "assets" / "model06_logistic_unbounded_results.json").write_text(json.dumps({"test_balance": logistic}))
    text = rendering.render_latents_ch6()
    rows = text.splitlines()  # two runs: a column names each row's run, the logistic's first (CH6_RUNS)
    assert rows[0].startswith("| run | latent maps |") and rows[1] == "|" + "---|" * 10
    assert rows[2] == (f"| {results.label('model06_logistic_unbounded')} | 16x16 | 1 | 2048 | 200.0 | 50% | "
                       f"1000 of 2048 | 600.0 | 2.1 | yes |")
    assert rows[6] == f"| {results.label('model06_mixture')} | 16x16 | 1 | 2048 | 300.0 | 60% | 1000 of 2048 | 600.0 | 2.1 | yes |"
    assert "Rates of each run over the 10,000 test images" in text
    grouped = "16x16: 300.0 + 8x8: 150.0 + 4x4: 40.0 + 1x1: 10.0"
    assert rendering.per_layer("model06_mixture", balance, "rate_per_layer_nats", ".1f") == grouped
    assert rendering.per_layer("model05_mixture", balance, "active_units", "d") == "1000 + 200 + 100 + 128 + 0 + 3"


def test_the_hierarchies_draws_are_called_the_closest_only_when_every_one_is_closer_than_every_other_colour_run():
    ratio = {"model01": 1.1, "model03_unbounded": 2.1, "model05_mixture": 1.9, "model06_mixture": 1.5}
    assert rendering.hierarchies_closest(ratio) == "the closest"  # MNIST's model01 is not a colour run
    assert rendering.hierarchies_closest(dict(ratio, model04=1.8)) == "among the closest"
    assert rendering.hierarchies_closest({"model03": 2.0}) == "among the closest"  # no hierarchy: no claim


def test_chapter_6_cost_is_bench_pys_ratio_to_model05(monkeypatch):
    def row(chapter, images_per_s, flops_per_image, pairs_per_s):
        return {"chapter": chapter, "path": "optimized",
                "train": {"images_per_s": images_per_s, "flops_per_image": flops_per_image, "matmul_flops": 1e11},
                "eval": {"pairs_per_s": pairs_per_s, "flops_per_pair": 1e8, "matmul_flops": 1e11}}
    bench = {"rows": [row("model05", 300.0, 3e8, 1000.0), row("model06", 200.0, 3.3e8, 500.0)]}
    monkeypatch.setattr(rendering, "load_bench", lambda: bench)
    assert rendering.render_cost_ch6() == (
        "What the larger hierarchy costs: 1.1 times model05's FLOPs per training image but 1.5 times its time; per "
        "evaluation pair, 2.0 times its time (`bench.py`, both in one process). Training runs at 66% of the FLOP rate "
        "of a matmul on the same cores, model05's at 90%.")
    bench["rows"][1] = row("model06", 150.0, 6e8, 500.0)  # twice the FLOPs in twice the time: no "but"
    assert rendering.render_cost_ch6().startswith(
        "What the larger hierarchy costs: 2.0 times model05's FLOPs per training image and 2.0 times its time; ")
    monkeypatch.setattr(rendering, "load_bench", lambda: {"rows": bench["rows"][:1]})
    assert "not measured yet" in rendering.render_cost_ch6()


def test_the_roughness_sentence_gives_each_groups_range_of_draws_over_data():
    ratio = {"model01": 1.1, "model02": 7.0, "model02_beta0.3679": 7.5, "model03_unbounded": 2.1, "model04": 2.6,
             "model05_mixture": 1.9, "model06_mixture": 1.5}
    assert rendering.roughness_groups(ratio) == (
        "Draws / data: bounded variance or the beta-VAE, 7.00 to 7.50; free, one latent layer, 2.10 to 2.60; "
        "the hierarchies, 1.50 to 1.90; the hierarchies' draws are the closest to the data.")
    assert rendering.roughness_groups({"model03": 6.9, "model03_unbounded": 2.1}) == (
        "Draws / data: bounded variance or the beta-VAE, 6.90; free, one latent layer, 2.10.")


def test_a_rate_ruled_by_a_rare_draw_is_told_beside_its_re_evaluation(monkeypatch):
    balance = {"rate_nats": 2e7, "rate_per_layer_nats": [100.0, 2e7], "elbo_nats": -1.0, "distortion_nats": 1.0,
               "mean_log_scale": 0.0}
    run = {"model": "model05_mixture", "test_bpd": 4.70, "test_bpd_stderr": 0.01, "test_balance": balance}
    check = {"test_bpd": 4.705, "eval_samples": 100,
             "test_balance": dict(balance, rate_nats=337.4, rate_per_layer_nats=[100.0, 237.4])}
    checks = {"model05_mixture": check}
    monkeypatch.setattr(rendering, "shipped", lambda: [("model05_mixture", run)])
    monkeypatch.setattr(rendering, "load", lambda name, folder="assets", suffix="": checks.get(name))
    text = rendering.render_rare_draws()
    assert "prior of layer 2 (from the bottom) is far off" in text and "20.0 million nats" in text
    assert "re-evaluation's is 237;" in text and "estimate is unmoved" in text
    checks["model05_mixture"] = dict(check, test_bpd=4.72)
    assert "estimate moves" in rendering.render_rare_draws()
    checks.clear()
    assert rendering.render_rare_draws().endswith("ruled by one draw; its re-evaluation is not in assets/checks yet.")
    ordinary = dict(run, test_balance=check["test_balance"])
    monkeypatch.setattr(rendering, "shipped", lambda: [("model05_mixture", ordinary)])
    no_rare = "No shipped run's mean rate is ruled by a rare draw (none is above 100,000 nats)."
    assert rendering.render_rare_draws() == no_rare
    recorded = dict(check["test_balance"], rate_per_layer_max_nats=[150.0, 950.0],
                    rate_per_layer_median_nats=[100.0, 0.5])  # a layer below 1 nat is judged against 1 nat
    monkeypatch.setattr(rendering, "shipped", lambda: [("model05_mixture", dict(run, test_balance=recorded)),
                                                       ("model06_mixture", dict(run, test_balance=dict(
                                                           recorded, rate_per_layer_max_nats=[9e3, 1.0])))])
    assert rendering.render_rare_draws() == no_rare + (
        " In each run before chapter 6 whose results record it, every layer's largest one-sample rate over the test "
        "images is within 950.0 times its median (`model05_mixture` 950.0; chapter 6's runs: its latents table).")


def test_a_summary_of_your_own_runs_leaves_the_readme_alone(tmp_path, monkeypatch, capsys):
    written = []
    monkeypatch.setattr(rendering, "draw_colour_curves", lambda: written.append("curves") or 0)
    monkeypatch.setattr(rendering, "render_readme", lambda text: written.append("readme") or text)
    assert rendering.main(["--summary", "--runs", str(tmp_path), "--data-dir", str(tmp_path / "no-data")]) == 2
    assert written == [] and "holds no finished colour run" in capsys.readouterr().err


def test_a_summary_of_your_own_runs_draws_them_with_their_own_numbers(cifar_bin_dir, tmp_path, monkeypatch):
    import evaluation
    import model03
    runs = tmp_path / "runs"
    assert model03.main(["--data-dir", str(cifar_bin_dir), "--out-dir", str(runs), "--eval-samples", "2",
                         "--eval-limit", "6", "--device", "cpu", "--epochs", "1", "--batch-size", "8",
                         "--no-download", "--no-compile"]) == 0
    results = runs / "model03_results.json"
    results.write_text(json.dumps(dict(json.loads(results.read_text()), test_bpd=1.234)))  # not the shipped number
    drawn = []
    monkeypatch.setattr(evaluation, "save_labelled_grid", lambda rows, names, titles, out: drawn.append(names))
    monkeypatch.setattr(rendering, "draw_colour_curves", lambda: pytest.fail("your runs must leave assets/ alone"))
    out = tmp_path / "summary.png"
    assert rendering.main(["--summary", "--runs", str(runs), "--out", str(out), "--data-dir", str(cifar_bin_dir)]) == 0
    assert drawn == [[f"{rendering.label('model03')}: 1.23 bits/dim"]]


def test_the_guard_history_is_read_from_the_log(tmp_path, monkeypatch):
    log = tmp_path / "log.txt"
    log.write_text("Gradient norm / the median ..., over steps 101 to 9: at most 3.10.\n"
                   " step            loss    grad norm  / median   taken or skipped\n"
                   "    7           100.0    1.0e+04        1.0  taken\n"
                   "    8           300.0    1.0e+04        1.1  taken\n"
                   "    9           200.0    1.0e+04        0.9  taken\n"
                   "   10          7000.0    1.0e+06         40  taken\n"
                   "   11     4.4e+10    1.0e+12    1.0e+05  skipped\n")
    monkeypatch.setattr(rendering, "GUARD_LOG", str(log))
    text = rendering.render_guard_history()
    assert "at 40 times that median (step 10; the largest ratio before it was 3.1), and 1 step later" in text
    assert "loss was 4.4e10 nats per image instead of about 200 (" in text


def test_chapter_6s_finding_says_lowers_only_where_both_of_its_runs_beat_chapter_5s(monkeypatch):
    runs = list(results.shipped())
    assert "(chapter 6) lowers the bits/dim again" in rendering.render_findings()
    worse = [(name, dict(r, test_bpd=9.0) if name == "model06_logistic_unbounded" else r) for name, r in runs]
    monkeypatch.setattr(rendering, "shipped", lambda: worse)
    text = rendering.render_findings()
    assert "(chapter 6) does not always lower the bits/dim" in text
    chapter5 = dict(runs)["model05_logistic_unbounded"]["test_bpd"]
    assert f"the free logistic from {chapter5:.3f} (chapter 5) to 9.000." in text


def test_the_beta_vae_finding_says_the_same_only_where_both_numbers_print_alike(monkeypatch):
    runs = list(results.shipped())
    moved = [(name, dict(r, test_bpd=r["test_bpd"] + 0.5) if name == "model02_beta0.3679" else r)
             for name, r in runs]
    monkeypatch.setattr(rendering, "shipped", lambda: moved)
    bounded, beta = dict(moved)["model02"]["test_bpd"], dict(moved)["model02_beta0.3679"]["test_bpd"]
    assert f"it scores {beta:.3f} against the bounded run's {bounded:.3f} bits/dim" in rendering.render_findings()
    assert rendering.same_or_against(8.5491, 8.5489, ".3f") == "the bounded run's 8.549"


def test_a_runs_weights_are_its_results_count_or_its_checkpoints():
    runs = dict(results.shipped())
    both = [name for name, r in runs.items() if "parameters" in r]
    assert both and all(results.weights(name, {}) == runs[name]["parameters"] for name in both)


def test_reproduce_times_a_run_by_its_own_epochs_and_samples(monkeypatch):
    import model06
    import reproduce
    row = {"chapter": "model06", "path": "optimized", "train": {"images_per_s": 100.0}, "eval": {"pairs_per_s": 1e3}}
    monkeypatch.setattr(results, "load_bench", lambda: {"rows": [row]})
    train, evaluation = reproduce.hours("model06.py")
    assert train == pytest.approx(model06.EPOCHS * 50000 / 100 / 3600)
    assert evaluation == pytest.approx(10000 * model06.EVAL_SAMPLES / 1e3 / 3600)
    flags = ["--epochs", str(2 * model06.EPOCHS), "--eval-samples", str(model06.EVAL_SAMPLES // 10)]
    assert reproduce.hours("model06.py", flags) == pytest.approx((2 * train, evaluation / 10))


def test_reproduce_runs_each_shipped_run_with_the_flags_that_trained_it():
    """reproduce.py's command for each run, parsed by its script, gives the config its shipped checkpoint holds (a
    default that moved since a run, e.g. model05's --latent-bounds, must be named in its flags), and every shipped
    run is in reproduce.py."""
    import importlib

    import torch

    import reproduce
    from experiment import RESUMABLE_CHANGES
    assert {name for name, _, _ in reproduce.RUNS} == {name for name, _ in results.shipped()}
    for name, script, flags in reproduce.RUNS:
        module = importlib.import_module(script[:-3])
        args = vars(module.parser().parse_args(flags))
        blob = torch.load(os.path.join(results.ASSETS, f"{name}_checkpoint.pt"), map_location="cpu",
                          weights_only=False)
        config = {**getattr(module, "OLDER_CHECKPOINTS", {}), **blob["config"]}
        differ = {k: (v, config[k]) for k, v in args.items()
                  if k in config and k not in RESUMABLE_CHANGES and as_list(v) != as_list(config[k])}
        assert not differ, f"reproduce.py's {name}: (its flags give, the checkpoint holds) {differ}"


def as_list(v):
    """A flag's value as a list, so that nargs flags (lists) and their defaults (tuples) compare."""
    return list(v) if isinstance(v, (list, tuple)) else [v]
