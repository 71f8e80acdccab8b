"""`zimagekit inspect`: counts from the modules, and a token layout that is the reference's."""

import re

import torch
from diffusers import ZImageTransformer2DModel

from zimagekit.cli import main
from zimagekit.s3dit import S3DiTConfig


def test_inspect_counts_the_released_model(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^total\s+6,154,908,736$", out, re.M)
    assert re.search(r"^layers\.feed_forward\s+3,538,944,000", out, re.M)  # 30 x 117,964,800


def test_token_layout_matches_diffusers_position_ids(capsys):
    """Read the printed layout back and compare it with the position ids diffusers builds."""
    cfg = S3DiTConfig.preset("tiny")
    assert main(["inspect", "tiny", "--caption-tokens", "45", "--size", "96x48"]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(**cfg.to_dict())
    x = torch.zeros(cfg.in_channels, 1, 48 // 8, 96 // 8)  # 3 x 6 = 18 image tokens, 14 pads
    cap = torch.zeros(45, cfg.cap_feat_dim)  # 45 caption tokens, 19 pads
    _, _, _, img_pos, cap_pos, img_pad, cap_pad = ref.patchify_and_embed([x], [cap], 2, 1)
    img_pos, cap_pos = img_pos[0].tolist(), cap_pos[0][: 64].tolist()

    def row(name):
        return re.search(rf"^{name}\s+(\d+)\s+(.*)$", out, re.M).groups()

    assert row("caption") == ("45", f"{tuple(cap_pos[0])} .. {tuple(cap_pos[44])}".replace("[", "(").replace("]", ")"))
    assert row("caption pads") == ("19", f"{tuple(cap_pos[45])} .. {tuple(cap_pos[63])}")
    assert row("image") == ("18", f"{tuple(img_pos[0])} .. {tuple(img_pos[17])}")
    assert row("image pads") == ("14", f"{tuple(img_pos[18])}")
    assert int(img_pad[0].sum()) == 14 and int(cap_pad[0].sum()) == 19


def test_unknown_model_is_one_line(capsys):
    assert main(["inspect", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'no-such-preset' is neither a preset") and err.count("\n") == 1


def test_inspect_dual_reports_the_counterfactual(capsys):
    assert main(["inspect", "--dual"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^block total\s+180,910,336\s+361,820,672\s+50\.0%$", out, re.M)


def test_trace_runs_a_model_folder_and_lists_every_stage(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir), "--trace", "a photo of a cat", "--trace-size", "64"]) == 0
    out = capsys.readouterr().out
    # the chat-formatted prompt is 13 tokens (the ids the pipeline tests pin) -> (13, cap_feat_dim 16)
    assert "-> 13 tokens -> text encoder hidden_states[-2] (13, 16)" in out
    # 64 px / VAE 8 -> 8x8 latent -> 4x4 = 16 image tokens (padded to 32), caption 13 -> 32: unified 64
    assert re.search(r"noise_refiner\.0\s+\(1, 32, 32\) -> \(1, 32, 32\)", out)
    assert re.search(r"layers\.1 \(unified\)\s+\(1, 64, 32\) -> \(1, 64, 32\)", out)
    assert "VAE decode -> image (1, 3, 64, 64)" in out
