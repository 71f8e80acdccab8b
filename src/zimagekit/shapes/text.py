"""The shapes world's tokenizer and text encoder: a byte-level BPE over the caption vocabulary
in Qwen's tokenizer class, and a small Qwen3 pre-trained as a causal LM on training captions.

    python -m zimagekit.shapes.text tokenizer models/shapes/tokenizer
    python -m zimagekit.shapes.text train --config configs/shapes/text_encoder.yaml [key=value ...]
    python -m zimagekit.shapes.text export runs/shapes-text-encoder models/shapes/text_encoder
    python -m zimagekit.shapes.text evaluate models/shapes/text_encoder models/shapes/tokenizer

Both stand in for Z-Image's Qwen3-4B and its tokenizer and take exactly the same code path:
``AutoTokenizer`` loads a ``Qwen2Tokenizer`` (NFC, Qwen's split regex, byte-level BPE) with
Qwen3's added tokens and chat template, and the pipeline reads ``hidden_states[-2]`` of the
``Qwen3Model`` for the chat-formatted prompt. Z-Image's encoder was pre-trained on language,
not on images; this one is pre-trained on the world's captions (next-token prediction,
held-out colour-shape combinations never shown) and then frozen.
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

import torch
from safetensors.torch import load_file

from ..errors import ZImageKitError, exit_code
from ..runconfig import add_run_commands, load_config
from ..text_encoder import QWEN3_ADDED_TOKENS, QWEN3_CHAT_TEMPLATE, _quiet_transformers, chat_prompt
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
    """Caption i of the training set is ``world.sample_prompt(seed + i, "train")``: the
    same captions the teacher's scenes carry, never a held-out combination."""

    tokenizer: str = "models/shapes/tokenizer"
    captions: int = 20_000
    seed: int = 0

    def __post_init__(self):
        if self.captions < 1 or self.seed < 0:
            raise ZImageKitError(f"data.captions must be >= 1 and data.seed >= 0, got {self.captions} and {self.seed}")


@dataclass
class TextEncoderConfig(TrainConfig):
    model: TextModelSection = field(default_factory=TextModelSection)
    data: TextDataSection = field(default_factory=TextDataSection)


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


def encode_captions(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """Chat-formatted token ids exactly as the pipeline feeds them, right-padded to the longest:
    ``input_ids`` and ``attention_mask``, (N, L)."""
    texts = [chat_prompt(tokenizer, c) for c in captions]
    batch = tokenizer(texts, padding="longest", return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].bool()}


def training_captions(data: TextDataSection) -> list[str]:
    return [world.sample_prompt(data.seed + i, "train").text for i in range(data.captions)]


def caption_data(tokenizer, captions: list[str], batch_size: int, seed: int) -> IndexDataSource:
    encoded = encode_captions(tokenizer, captions)
    return IndexDataSource(lambda idx: {k: v[idx] for k, v in encoded.items()}, len(captions), batch_size, seed=seed)


class CaptionLM(Algorithm):
    """Pre-trains one module, ``text_encoder`` (a ``Qwen3ForCausalLM``), by next-token
    prediction on chat-formatted captions: the whole templated sequence, as a chat LM sees it."""

    def __init__(self, lm):
        self.lm = lm

    def modules(self):
        return {GROUP: self.lm}

    def training_step(self, batch, step):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # Every real token is a target (transformers shifts them by one); padding is not.
        out = self.lm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(~mask, -100), use_cache=False)
        return {GROUP: out.loss}


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------


def train(cfg: TextEncoderConfig) -> Path:
    from transformers import Qwen3ForCausalLM

    seed_everything(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    config = qwen3_config(cfg.model, tokenizer)
    lm = Qwen3ForCausalLM(config)
    data = caption_data(tokenizer, training_captions(cfg.data), cfg.train.batch_size, cfg.data.seed)
    trainer = Trainer(cfg, CaptionLM(lm), data)
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
    with weights, _quiet_transformers():
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


def evaluate(text_encoder_dir: Path, tokenizer_dir: Path, captions: int = 2000) -> dict[str, float]:
    """Per-token caption NLL of an exported encoder (its tied embeddings are the LM head) on
    ``captions`` fresh training-split captions and on the evaluation prompts that name a
    held-out colour-shape combination, which the encoder never saw together."""
    from transformers import Qwen3ForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    if not (Path(text_encoder_dir) / "config.json").is_file():
        raise ZImageKitError(f"{text_encoder_dir}: no config.json; export a run there first")
    with _quiet_transformers():
        lm = Qwen3ForCausalLM.from_pretrained(text_encoder_dir, dtype=torch.float32).eval()
    # Seeds far past any training set, so these are draws, not the training list itself.
    train = [world.sample_prompt(10**9 + i, "train").text for i in range(captions)]
    held = sorted({p.text for p in world.eval_prompts()
                   if any((o.color, o.shape) in world.HELD_OUT for o in p.objects)})
    return {"train": caption_nll(lm, tokenizer, train), "held_out": caption_nll(lm, tokenizer, held)}


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
        else:
            for split, nll in evaluate(args.text_encoder, args.tokenizer).items():
                print(f"{split}: {nll:.4f} nats/token, perplexity {math.exp(nll):.3f}")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
