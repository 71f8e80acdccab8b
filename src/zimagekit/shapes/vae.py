"""The shapes-world VAE: a small diffusers ``AutoencoderKL`` with 16 latent channels, trained
on renders of the shapes world, exported in the Hugging Face layout the Z-Image pipeline loads.

    zimagekit shapes vae train --config configs/shapes/vae.yaml [key=value ...]
    zimagekit shapes vae export runs/shapes-vae models/shapes-vae
    zimagekit shapes vae evaluate models/shapes-vae

Like Flux's VAE (which Z-Image uses) it has no quant convs and a single scalar shift and
scale, ``(z - shift_factor) * scaling_factor``, chosen at export so that the posterior means
of training renders have mean 0 and standard deviation 1 after it.

Geometry: four levels, ``block_out_channels=(16, 32, 64, 64)``, so 8x downsampling as in
Flux's VAE: a 64 px scene becomes an 8x8x16 latent (1,024 numbers for at most four objects),
which the S3-DiT's 2x2 patches turn into 16 image tokens. With 4x downsampling (16x16x16,
64 tokens) a teacher training step took 1.8x as long on this CPU (batch 32, fp32, one
thread: 5.0 s against 2.8 s), and the caption's 32 padded tokens are the same either way.
A narrow first level keeps the VAE itself cheap: a training step (batch 16, 2 threads,
fp32) takes 0.40 s at (16, 32, 64) against 0.90 s at (32, 64, 64).

Loss: L1 reconstruction of the [-1, 1] pixels plus ``kl_weight`` times the KL divergence to
N(0, I), scaled as in latent diffusion (the KL summed over the latent against the L1 summed
over the pixels), plus ``edge_weight`` times an L1 on horizontal and vertical pixel
differences, which keeps shape corners and the 2 px gaps between objects crisp.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file

from ..cli.runs import add_run_commands
from ..errors import ZImageKitError, exit_code
from ..fileio import atomic_folder
from ..runconfig import load_config, require_config
from ..trainer import Algorithm, IndexDataSource, TrainConfig, Trainer, load_trained, seed_everything
from ..vae_codec import to_vae_input
from . import world
from .judge import Report, judge_all

# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


@dataclass
class VAESection:
    """The autoencoder's architecture, its loss and its training scenes."""

    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)  # one entry per level; downsampling 2**(levels - 1)
    layers_per_block: int = 1
    norm_num_groups: int = 8  # must divide every entry of block_out_channels
    latent_channels: int = 16  # Z-Image's transformer takes 16, as Flux's VAE gives
    mid_block_add_attention: bool = True
    recon_loss: Literal["l1", "mse"] = "l1"
    kl_weight: float = 1e-6
    edge_weight: float = 0.0
    scenes: int = 20_000  # the training set: world.sample_layout(data_seed + i), rendered once
    data_seed: int = 0
    factor_scenes: int = 2_048  # layouts data_seed, data_seed + 1, ... whose latents set shift and scale

    def __post_init__(self):
        chans = self.block_out_channels
        require_config(len(chans) >= 1 and all(c >= 1 for c in chans), "vae.block_out_channels",
                 f"must list positive channel counts, got {list(chans)}")
        require_config(2 ** (len(chans) - 1) <= world.CANVAS // 2, "vae.block_out_channels",
                 f"has {len(chans)} levels; a {world.CANVAS} px image allows at most "
                 f"{world.CANVAS.bit_length() - 1}")
        for key in ("norm_num_groups", "layers_per_block", "latent_channels", "scenes", "factor_scenes"):
            require_config(getattr(self, key) >= 1, f"vae.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("kl_weight", "edge_weight"):
            require_config(getattr(self, key) >= 0, f"vae.{key}", f"must be >= 0, got {getattr(self, key)}")
        require_config(self.data_seed >= 0, "vae.data_seed", f"must be >= 0, got {self.data_seed}")


@dataclass
class VAEConfig(TrainConfig):
    vae: VAESection = field(default_factory=VAESection)


def build_vae(section: VAESection):
    """A freshly initialised diffusers AutoencoderKL of the section's architecture."""
    from diffusers import AutoencoderKL

    # Checked here, not in the config, so that overrides may change the two in either order.
    chans, groups = section.block_out_channels, section.norm_num_groups
    require_config(all(c % groups == 0 for c in chans), "vae.norm_num_groups",
             f"must divide every vae.block_out_channels entry {list(chans)}, got {groups}")
    levels = len(section.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=section.block_out_channels,
        layers_per_block=section.layers_per_block, latent_channels=section.latent_channels,
        norm_num_groups=section.norm_num_groups, sample_size=world.CANVAS, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=section.mid_block_add_attention,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# Pixels and data
# ----------------------------------------------------------------------------------------


def to_model_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1], the range diffusers' VAEs take."""
    return to_vae_input(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] → uint8 (N, H, W, 3), rounding as the pipeline does."""
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def render_training_scenes(section: VAESection, count: int | None = None) -> np.ndarray:
    """uint8 (N, 64, 64, 3) renders of layouts ``data_seed .. data_seed + N - 1`` (N =
    ``section.scenes`` unless ``count`` is given). The VAE never sees a caption, so it learns
    the whole image domain (:func:`world.sample_layout`), held-out combinations included."""
    n = section.scenes if count is None else count
    return np.stack([world.render(world.sample_layout(section.data_seed + i)) for i in range(n)])


def data_source(section: VAESection, batch_size: int) -> IndexDataSource:
    """Batches of [-1, 1] pixels (B, 3, 64, 64) from the training scenes, rendered once."""
    images = torch.from_numpy(render_training_scenes(section))  # uint8 keeps 20k scenes at 250 MB
    return IndexDataSource(lambda idx: to_model_pixels(images[idx].numpy()), len(images), batch_size,
                           seed=section.data_seed)


def eval_scenes(layouts: int, seed: int = 0) -> list[world.Scene]:
    """``layouts`` ground-truth layouts of every evaluation prompt (held-out combinations
    included), prompt-major, all from one generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    return [world.scene_for_prompt(p, rng, split="eval") for p in world.eval_prompts() for _ in range(layouts)]


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3) → their reconstructions through the posterior mean, uint8."""
    out = []
    for i in range(0, len(images), batch):
        x = to_model_pixels(images[i : i + batch]).to(vae.dtype)
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class VAETraining(Algorithm):
    """Trains one module, ``vae``, on batches of [-1, 1] pixels (B, 3, H, W)."""

    def __init__(self, vae, section: VAESection):
        self.vae, self.section = vae, section

    def modules(self):
        return {"vae": self.vae}

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction, KL and edge terms (unweighted) of one batch; the decoder sees a
        posterior sample (the reparameterisation trick, Kingma & Welling 2014, eq. 10)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # Under bf16 autocast the encoder returns bf16 moments; the KL sums thousands of
        # them per image, so take them to fp32 first.
        posterior = DiagonalGaussianDistribution(self.vae.encode(x).latent_dist.parameters.float())
        y = self.vae.decode(posterior.sample()).sample.float()
        diff = y - x
        recon = diff.abs().mean() if self.section.recon_loss == "l1" else diff.square().mean()
        (yx, yy), (xx, xy) = _edges(y), _edges(x)
        edge = ((yx - xx).abs().mean() + (yy - xy).abs().mean()) / 2
        return {"recon": recon, "kl": posterior.kl().mean() / x[0].numel(), "edge": edge}

    def training_step(self, batch, step):
        t = self.loss_terms(batch)
        return {"vae": t["recon"] + self.section.kl_weight * t["kl"] + self.section.edge_weight * t["edge"]}

    def flops_per_sample(self):
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, world.CANVAS, world.CANVAS)
        with FlopCounterMode(display=False) as counter:
            self.training_step(x, 0)["vae"].backward()
        self.vae.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    def sample(self, prompts, seeds):
        """Per (prompt, seed): a layout of the prompt drawn from the seed, its render on the
        left and the reconstruction on the right."""
        from PIL import Image

        scenes = [world.scene_for_prompt(world.parse_prompt(p), s, split="eval") for p, s in zip(prompts, seeds)]
        originals = np.stack([world.render(s) for s in scenes])
        pairs = np.concatenate([originals, reconstruct(self.vae, originals)], axis=2)
        return [Image.fromarray(p) for p in pairs]


# ----------------------------------------------------------------------------------------
# Export and evaluation
# ----------------------------------------------------------------------------------------


def latent_factors(latents: torch.Tensor) -> tuple[float, float]:
    """(shift_factor, scaling_factor) that take ``latents`` to mean 0 and (population)
    standard deviation 1 under ``(z - shift) * scale``: one scalar each, as Flux's VAE has."""
    z = latents.double()
    return z.mean().item(), 1.0 / z.std(correction=0).item()


