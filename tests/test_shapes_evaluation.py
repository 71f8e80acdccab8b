"""Shapes-world evaluation: the distribution metrics against hand-worked values, the fixed eval
jobs, the data reference, and the compare/curves commands end to end on tiny random folders."""

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from zimagekit.shapes import evaluation as ev
from zimagekit.shapes import world

BG = np.array(world.BACKGROUND) / 255


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only waits on a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def const(value, n=1, size=4):
    return np.full((n, size, size, 3), value, np.float64)


# ----------------------------------------------------------------------------------------
# Metrics, hand-worked
# ----------------------------------------------------------------------------------------


def test_diversity_is_the_mean_pairwise_rms_distance_within_each_prompt():
    # group 0: identical images (0); group 1: black and white (1); group 2: 0, 0.5, 1 gives
    # pairs 0.5, 1, 0.5 (2/3); group 3 has one image and no pair, so it does not count.
    images = np.concatenate([const(0.3, 3), const(0.0), const(1.0), const(0.0), const(0.5), const(1.0), const(0.7)])
    groups = [0, 0, 0, 1, 1, 2, 2, 2, 3]
    assert ev.diversity(images, groups) == pytest.approx((0 + 1 + 2 / 3) / 3)
    assert ev.diversity(const(0.3, 4), [0, 0, 1, 1]) == 0.0
    assert ev.diversity(const(0.3, 2), [0, 1]) is None  # no prompt has two images


def test_saturation_is_the_mean_hsv_saturation_of_foreground_pixels():
    image = np.tile(BG, (1, 2, 3, 1))
    image[0, 0, 0] = (1.0, 0.0, 0.0)  # S = 1
    image[0, 0, 1] = (200 / 255, 100 / 255, 100 / 255)  # S = (200 - 100) / 200 = 0.5
    image[0, 0, 2] = (0.0, 0.0, 0.0)  # black: S = 0, and far from the background
    image[0, 1, 0] = (230 / 255, 230 / 255, 250 / 255)  # saturated a little, but 0.07 from the background
    assert ev.saturation(image) == pytest.approx((1 + 0.5 + 0) / 3)
    assert ev.saturation(np.tile(BG, (2, 4, 4, 1))) is None


def test_a_rendered_red_square_has_the_palette_reds_saturation():
    scene = world.scene_for_prompt(world.parse_prompt("a red square"), 0)
    r, g, b = world.COLORS["red"]
    assert ev.saturation(world.render(scene)[None] / 255) == pytest.approx((r - min(g, b)) / r)


def test_mean_and_std_are_per_image_then_averaged():
    half = np.zeros((1, 4, 4, 3))
    half[:, :2] = 1.0  # mean 0.5, std 0.5
    assert ev.mean_std(np.concatenate([half, const(0.2)])) == pytest.approx(((0.5 + 0.2) / 2, (0.5 + 0.0) / 2))


# ----------------------------------------------------------------------------------------
# The eval set and the data reference
# ----------------------------------------------------------------------------------------


def test_eval_seeds_are_distinct_and_more_images_only_add_images():
    n = len(world.eval_prompts())
    one, three = ev.eval_jobs(1), ev.eval_jobs(3)
    assert [s for _, _, s in three[:3]] == [0, n, 2 * n]  # entry 0, images 0..2
    assert len({s for *_, s in three}) == 3 * n
    assert set((e, s) for e, _, s in one) <= set((e, s) for e, _, s in three)
    with pytest.raises(ev.ZImageKitError, match="at least 1"):
        ev.eval_jobs(0)
    # An offset of the set's size gives the same prompts at disjoint seeds.
    second = ev.eval_jobs(4, seed_offset=4 * n)
    assert [(e, p) for e, p, _ in second] == [(e, p) for e, p, _ in ev.eval_jobs(4)]
    assert {s for *_, s in second}.isdisjoint(s for *_, s in ev.eval_jobs(4))
    assert [s for _, _, s in second[:2]] == [4 * n, 5 * n]
    with pytest.raises(ev.ZImageKitError, match="seed offset"):
        ev.eval_jobs(1, seed_offset=-1)


