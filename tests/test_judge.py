"""The shapes-world judge: hand-worked judgements, ground truth, planted errors, robustness
to noise and blur, GenEval's scoring rule, and the `zimagekit shapes judge` entry point."""

import dataclasses
import json
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from zimagekit.errors import ZImageKitError
from zimagekit.shapes.judge import detect_objects, judge_all, judge_image, main
from zimagekit.shapes.world import (
    COLORS,
    SHAPES,
    Prompt,
    Scene,
    SceneObject,
    eval_prompts,
    parse_prompt,
    place_objects,
    render,
    sample_scene,
    scene_for_prompt,
)

LAYOUTS_PER_PROMPT = 4


@lru_cache(maxsize=None)
def ground_truth() -> tuple[Scene, ...]:
    """Every eval prompt in several layouts, plus training scenes."""
    rng = np.random.default_rng(0)
    evals = [scene_for_prompt(p, rng, "eval") for p in eval_prompts() for _ in range(LAYOUTS_PER_PROMPT)]
    return tuple(evals) + tuple(sample_scene(10_000 + i) for i in range(300))


def _accuracy(pairs) -> float:
    results = [judge_image(image, prompt).correct for image, prompt in pairs]
    return sum(results) / len(results)


def _scene(prompt: str, *objects: SceneObject) -> tuple[np.ndarray, str]:
    return render(Scene(parse_prompt(prompt), objects)), prompt


# A red circle (centre 12, 28) well left of a blue square (centre 47, 29).
CIRCLE = SceneObject("circle", "red", 4, 20, 16)
SQUARE = SceneObject("square", "blue", 40, 22, 14)


# ----------------------------------------------------------------------------------------
# Hand-worked cases
# ----------------------------------------------------------------------------------------


def test_detects_colour_shape_and_exact_box():
    found = detect_objects(render(Scene(Prompt("", "", ()), (CIRCLE, SQUARE))))
    assert [(d.color, d.shape, d.bbox) for d in found] == [
        ("red", "circle", (4, 20, 20, 36)),
        ("blue", "square", (40, 22, 54, 36)),
    ]


@pytest.mark.parametrize(
    "prompt, verdict",
    [
        ("a red circle to the left of a blue square", "correct"),
        ("a blue square to the right of a red circle", "correct"),
        ("a red circle and a blue square", "correct"),
        ("a square and a circle", "correct"),
        ("a red circle to the right of a blue square", "wrong position"),
        ("a red circle above a blue square", "wrong position"),
        ("a red circle to the left of a blue triangle", "wrong shape"),
        ("a red circle to the left of a green square", "wrong color"),
        ("three red circles", "wrong count"),
        ("a red circle", "wrong count"),
    ],
)
def test_hand_worked_judgements(prompt, verdict):
    j = judge_image(*_scene(prompt, CIRCLE, SQUARE))
    assert j.correct == (verdict == "correct")
    assert j.reason.startswith(verdict), j.reason


def test_position_reason_says_what_was_seen():
    j = judge_image(*_scene("a red circle to the right of a blue square", CIRCLE, SQUARE))
    assert "but it is left of it" in j.reason
    # Centres 4 px apart horizontally: no relation holds, and the reason says so.
    close = SceneObject("square", "blue", CIRCLE.x + 4, CIRCLE.y + 18, 16)
    j = judge_image(*_scene("a red circle above a blue square", CIRCLE, close))
    assert j.correct
    j = judge_image(*_scene("a red circle to the left of a blue square", CIRCLE, close))
    assert j.reason.startswith("wrong position") and "it is above it" in j.reason


# ----------------------------------------------------------------------------------------
# Ground truth, planted errors, robustness
# ----------------------------------------------------------------------------------------


def test_ground_truth_is_judged_correct():
    scenes = ground_truth()
    assert _accuracy((render(s), s.prompt) for s in scenes) >= 0.99


def _corruptions(scene: Scene, rng: np.random.Generator):
    """(expected reason, corrupted scene) pairs, each breaking one aspect of the prompt."""
    prompt, objs = scene.prompt, scene.objects
    items = [(o.shape, o.color) for o in objs]
    i = int(rng.integers(len(objs)))
    # Count: one more object of a named kind (so only the count is wrong), or one fewer.
    extra = place_objects(rng, items + [items[i]], prompt.relation)
    yield "wrong count", Scene(prompt, extra)
    yield "wrong count", Scene(prompt, objs[:i] + objs[i + 1 :])
    # Shape: one object takes another shape in the same box.
    shape = [s for s in SHAPES if s != objs[i].shape][int(rng.integers(2))]
    yield "wrong shape", Scene(prompt, objs[:i] + (dataclasses.replace(objs[i], shape=shape),) + objs[i + 1 :])
    # Colour: recolour an object whose colour the prompt names.
    named = [k for k, spec in enumerate(prompt.objects) if spec.color]
    if named:
        k = named[int(rng.integers(len(named)))]
        color = [c for c in COLORS if c != objs[k].color][int(rng.integers(len(COLORS) - 1))]
        yield "wrong color", Scene(prompt, objs[:k] + (dataclasses.replace(objs[k], color=color),) + objs[k + 1 :])
    # Position: the two objects trade places (each takes the other's box).
    if prompt.relation:
        a, b = objs[:2]
        swapped = (dataclasses.replace(b, shape=a.shape, color=a.color), dataclasses.replace(a, shape=b.shape, color=b.color))
        yield "wrong position", Scene(prompt, swapped + objs[2:])


