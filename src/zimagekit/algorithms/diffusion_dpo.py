"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, Eq. 14) for a flow-matching Z-Image
model: preference pairs train the policy to denoise the preferred image better, relative to a
frozen reference, than the rejected one.

For a pair (winner w, loser l) of the same prompt, one noise level σ and one noise ε are
shared; each error is the mean squared velocity error ``e(x) = mean‖v(x_σ) − (x − ε)‖²`` of the
policy or the reference, and (:func:`.rl_maths.diffusion_dpo_loss`)

    Δ = (e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l)),     L = −log σ(−β/2 · Δ),

which is log 2 while the policy is the reference. σ is drawn as in pre-training (logit-normal,
shifted like the folder's schedule).

Pairs come from a file (``dpo.pairs``: JSONL rows ``{"prompt", "chosen", "rejected"}``, image
paths relative to the file) or on-policy: each update samples ``group_size`` images per prompt
with the current policy (the ODE sampler at ``sample_steps``), ranks them by the reward and
pairs the best with the worst, as the flow version of DPO in Flow-GRPO's code does. A group
whose best and worst scores tie holds no preference and is left out of that update's loss.

    zimagekit rl --config configs/shapes/diffusion_dpo.yaml
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..errors import ZImageKitError
from ..rewards import load_reward, reward_name, score
from ..runconfig import load_config, require_config
from ..sampling import ScheduleConfig, add_noise, time_from_sigma, training_sigmas, velocity
from ..trainer import Algorithm, IndexDataSource, TrainConfig, Trainer, seed_everything
from ..vae_codec import scale_latents, to_vae_input
from .policy import Policy, export_policy, open_model
from .prompt_data import RLData, prompt_source
from .rl_maths import diffusion_dpo_loss


@dataclass
class DPOSection:
    beta: float = 100.0  # Flow-GRPO's flow DPO uses 100 (the SD1.5 paper's 5000 is for ε-MSE)
    pairs: str | None = None  # JSONL of prompt/chosen/rejected; null: on-policy pairs
    reward: str = "zimagekit.shapes.rewards:JudgeReward"  # ranks on-policy samples
    group_size: int = 8  # on-policy samples per prompt; the pair is the best and the worst
    sample_steps: int | None = None  # ODE steps of on-policy samples; null: the folder's default
    guidance_scale: float | None = None  # w of on-policy samples; null: the folder's default
    logit_mean: float = 0.0  # noise levels of the loss: σ = sigmoid(N(mean, std²)), shifted
    logit_std: float = 1.0
    lora_rank: int = 32  # 0: train the whole transformer (the reference is a frozen copy)
    lora_alpha: float | None = 64.0

    def __post_init__(self):
        require_config(self.beta > 0, "dpo.beta", f"must be > 0, got {self.beta}")
        require_config(self.group_size >= 2, "dpo.group_size", f"must be >= 2 to make a pair, got {self.group_size}")
        require_config(self.sample_steps is None or self.sample_steps >= 1, "dpo.sample_steps",
                       f"must be >= 1 or null, got {self.sample_steps}")
        require_config(self.lora_rank >= 0, "dpo.lora_rank", f"must be >= 0, got {self.lora_rank}")


@dataclass
class DiffusionDPOConfig(TrainConfig):
    """``train.batch_size`` counts pairs (on-policy: prompts) per update."""

    algorithm: Literal["diffusion_dpo"] = "diffusion_dpo"
    dpo: DPOSection = field(default_factory=DPOSection)
    data: RLData = field(default_factory=RLData)


CONFIG = DiffusionDPOConfig


class NoisedPairs:
    """Winners and losers (B, C, F, H, W) noised to one σ per pair with one ε per pair, shared by
    both images (Eq. 14): the inputs on which the policy's and the reference's errors compare."""

    def __init__(self, winners: torch.Tensor, losers: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor):
        x0, noise = torch.cat([winners, losers]), torch.cat([noise, noise])
        self.sigma = torch.cat([sigma, sigma]).to(x0)
        self.x_t = add_noise(x0, noise, self.sigma.view(-1, *([1] * (x0.ndim - 1))))
        self.target = velocity(x0, noise)

    def errors(self, model, captions) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair mean squared velocity error of ``model`` on the winners and on the losers."""
        pred = model(self.x_t.to(model.dtype), time_from_sigma(self.sigma), list(captions) * 2)
        return (pred.float() - self.target).pow(2).flatten(1).mean(1).chunk(2)


class DiffusionDPO(Algorithm):
    metric_names = ("implicit_accuracy", "pairs", "reward/best", "reward/worst")

    def __init__(self, pipe, cfg: DiffusionDPOConfig, reward=None):
        self.pipe, self.dpo, self.reward = pipe, cfg.dpo, reward
        self.model = pipe.transformer
        self.policy = Policy(self.model, cfg.dpo.lora_rank, cfg.dpo.lora_alpha)
        self.schedule: ScheduleConfig = pipe.schedule
        self.height, self.width = cfg.data.height or pipe.defaults["height"], cfg.data.width or pipe.defaults["width"]
        self.empty = pipe.encode_prompt([""])[0]
        self._metrics: dict[str, float] = {}

    def modules(self):
        return self.policy.modules()

    @torch.no_grad()
    def on_policy_pairs(self, captions, prompts):
        """Winner and loser latents of each prompt whose samples do not all tie, and the
        prompts' captions."""
        g = self.dpo
        n = len(prompts)
        self.model.eval()
        latents = self.pipe(prompt_embeds=[c for c in captions for _ in range(g.group_size)],
                            negative_prompt_embeds=[self.empty] * (n * g.group_size),
                            num_inference_steps=g.sample_steps, guidance_scale=g.guidance_scale,
                            height=self.height, width=self.width, output_type="latent", progress=False)
        rewards = score(self.reward, self.pipe.decode(latents, "pt"),
                        [p for p in prompts for _ in range(g.group_size)]).view(n, g.group_size)
        best, worst = rewards.argmax(1), rewards.argmin(1)
        keep = (rewards.max(1).values > rewards.min(1).values).nonzero().flatten().tolist()
        self._metrics.update({"reward/best": rewards.max(1).values.mean().item(),
                              "reward/worst": rewards.min(1).values.mean().item()})
        grouped = latents.view(n, g.group_size, *latents.shape[1:])
        return grouped[keep, best[keep]], grouped[keep, worst[keep]], [captions[i] for i in keep]


    def training_step(self, batch, step):
        if "winners" in batch:
            winners, losers, captions = batch["winners"], batch["losers"], list(batch["captions"])
        else:
            winners, losers, captions = self.on_policy_pairs(batch["captions"], batch["prompts"])
        group = next(iter(self.modules()))
        self._metrics["pairs"] = float(len(captions))
        if not captions:  # every group tied: nothing to prefer; a zero loss that still reaches the weights
            return {group: sum(p.sum() for p in self.modules()[group].parameters()) * 0.0}
        # (B, C, F = 1, H, W), as the transformer takes them
        winners = winners.to(self.model.device, torch.float32).unsqueeze(2)
        losers = losers.to(self.model.device, torch.float32).unsqueeze(2)
        sigma = training_sigmas(len(winners), self.schedule, self.model.config.image_tokens(*winners.shape[-2:]),
                                self.dpo.logit_mean, self.dpo.logit_std)
        pair = NoisedPairs(winners, losers, sigma, torch.randn_like(winners))
        error_w, error_l = pair.errors(self.model, captions)
        with torch.no_grad(), self.policy.reference() as reference:
            ref_w, ref_l = pair.errors(reference, captions)
        loss, accuracy = diffusion_dpo_loss(error_w, error_l, ref_w, ref_l, self.dpo.beta)
        self._metrics["implicit_accuracy"] = accuracy.item()
        return {group: loss}

    def metrics(self):
        return dict(self._metrics)

    def sample(self, prompts, seeds):
        return self.pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], height=self.height,
                         width=self.width, progress=False)