def test_the_data_scores_perfectly_and_varies_across_seeds():
    _, row = ev.measure(ev.data_eval_set(2))
    assert row["images"] == 2 * len(world.eval_prompts())
    assert row["overall"] == 1.0 and all(row[c] == 1.0 for c in world.CATEGORIES)
    assert row["diversity"] > 0.05 and 0.68 <= row["saturation"] <= 0.88  # the palette's range


def test_vae_round_trip_maps_pixels_to_the_vaes_range_and_back():
    class Identity:  # encode and decode as the identity: the round trip must return the pixels
        device, dtype = torch.device("cpu"), torch.float32

        def encode(self, x):
            return type("Out", (), {"latent_dist": type("Dist", (), {"mean": x})})

        def decode(self, z):
            return type("Out", (), {"sample": z})

    data = ev.data_eval_set(1)[:5]
    back = ev.vae_round_trip(Identity(), data, batch=2)
    assert all(np.array_equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(data, back))


def test_batched_eval_images_are_the_ones_single_generate_calls_draw(zimage_pipe):
    samples = ev.generate_eval_set(zimage_pipe, steps=2, guidance_scale=1.0, images_per_prompt=2, batch=5)
    assert len(samples) == 2 * len(world.eval_prompts())
    for image, prompt, ids in samples[:3] + samples[-2:]:
        single = zimage_pipe(prompt.text, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                             seed=ids["seed"], progress=False)[0]
        # Same noise and maths; only float rounding differs between batch layouts.
        diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(single, dtype=np.int16))
        assert diff.max() <= 2 and diff.mean() < 0.05


# ----------------------------------------------------------------------------------------
# The commands, on the tiny random Z-Image folder as teacher
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distill_runs(tmp_path_factory, tiny_model_dir):
    """Two 4-step distillation runs at 64 px with checkpoints at steps 2 and 4: hybrid keeps
    both, ca_only only the last."""
    from zimagekit.cli import distill as distill_cli

    root = tmp_path_factory.mktemp("runs")
    for mode in ("hybrid", "ca_only"):
        config = root / f"{mode}.yaml"
        config.write_text(yaml.safe_dump({
            "run": {"dir": str(root), "name": f"ablation-{mode}"},
            "distill": {"mode": mode, "student_steps": 2, "fake_updates_per_student": 2},
            "data": {"teacher": str(tiny_model_dir), "prompts": "zimagekit.shapes.world:training_prompts", "count": 16,
                     "height": 64, "width": 64},
            "train": {"steps": 4, "batch_size": 4, "ckpt_every": 2, "keep_last_ckpts": 2 if mode == "hybrid" else 1,
                      "log_every": 2,
                      "progress": False},
        }))
        assert distill_cli.main(["train", "--config", str(config), "optim.lr=1e-3"]) == 0
    return [root / "ablation-hybrid", root / "ablation-ca_only"]


