"""The shapes world: rendering by hand-worked pixels, layout invariants, the held-out split,
prompt grammar and determinism."""

import itertools
import re
from collections import Counter

import numpy as np
import pytest

from zimagekit.errors import ZImageKitError
from zimagekit.shapes.world import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    HELD_OUT,
    SEEN_FEATURED,
    SHAPES,
    ObjectSpec,
    Prompt,
    Scene,
    SceneObject,
    eval_prompts,
    parse_prompt,
    relation_holds,
    render,
    sample_prompt,
    sample_scene,
)

RED, BLUE = COLORS["red"], COLORS["blue"]


def _draw(*objects):
    return render(Scene(Prompt("", "", ()), tuple(objects)))


def _mask(image, rgb):
    return (image == rgb).all(-1)


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------


def test_square_fills_exactly_its_box_on_the_background():
    image = _draw(SceneObject("square", "red", 10, 20, 12))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    red = _mask(image, RED)
    assert red.sum() == 144 and red[20:32, 10:22].all()
    assert _mask(image, BACKGROUND).sum() == 64 * 64 - 144


def test_triangle_has_its_apex_up_and_its_base_on_the_bottom_edge():
    red = _mask(_draw(SceneObject("triangle", "red", 0, 0, 12)), RED)[:12, :12]
    # Row y spans the pixel centres within (y + 1) / 2 of the centre line x = 6:
    # widths 2, 2, 4, 4, ..., 12, 12.
    assert list(red.sum(1)) == [2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12]
    assert list(np.nonzero(red[0])[0]) == [5, 6]
    assert (red == red[:, ::-1]).all()


def test_circle_is_inscribed_in_its_box():
    blue = _mask(_draw(SceneObject("circle", "blue", 30, 30, 12)), BLUE)[30:42, 30:42]
    assert blue[5].all() and blue[:, 5].all()  # touches all four sides
    assert not blue[0, 0] and not blue[11, 11]  # corners stay background
    assert (blue == blue[::-1]).all() and (blue == blue.T).all()
    assert abs(blue.mean() - np.pi / 4) < 0.05


def test_renders_only_palette_and_background_colours():
    image = render(sample_scene(5))
    palette = {tuple(c) for c in COLORS.values()} | {BACKGROUND}
    assert {tuple(p) for p in image.reshape(-1, 3)} <= palette


# ----------------------------------------------------------------------------------------
# Layout invariants
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "eval"])
def test_layout_invariants_and_scenes_hold_exactly_the_named_objects(split):
    for seed in range(1500):
        scene = sample_scene(seed, split)
        objs = scene.objects
        assert 1 <= len(objs) <= 4
        for o in objs:
            x0, y0, x1, y1 = o.bbox
            assert 12 <= o.size <= 20 and x0 >= 0 and y0 >= 0 and x1 <= 64 and y1 <= 64
        for a, b in itertools.combinations(objs, 2):
            gap_x = max(b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2])
            gap_y = max(b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3])
            assert max(gap_x, gap_y) >= 2, scene
        # Exactly the named objects, named colours respected.
        assert len(objs) == len(scene.prompt.objects)
        for o, spec in zip(objs, scene.prompt.objects):
            assert o.shape == spec.shape and spec.color in (None, o.color)
        if split == "train":  # not even a free colour may show a held-out combination
            assert not {(o.color, o.shape) for o in objs} & set(HELD_OUT)
        if scene.prompt.relation:
            a, b = objs[0].center, objs[1].center
            assert relation_holds(scene.prompt.relation, a, b, slack=2.0)


def test_position_definition_by_hand():
    assert relation_holds("left of", (10, 30), (16, 30))  # 6 px: the margin
    assert not relation_holds("left of", (10, 30), (15, 30))  # 5 px: too close
    assert not relation_holds("left of", (10, 30), (20, 40))  # diagonal: |dy| = |dx|
    assert relation_holds("above", (40, 10), (35, 30)) and relation_holds("below", (35, 30), (40, 10))
    assert relation_holds("right of", (50, 30), (20, 32))


