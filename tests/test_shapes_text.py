"""The shapes tokenizer and text encoder: a Qwen-class tokenizer with one token per caption word,
the shipped folders read by our pipeline exactly as transformers reads them, and LM
pre-training through the trainer."""

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from zimagekit.errors import ZImageKitError
from zimagekit.shapes import text, world
from zimagekit.text_encoder import QWEN3_ADDED_TOKENS, Qwen3TextEncoder

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shapes"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    assert text.main(["tokenizer", str(out)]) == 0
    return out


@pytest.fixture(scope="module", params=["built", "shipped"])
def tokenizer(request, tokenizer_dir):
    """A fresh build and the shipped folder, each as AutoTokenizer loads it."""
    from transformers import AutoTokenizer

    folder = tokenizer_dir if request.param == "built" else SHIPPED / "tokenizer"
    assert folder.is_dir(), f"{folder} is missing; build it with python -m zimagekit.shapes.text tokenizer {folder}"
    return AutoTokenizer.from_pretrained(folder)


def every_caption() -> list[str]:
    """Training and evaluation captions as the world samples them, plus grammatical forms its
    samplers never write but its parser accepts."""
    captions = {world.sample_prompt(seed, "train").text for seed in range(3000)}
    captions |= {p.text for p in world.eval_prompts()}
    captions |= {"two circles", "four triangles", "an orange triangle below a square", "a square above an orange circle"}
    return sorted(captions)


def test_tokenizer_is_qwen3s_class_with_its_added_tokens_after_the_bpe(tokenizer):
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"  # what AutoTokenizer gives for Qwen3
    first = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.convert_tokens_to_ids(QWEN3_ADDED_TOKENS) == list(range(first, first + 26))
    assert len(tokenizer) == first + 26 < 400
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    assert special == {t for t in QWEN3_ADDED_TOKENS if t.startswith("<|")}  # <think> etc. are not, as in Qwen3
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == ("<|im_end|>", "<|endoftext|>", "right")


def test_chat_string_of_a_prompt_is_the_template_around_one_token_per_word(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "a red circle to the left of a blue square"}],
                                        add_generation_prompt=True, enable_thinking=True, tokenize=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|im_start|>", "user", "Ċ",
        "a", "Ġred", "Ġcircle", "Ġto", "Ġthe", "Ġleft", "Ġof", "Ġa", "Ġblue", "Ġsquare",
        "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ",
    ]  # fmt: skip
    assert ids[0] == ids[15] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[13] == tokenizer.eos_token_id
    # Byte-level symbols keep GPT-2's byte order, as in Qwen: "a" is 64 and "\n" is 198.
    assert (ids[3], ids[2]) == (64, 198)


def test_every_caption_word_is_one_token(tokenizer):
    for caption in every_caption():
        words = caption.split()
        assert tokenizer.tokenize(caption) == [words[0]] + ["Ġ" + w for w in words[1:]], caption


def test_decode_round_trips_any_text(tokenizer):
    for s in ["three purple triangles", "A Red Circle.", "  two\tblue squares\n", "Ünïcödé 🟥 ≠ ascii", ""]:
        assert tokenizer.decode(tokenizer(s).input_ids) == s
    chat = "<|im_start|>user\na green square<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer(chat).input_ids) == chat


def test_tokenizer_build_is_deterministic(tokenizer_dir, tmp_path):
    assert text.main(["tokenizer", str(tmp_path / "again")]) == 0
    for f in tokenizer_dir.iterdir():
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name


# ----------------------------------------------------------------------------------------
# The shipped text encoder
# ----------------------------------------------------------------------------------------

PROMPTS = ["a red circle", "three blue circles", "a yellow square to the right of a purple triangle", ""]


@pytest.fixture(scope="module")
def shipped_dirs():
    te, tok = SHIPPED / "text_encoder", SHIPPED / "tokenizer"
    for folder in (te, tok):
        assert folder.is_dir(), f"{folder} is missing; see python -m zimagekit.shapes.text --help"
    return te, tok


