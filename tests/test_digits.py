"""The digit study: data, judge, embedders, the module-encoder loader, the identity baseline, the quick demo."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")  # the trainer-deps extra's scikit-learn: the digits ship inside it

from reference.checkpoint import load_checkpoint
from reference.logs import GRID_HEADER_LINES, GRID_LINE_PX
from reference.losses import generator_adversarial_loss
from reference.models import PatchDiscriminator, ResnetGenerator
from reference.studies import digits as digit_demo
from reference.studies.digit_data import (
    STYLE_A,
    STYLE_B,
    DigitJudge,
    audit_digit_translations,
    coloured_noise,
    digit_domains,
    fidelity_l1,
    kid,
    orientation_embedder,
    pixel_embedder,
    pixel_features,
    realism,
    render_digits,
    salt_and_pepper,
    stroke_embedder,
)
from reference.train import SetupError, StepOptions, TrainConfig, generator_step, main, train
from reference.user_embedder import EmbedderSpecError, build_user_embedder, load_factory
from travel_loss import flip_scores, travel_loss
from travel_loss.testing import check_embedder

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def domains():
    return digit_domains()


# ---------------------------------------------------------------------------------------------
# data and judge


def test_domains_are_deterministic_and_b_is_skewed(domains):
    again = digit_domains()
    assert torch.equal(domains.a_train, again.a_train) and torch.equal(domains.b, again.b)
    assert domains.a_train.shape[1:] == (3, 16, 16) and domains.a_train.min() >= -1 and domains.a_train.max() <= 1
    counts = torch.bincount(domains.b_labels, minlength=10)
    ordered = counts[list(domains.class_order)]
    assert torch.all(ordered[:-1] >= ordered[1:]), f"B's counts must fall along class_order, got {ordered.tolist()}"
    assert ordered[:2].sum() >= 0.45 * counts.sum() and ordered[-1] <= 3  # two classes make half of B
    a_counts = torch.bincount(domains.a_train_labels, minlength=10)
    assert a_counts.min() >= 0.6 * a_counts.max()  # A is roughly balanced


def test_seed_draws_b_and_leaves_a_the_judge_and_the_reference_alone(domains):
    other = digit_domains(seed=1)
    assert other.class_order != domains.class_order and not torch.equal(other.b_labels, domains.b_labels)
    for name in ("a_train", "a_test", "a_test_ideal", "judge", "realism_reference"):
        assert torch.equal(getattr(other, name), getattr(domains, name)), name
    counts = torch.bincount(domains.realism_reference_labels, minlength=10)
    assert counts.min() == counts.max() >= 20  # every class equally often
    judge = DigitJudge(domains.judge, domains.judge_labels)
    assert judge.accuracy(domains.realism_reference, domains.realism_reference_labels) > 0.9  # labels fit images


def test_subsets_are_disjoint_scans(domains):
    ids = {name: set(index.tolist()) for name, index in domains.scan_ids.items()}
    names = sorted(ids)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not ids[first] & ids[second], f"{first} and {second} share scans"
    assert len(ids["a_test"]) == len(domains.a_test) and len(ids["judge"]) * 2 == len(domains.judge)


def test_styles_have_opposite_polarity_and_realism_tells_them_apart(domains):
    scans = torch.zeros(2, 8, 8)
    scans[:, 2:6, 3] = 1.0  # a vertical stroke on empty paper
    a, b = render_digits(scans, STYLE_A), render_digits(scans, STYLE_B)
    paper, stroke = (0, slice(None), 0, 0), (0, slice(None), 8, 7)
    assert a[paper].mean() < a[stroke].mean() and b[paper].mean() > b[stroke].mean()  # light ink vs dark ink
    assert realism(domains.b) > 0.99 and realism(domains.a_test) < 0.01 and realism(domains.a_test_ideal) > 0.99


def test_judge_reads_style_b_digits_but_not_style_a(domains):
    judge = DigitJudge(domains.judge, domains.judge_labels)
    assert judge.accuracy(domains.a_test_ideal, domains.a_test_labels) >= 0.9
    assert judge.accuracy(domains.a_test, domains.a_test_labels) <= 0.3


# ---------------------------------------------------------------------------------------------
# embedders


# ---------------------------------------------------------------------------------------------
# the scores: KID in pixels + local contrast, L1 to the ideal, the colour fraction


def test_kid_ranks_the_known_cases_as_the_eye_does(domains):
    """Ideal renders best; the ideal with B-coloured speckle at the study's density clearly worse (while
    the colour fraction calls it perfect); the input unchanged and B-coloured noise worst."""
    draw = torch.Generator().manual_seed(0)
    ideal = domains.a_test_ideal
    speckled = salt_and_pepper(ideal, digit_demo.SPECKLE_DENSITY, draw)
    scores = {
        "ideal": kid(ideal, domains.realism_reference)[0],
        "speckle": kid(speckled, domains.realism_reference)[0],
        "input": kid(domains.a_test, domains.realism_reference)[0],
        "noise": kid(coloured_noise(200, 16, draw), domains.realism_reference)[0],
    }
    assert scores["ideal"] < 0.01
    assert scores["speckle"] > 10 * scores["ideal"] and scores["speckle"] > 0.1
    assert min(scores["input"], scores["noise"]) > scores["speckle"]
    assert realism(speckled) > 0.99  # the colour fraction cannot see it


def test_kid_of_a_set_against_itself_is_about_zero_and_grows_with_the_speckle(domains):
    reference = domains.realism_reference
    draw = torch.Generator().manual_seed(1)
    values = [kid(salt_and_pepper(reference, density, draw), reference)[0] for density in (0.0, 0.02, 0.05, 0.15)]
    assert abs(values[0]) < 1e-3
    assert values == sorted(values)


def test_pixel_features_are_the_pixels_and_their_local_contrast():
    flat = torch.full((2, 3, 8, 8), 0.2)
    features = pixel_features(flat)
    assert features.shape == (2, 6 * 64)
    torch.testing.assert_close(features[:, :192], torch.full((2, 192), 0.6, dtype=torch.float64))
    assert torch.all(features[:, 192:] == 0)  # a flat image has no contrast
    dot = flat.clone()
    dot[0, :, 4, 4] = 1.0
    contrast = pixel_features(dot)[0, 192:].view(3, 8, 8)
    assert contrast[0, 4, 4] == pytest.approx(6.0 * 0.4 * 8 / 9) and contrast[0, 0, 0] == 0


def test_fidelity_is_the_mean_absolute_difference_on_the_unit_scale(domains):
    ideal = domains.a_test_ideal
    assert fidelity_l1(ideal, ideal) == 0
    shifted = (ideal + 0.2).clamp(-1, 1)
    assert fidelity_l1(shifted, ideal) == pytest.approx(float((shifted - ideal).abs().mean() / 2))
    with pytest.raises(ValueError, match="translated, ideal: expected the same shape"):
        fidelity_l1(ideal[:3], ideal)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5])
def test_salt_and_pepper_touches_the_density_and_uses_the_style_colours(domains, density):
    images = domains.a_test_ideal
    speckled = salt_and_pepper(images, density, torch.Generator().manual_seed(0))
    changed = (speckled != images).any(1).float().mean()
    assert abs(float(changed) - density) < 0.03 + 0.5 * density  # a speckle can land on its own colour
    with pytest.raises(ValueError, match="density"):
        salt_and_pepper(images, 1.5, torch.Generator())


@pytest.mark.parametrize("factory", [stroke_embedder, pixel_embedder, orientation_embedder])
def test_study_embedders_pass_the_kit(factory):
    check_embedder(factory(), image_shape=(3, 16, 16))


def test_stroke_embedder_is_invariant_to_the_style_change_and_the_pixel_one_is_not(domains):
    """travel(E(x), E(ideal(x))): near 0 if E ignores the style, ~1 for unrelated images, ~2 for opposite."""
    shuffled = torch.randperm(len(domains.a_test), generator=torch.Generator().manual_seed(0))
    stroke, pixel = stroke_embedder(), pixel_embedder()
    same = float(travel_loss(stroke(domains.a_test), stroke(domains.a_test_ideal)))
    unrelated = float(travel_loss(stroke(domains.a_test), stroke(domains.a_test_ideal[shuffled])))
    assert same < 0.5 * unrelated, (same, unrelated)
    assert float(travel_loss(pixel(domains.a_test), pixel(domains.a_test_ideal))) > 1.5  # vectors point backwards


def test_the_audit_embedder_ignores_the_style_change_and_the_audit_finds_swapped_digits(domains):
    audit = orientation_embedder()
    shuffled = torch.randperm(len(domains.a_test), generator=torch.Generator().manual_seed(0))
    same = float(travel_loss(audit(domains.a_test), audit(domains.a_test_ideal)))
    unrelated = float(travel_loss(audit(domains.a_test), audit(domains.a_test_ideal[shuffled])))
    assert same < 0.5 * unrelated, (same, unrelated)
    # the ideal translations with 20 of them swapped for other digits: the audit ranks those first
    translated, flipped = domains.a_test_ideal.clone(), torch.zeros(len(domains.a_test), dtype=torch.bool)
    labels = domains.a_test_labels
    for first in range(0, 40, 2):
        second = int(((labels != labels[first]) & (torch.arange(len(labels)) > 40)).nonzero()[first // 2])
        translated[[first, second]] = domains.a_test_ideal[[second, first]]
        flipped[[first, second]] = True
    judge = DigitJudge(domains.judge, domains.judge_labels)
    result = audit_digit_translations(translated, domains, judge)
    assert 0.15 < result["flip_share"] < 0.35
    assert result["audit_auroc"] > 0.8 and result["audit_top10_flips"] >= 0.9, result  # the judge errs too
    scores = flip_scores(audit(domains.a_test), audit(translated))
    assert flipped[scores.topk(40).indices].float().mean() >= 0.8


# ---------------------------------------------------------------------------------------------
# --encoder-mode module


FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Pool(nn.Module):
        def forward(self, x):
            return nn.functional.avg_pool2d(x, 4)  # (N, 3, S/4, S/4): flattened by the trainer

    def good(image_size):
        assert image_size == 16
        return Pool()

    def no_arguments():
        return Pool()

    class BatchCoupled(nn.Module):
        def forward(self, x):
            return (x - x.mean(0, keepdim=True)).flatten(1)  # each embedding depends on the batch

    def coupled():
        return BatchCoupled()

    def broken():
        raise RuntimeError("weights missing")

    def not_a_module():
        return lambda x: x
    """
)


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_embedders.py"
    path.write_text(FACTORIES)
    return path


