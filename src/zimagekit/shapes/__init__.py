"""The shapes world (a closed text-to-image task in GenEval's six categories) and its
pixel-exact judge. See ``world.py`` for the world and ``judge.py`` for the judge."""

from .judge import Detection, Judgement, Report, detect_objects, judge_all, judge_image
from .world import (
    CATEGORIES,
    HELD_OUT,
    ObjectSpec,
    Prompt,
    Scene,
    SceneObject,
    eval_prompts,
    parse_prompt,
    render,
    sample_prompt,
    sample_scene,
    scene_for_prompt,
)

__all__ = [
    "CATEGORIES",
    "HELD_OUT",
    "Detection",
    "Judgement",
    "ObjectSpec",
    "Prompt",
    "Report",
    "Scene",
    "SceneObject",
    "detect_objects",
    "eval_prompts",
    "judge_all",
    "judge_image",
    "parse_prompt",
    "render",
    "sample_prompt",
    "sample_scene",
    "scene_for_prompt",
]