def test_shipped_encoder_features_are_qwen3s_second_to_last_hidden_state(shipped_dirs):
    from transformers import AutoTokenizer, Qwen3Model

    te, tok = shipped_dirs
    ours = Qwen3TextEncoder.from_pretrained(te, tok).encode(PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(tok)
    full = Qwen3Model.from_pretrained(te, dtype=torch.float32).eval()
    for prompt, features in zip(PROMPTS, ours, strict=True):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            enable_thinking=True, tokenize=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            expected = full(input_ids=ids["input_ids"], output_hidden_states=True).hidden_states[-2][0]
        assert features.shape == expected.shape
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_shipped_encoder_is_a_qwen3model_folder_in_safetensors(shipped_dirs):
    import json

    te, tok = shipped_dirs
    config = json.loads((te / "config.json").read_text())
    assert config["architectures"] == ["Qwen3Model"] and config["model_type"] == "qwen3"
    assert sorted(p.name for p in te.iterdir()) == ["config.json", "model.safetensors"]
    from transformers import AutoTokenizer

    assert config["vocab_size"] >= len(AutoTokenizer.from_pretrained(tok))


def test_shipped_encoder_restates_held_out_captions_in_canonical_form(shipped_dirs):
    """Greedy decoding after the chat-formatted prompt writes :func:`canonical_answer`, for
    prompts that name held-out combinations and the relations and counts the old caption-only
    LM could not tell apart (55 of the 57 distinct evaluation prompts; the two misses are
    colour_attr pairs of two held-out combinations, which it restates with seen ones); and from
    the template's start it still writes captions."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    te, tok = shipped_dirs
    tokenizer = AutoTokenizer.from_pretrained(tok)
    lm = Qwen3ForCausalLM.from_pretrained(te, dtype=torch.float32).eval()

    def greedy(prefix: str) -> str:
        ids = tokenizer(prefix).input_ids
        with torch.no_grad():
            out = lm.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    for caption in ["a blue circle to the right of a green square", "a green square to the right of a blue circle",
                    "an orange square below a purple triangle", "three purple squares", "two purple squares",
                    "a triangle and a circle"]:
        assert greedy(text.chat_prompt(tokenizer, caption)) == text.canonical_answer(caption), caption
    for start in ["", "two", "a green"]:
        caption = start + greedy("<|im_start|>user\n" + start)
        assert world.parse_prompt(caption).text == caption and caption.startswith(start)


@pytest.mark.parametrize("caption, answer", [
    ("a circle", "a circle"),
    ("two red circles", "a red circle and a red circle"),
    ("four squares", "a square and a square and a square and a square"),
    ("a red circle to the left of a blue square", "a red circle to the left of a blue square"),
    ("a red circle to the right of a blue square", "a blue square to the left of a red circle"),
    ("an orange triangle below a square", "a square above an orange triangle"),
    ("a square and a circle", "a circle and a square"),
    ("an orange triangle and a red triangle", "a red triangle and an orange triangle"),
    ("a triangle and a green triangle", "a triangle and a green triangle"),
])
def test_canonical_answer_hand_worked(caption, answer):
    assert text.canonical_answer(caption) == answer


def test_canonical_answer_is_one_per_meaning_and_tells_every_word_apart():
    """Captions that mean the same scene share an answer; captions that differ in a count,
    relation, shape or colour word get different answers."""
    same = [("a red circle to the right of a blue square", "a blue square to the left of a red circle"),
            ("a red circle below a blue square", "a blue square above a red circle"),
            ("a red circle and a blue square", "a blue square and a red circle")]
    for a, b in same:
        assert text.canonical_answer(a) == text.canonical_answer(b)
    differ = [("two red circles", "three red circles"), ("a red circle to the left of a blue square",
              "a red circle to the right of a blue square"), ("a red circle above a blue square",
              "a red circle below a blue square"), ("a circle", "a square"), ("a red circle", "a blue circle")]
    for a, b in differ:
        assert text.canonical_answer(a) != text.canonical_answer(b)


def test_shipped_encoder_features_tell_one_word_apart(shipped_dirs):
    """The read features (hidden_states[-2]) of captions that differ in one relation or count
    word differ by over 5 % of their norm (the caption-only LM's: 0.2 % and 1.3 %), and linear
    probes read count and relation off them on held-out combinations."""
    te, tok = shipped_dirs
    encoder = Qwen3TextEncoder.from_pretrained(te, tok)
    for a, b in [("two red circles", "three red circles"),
                 ("a red circle to the left of a blue square", "a red circle to the right of a blue square"),
                 ("a red circle above a blue square", "a red circle below a blue square")]:
        fa, fb = encoder.encode([a, b])
        assert (fa - fb).norm() / fa.norm() > 0.05, (a, b)
    accuracy = text.linear_probe(te, tok, captions=1000)
    assert accuracy["count"] > 0.9 and accuracy["relation"] > 0.9 and accuracy["colour"] > 0.9, accuracy


# ----------------------------------------------------------------------------------------
# Pre-training through the trainer
# ----------------------------------------------------------------------------------------


def tiny_config(tokenizer_dir, run_dir, **train):
    cfg = text.TextEncoderConfig(
        model=text.TextModelSection(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=16, intermediate_size=64),
        data=text.TextDataSection(tokenizer=str(tokenizer_dir), captions=256))
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir), name="lm"),
        optim=dataclasses.replace(cfg.optim, lr=1e-2),
        train=dataclasses.replace(cfg.train, **{"steps": 30, "batch_size": 16, "log_every": 1, "progress": False, **train}))


def test_training_captions_never_name_a_held_out_combination():
    data = text.TextDataSection(captions=500)
    for caption in text.training_captions(data):
        assert not any((o.color, o.shape) in world.HELD_OUT for o in world.parse_prompt(caption).objects), caption


def test_a_tiny_lm_trains_through_the_trainer_and_exports_a_pipeline_encoder(tokenizer_dir, tmp_path):
    run_dir = text.train(tiny_config(tokenizer_dir, tmp_path))
    with (run_dir / "metrics.csv").open() as fh:
        losses = [float(row["loss/text_encoder"]) for row in csv.DictReader(fh)]
    assert losses[0] > 5.0  # about log(384): a uniform guess
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]

    out = tmp_path / "text_encoder"
    assert text.main(["export", str(run_dir), str(out), "--no-ema"]) == 0
    # The exported Qwen3Model holds the final checkpoint's weights, under Qwen3Model's names.
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    trained = load_file(str(run_dir / "checkpoints" / "step_0000030" / "text_encoder.safetensors"))
    assert {"model." + k for k in exported} == set(trained) - {"lm_head.weight"}
    assert all(torch.equal(v, trained["model." + k]) for k, v in exported.items())
    features = Qwen3TextEncoder.from_pretrained(out, tokenizer_dir).encode(["a red circle"])[0]
    assert features.shape == (11, 32)  # 8 template tokens + 3 words, width = hidden_size


def test_read_identity_loss_is_cross_entropy_of_each_prompt_token_at_the_read_layer(tokenizer_dir):
    """The training loss with read_identity_weight = w is the LM loss plus w times the mean,
    over the prompt's tokens (not the answer's, not padding), of -log p(token | its own
    hidden_states[-2]) through the final norm and the tied head, computed here one token at
    a time."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = text.TextModelSection(hidden_size=32, num_hidden_layers=2, head_dim=8, intermediate_size=64)
    lm = Qwen3ForCausalLM(text.qwen3_config(model, tokenizer)).eval()
    batch = text.encode_dialogues(tokenizer, ["a red circle", "two green squares"])
    plain = text.CaptionLM(lm).training_step(batch, 1)[text.GROUP]
    both = text.CaptionLM(lm, text.ObjectiveSection(read_identity_weight=0.5)).training_step(batch, 1)[text.GROUP]
    total, count = 0.0, 0
    for caption in ["a red circle", "two green squares"]:
        ids = tokenizer(text.chat_prompt(tokenizer, caption)).input_ids
        with torch.no_grad():
            read = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2][0]
            logp = lm.lm_head(lm.model.norm(read)).log_softmax(-1)
        total -= sum(logp[i, t].item() for i, t in enumerate(ids))
        count += len(ids)
    assert (both - plain).item() == pytest.approx(0.5 * total / count, rel=1e-4)


