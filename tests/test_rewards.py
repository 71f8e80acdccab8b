"""Rewards behind one interface: loading by name, the checks on what a reward returns, the PIL
adapter for external reward models (with a stand-in scorer), and the shapes world's three
rewards against renders whose truth is known."""

import numpy as np
import pytest
import torch

from zimagekit.errors import ZImageKitError
from zimagekit.rewards import PILReward, load_reward, score
from zimagekit.shapes import world
from zimagekit.shapes.judge import judge_image
from zimagekit.shapes.rewards import ColourMassReward, JudgeReward, SoftColourReward


def renders(prompts):
    scenes = [world.scene_for_prompt(world.parse_prompt(p), i, split="eval") for i, p in enumerate(prompts)]
    return torch.stack([torch.from_numpy(world.render(s)).permute(2, 0, 1).float() / 255 for s in scenes])


PROMPTS = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle",
           "a purple square and an orange triangle"]


def test_rewards_load_by_module_and_name_and_bad_names_are_one_line_errors():
    assert isinstance(load_reward("zimagekit.shapes.rewards:JudgeReward"), JudgeReward)
    for spec, message in (("JudgeReward", "module:Name"), ("zimagekit.nothing:X", "cannot import"),
                          ("zimagekit.shapes.rewards:Nope", "has no Nope"), ("zimagekit.shapes.world:CANVAS",
                                                                             "not callable")):
        with pytest.raises(ZImageKitError, match=message):
            load_reward(spec)


def test_score_refuses_a_wrong_shape_or_a_nan_and_names_the_image():
    images = torch.zeros(3, 3, 8, 8)
    assert score(lambda im, p: [1, 2, 3], images, ["a", "b", "c"]).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ZImageKitError, match=r"shape \(2,\) for 3 images"):
        score(lambda im, p: torch.zeros(2), images, ["a", "b", "c"])
    with pytest.raises(ZImageKitError, match="returned nan for image 1 \\(prompt 'b'\\)"):
        score(lambda im, p: torch.tensor([0.0, float("nan"), 1.0]), images, ["a", "b", "c"])
    with pytest.raises(ZImageKitError, match="returned a str"):
        score(lambda im, p: "good", images, ["a", "b", "c"])


def test_the_pil_adapter_feeds_a_stand_in_model_8_bit_images_in_batches():
    calls = []

    def brightness(pils, prompts):  # a stand-in for HPSv3 / ImageReward / PickScore
        calls.append(len(pils))
        return [np.asarray(p).mean() / 255 + len(q) for p, q in zip(pils, prompts)]

    torch.manual_seed(0)
    images = torch.rand(5, 3, 8, 8)
    prompts = ["a", "bb", "c", "dd", "e"]
    got = score(PILReward(brightness, batch_size=2), images, prompts)
    expected = [(images[i] * 255).round().mean().item() / 255 + len(prompts[i]) for i in range(5)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5) and calls == [2, 2, 1]


def test_the_judge_reward_grades_by_how_far_an_image_gets_through_the_judge():
    images = renders(PROMPTS)
    assert JudgeReward()(images, PROMPTS).tolist() == [1.0] * 4
    swapped = PROMPTS[1:] + PROMPTS[:1]  # each image judged against another prompt
    stages = {"count": 0.0, "shape": 0.25, "color": 0.5, "position": 0.75}
    expected = []
    for image, prompt in zip(images, swapped):
        verdict = judge_image(image.permute(1, 2, 0).numpy(), prompt)
        expected.append(1.0 if verdict.correct else stages[verdict.reason.split(":")[0].split()[-1]])
    assert JudgeReward()(images, swapped).tolist() == expected and max(expected) < 1


def test_the_soft_colour_reward_has_gradients_and_prefers_the_right_colours():
    images = renders(PROMPTS).requires_grad_(True)
    right = SoftColourReward()(images, PROMPTS)
    right.sum().backward()
    assert images.grad.abs().sum() > 0
    wrong_colour = SoftColourReward()(renders(PROMPTS).roll(1, 0), PROMPTS)
    assert (right.detach() > wrong_colour).all()


def test_the_colour_mass_reward_is_hacked_by_painting_the_canvas_and_the_judge_is_not():
    images = renders(PROMPTS)
    hacked = torch.stack([torch.tensor(world.COLORS[c], dtype=torch.float32).view(3, 1, 1).expand(3, 64, 64) / 255
                          for c in ("red", "blue", "green", "purple")])
    assert (ColourMassReward()(hacked, PROMPTS) > 3 * ColourMassReward()(images, PROMPTS)).all()
    # One canvas-sized square: at best the count is right (0.25 for "a red circle"), never the shape.
    assert JudgeReward()(hacked, PROMPTS).max() <= 0.25 and SoftColourReward()(hacked, PROMPTS).max() < 0