def test_compare_writes_the_table_json_and_grids(distill_runs, tiny_model_dir, tmp_path):
    from zimagekit.algorithms import decoupled_dmd as dd

    student = tmp_path / "student"
    dd.export(distill_runs[0], student)
    out = tmp_path / "results"
    assert ev.main(["compare", "--teacher", str(tiny_model_dir), "--teacher-steps", "2", "--cfg-scale", "1.5",
                    "--student", str(student), "--images-per-prompt", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["data", "data through the VAE", "teacher 2 steps", "student student"]
    assert [r["NFE"] for r in rows] == [None, None, 4, 2]  # CFG doubles the calls; the student has none
    assert rows[0]["overall"] == 1.0 and all(r["images"] == 2 * len(world.eval_prompts()) for r in rows)
    for r in rows:
        cats = [r[c] for c in world.CATEGORIES]
        assert r["overall"] == pytest.approx(sum(cats) / len(cats))
    table = (out / "results.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + len(rows)
    gap = 100 * (rows[3]["overall"] - rows[2]["overall"])
    assert f"- student student: {gap:+.1f} points overall against teacher 2 steps" in table
    assert (out / "student-student" / "grid.png").stat().st_size > 0


def test_curves_measure_every_kept_checkpoint_of_every_run(distill_runs, tmp_path):
    assert ev.main(["curves", *map(str, distill_runs), "--images-per-prompt", "2", "--out", str(tmp_path)]) == 0
    with (tmp_path / "curves.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["run"], int(r["step"])) for r in rows] == [
        ("ablation-hybrid", 2), ("ablation-hybrid", 4), ("ablation-ca_only", 4)]
    assert all(float(r["diversity"]) >= 0 for r in rows)
    table = (tmp_path / "ablation.md").read_text()
    assert "| data | - |" in table and "| ablation-ca_only | 4 |" in table
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_command_errors_are_one_line(tmp_path, capsys):
    assert ev.main(["curves", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a distillation run" in err and err.count("\n") == 1
    assert ev.main(["compare", "--teacher", str(tmp_path), "--images-per-prompt", "1", "--out", str(tmp_path)]) == 2
    assert "at least 2" in capsys.readouterr().err


def records(correct, category="counting", seed_offset=0):
    """results.jsonl records: ``correct[e][i]`` is image i of eval entry e."""
    return [{"entry": e, "seed": seed_offset + e + 100 * i, "category": category, "correct": bool(c)}
            for e, row in enumerate(correct) for i, c in enumerate(row)]


def test_paired_difference_of_a_uniform_gap_is_exact_with_a_point_interval():
    d = ev.paired_difference(records([[1, 1]] * 5), records([[0, 1]] * 5), resamples=200)
    # every prompt's gap is 1/2, so every resample's is too
    assert d == {"difference": 0.5, "low": 0.5, "high": 0.5, "images": 10, "prompts": 5}


def test_paired_difference_is_the_mean_of_category_differences_over_shared_images():
    a = records([[1, 1], [1, 1]], "counting") + records([[0, 0]], "position", seed_offset=1000)
    b = records([[0, 0], [0, 0]], "counting") + records([[0, 0]], "position", seed_offset=1000)
    a += records([[1] * 4], "counting", seed_offset=5000)  # judged for A only: left out
    d = ev.paired_difference(a, b, resamples=200)
    # counting: +1 on 4 images; position: 0 on 2; overall is their mean, not the image mean (4/6)
    assert d["difference"] == 0.5 and d["images"] == 6 and d["prompts"] == 2


def test_paired_interval_matches_the_normal_approximation_over_prompts():
    rng = np.random.default_rng(1)
    a = (rng.random((400, 4)) < rng.random((400, 1))).astype(int)  # each prompt its own difficulty
    b = (rng.random((400, 4)) < 0.4).astype(int)
    d = ev.paired_difference(records(a), records(b), resamples=4000)
    gaps = (a - b).mean(1)
    half_width = 1.96 * gaps.std(ddof=1) / np.sqrt(len(gaps))
    assert d["difference"] == pytest.approx(gaps.mean())
    assert (d["high"] - d["low"]) / 2 == pytest.approx(half_width, rel=0.1)
    assert d["low"] < gaps.mean() < d["high"]


def test_paired_command_prints_the_gap_and_rejects_unpaired_input(tmp_path, capsys):
    from zimagekit.shapes import teacher

    for name, rows in (("a", records([[1, 1]] * 3)), ("b", records([[0, 1]] * 3)),
                       ("c", records([[0, 1]] * 3, seed_offset=432)), ("d", [{"file_name": "0.png"}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.jsonl").write_text(json.dumps(records([[1]])[0])[:20] + "\n")  # cut short
    assert teacher.main(["paired", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out == "A - B: +50.0 points (95 % interval +50.0 to +50.0) on 6 paired images of 3 prompts\n"
    for argv, message in ((["--b", str(tmp_path / "c")], "share no judged image"),
                          (["--b", str(tmp_path / "b"), str(tmp_path / "b")], "judged twice"),
                          (["--b", str(tmp_path / "missing")], "no results.jsonl"),
                          (["--b", str(tmp_path / "d")], "needs 'entry'"),
                          (["--b", str(tmp_path / "e")], "results.jsonl:1: not valid JSON")):
        assert teacher.main(["paired", "--a", str(tmp_path / "a"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