def test_module_loader_takes_a_file_or_a_package(factory_file):
    embedder = build_user_embedder(f"{factory_file}:good", 16)
    assert embedder(torch.zeros(2, 3, 16, 16)).shape == (2, 48)
    assert not any(p.requires_grad for p in embedder.parameters()) and not embedder.training
    assert build_user_embedder(f"{factory_file}:no_arguments", 16)(torch.zeros(2, 3, 16, 16)).shape == (2, 48)
    assert load_factory("reference.studies.digit_data:stroke_embedder") is stroke_embedder


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken", "calling .* failed: RuntimeError: weights missing"),
        ("not_a_module", "must return an nn.Module, got function"),
        ("coupled", "fails travel_loss.testing.check_embedder: .*image 0"),
        ("missing", "has no callable named 'missing'"),
    ],
)
def test_module_loader_errors_name_the_problem(factory_file, name, message):
    with pytest.raises(EmbedderSpecError, match=message):
        build_user_embedder(f"{factory_file}:{name}", 16)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected FILE.py:FACTORY"),
        ("nowhere/x.py:f", "no such file"),
        ("no_such_pkg.mod:f", "cannot import module"),
    ],
)
def test_module_loader_rejects_bad_specs(spec, message):
    with pytest.raises(EmbedderSpecError, match=message):
        load_factory(spec)