def test_same_seed_same_scene_and_global_rng_untouched():
    assert sample_scene(123) == sample_scene(123)
    assert len({sample_scene(s) for s in range(20)}) == 20
    assert sample_scene(np.random.default_rng(7)) == sample_scene(7)
    np.random.seed(0)
    sample_scene(1)
    after = np.random.rand()
    np.random.seed(0)
    assert np.random.rand() == after


# ----------------------------------------------------------------------------------------
# Split and prompts
# ----------------------------------------------------------------------------------------


def _combos(prompt):
    return {(o.color, o.shape) for o in prompt.objects if o.color}


def test_training_captions_never_name_a_held_out_combination():
    rng = np.random.default_rng(0)
    prompts = [sample_prompt(rng) for _ in range(5000)]
    for p in prompts:
        assert not any(f"{c} {s}" in p.text for c, s in HELD_OUT), p.text
    assert set(Counter(p.category for p in prompts)) == set(CATEGORIES)
    # Every colour and every shape is still seen in training.
    named = set().union(*map(_combos, prompts))
    assert {c for c, _ in named} == set(COLORS) and {s for _, s in named} == set(SHAPES)
    assert len(named) == 18 - len(HELD_OUT)


def test_eval_prompts_are_balanced_and_use_the_held_out_combinations():
    prompts = eval_prompts()
    assert prompts == eval_prompts()
    assert Counter(p.category for p in prompts) == {c: 18 for c in CATEGORIES}
    for p in prompts:
        if p.category in ("counting", "colors", "position", "color_attr"):
            assert _combos(p) & set(HELD_OUT), p.text
    assert set().union(*map(_combos, prompts)) >= set(HELD_OUT)
    pos = [p for p in prompts if p.category == "position"]
    assert len({p.text for p in pos}) == 18
    assert {p.relation for p in pos} == {"left of", "right of", "above", "below"}
    for p in [p for p in prompts if p.category == "color_attr"]:
        assert p.objects[0].color != p.objects[1].color
    assert sample_prompt(3, "eval") in prompts


def test_seen_twin_of_the_eval_set_names_only_training_combinations():
    held, seen = eval_prompts(), eval_prompts("seen")
    assert [p.category for p in seen] == [p.category for p in held]
    assert [len(p.objects) for p in seen] == [len(p.objects) for p in held]
    assert [p.relation for p in seen] == [p.relation for p in held]
    for p in seen:
        assert not _combos(p) & set(HELD_OUT), p.text
        if p.category in ("counting", "colors", "position", "color_attr"):
            assert _combos(p) & set(SEEN_FEATURED), p.text
        if p.category == "color_attr":
            assert p.objects[0].color != p.objects[1].color
        if p.category == "position":
            assert p.objects[0] != p.objects[1], p.text  # two objects the judge can tell apart
        assert parse_prompt(p.text) == p
    with pytest.raises(ZImageKitError, match="prompt set"):
        eval_prompts("train")


def test_every_prompt_parses_back_to_its_requirement():
    rng = np.random.default_rng(1)
    for p in list(eval_prompts()) + [sample_prompt(rng) for _ in range(500)]:
        assert parse_prompt(p.text) == p


def test_parse_prompt_by_hand():
    assert parse_prompt("  Three RED circles. ") == Prompt(
        "three red circles", "counting", (ObjectSpec("circle", "red"),) * 3
    )
    p = parse_prompt("a orange square below a blue circle")
    assert p.text == "an orange square below a blue circle"
    assert (p.category, p.relation) == ("position", "below")
    assert p.objects == (ObjectSpec("square", "orange"), ObjectSpec("circle", "blue"))
    assert parse_prompt("a circle and a square").category == "two_object"
    assert parse_prompt("a circle").objects == (ObjectSpec("circle"),)
    assert parse_prompt("a purple triangle and a green circle").category == "color_attr"
    assert parse_prompt("a green triangle").category == "colors"


@pytest.mark.parametrize("text", ["", "a dog", "five red circles", "a red circle left of a square", "a pink circle"])
def test_parse_prompt_rejects_other_text(text):
    with pytest.raises(ZImageKitError, match=re.escape(repr(text))):
        parse_prompt(text)
