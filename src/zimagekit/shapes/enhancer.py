"""The shapes world's prompt enhancer: a template that turns a terse caption into the detailed
description a prompt enhancer would write, for PE-aware training on shapes data
(``data.enhancer: zimagekit.shapes.enhancer:ShapesTemplateEnhancer``)."""

from __future__ import annotations

from ..enhancer import PromptEnhancer
from . import world


class ShapesTemplateEnhancer(PromptEnhancer):
    """Turns a shapes-world caption ("a red circle to the left of two ...") into the
    detailed description an enhancer would write, from the caption's parsed requirement."""

    name = "shapes-template-1"

    def __call__(self, prompts: list[str]) -> list[str]:
        return [describe_scene(world.parse_prompt(p)) for p in prompts]


def describe_scene(prompt) -> str:
    """The description of a parsed shapes-world :class:`~zimagekit.shapes.world.Prompt`."""

    def thing(spec) -> str:
        return f"{spec.color} {spec.shape}" if spec.color else f"{spec.shape} in any one flat colour"

    n = len(prompt.objects)
    if prompt.category == "counting":
        spec = prompt.objects[0]
        colour = f"all {spec.color}" if spec.color else "each in a flat colour"
        content = f"exactly {world.COUNT_WORDS[n]} {spec.shape}s, {colour}, of similar size"
    else:
        content = "exactly " + " and ".join(f"one {thing(o)}" for o in prompt.objects)
    text = (f"A flat two-dimensional illustration on a plain light-grey square canvas showing {content}. ")
    if prompt.relation is not None:
        a, b = (str(o) for o in prompt.objects)
        where = {"left of": "to the left of", "right of": "to the right of"}.get(prompt.relation, prompt.relation)
        text += f"The {a} is clearly {where} the {b}. "
    text += ("Every shape is a solid silhouette with crisp edges and no outline, shading or texture; "
             f"{'the shapes do not touch or overlap, and ' if n > 1 else ''}"
             "there is no text and nothing else in the picture.")
    return text