def digit_config(out: Path, data: Path, **overrides) -> TrainConfig:
    options = dict(
        data_a=str(data / "trainA"), data_b=str(data / "trainB"), size=16, flip=False, num_workers=0,
        encoder_mode="module", encoder=f"{REPO / 'reference' / 'studies' / 'digit_data.py'}:stroke_embedder",
        lambda_travel=10.0,
        g_width=8, g_blocks=1, d_width=8, d_layers=2, batch_size=4, steps=4, out=str(out), log_every=1,
        sample_every=1000, checkpoint_every=1000,
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory, domains):
    data = tmp_path_factory.mktemp("digits")
    digit_demo._write_folder(domains.a_train[:16], data / "trainA")
    digit_demo._write_folder(domains.b[:16], data / "trainB")
    return data


def test_module_encoder_trains_and_resumes_bit_for_bit(tmp_path, digit_folders):
    whole = train(digit_config(tmp_path / "whole", digit_folders), progress=False)
    train(digit_config(tmp_path / "split", digit_folders, steps=2), progress=False)
    train(digit_config(tmp_path / "split", digit_folders, resume=True), progress=False)
    a, b = load_checkpoint(whole["checkpoint"]), load_checkpoint(tmp_path / "split" / "latest.pt")
    for name in ("generator", "discriminator"):
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"


