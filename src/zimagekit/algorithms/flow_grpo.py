"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) on a multi-step Z-Image model: online RL with
group-relative advantages, made possible by sampling with an SDE whose marginals are the ODE's.

Each rollout draws ``group_size`` images per prompt with :func:`zimagekit.sampling.sde_step`
(``sde_steps`` steps, the "denoising reduction": fewer than the model samples with), keeping
every latent x_k and the log-probability of each step under the sampling policy. A reward
scores the images (:mod:`zimagekit.rewards`); :func:`.rl_maths.group_advantages` turns the
scores into advantages A (Eq. 6). The update then recomputes each trained step's
log-probability under the current policy and minimises, averaged over steps (Eq. 7–8),

    L = mean(max(−A·ρ_k, −A·clip(ρ_k, 1 − ε, 1 + ε))) + β·KL(π_θ(·|x_k) ‖ π_ref(·|x_k)),

ρ_k = π_θ(x_{k+1}|x_k) / π_old(x_{k+1}|x_k), the KL in closed form for the two Gaussians of
equal variance. The policy is a LoRA on the folder's transformer (the reference is the same
model with the LoRA off) or the whole transformer (the reference a frozen copy). CFG stays on
in rollouts and in the log-probabilities, as in Flow-GRPO. The last step is taken without
noise (its mean), so the scored image is the rollout's clean end; only the first
``train_steps`` steps are trained (Flow-GRPO: 9 of 10).

A rollout is cut into ``updates_per_rollout`` minibatches, one optimizer update each: the
first update is on-policy (ρ = 1), later ones are where the clipping acts. An update's loss
comes to the trainer one trained step at a time (an iterable of parts, see
:meth:`zimagekit.trainer.Algorithm.training_step`), so only one step's graph is in memory.

    zimagekit rl --config configs/shapes/flow_grpo.yaml
    zimagekit rl export runs/shapes-flow-grpo OUT_FOLDER
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..rewards import load_reward, reward_name, score
from ..runconfig import load_config, require_config
from ..sampling import cfg_combine, cpu_randn, gaussian_log_prob, get_sigmas, sde_step, time_from_sigma
from ..trainer import Algorithm, TrainConfig, Trainer, seed_everything
from .policy import Policy, export_policy, open_model
from .prompt_data import RLData, prompt_source
from .rl_maths import clipped_surrogate, flat_groups, gaussian_kl, group_advantages


@dataclass
class GRPOSection:
    reward: str = "zimagekit.shapes.rewards:JudgeReward"  # module:Name (zimagekit.rewards)
    group_size: int = 8  # images per prompt; advantages compare within a group
    sde_steps: int = 10  # rollout steps (Flow-GRPO: 10 in training, 40 to evaluate)
    train_steps: int | None = None  # the first K steps are trained; null: sde_steps − 1
    noise_level: float = 0.7  # a in s = a·√(σ/(1 − σ))
    guidance_scale: float | None = None  # w of the rollouts' CFG; null: the folder's default
    clip_range: float = 1e-4  # ε of the clipped ratio (Flow-GRPO's default)
    kl_beta: float = 0.04  # β; 0 drops the reference model
    advantage_clip: float = 5.0
    global_std: bool = True  # advantages divided by the std of the whole batch, not the group's
    updates_per_rollout: int = 1  # minibatches a rollout is cut into
    lora_rank: int = 32  # 0: train the whole transformer
    lora_alpha: float | None = 64.0

    def __post_init__(self):
        require_config(self.group_size >= 2, "grpo.group_size",
                       f"must be >= 2: advantages compare the samples of one prompt, got {self.group_size}")
        require_config(self.sde_steps >= 2, "grpo.sde_steps", f"must be >= 2, got {self.sde_steps}")
        require_config(self.train_steps is None or 1 <= self.train_steps < self.sde_steps, "grpo.train_steps",
                       f"must lie in [1, sde_steps) (the last step adds no noise) or be null, got {self.train_steps}")
        require_config(self.noise_level > 0, "grpo.noise_level", f"must be > 0, got {self.noise_level}")
        require_config(self.guidance_scale is None or self.guidance_scale >= 0, "grpo.guidance_scale",
                       f"must be >= 0 or null, got {self.guidance_scale}")
        require_config(self.clip_range > 0, "grpo.clip_range", f"must be > 0, got {self.clip_range}")
        require_config(self.kl_beta >= 0, "grpo.kl_beta", f"must be >= 0, got {self.kl_beta}")
        require_config(self.updates_per_rollout >= 1, "grpo.updates_per_rollout",
                       f"must be >= 1, got {self.updates_per_rollout}")
        require_config(self.lora_rank >= 0, "grpo.lora_rank", f"must be >= 0, got {self.lora_rank}")


