"""The shapes world's tokenizer and text encoder: a byte-level BPE over the caption vocabulary
in Qwen's tokenizer class, and a small Qwen3 trained as a chat LM to restate captions.

    python -m zimagekit.shapes.text tokenizer models/shapes/tokenizer
    python -m zimagekit.shapes.text train --config configs/shapes/text_encoder.yaml [key=value ...]
    python -m zimagekit.shapes.text export runs/shapes-text-encoder models/shapes/text_encoder
    python -m zimagekit.shapes.text evaluate models/shapes/text_encoder models/shapes/tokenizer

Both stand in for Z-Image's Qwen3-4B and its tokenizer and take exactly the same code path:
``AutoTokenizer`` loads a ``Qwen2Tokenizer`` (NFC, Qwen's split regex, byte-level BPE) with
Qwen3's added tokens and chat template, and the pipeline reads ``hidden_states[-2]`` of the
``Qwen3Model`` for the chat-formatted prompt. Z-Image's encoder is a chat LM whose features
carry what a prompt means; this one is trained as a chat LM on one task whose answers need
the whole caption (:func:`canonical_answer`: restate the scene in one canonical order), with
a second loss that keeps every prompt word's identity in the layer the DiT reads
(:class:`ObjectiveSection`), on training captions only (held-out colour-shape combinations
never shown), and then frozen.

Why a task and not plain next-token prediction on captions: a tiny LM trained to the entropy
floor of the caption grammar keeps only what predicts the next word. "left" and "right" are
both followed by "of" and a count word does not change what follows it, so with tied
embeddings such an LM maps them to nearly the same vector, and the DiT cannot follow what its
features do not carry (docs/shapes/diagnosis.md has the measurements).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from ..cli.runs import add_run_commands
from ..errors import ZImageKitError, exit_code
from ..runconfig import load_config
from ..text_encoder import QWEN3_ADDED_TOKENS, QWEN3_CHAT_TEMPLATE
from ..trainer import EMA, Algorithm, IndexDataSource, TrainConfig, Trainer, seed_everything
from . import world

# The run directory keeps the exact Qwen3Config it trained, so export needs nothing else.
QWEN3_CONFIG = "qwen3_config.json"
GROUP = "text_encoder"

# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------


def grammar_captions() -> list[str]:
    """Every caption the world's grammar can write, held-out combinations included (their
    words all occur in training captions anyway): one or two objects with or without a
    colour, counts, "and" pairs and the four relations. Only the texts are used, so the
    category passed to ``make_prompt`` just selects the sentence form."""
    specs = [world.ObjectSpec(s, c) for s in world.SHAPES for c in (None, *world.COLORS)]
    pairs = list(itertools.product(specs, repeat=2))
    prompts = [world.make_prompt("colors", (o,)) for o in specs]
    prompts += [world.make_prompt("counting", (o,) * n) for o in specs for n in world.COUNT_WORDS]
    prompts += [world.make_prompt("color_attr", pair) for pair in pairs]
    prompts += [world.make_prompt("position", pair, r) for pair in pairs for r in world.RELATIONS]
    return [p.text for p in prompts]


def _qwen3_tokenizer(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None):
    """A ``Qwen2Tokenizer`` (the class Qwen3 ships) over ``vocab``/``merges`` with no special
    tokens of its own; without a vocabulary it is just Qwen's normalizer and pre-tokenizer."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None, pad_token=None)