def test_module_encoder_under_bf16_autocast(tmp_path, digit_folders):
    summary = train(digit_config(tmp_path / "amp", digit_folders, amp="bf16", steps=2), progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["metrics"].values())


def test_failing_embedder_stops_before_any_step(tmp_path, digit_folders, factory_file, capsys):
    config = digit_config(tmp_path / "bad", digit_folders, encoder=f"{factory_file}:coupled")
    with pytest.raises(SetupError, match="check_embedder"):
        train(config, progress=False)
    assert not (tmp_path / "bad" / "latest.pt").exists()
    argv = ["--data-a", config.data_a, "--data-b", config.data_b, "--size", "16", "--encoder-mode", "module",
            "--encoder", config.encoder, "--out", str(tmp_path / "bad_cli"), "--steps", "1",
            "--d-layers", "2"]  # fmt: skip
    assert main(argv) == 2
    assert "check_embedder" in capsys.readouterr().err


def test_module_mode_needs_a_factory_spec(tmp_path, digit_folders):
    with pytest.raises(ValueError, match="encoder: expected FILE.py:FACTORY"):
        train(digit_config(tmp_path / "x", digit_folders, encoder="openai/clip-vit-large-patch14"), progress=False)


# ---------------------------------------------------------------------------------------------
# the identity-L1 baseline