def test_grammar_source_cycles_every_grammar_caption_held_out_pairs_included():
    captions = text.training_captions(text.TextDataSection(captions=5000, source="grammar"))
    every = set(text.grammar_captions())
    assert len(captions) == 5000 and set(captions) <= every and len(set(captions)) == min(5000, len(every))
    assert any((o.color, o.shape) in world.HELD_OUT for c in captions for o in world.parse_prompt(c).objects)


def test_caption_nll_averages_over_caption_words_and_im_end(tokenizer_dir):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = text.TextModelSection(hidden_size=32, num_hidden_layers=2, head_dim=8, intermediate_size=64)
    lm = Qwen3ForCausalLM(text.qwen3_config(model, tokenizer)).eval()
    captions = ["a red circle", "two green squares", "an orange triangle below a purple square"]  # padded batch
    total, count = 0.0, 0
    for caption in captions:  # one unpadded sequence at a time, position by position
        full = tokenizer(f"<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n").input_ids
        with torch.no_grad():
            logp = lm(torch.tensor([full])).logits[0].log_softmax(-1)
        scored = range(3, 3 + len(caption.split()) + 1)  # after "<|im_start|>user\n", through <|im_end|>
        total -= sum(logp[p - 1, full[p]].item() for p in scored)
        count += len(scored)
    assert text.caption_nll(lm, tokenizer, captions) == pytest.approx(total / count, rel=1e-5)


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert text.main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert text.main(["train", f"data.tokenizer={tmp_path / 'missing'}", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    with pytest.raises(ZImageKitError, match="multiple of model.num_key_value_heads"):
        text.TextModelSection(num_attention_heads=4, num_key_value_heads=3)