@dataclass
class FlowGRPOConfig(TrainConfig):
    """``train.batch_size`` counts prompts per rollout; a rollout draws ``batch_size ×
    grpo.group_size`` images."""

    algorithm: Literal["flow_grpo"] = "flow_grpo"
    grpo: GRPOSection = field(default_factory=GRPOSection)
    data: RLData = field(default_factory=RLData)


CONFIG = FlowGRPOConfig


def guided_velocity(model, x: torch.Tensor, sigma: float, captions, negatives, guidance_scale: float) -> torch.Tensor:
    """The model's velocity at x_σ in fp32, with Z-Image CFG when ``guidance_scale > 0``
    (positive and negative halves in one batch, as the pipeline does)."""
    latent = x.to(model.dtype).unsqueeze(2)
    t = torch.full((len(x),), time_from_sigma(sigma), device=x.device)
    if guidance_scale > 0:
        out = model(torch.cat([latent, latent]), torch.cat([t, t]), list(captions) + list(negatives))
        pos, neg = out.squeeze(2).float().chunk(2)
        return cfg_combine(pos, neg, guidance_scale)
    return model(latent, t, list(captions)).squeeze(2).float()


class FlowGRPO(Algorithm):
    metric_names = ("reward/mean", "reward/std", "reward/flat_groups", "kl", "ratio/max", "clip_fraction")

    def __init__(self, pipe, cfg: FlowGRPOConfig, reward):
        self.pipe, self.cfg, self.grpo, self.reward = pipe, cfg, cfg.grpo, reward
        self.model = pipe.transformer
        g = self.grpo
        self.policy = Policy(self.model, g.lora_rank, g.lora_alpha, keep_reference=g.kl_beta > 0)
        self.lora = self.policy.lora
        self.guidance = pipe.defaults["guidance_scale"] if g.guidance_scale is None else g.guidance_scale
        self.height, self.width = cfg.data.height or pipe.defaults["height"], cfg.data.width or pipe.defaults["width"]
        f = pipe.vae_scale_factor
        self.latent_shape = (self.model.config.in_channels, self.height // f, self.width // f)
        self.sigmas = get_sigmas(g.sde_steps, pipe.schedule, self.model.config.image_tokens(*self.latent_shape[1:]))
        self.train_steps = g.train_steps or g.sde_steps - 1
        self.empty = pipe.encode_prompt([""])[0]
        self._buffer: list[dict] = []
        self._metrics: dict[str, float] = {}

    def modules(self):
        return self.policy.modules()

    # -- rollouts ---------------------------------------------------------------------------

    def _mean_and_std(self, model, x, k: int, captions, negatives):
        s, s_next = self.sigmas[k].item(), self.sigmas[k + 1].item()
        v = guided_velocity(model, x, s, captions, negatives, self.guidance)
        _, mean, std = sde_step(x, v, s, s_next, self.grpo.noise_level, torch.zeros_like(x),
                                sigma_cap=self.sigmas[1].item())
        return mean, std

    @torch.no_grad()
    def rollout(self, captions, prompts) -> dict:
        """``group_size`` SDE samples per prompt (consecutive), their latents, per-step
        log-probabilities, rewards and advantages."""
        g = self.grpo
        captions = [c for c in captions for _ in range(g.group_size)]
        prompts = [p for p in prompts for _ in range(g.group_size)]
        negatives = [self.empty] * len(captions)
        device = self.model.device
        x = cpu_randn((len(captions), *self.latent_shape), device=device)
        latents, log_probs = [x], []
        for k in range(g.sde_steps):
            mean, std = self._mean_and_std(self.model, x, k, captions, negatives)
            if k < g.sde_steps - 1:
                x = mean + std * torch.randn_like(x)
                log_probs.append(gaussian_log_prob(x, mean, std))
            else:
                x = mean  # the scored image is the rollout's clean end
            latents.append(x)
        images = self.pipe.decode(x, "pt")
        rewards = score(self.reward, images, prompts)
        advantages = group_advantages(rewards, g.group_size, g.global_std, g.advantage_clip)
        self._metrics.update({"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
                              "reward/flat_groups": flat_groups(rewards, g.group_size)})
        return {"latents": torch.stack(latents[: self.train_steps + 1], 1), "log_probs": torch.stack(log_probs, 1),
                "advantages": advantages, "captions": captions}

    # -- the update ---------------------------------------------------------------------------

    def training_step(self, batch, step):
        if not self._buffer:
            self.model.eval()
            roll = self.rollout(batch["captions"], batch["prompts"])
            parts = torch.arange(len(roll["advantages"])).chunk(self.grpo.updates_per_rollout)
            self._buffer = [{"latents": roll["latents"][i], "log_probs": roll["log_probs"][i],
                             "advantages": roll["advantages"][i], "captions": [roll["captions"][j] for j in i]}
                            for i in parts]
        mb = self._buffer.pop(0)
        group = next(iter(self.modules()))
        # One part per trained step, each back-propagated by the trainer before the next is
        # computed (Flow-GRPO's step-by-step backward): one step's graph in memory at a time.
        return {group: self._step_losses(mb)}

    def _step_losses(self, mb):
        """Yield each trained step's loss / train_steps (their sum is the mean over steps),
        then record the step's metrics."""
        captions, negatives = mb["captions"], [self.empty] * len(mb["captions"])
        kls, ratios, clipped = [], [], []
        for k in range(self.train_steps):
            x, x_next = mb["latents"][:, k], mb["latents"][:, k + 1]
            mean, std = self._mean_and_std(self.model, x, k, captions, negatives)
            log_prob = gaussian_log_prob(x_next, mean, std)
            loss, ratio = clipped_surrogate(log_prob, mb["log_probs"][:, k], mb["advantages"], self.grpo.clip_range)
            if self.grpo.kl_beta > 0:
                with torch.no_grad(), self.policy.reference() as reference:
                    ref_mean, _ = self._mean_and_std(reference, x, k, captions, negatives)
                kl = gaussian_kl(mean, ref_mean, std).mean()
                loss = loss + self.grpo.kl_beta * kl
                kls.append(kl.detach())
            ratios.append(ratio.detach())
            clipped.append(((ratio.detach() - 1).abs() > self.grpo.clip_range).float().mean())
            yield loss / self.train_steps
        self._metrics.update({"ratio/max": torch.stack(ratios).max().item(),
                              "clip_fraction": torch.stack(clipped).mean().item(),
                              "kl": torch.stack(kls).mean().item() if kls else 0.0})

    def metrics(self):
        return dict(self._metrics)

    def sample(self, prompts, seeds):
        return self.pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], height=self.height,
                         width=self.width, progress=False)

    def state_dict(self):
        return {"buffer": self._buffer}

    def load_state_dict(self, state):
        self._buffer = state.get("buffer", [])


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------


def train(cfg: FlowGRPOConfig) -> Path:
    seed_everything(cfg.run.seed)
    reward = load_reward(cfg.grpo.reward)
    pipe = open_model(cfg.data.model)
    algorithm = FlowGRPO(pipe, cfg, reward)
    data = prompt_source(pipe.encode_prompt, cfg.data, cfg.train.batch_size)
    print(f"Flow-GRPO on {cfg.data.model}: reward {reward_name(reward)}, {cfg.train.batch_size} prompts x "
          f"{cfg.grpo.group_size} images per rollout, {cfg.grpo.sde_steps} SDE steps (w = {algorithm.guidance:g})")
    trainer = Trainer(cfg, algorithm, data)
    trainer.fit()
    return trainer.run_dir


def export(run_dir: Path, out: Path, use_ema: bool = True) -> None:
    """Write the run's policy as a Z-Image folder: the model folder with its transformer
    replaced (LoRA merged), stored in bf16; the EMA weights when the run kept them."""
    cfg = load_config(FlowGRPOConfig, Path(run_dir) / "config.yaml")
    export_policy(run_dir, out, cfg.data.model, cfg.grpo.lora_rank, cfg.grpo.lora_alpha, use_ema and cfg.ema.enabled)