def test_identity_term_adds_w_times_mean_absolute_difference():
    torch.manual_seed(0)
    generator, discriminator = ResnetGenerator(3, 3, width=4, n_blocks=1), PatchDiscriminator(3, width=4, n_layers=1)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    weight = 2.5

    def gradients(step: bool) -> list[torch.Tensor]:
        generator.zero_grad(set_to_none=True)
        if step:
            optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)  # lr 0: the step leaves the weights
            options = StepOptions(lambda_travel=0.0, lambda_identity=weight, gan_loss="lsgan")
            generator_step(generator, discriminator, lambda x: x.flatten(1), optimizer, images, options)
        else:
            fake = generator(images)
            loss = generator_adversarial_loss(discriminator(fake), "lsgan") + weight * (fake - images).abs().mean()
            loss.backward(inputs=list(generator.parameters()))
        return [p.grad.clone() for p in generator.parameters()]

    for ours, straightforward in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(ours, straightforward, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# the study itself, in its quick mode


def test_quick_digit_demo_writes_report_grid_and_frontier(tmp_path):
    report = digit_demo.run_digit_demo(tmp_path / "demo", quick=True, progress=False)
    saved = json.loads((tmp_path / "demo" / digit_demo.REPORT_NAME).read_text())
    assert saved["runs"] == json.loads(json.dumps(report["runs"]))
    methods = [m.name for m in digit_demo.CORE]
    assert methods == ["gan", "travel", "identity-l1", "cycle", "patchnce"]
    seeds = [0, 1]
    assert sorted((r["method"], r["seed"]) for r in saved["runs"]) == sorted((m, s) for m in methods for s in seeds)
    for run in saved["runs"]:
        assert 0 <= run["label_accuracy"] <= 1 and 0 <= run["realism"] <= 1
        assert run["kid"] > -0.01 and run["kid_std"] >= 0 and 0 <= run["fidelity_l1"] <= 1
    assert [row["method"] for row in saved["summary"]] == methods
    for row in saved["summary"]:
        values = [r["label_accuracy"] for r in saved["runs"] if r["method"] == row["method"]]
        assert row["label_accuracy"] == pytest.approx({"mean": sum(values) / 2, "min": min(values), "max": max(values)})
    refs = saved["references"]
    assert refs["ideal"]["label_accuracy"] >= 0.9 and refs["ideal"]["fidelity_l1"] == 0
    from PIL import Image

    grid = Image.open(tmp_path / "demo" / digit_demo.GRID_NAME)
    rows, columns = digit_demo.QUICK.grid_rows, len(methods) + 2  # input | methods | ideal
    header = GRID_HEADER_LINES * GRID_LINE_PX + 2  # the title and the column labels
    assert grid.size == (columns * (64 + 2) + 2, header + rows * (64 + 2) + 2)
    grey = torch.tensor(list(grid.convert("L").getdata())).view(grid.height, grid.width)
    labels = grey[GRID_LINE_PX:header]  # below the title
    assert all((labels[:, 2 + k * 66 : (k + 1) * 66] < 128).any() for k in range(columns)), "a column without a label"
    assert Image.open(tmp_path / "demo" / digit_demo.FRONTIER_NAME).size[0] > 0
    # a second call continues the finished runs instead of failing on their checkpoints
    again = digit_demo.run_digit_demo(tmp_path / "demo", quick=True, progress=False)
    assert [r["label_accuracy"] for r in again["runs"]] == [r["label_accuracy"] for r in report["runs"]]


def test_the_study_table_keeps_every_column_under_its_header():
    def spread(mean: float, low: float, high: float) -> dict[str, float]:
        return {"mean": mean, "min": low, "max": high}

    def row(method: str, weight: float, kid: dict[str, float], audit: dict[str, float] | None) -> dict[str, object]:
        scores = {"label_accuracy": spread(0.8, 0.7, 0.9), "fidelity_l1": spread(0.07, 0.06, 0.08)}
        return {"method": method, "weight": weight, "kid": kid, "realism": spread(0.9, 0.8, 1.0),
                "seconds": spread(15.4, 14.0, 17.0), "audit_auroc": audit, **scores}  # fmt: skip

    summary = [
        row("gan", 0.0, spread(0.1, 0.09, 0.12), None),  # every digit flipped: nothing to rank
        row("travel", 30.0, spread(1.6112, 1.0834, 2.0882), spread(0.8123, 0.78, 0.845)),
    ]
    known = {"ideal": {"label_accuracy": 0.94, "kid": 0.0045, "fidelity_l1": 0.0, "realism": 1.0}}
    lines = digit_demo.format_table(summary, known).splitlines()
    header, rule, *body = lines
    assert header.split("  ")[0].strip() == "method" and header.endswith("s/run") and set(rule) <= {"-", " "}
    starts = [header.index(name) for name in digit_demo.TABLE_COLUMNS[2:7]]
    cells = [[line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])] for line in body]
    assert cells[1][1:] == [
        "1611.2 (1083.4-2088.2)",
        "0.070 (0.060-0.080)",
        "0.900 (0.800-1.000)",
        "0.81 (0.78-0.84)     15",
    ]
    assert cells[0][4].startswith("-")
    assert all(line[start - 2 : start] == "  " for line in body for start in starts[:-1])
    assert all(line[starts[-1] - 2 : starts[-1]] == "  " for line in body[:2])  # the known cases have no audit
    assert body[0].startswith("gan") and body[0].endswith(" 15") and body[2] == body[2].rstrip()
    assert body[2].split() == ["(ideal)", "0.940", "4.5", "0.000", "1.000"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--demo"], ("digits", {"seed": 0, "quick": False})),
        (["--demo", "digits", "--quick", "--seed", "3"], ("digits", {"seed": 3, "quick": True})),
        (["--demo", "digits-full"], ("digits", {"seed": 0, "quick": False, "full": True})),
    ],
)
def test_command_line_dispatches_the_studies(tmp_path, monkeypatch, argv, expected):
    calls = []
    monkeypatch.setattr(digit_demo, "run_digit_demo", lambda out, **kw: calls.append(("digits", out, kw)))
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert calls == [(expected[0], str(tmp_path), expected[1])]


