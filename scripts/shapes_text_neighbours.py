"""Which seen caption do a shapes text encoder's features put next to each held-out
colour-shape combination? For "a red triangle" (never in a training caption) print the three
single-object training captions whose read features (hidden_states[-2], mean over tokens) lie
closest, with the distance relative to the held-out caption's norm. An encoder that keeps
shape as well as colour puts "a red triangle" next to other triangles and other reds alike.

    python scripts/shapes_text_neighbours.py TEXT_ENCODER_FOLDER [TOKENIZER_FOLDER]
"""
import sys

import torch

from zimagekit.shapes import world
from zimagekit.text_encoder import Qwen3TextEncoder


def phrase(color, shape):
    return ("an " if color[0] in "aeiou" else "a ") + f"{color} {shape}"


encoder = Qwen3TextEncoder.from_pretrained(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "models/shapes/tokenizer")
seen = [phrase(c, s) for c, s in world.TRAIN_COMBOS]
held = [phrase(c, s) for c, s in world.HELD_OUT]
pooled = lambda texts: torch.stack([f.mean(0) for f in encoder.encode(texts)])
fs, fh = pooled(seen), pooled(held)
for text, f in zip(held, fh):
    d = (fs - f).norm(dim=1) / f.norm()
    print(f"{text}: " + ", ".join(f"{seen[i]} {d[i]:.3f}" for i in d.argsort()[:3].tolist()))