# ----------------------------------------------------------------------------------------
# Pairs from a file
# ----------------------------------------------------------------------------------------


def read_pairs(path: str) -> list[tuple[str, Path, Path]]:
    """The (prompt, chosen image, rejected image) rows of a JSONL file; image paths are
    relative to the file."""
    file = Path(path)
    if not file.is_file():
        raise ZImageKitError(f"dpo.pairs: no file {path}; give a JSONL of prompt/chosen/rejected rows")
    rows = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((row["prompt"], file.parent / row["chosen"], file.parent / row["rejected"]))
        except (ValueError, KeyError, TypeError):
            raise ZImageKitError(f"{path}, line {n}: expected a JSON object with prompt, chosen and rejected") from None
    if not rows:
        raise ZImageKitError(f"{path} holds no pairs")
    return rows


@torch.no_grad()
def encode_pairs(pipe, rows, height: int, width: int):
    """Caption features, and winner and loser latents (the VAE posterior means, scaled for
    the transformer), of every row; images are resized to ``width`` x ``height``."""
    from PIL import Image

    def latents(paths):
        pixels = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB").resize((width, height), Image.LANCZOS)
            except OSError as e:
                raise ZImageKitError(f"dpo.pairs: cannot read {path}: {e}") from None
            pixels.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        x = to_vae_input(torch.stack(pixels)).to(pipe.device, pipe.vae.dtype)
        return scale_latents(pipe.vae.encode(x).latent_dist.mean.float(), pipe.vae.config)

    captions = pipe.encode_prompt([p for p, _, _ in rows])
    return captions, latents([w for _, w, _ in rows]), latents([l for _, _, l in rows])


def train(cfg: DiffusionDPOConfig) -> Path:
    seed_everything(cfg.run.seed)
    pipe = open_model(cfg.data.model)
    reward = None if cfg.dpo.pairs else load_reward(cfg.dpo.reward)
    algorithm = DiffusionDPO(pipe, cfg, reward)
    if cfg.dpo.pairs:
        captions, winners, losers = encode_pairs(pipe, read_pairs(cfg.dpo.pairs), algorithm.height, algorithm.width)
        data = IndexDataSource(lambda idx: {"captions": [captions[i] for i in idx], "winners": winners[idx],
                                            "losers": losers[idx]}, len(captions), cfg.train.batch_size,
                               seed=cfg.data.seed)
        source = f"{len(captions)} pairs from {cfg.dpo.pairs}"
    else:
        data = prompt_source(pipe.encode_prompt, cfg.data, cfg.train.batch_size)
        source = f"on-policy pairs (best and worst of {cfg.dpo.group_size}, reward {reward_name(reward)})"
    print(f"Diffusion-DPO on {cfg.data.model}: {source}, beta {cfg.dpo.beta:g}")
    trainer = Trainer(cfg, algorithm, data)
    trainer.fit()
    return trainer.run_dir


def export(run_dir: Path, out: Path, use_ema: bool = True) -> None:
    """Write the run's policy (LoRA merged, bf16) into a copy of its model folder."""
    cfg = load_config(DiffusionDPOConfig, Path(run_dir) / "config.yaml")
    export_policy(run_dir, out, cfg.data.model, cfg.dpo.lora_rank, cfg.dpo.lora_alpha, use_ema and cfg.ema.enabled)