def test_the_main_job_runs_its_recipe_and_digits_full_the_presets(tmp_path, monkeypatch):
    """``--demo`` trains every method with MAIN_JOB's generator width and batch (the command lines say so);
    ``--demo digits-full`` with the digits-demo preset's own, for every method including the main job's."""
    from reference.presets import preset_config

    studied = []
    monkeypatch.setattr(digit_demo, "_run_study", lambda out, seed, settings, progress: studied.append(settings))
    digit_demo.run_digit_demo(tmp_path, progress=False)
    digit_demo.run_digit_demo(tmp_path, full=True, progress=False)
    digit_demo.run_digit_demo(tmp_path, full=True, quick=True, progress=False)
    main_job, full, quick_full = studied
    assert quick_full.overrides == digit_demo.QUICK.overrides and quick_full.methods == full.methods
    preset = preset_config("digits-demo")
    assert main_job.methods == digit_demo.CORE and all(m in full.methods for m in digit_demo.CORE)
    assert main_job.recipe == {**preset, **digit_demo.MAIN_JOB} and full.recipe == preset
    assert main_job.runs != full.runs  # one folder of runs per recipe: neither resumes the other's checkpoints
    assert digit_demo.MAIN_JOB["g_width"] < preset["g_width"] and main_job.steps == full.steps == preset["steps"]
    for settings, width, batch in ((main_job, "8", "16"), (full, None, None)):  # None: the preset's, no flag
        argv = digit_demo._trainer_run(digit_demo.CORE[3], settings, tmp_path / "data", tmp_path, seed=0).argv
        given = {name: argv[argv.index(name) + 1] if name in argv else None for name in ("--g-width", "--batch-size")}
        assert given == {"--g-width": width, "--batch-size": batch}


def test_unknown_study_is_refused_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "faces", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "digits-full" in capsys.readouterr().err


def test_a_run_in_a_shared_worker_equals_the_command_line_bit_for_bit(tmp_path, digit_folders):
    """Two runs in one worker process (the second after the first, as a study runs them) and the same
    flags as a command line of its own give bit-identical weights."""
    import subprocess

    from reference.studies.runner import TrainerRun, run_trainers, trainer_argv

    def run(name: str) -> TrainerRun:
        flags = dict(
            data_a=str(digit_folders / "trainA"), data_b=str(digit_folders / "trainB"), g_width=8, g_blocks=1,
            d_width=8, batch_size=4, steps=3, lambda_travel=3.0, g_ema=0.9, out=str(tmp_path / name),
        )  # fmt: skip
        return TrainerRun(name, trainer_argv("digits-demo", flags), tmp_path / name)

    first, second, alone = run("first"), run("second"), run("alone")
    run_trainers([first, second], workers=1, say=lambda *a: None)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    subprocess.run(alone.command, check=True, capture_output=True, env=env, cwd=REPO)
    states = [load_checkpoint(r.out / "latest.pt") for r in (first, second, alone)]
    for name in ("generator", "generator_ema", "discriminator"):
        for key, value in states[2][name].items():
            assert torch.equal(states[0][name][key], value) and torch.equal(states[1][name][key], value), (name, key)


def test_a_failing_run_names_itself_with_its_log(tmp_path):
    from reference.studies.runner import TrainerRun, run_trainers

    bad = TrainerRun("bad", ["--data-a", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")], tmp_path / "bad")
    with pytest.raises(RuntimeError, match=r"(?s)'bad' exited with 2.*--data-a"):
        run_trainers([bad], workers=1, say=lambda *a: None)


def test_preset_sets_defaults_and_flags_override_them(tmp_path, monkeypatch):
    from reference import train as train_module
    from reference.presets import preset_config

    seen = []
    monkeypatch.setattr(train_module, "train", lambda config, **kw: seen.append(config) or {"rank": 1})
    argv = ["--preset", "digits-demo", "--data-a", "a", "--data-b", "b", "--lambda-travel", "3", "--out", str(tmp_path)]
    assert train_module.main(argv) == 0
    (config,) = seen
    preset = {k: v for k, v in preset_config("digits-demo").items() if k != "out"}  # --out given
    assert config.lambda_travel == 3.0 != preset["lambda_travel"]  # the flag wins
    for name, value in preset.items():
        if name != "lambda_travel":
            assert getattr(config, name) == value, name