def build_tokenizer():
    """The shapes tokenizer: byte-level BPE trained to completion on the chat-formatted
    grammar captions, then Qwen3's added tokens, eos/pad and chat template.

    Training runs through Qwen's own normalizer and pre-tokenizer, so every caption word
    ends as one token ("a" at the start, "Ġred" after a space), as do the template's "user"
    and "assistant". The 256 byte symbols stay in the vocabulary so that any text still
    encodes and decodes losslessly, as with Qwen. Deterministic: the same files every time.
    """
    from tokenizers import AddedToken, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    base = _qwen3_tokenizer()
    base.chat_template = QWEN3_CHAT_TEMPLATE
    # The trainer does not split out added tokens, so it sees the text between them.
    specials = re.compile("|".join(map(re.escape, QWEN3_ADDED_TOKENS)))
    corpus = [piece for caption in grammar_captions() for piece in specials.split(chat_prompt(base, caption)) if piece]
    # A vocab_size beyond reach merges until no pair is left inside any word.
    trainer = trainers.BpeTrainer(vocab_size=1 << 20, initial_alphabet=alphabet, show_progress=False)
    backend = base.backend_tokenizer
    backend.train_from_iterator(corpus, trainer)
    # The trained BPE exposes its merges only in its serialised form.
    bpe = json.loads(backend.to_str())["model"]

    tokenizer = _qwen3_tokenizer(bpe["vocab"], [tuple(m) for m in bpe["merges"]])
    # After the BPE ids and in Qwen3's order; "<|...|>" tokens are special, as in Qwen3.
    tokenizer.add_tokens([AddedToken(t, special=t.startswith("<|"), normalized=False) for t in QWEN3_ADDED_TOKENS])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def _replace_folder(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` a folder next to ``out``, then put it in ``out``'s place, so an interrupted
    build never leaves a half-written folder where the pipeline looks."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def save_tokenizer(out: Path) -> None:
    """Build the tokenizer and write it to ``out`` (replaced if it exists)."""
    _replace_folder(out, build_tokenizer().save_pretrained)


def chat_prompt(tokenizer, caption: str) -> str:
    """A caption as the pipeline feeds it (:meth:`zimagekit.text_encoder.ChatTokenizer.format`),
    through a transformers tokenizer, which the text-encoder training here uses."""
    return tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' per-load report and progress bar."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise ZImageKitError(f"no tokenizer folder {folder}; build it with: python -m zimagekit.shapes.text "
                             f"tokenizer {folder}")
    return AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------------
# Text encoder: config, data, algorithm
# ----------------------------------------------------------------------------------------


@dataclass
class TextModelSection:
    """The Qwen3's shape; ``hidden_size`` is the DiT's ``cap_feat_dim``. The vocabulary size
    follows from the tokenizer."""

    hidden_size: int = 128
    num_hidden_layers: int = 4  # hidden_states[-2] is the output of layer 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 512  # the pipeline's default max_sequence_length

    def __post_init__(self):
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                    "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ZImageKitError(f"config key 'model.{key}' must be >= 1, got {getattr(self, key)}")
        if self.num_hidden_layers < 2:
            # The pipeline drops the last layer; with one layer it would read raw embeddings.
            raise ZImageKitError(f"config key 'model.num_hidden_layers' must be >= 2, got {self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ZImageKitError(f"config key 'model.num_attention_heads' ({self.num_attention_heads}) must be a "
                                 f"multiple of model.num_key_value_heads ({self.num_key_value_heads})")


@dataclass
class TextDataSection:
    """With ``source="train"``, caption i of the training set is ``world.sample_prompt(seed + i,
    "train")``: the same captions the teacher's scenes carry, never a held-out combination.
    With ``source="grammar"`` the captions cycle through every caption the grammar can write
    (:func:`grammar_captions`, shuffled by ``seed``), held-out combinations included, as a
    language model's pre-training text names every colour with every shape; the teacher's
    image-caption pairs still never do."""

    tokenizer: str = "models/shapes/tokenizer"
    captions: int = 20_000
    seed: int = 0
    source: Literal["train", "grammar"] = "train"

    def __post_init__(self):
        if self.captions < 1 or self.seed < 0:
            raise ZImageKitError(f"data.captions must be >= 1 and data.seed >= 0, got {self.captions} and {self.seed}")


@dataclass
class ObjectiveSection:
    """``read_identity_weight`` > 0 adds a second loss: each prompt token's own id, predicted
    from the layer the DiT reads (``hidden_states[-2]``, through the final norm and the tied
    head), so that layer keeps every word's identity; next-token prediction alone never needs
    a shape word's identity there (what follows a shape does not depend on which shape)."""

    read_identity_weight: float = 0.0

    def __post_init__(self):
        if not self.read_identity_weight >= 0:
            raise ZImageKitError(f"objective.read_identity_weight must be >= 0, got {self.read_identity_weight}")


@dataclass
class TextEncoderConfig(TrainConfig):
    model: TextModelSection = field(default_factory=TextModelSection)
    data: TextDataSection = field(default_factory=TextDataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)


def qwen3_config(model: TextModelSection, tokenizer):
    """The Qwen3Config for ``model`` and ``tokenizer``: tied embeddings as in Qwen3-4B, the
    vocabulary rounded up to a multiple of 64 (Qwen3 likewise pads 151,669 tokens to 151,936;
    the spare rows are never looked up), bos/eos ids as in Qwen3's config."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads,
        head_dim=model.head_dim,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )


def _tokenize(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, padding="longest", return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].bool()}


def encode_captions(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """Chat-formatted token ids exactly as the pipeline feeds them, right-padded to the longest:
    ``input_ids`` and ``attention_mask``, (N, L)."""
    return _tokenize(tokenizer, [chat_prompt(tokenizer, c) for c in captions])


# Canonical order of a pair joined by "and": by shape, then colour (an unnamed colour first).
_SHAPE_RANK = {s: i for i, s in enumerate(world.SHAPES)}
_COLOR_RANK = {c: i for i, c in enumerate((None, *world.COLORS))}


def canonical_answer(caption: str) -> str:
    """The reply the encoder learns to give to a caption: its scene restated in one canonical
    form, in the caption grammar's own words, so that captions that mean the same get the
    same reply and captions that differ in one word get different ones.

    - a relation is turned to "to the left of" or "above", swapping the objects if needed:
      "a red circle to the right of a blue square" -> "a blue square to the left of a red
      circle" (which object comes first depends on left/right, above/below);
    - a count is spelled out: "three red circles" -> "a red circle and a red circle and a red
      circle" (how many phrases depends on the count word);
    - two objects joined by "and" are ordered by shape, then colour (the order depends on
      both shapes);
    - one object is repeated as it is.
    """
    prompt = world.parse_prompt(caption)
    objects = prompt.objects
    if prompt.category == "position":
        relation = prompt.relation
        if relation in ("right of", "below"):
            objects, relation = objects[::-1], {"right of": "left of", "below": "above"}[relation]
        return world.make_prompt("position", objects, relation).text
    if len(objects) == 2 and prompt.category != "counting":
        objects = tuple(sorted(objects, key=lambda o: (_SHAPE_RANK[o.shape], _COLOR_RANK[o.color])))
    # make_prompt joins any number of noun phrases with "and" outside counting and position.
    return world.make_prompt("two_object", objects).text


def encode_dialogues(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """The training sequences: each caption chat-formatted as the pipeline feeds it, followed by
    the assistant's :func:`canonical_answer` and ``<|im_end|>``, right-padded to the longest
    (``input_ids``, ``attention_mask``), and ``prompt_length``, the tokens of the prompt part,
    which is token for token what the DiT's features are read from."""
    prompts = [chat_prompt(tokenizer, c) for c in captions]
    encoded = _tokenize(tokenizer, [f"{p}{canonical_answer(c)}{tokenizer.eos_token}" for p, c in zip(prompts, captions)])
    encoded["prompt_length"] = torch.tensor([len(ids) for ids in tokenizer(prompts).input_ids])
    return encoded


def training_captions(data: TextDataSection) -> list[str]:
    if data.source == "grammar":
        every = grammar_captions()
        np.random.default_rng(data.seed).shuffle(every)
        return list(itertools.islice(itertools.cycle(every), data.captions))
    return world.training_prompts(data.captions, data.seed)


def dialogue_data(tokenizer, captions: list[str], batch_size: int, seed: int) -> IndexDataSource:
    encoded = encode_dialogues(tokenizer, captions)
    return IndexDataSource(lambda idx: {k: v[idx] for k, v in encoded.items()}, len(captions), batch_size, seed=seed)


class CaptionLM(Algorithm):
    """Trains one module, ``text_encoder`` (a ``Qwen3ForCausalLM``), by next-token prediction on
    chat-formatted dialogues (:func:`encode_dialogues`): the whole templated sequence, caption and
    answer, as a chat LM sees it."""

    def __init__(self, lm, objective: ObjectiveSection | None = None):
        self.lm = lm
        self.objective = objective or ObjectiveSection()

    def modules(self):
        return {GROUP: self.lm}

    def training_step(self, batch, step):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        weight = self.objective.read_identity_weight
        # Every real token is a target (transformers shifts them by one); padding is not.
        out = self.lm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(~mask, -100), use_cache=False,
                      output_hidden_states=weight > 0)
        if weight == 0:
            return {GROUP: out.loss}
        # The prompt part (through the template's closing "\n") is what the DiT reads.
        logits = self.lm.lm_head(self.lm.model.norm(out.hidden_states[-2]))
        read = mask & (torch.arange(ids.shape[1])[None] < batch["prompt_length"][:, None])
        identity = torch.nn.functional.cross_entropy(logits[read].float(), ids[read])
        return {GROUP: out.loss + weight * identity}


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------


def train(cfg: TextEncoderConfig) -> Path:
    from transformers import Qwen3ForCausalLM

    seed_everything(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    config = qwen3_config(cfg.model, tokenizer)
    lm = Qwen3ForCausalLM(config)
    data = dialogue_data(tokenizer, training_captions(cfg.data), cfg.train.batch_size, cfg.data.seed)
    trainer = Trainer(cfg, CaptionLM(lm, cfg.objective), data)
    config.to_json_file(trainer.run_dir / QWEN3_CONFIG)
    trainer.fit()
    return trainer.run_dir


def export(run_dir: Path, out: Path, use_ema: bool = True) -> None:
    """Write the run's latest weights (EMA by default) as a ``Qwen3Model`` folder, config.json
    plus model.safetensors, the layout of Z-Image's text_encoder/ (replaced if it exists)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    pointer = run_dir / "checkpoints" / "latest"
    if not (run_dir / QWEN3_CONFIG).is_file() or not pointer.is_file():
        raise ZImageKitError(f"{run_dir}: not a finished text-encoder run ({QWEN3_CONFIG} or checkpoints/latest "
                             f"is missing)")
    ckpt = pointer.parent / pointer.read_text().strip()
    lm = Qwen3ForCausalLM(Qwen3Config.from_json_file(run_dir / QWEN3_CONFIG))
    lm.load_state_dict(load_file(str(ckpt / f"{GROUP}.safetensors")))
    weights = contextlib.nullcontext()
    if use_ema:
        if not (ckpt / f"{GROUP}_ema.safetensors").is_file():
            raise ZImageKitError(f"{ckpt} has no EMA weights (trained with ema.enabled=false); export with --no-ema")
        ema = EMA(lm, decay=0.0, start_step=0)
        ema.load_state_dict(load_file(str(ckpt / f"{GROUP}_ema.safetensors")))
        weights = ema.swapped_in()
    with weights, quiet_transformers():
        # The head is tied to the embeddings, so the Qwen3Model part holds every weight.
        _replace_folder(out, lm.model.save_pretrained)


@torch.no_grad()
def caption_nll(lm, tokenizer, captions: list[str]) -> float:
    """Mean negative log-likelihood (nats) of each caption's words and its closing
    ``<|im_end|>`` given everything before; the template's fixed tokens are left out, as
    they say nothing about how well the model knows captions."""
    encoded = encode_captions(tokenizer, captions)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    logp = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    # Caption tokens start where the empty prompt's <|im_end|> stands and end at their own.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = encode_captions(tokenizer, [""])["input_ids"][0].tolist().index(im_end)
    end = (ids == im_end).int().argmax(1)
    pos = torch.arange(ids.shape[1])[None]
    scored = ((pos >= start) & (pos <= end[:, None]))[:, 1:]
    return -(token_logp * scored).sum().item() / scored.sum().item()


def caption_perplexity(text_encoder_dir: Path, tokenizer_dir: Path, captions: int = 2000) -> dict[str, float]:
    """Per-token caption NLL of an exported encoder (its tied embeddings are the LM head) on
    ``captions`` fresh training-split captions and on the evaluation prompts that name a
    held-out colour-shape combination, which the encoder never saw together."""
    from transformers import Qwen3ForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    if not (Path(text_encoder_dir) / "config.json").is_file():
        raise ZImageKitError(f"{text_encoder_dir}: no config.json; export a run there first")
    with quiet_transformers():
        lm = Qwen3ForCausalLM.from_pretrained(text_encoder_dir, dtype=torch.float32, use_safetensors=True).eval()
    # Seeds far past any training set, so these are draws, not the training list itself.
    train = [world.sample_prompt(10**9 + i, "train").text for i in range(captions)]
    held = sorted({p.text for p in world.eval_prompts()
                   if any((o.color, o.shape) in world.HELD_OUT for o in p.objects)})
    return {"train": caption_nll(lm, tokenizer, train), "held_out": caption_nll(lm, tokenizer, held)}


# What a linear probe reads off the features: a name per target and the caption's label (None
# where the caption has none, e.g. no relation in "a red circle"). The count is asked of
# counting captions only ("two" / "three" / "four"): "and" alone would give away 1 vs 2.
PROBE_TARGETS: dict[str, Callable[[world.Prompt], object]] = {
    "count": lambda p: len(p.objects) if p.category == "counting" else None,
    "shape": lambda p: p.objects[0].shape,
    "relation": lambda p: p.relation,
    "colour": lambda p: p.objects[0].color,
}


def linear_probe(text_encoder_dir: Path, tokenizer_dir: Path, captions: int = 4000, steps: int = 300) -> dict[str, float]:
    """Held-out accuracy of linear probes from the features the DiT reads (``hidden_states[-2]``
    of the chat-formatted caption, averaged over its tokens) to each of :data:`PROBE_TARGETS`.

    Each probe is a softmax regression fitted on distinct training captions (``captions``
    draws) and scored on the distinct evaluation prompts that name a held-out colour-shape
    combination, so a probe must read the attribute, not recall the caption. Chance is
    1/number of classes; a probe at 1.0 means the pooled features carry the attribute
    linearly."""
    from ..text_encoder import Qwen3TextEncoder

    for what, folder in (("text encoder", text_encoder_dir), ("tokenizer", tokenizer_dir)):
        if not (Path(folder) / ("config.json" if what == "text encoder" else "tokenizer_config.json")).is_file():
            raise ZImageKitError(f"{folder}: not a {what} folder")
    encoder = Qwen3TextEncoder.from_pretrained(text_encoder_dir, tokenizer_dir)
    train = sorted({world.sample_prompt(10**9 + i, "train").text for i in range(captions)})
    test = sorted({p.text for p in world.eval_prompts()
                   if any((o.color, o.shape) in world.HELD_OUT for o in p.objects)})

    def pooled(texts):
        return torch.stack([f.mean(0) for f in encoder.encode(texts)])

    x_train, x_test = pooled(train), pooled(test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    prompts_train = [world.parse_prompt(t) for t in train]
    prompts_test = [world.parse_prompt(t) for t in test]
    accuracy = {}
    for name, label in PROBE_TARGETS.items():
        y_train = [label(p) for p in prompts_train]
        y_test = [label(p) for p in prompts_test]
        classes = sorted({y for y in y_train if y is not None}, key=str)
        rows = [i for i, y in enumerate(y_train) if y is not None]
        test_rows = [i for i, y in enumerate(y_test) if y is not None]
        target = torch.tensor([classes.index(y_train[i]) for i in rows])
        weight = torch.zeros(x_train.shape[1], len(classes), requires_grad=True)
        bias = torch.zeros(len(classes), requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=0.05)
        torch.manual_seed(0)
        for _ in range(steps):
            optimizer.zero_grad()
            logits = x_train[rows] @ weight + bias
            (torch.nn.functional.cross_entropy(logits, target) + 1e-3 * weight.square().sum()).backward()
            optimizer.step()
        with torch.no_grad():
            guess = (x_test[test_rows] @ weight + bias).argmax(1)
        truth = torch.tensor([classes.index(y_test[i]) for i in test_rows])
        accuracy[name] = (guess == truth).float().mean().item()
    return accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zimagekit.shapes.text", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("tokenizer", help="build the shapes tokenizer into a folder")
    k.add_argument("out", type=Path, help="the tokenizer folder to write (replaced if it exists)")
    add_run_commands(sub, "pre-train the shapes text encoder as a causal LM on training captions",
                     "write a run's text encoder as a Qwen3Model folder", example="optim.lr=3e-3 train.steps=500")
    v = sub.add_parser("evaluate", help="caption perplexity on training captions and held-out combinations")
    v.add_argument("text_encoder", type=Path, help="an exported text_encoder folder")
    v.add_argument("tokenizer", type=Path, help="its tokenizer folder")
    q = sub.add_parser("probe", help="linear probes from the features the DiT reads to count, shape, relation "
                       "and colour, scored on held-out combinations")
    q.add_argument("text_encoder", type=Path, help="an exported text_encoder folder")
    q.add_argument("tokenizer", type=Path, help="its tokenizer folder")
    args = parser.parse_args(argv)

    def run():
        if args.command == "tokenizer":
            save_tokenizer(args.out)
            print(f"wrote {args.out} ({len(load_tokenizer(args.out))} tokens)")
        elif args.command == "train":
            print(f"run directory: {train(load_config(TextEncoderConfig, args.config, args.overrides))}")
        elif args.command == "export":
            export(args.run_dir, args.out, use_ema=not args.no_ema)
            print(f"wrote {args.out}")
        elif args.command == "probe":
            for name, acc in linear_probe(args.text_encoder, args.tokenizer).items():
                print(f"{name}: {acc:.3f} held-out accuracy")
        else:
            for split, nll in caption_perplexity(args.text_encoder, args.tokenizer).items():
                print(f"{split}: {nll:.4f} nats/token, perplexity {math.exp(nll):.3f}")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
