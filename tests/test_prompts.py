"""Prompt sources: text, JSONL and CSV files, a dataset folder's captions, and module:function
(the shapes world as one source among them); each bad source is one clear error."""

import json

import pytest
from PIL import Image

from zimagekit.errors import ZImageKitError
from zimagekit.prompts import load_prompts
from zimagekit.shapes import world

PROMPTS = ["a lighthouse in a storm", "a red fox, snow", "ramen; top view"]


def test_a_text_file_gives_one_prompt_a_line_without_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a lighthouse in a storm\n\n  a red fox, snow  \nramen; top view\n", encoding="utf-8")
    assert load_prompts(str(path)) == PROMPTS
    assert load_prompts(str(path), count=2) == PROMPTS[:2]


def test_jsonl_and_csv_read_the_prompt_column_or_the_one_named(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "text": p, "alt": p.upper()}) for i, p in enumerate(PROMPTS)))
    assert load_prompts(str(jsonl)) == PROMPTS
    assert load_prompts(str(jsonl), column="alt") == [p.upper() for p in PROMPTS]
    csv = tmp_path / "p.csv"
    csv.write_text("file,prompt\n" + "\n".join(f'{i}.png,"{p}"' for i, p in enumerate(PROMPTS)) + "\n")
    assert load_prompts(str(csv)) == PROMPTS


def test_a_dataset_folder_gives_its_captions(tmp_path):
    for i, p in enumerate(PROMPTS):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(p)
    assert load_prompts(str(tmp_path)) == PROMPTS


def test_a_function_draws_count_prompts_with_the_seed():
    got = load_prompts("zimagekit.shapes.world:training_prompts", count=5, seed=3)
    assert got == [world.sample_prompt(3 + i, "train").text for i in range(5)]


@pytest.mark.parametrize("source, content, message", [
    ("missing.txt", None, "no such file or folder"),
    ("empty.txt", "\n \n", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "a"}\nnot json\n', "line 2 is not JSON"),
    ("cols.csv", "file,label\na.png,x\n", "none of the columns prompt, text, caption"),
    ("zimagekit.nowhere:prompts", None, "cannot import zimagekit.nowhere"),
    ("zimagekit.shapes.world:training_prompts", None, "give their count"),
])
def test_bad_sources_are_one_line_errors(tmp_path, source, content, message):
    if content is not None:
        (tmp_path / source).write_text(content)
        source = str(tmp_path / source)
    elif source.endswith(".txt"):
        source = str(tmp_path / source)
    with pytest.raises(ZImageKitError, match=message) as e:
        load_prompts(source)
    assert "\n" not in str(e.value)