def test_planted_errors_are_caught_with_the_right_reason():
    rng = np.random.default_rng(1)
    cases = [c for s in ground_truth() for c in _corruptions(s, rng)]
    kinds = {kind for kind, _ in cases}
    assert kinds == {"wrong count", "wrong shape", "wrong color", "wrong position"}
    caught = [judge_image(render(s), s.prompt).reason.startswith(kind) for kind, s in cases]
    assert sum(caught) / len(caught) >= 0.99
    for kind in kinds:  # every kind on its own, not only on average
        hits = [c for c, (k, _) in zip(caught, cases) if k == kind]
        assert sum(hits) / len(hits) >= 0.99, kind


def _box_blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(padded[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)) / 9


def test_ground_truth_survives_blur_and_noise():
    rng = np.random.default_rng(2)
    scenes = ground_truth()[::2]

    def degrade(image):
        noisy = _box_blur(image) + rng.normal(0, 8, image.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    assert _accuracy((degrade(render(s)), s.prompt) for s in scenes) >= 0.99


def test_accepts_pil_float_and_upscaled_images():
    image, prompt = _scene("a red circle to the left of a blue square", CIRCLE, SQUARE)
    for variant in (
        Image.fromarray(image),
        Image.fromarray(image).convert("RGBA"),
        image.astype(np.float32) / 255,
        image.repeat(2, 0).repeat(2, 1),  # a 128 px decode
    ):
        assert judge_image(variant, prompt).correct
    for bad in (image[:60], image[..., 0], [[0]]):
        with pytest.raises(ZImageKitError):
            judge_image(bad, prompt)


# ----------------------------------------------------------------------------------------
# Scoring and reports
# ----------------------------------------------------------------------------------------


def test_overall_is_the_mean_of_category_accuracies_not_of_images(tmp_path):
    good = _scene("a red circle", CIRCLE)
    assert judge_all([good, good, (good[0], "a blue circle")]).accuracy() == {"colors": 2 / 3}
    two = render(Scene(parse_prompt("a circle and a square"), (CIRCLE, SQUARE)))
    report = judge_all([good, good, good, (two, "a circle and a triangle")])
    assert report.accuracy() == {"two_object": 0.0, "colors": 1.0}
    assert report.overall == pytest.approx(0.5)  # the mean over images would be 3/4

    report.write_jsonl(tmp_path / "r.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert lines[-1]["category"] == "two_object" and lines[-1]["correct"] is False
    assert lines[-1]["reason"].startswith("wrong shape")
    assert set(lines[0]) == {"prompt", "category", "correct", "reason"}
    table = report.summary()
    assert "colors" in table and "100.0%" in table and "overall (mean of 2 categories)" in table


def test_record_keeps_id_fields():
    report = judge_all([(*_scene("a red circle", CIRCLE), {"file_name": "a.png", "seed": 3})])
    assert report.records == [
        {"file_name": "a.png", "seed": 3, "prompt": "a red circle", "category": "colors", "correct": True,
         "reason": "correct: found 1 red circle"}
    ]


# ----------------------------------------------------------------------------------------
# zimagekit eval
# ----------------------------------------------------------------------------------------


def _save_png(path, image, parameters=None):
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.fromarray(image).save(path, pnginfo=info)


def test_cli_reads_metadata_and_png_text(tmp_path, capsys):
    image, prompt = _scene("a red circle to the left of a blue square", CIRCLE, SQUARE)
    _save_png(tmp_path / "0.png", image)
    _save_png(tmp_path / "1.png", image, "a red circle above a blue square\nSteps: 8, Seed: 1")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "prompt": prompt, "seed": 5}) + "\n")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "position" in out and "50.0%" in out
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["correct"]) for r in lines] == [("0.png", True), ("1.png", False)]
    assert lines[0]["seed"] == 5 and lines[1]["prompt"] == "a red circle above a blue square"

    assert main([str(tmp_path), "--output", str(tmp_path / "other.jsonl")]) == 0
    assert (tmp_path / "other.jsonl").exists()


def test_cli_names_an_unreadable_image_and_judges_the_others(tmp_path, capsys):
    image, prompt = _scene("a red circle to the left of a blue square", CIRCLE, SQUARE)
    _save_png(tmp_path / "0.png", image, prompt)
    (tmp_path / "1.png").write_bytes(b"not a png at all")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 file(s) that are not readable images: 1.png" in out
    assert [json.loads(line)["file_name"] for line in (tmp_path / "results.jsonl").read_text().splitlines()] == ["0.png"]
    (tmp_path / "0.png").write_bytes(b"broken too")
    assert main([str(tmp_path)]) == 2
    assert "none of the 2 .png files" in capsys.readouterr().err


@pytest.mark.parametrize("setup, message", [
    ("missing", "no such folder"),
    ("empty", "no .png images"),
    ("no_prompt", "no prompt"),
    ("bad_prompt", "not a shapes-world prompt"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, setup, message):
    folder = tmp_path / "imgs"
    if setup != "missing":
        folder.mkdir()
    if setup in ("no_prompt", "bad_prompt"):
        _save_png(folder / "x.png", render(sample_scene(0)), "a dog" if setup == "bad_prompt" else None)
    assert main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "metadata.jsonl" in out and "parameters" in out and "--output" in out and "results.jsonl" in out