@torch.no_grad()
def encode_means(vae, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Posterior means (N, C, h, w) of uint8 (N, H, W, 3) images, in fp32."""
    return torch.cat([vae.encode(to_model_pixels(images[i : i + batch]).to(vae.dtype)).latent_dist.mean.float()
                      for i in range(0, len(images), batch)])


def load_run(run_dir: Path, use_ema: bool = True):
    """The run's config and its latest VAE (EMA weights by default), fp32, in eval mode."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise ZImageKitError(f"{run_dir}: not a training run (config.yaml is missing)")
    cfg = load_config(VAEConfig, config_path)
    vae = build_vae(cfg.vae)
    load_trained(run_dir, "vae", vae, use_ema)
    return cfg, vae.eval().requires_grad_(False)


def export(run_dir: Path, out: Path, use_ema: bool = True, dtype: Literal["bf16", "fp32"] = "bf16"):
    """Write the run's VAE as a diffusers AutoencoderKL folder (config.json +
    diffusion_pytorch_model.safetensors) and return it as saved, in fp32.

    Weights are rounded to ``dtype`` *before* shift and scale are measured, so the factors
    describe the latents of the weights that ship."""
    cfg, vae = load_run(run_dir, use_ema)
    stored = {k: v.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).contiguous()
              for k, v in vae.state_dict().items()}
    vae.load_state_dict(stored)  # copies the rounded values into the fp32 parameters
    shift, scale = latent_factors(encode_means(vae, render_training_scenes(cfg.vae, cfg.vae.factor_scenes)))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    # Written directly rather than by save_pretrained, which would need the module cast to
    # bf16 and back; the file names and metadata are those diffusers writes and reads.
    with atomic_folder(out) as tmp:
        vae.save_config(tmp)
        save_file(stored, str(tmp / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return vae


def load_model(folder: Path):
    """An exported VAE folder as a fp32 AutoencoderKL in eval mode (the pipeline upcasts too)."""
    from diffusers import AutoencoderKL

    if not (Path(folder) / "config.json").is_file():
        raise ZImageKitError(f"{folder}: not an AutoencoderKL folder (config.json is missing)")
    return AutoencoderKL.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval().requires_grad_(False)


@dataclass
class ReconstructionEval:
    """The judge on ground-truth renders and on their reconstructions, plus pixel PSNR."""

    originals: Report
    reconstructions: Report
    psnr: float  # dB over all pixels, peak 255

    @property
    def ratio(self) -> float:
        """Reconstruction accuracy as a fraction of the originals' (the requirement: >= 0.98)."""
        return self.reconstructions.overall / self.originals.overall

    def summary(self) -> str:
        return (f"originals:\n{self.originals.summary()}\n\nreconstructions:\n{self.reconstructions.summary()}\n\n"
                f"reconstructions / originals: {100 * self.ratio:.1f}%   PSNR {self.psnr:.2f} dB")


def evaluate_reconstructions(vae, layouts: int = 4, seed: int = 0) -> ReconstructionEval:
    """Judge renders of ``layouts`` layouts of every evaluation prompt and their reconstructions."""
    scenes = eval_scenes(layouts, seed)
    originals = np.stack([world.render(s) for s in scenes])
    recons = reconstruct(vae, originals)
    mse = np.mean((recons.astype(np.float64) - originals) ** 2)
    return ReconstructionEval(
        judge_all((im, s.prompt) for im, s in zip(originals, scenes)),
        judge_all((im, s.prompt) for im, s in zip(recons, scenes)),
        float(10 * np.log10(255**2 / max(mse, 1e-12))),
    )


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------


def train(cfg: VAEConfig) -> Path:
    seed_everything(cfg.run.seed)  # before building the model, so its init is reproducible
    vae = build_vae(cfg.vae)
    trainer = Trainer(cfg, VAETraining(vae, cfg.vae), data_source(cfg.vae, cfg.train.batch_size))
    trainer.fit()
    return trainer.run_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zimagekit.shapes.vae", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _, e = add_run_commands(sub, "train the VAE on renders of training scenes",
                            "write a run's VAE as a diffusers AutoencoderKL folder", example="vae.kl_weight=1e-5")
    e.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weight dtype on disk (default bf16)")
    v = sub.add_parser("evaluate", help="judge reconstructions of the evaluation prompts' renders")
    v.add_argument("model", type=Path, help="an AutoencoderKL folder (config.json + safetensors)")
    v.add_argument("--layouts", type=int, default=4, help="layouts per evaluation prompt (default 4)")
    args = parser.parse_args(argv)

    def run():
        if args.command == "train":
            print(f"run directory: {train(load_config(VAEConfig, args.config, args.overrides))}")
        elif args.command == "export":
            vae = export(args.run_dir, args.out, use_ema=not args.no_ema, dtype=args.dtype)
            print(f"wrote {args.out} (shift_factor {vae.config.shift_factor:.4f}, "
                  f"scaling_factor {vae.config.scaling_factor:.4f})")
        else:
            print(evaluate_reconstructions(load_model(args.model), args.layouts).summary())

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
