"""``zimagekit inspect``: what an S3-DiT is made of, counted from the modules themselves.

    zimagekit inspect                         # the released z-image-turbo preset
    zimagekit inspect tiny
    zimagekit inspect ./Z-Image-Turbo         # a model folder (or its transformer/ folder)
    zimagekit inspect --caption-tokens 20 --size 1024x768   # token layout and RoPE positions
    zimagekit inspect ./model --trace "two red circles"     # tensor shapes through every stage

The model is built on the meta device, so even the 6B preset is counted in milliseconds
without memory. The token layout follows the forward pass (spec §2): caption tokens padded
to a multiple of 32 with attended pad tokens at positions (1 + j, 0, 0); image tokens at
(caption_padded + 1 + f, h, w); image pads at (0, 0, 0); one unified sequence [image, caption].
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ZImageKitError
from .s3dit import PRESETS, S3DiT, S3DiTConfig, padded_length, parameter_breakdown


def resolve_config(spec: str) -> S3DiTConfig:
    """A preset name, a transformer/ folder, or a model folder holding one."""
    if spec in PRESETS:
        return S3DiTConfig.preset(spec)
    path = Path(spec)
    for candidate in (path / "config.json", path / "transformer" / "config.json"):
        if candidate.is_file():
            return S3DiTConfig.from_json(candidate)
    raise ZImageKitError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a folder with config.json")


def breakdown_table(config: S3DiTConfig) -> str:
    with torch.device("meta"):
        model = S3DiT(config)
    counts = parameter_breakdown(model)
    total = counts["total"]
    lines = [f"{'part':<26}{'parameters':>16}{'share':>9}"]
    for name, n in counts.items():
        if name == "total":
            continue
        lines.append(f"{name:<26}{n:>16,}{n / total:>9.2%}")
    per_block = (counts["layers.attention"] + counts["layers.feed_forward"] + counts["layers.adaLN_modulation"]
                 + counts["layers.norms"]) // max(config.n_layers, 1)
    lines += [f"{'total':<26}{total:>16,}", "",
              f"one main block: {per_block:,} parameters; bf16 weights {total * 2 / 2**30:.2f} GiB, fp32 {total * 4 / 2**30:.2f} GiB"]
    return "\n".join(lines)


def dual_stream_table(config: S3DiTConfig) -> str:
    """One main block single- vs dual-stream, and both whole models at this width and depth."""
    from .dual_stream import DualStreamDiT, block_comparison

    lines = [f"{'one main block':<28}{'single-stream':>16}{'dual-stream':>16}{'saved':>9}"]
    for part, single, dual in block_comparison(config):
        lines.append(f"{part:<28}{single:>16,}{dual:>16,}{1 - single / dual:>9.1%}")
    with torch.device("meta"):
        single = sum(p.numel() for p in S3DiT(config).parameters())
        dual = sum(p.numel() for p in DualStreamDiT(config).parameters())
    lines += ["", f"whole model, {config.n_layers} main blocks: S3-DiT {single:,} (with its "
              f"{2 * config.n_refiner_layers} refiners) vs MMDiT-style {dual:,} (no refiners): "
              f"single-stream is {1 - single / dual:.1%} smaller"]
    return "\n".join(lines)


def trace(folder, prompt: str, size: int | None = None) -> str:
    """Run a model folder once (one step, no guidance) and list the tensor shapes each stage
    produces: text encoder, embedders, refiners, unified blocks, final layer, VAE decode."""
    from .pipeline import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder)
    model, lines, handles = pipe.transformer, [], []

    def shape(t):
        return tuple(t.shape) if torch.is_tensor(t) else [tuple(x.shape) for x in t]

    def record(name):
        def hook(module, inputs, output):
            lines.append(f"  {name:<28}{str(shape(inputs[0])):>22} -> {shape(output)}")
        return hook

    stages = [("t_embedder (t*1000 -> c)", model.t_embedder), ("cap_embedder", model.cap_embedder)]
    stages += [(f"x_embedder {k}", m) for k, m in model.all_x_embedder.items()]
    stages += [(f"noise_refiner.{i}", b) for i, b in enumerate(model.noise_refiner)]
    stages += [(f"context_refiner.{i}", b) for i, b in enumerate(model.context_refiner)]
    stages += [(f"layers.{i} (unified)", b) for i, b in enumerate(model.layers)]
    stages += [(f"final_layer {k}", m) for k, m in model.all_final_layer.items()]
    handles = [m.register_forward_hook(record(name)) for name, m in stages]
    handles.append(pipe.vae.decoder.register_forward_hook(record("vae.decoder")))
    try:
        features = pipe.encode_prompt(prompt)[0]
        tokens = pipe.text_encoder.token_ids([prompt])[0]
        side = size or pipe.defaults["height"]
        latents = pipe(prompt_embeds=[features], height=side, width=side, num_inference_steps=1, guidance_scale=0.0,
                       seed=0, output_type="latent", progress=False)
        image = pipe.decode(latents, output_type="pt")
    finally:
        for h in handles:
            h.remove()
    head = [f"prompt {prompt!r} -> chat template -> {len(tokens)} tokens -> text encoder hidden_states[-2] "
            f"{tuple(features.shape)}", f"noise latent {tuple(latents.shape)} at {side}x{side} px", "",
            f"  {'stage':<28}{'input':>22} -> output"]
    tail = ["", f"unpatchify -> latent {tuple(latents.shape)}; VAE decode -> image {tuple(image.shape)}"]
    return "\n".join(head + lines + tail)


def layout_table(config: S3DiTConfig, caption_tokens: int, width: int, height: int, vae_factor: int = 8) -> str:
    """Token counts, position ids and the head-dim slice each RoPE axis rotates."""
    p = config.all_patch_size[0]
    hl, wl = height // vae_factor // p, width // vae_factor // p
    n_img, n_cap = config.image_tokens(height // vae_factor, width // vae_factor), caption_tokens
    cap_pad, img_pad = padded_length(n_cap) - n_cap, padded_length(n_img) - n_img
    cp = padded_length(n_cap)
    lines = [
        f"image {width}x{height} px -> latent {width // vae_factor}x{height // vae_factor} -> {wl}x{hl} = {n_img} image tokens "
        f"(+{img_pad} pad); caption {n_cap} tokens (+{cap_pad} pad)",
        f"unified sequence: [image {n_img + img_pad}, caption {cp}] = {n_img + img_pad + cp} tokens",
        "",
        f"{'tokens':<16}{'count':>7}  position ids (t, h, w)",
        f"{'caption':<16}{n_cap:>7}  (1, 0, 0) .. ({n_cap}, 0, 0)",
        f"{'caption pads':<16}{cap_pad:>7}  ({n_cap + 1}, 0, 0) .. ({cp}, 0, 0)" if cap_pad else f"{'caption pads':<16}{0:>7}",
        f"{'image':<16}{n_img:>7}  ({cp + 1}, 0, 0) .. ({cp + 1}, {hl - 1}, {wl - 1})",
        f"{'image pads':<16}{img_pad:>7}  (0, 0, 0)",
        "",
        f"RoPE (theta {config.rope_theta:g}, interleaved pairs) over head_dim {config.head_dim}:",
    ]
    start = 0
    for name, d, n in zip(("t (caption / frame)", "h", "w"), config.axes_dims, config.axes_lens):
        lines.append(f"  dims {start:>3}-{start + d - 1:<3} rotate by {name}: {d // 2} frequencies, positions < {n}")
        start += d
    return "\n".join(lines)
