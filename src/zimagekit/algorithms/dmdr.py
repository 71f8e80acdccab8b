"""DMDR (Jiang et al. 2025, arXiv 2511.13649): distillation and RL together, with the
distribution-matching loss as RL's regulariser (Eq. 3, ``L = L_DMD + λ_rl·L_RL``), over
Decoupled-DMD (:mod:`.decoupled_dmd`), whose loop, modes and re-noising it keeps.

What DMDR adds, each a switch in :class:`DMDRSection`:

* **DynaDG** (§3.3): the fake score is the teacher plus a LoRA used at a fixed scale γ_f; the
  real score is the teacher plus *the same* LoRA at γ_r(k), annealed from 0.75 to 0
  (:func:`.rl_maths.dynadg_real_scale`): early on the real distribution is pulled toward the
  fake one, so the two overlap. At γ_r = 0 the real score is the teacher.
* **DynaRS** (§3.3): the DM term's re-noise level and the fake score's training level are drawn
  as σ ~ Beta(a_k, b_k), annealed from Beta(4, 1.5) (mostly noise) to uniform
  (:func:`.rl_maths.dynars_beta`), clipped to the mode's τ range.
* **RT-DM**, the cold start (Eq. 4): each sample's DMD direction is weighted by
  ``exp(r(x0)/‖r‖)`` of its finished rollout x0 (no gradient through the reward); ‖r‖ is the
  batch's root mean square of rewards, and the weights are divided by their mean so the
  update keeps its size (the paper leaves both unsaid).
* **RL**, stage 2, ``λ_rl`` times one of:

  - ``refl``: ``−mean r(decode(x))`` through the student's one-step prediction x (ReFL; the
    reward must be differentiable);
  - ``dpo``: Diffusion-DPO on on-policy pairs, the best and the worst finished rollout of each
    prompt's ``group_size``, re-noised to the student's own noise levels, against the student
    as the run started;
  - ``grpo``: the CA term of each sample weighted by ``1 + λ_rl·A`` with A its group-relative
    advantage among the ``group_size`` samples of its prompt, DM unweighted as the
    regulariser (the maintainers' option (b) for Decoupled-DMD). Chosen over SDE
    log-probabilities because a few-step student's per-step SDE variance is large (spec §4)
    and because it needs no extra backward pass: it is a reweighting of a direction the
    update computes anyway.
  - ``awr``: advantage-weighted regression (Peng et al. 2019) with GRPO's group-relative
    advantages: ``mean_i max(A_i, 0)·mean_elements (x_i − sg(x0_i))²``, pulling the student's prediction at
    step k toward the finished rollout x0_i that it led to, for the samples that scored above
    their group's mean. Unlike ``grpo`` it reinforces the sample itself rather than the
    strength of the guidance at it, and unlike a log-probability gradient it is a regression
    with no noise in its direction. Only the positive part is used: a pull away from a bad
    sample has no fixed point.

With every switch off and ``λ_rl = 0`` the update is Decoupled-DMD's, draw for draw.

    zimagekit rl --config configs/shapes/dmdr.yaml
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import ZImageKitError
from ..lora import LoRA
from ..rewards import load_reward, reward_name, score
from ..runconfig import require_config
from ..sampling import add_noise, cpu_randn, time_from_sigma
from ..trainer import Trainer, seed_everything
from .decoupled_dmd import (
    DecoupledDMD,
    DistillConfig,
    Renoise,
    as_student_pipeline,
    backward_simulation,
    flow_matching_loss,
    generator_loss,
    resolve,
    student_pipeline,
)
from .diffusion_dpo import NoisedPairs
from .prompt_data import prompt_source
from .rl_maths import diffusion_dpo_loss, dynadg_real_scale, dynars_sigmas, flat_groups, group_advantages


# RL terms that draw group_size samples of each prompt and compare them.
GROUPED = ("grpo", "dpo", "awr")


@dataclass
class DMDRSection:
    student: str | None = None  # a few-step student folder to start from (stage 2); null: the teacher
    reward: str = "zimagekit.shapes.rewards:JudgeReward"
    rl: Literal["none", "refl", "grpo", "dpo", "awr"] = "none"
    rl_weight: float = 0.5  # λ_rl (DMDR Table 5c: 0.5)
    group_size: int = 4  # grpo, dpo and awr: samples per prompt
    dpo_beta: float = 100.0  # dpo: β of the Diffusion-DPO loss
    reward_tilt: bool = False  # RT-DM, the cold start's reward-tilted DM
    dynadg: bool = False
    fake_lora_rank: int = 32  # DynaDG's fake score LoRA
    fake_scale: float = 2.0  # γ_f
    real_scale_start: float = 0.75  # γ_r(0)
    dynadg_steps: int = 1000  # K: trainer steps over which γ_r anneals to 0
    dynars: bool = False
    dynars_steps: int = 1000  # K of DynaRS
    # 1: L_DMD + λ·L_RL. 0 drops distribution matching: RL alone (ReFL or AWR), the
    # reward-hacking control of DMDR Fig. 4 (the fake score still trains; nothing reads it).
    dm_weight: float = 1.0

    def __post_init__(self):
        require_config(self.rl_weight >= 0, "dmdr.rl_weight", f"must be >= 0, got {self.rl_weight}")
        require_config(self.dm_weight in (0.0, 1.0), "dmdr.dm_weight", f"must be 1 (DMDR) or 0 (RL alone), got "
                       f"{self.dm_weight}")
        require_config(self.dm_weight == 1 or self.rl in ("refl", "awr"), "dmdr.dm_weight",
                       "0 (RL alone) needs dmdr.rl=refl or awr: GRPO here reweights the DMD direction")
        require_config(self.dm_weight == 1 or self.rl_weight > 0, "dmdr.rl_weight",
                       "must be > 0 with dmdr.dm_weight=0 (RL alone), or the run would train nothing but the fake score")
        require_config(self.rl not in GROUPED or self.group_size >= 2, "dmdr.group_size",
                       f"must be >= 2 for {self.rl} (it compares a prompt's samples), got {self.group_size}")
        require_config(self.fake_lora_rank >= 1, "dmdr.fake_lora_rank", f"must be >= 1, got {self.fake_lora_rank}")


@dataclass
class DMDRConfig(DistillConfig):
    algorithm: Literal["dmdr"] = "dmdr"
    dmdr: DMDRSection = field(default_factory=DMDRSection)


CONFIG = DMDRConfig


class _ScaledLoRA(nn.Module):
    """The teacher with the shared LoRA at the scale ``scale()`` returns when it is called:
    the fake score (γ_f) and the real score (γ_r(k)) of DynaDG are two of these."""

    def __init__(self, teacher, lora: LoRA, scale):
        super().__init__()
        self._teacher, self.lora, self.scale = [teacher], lora, scale

    def forward(self, *args):
        self.lora.scale = self.scale()
        return self._teacher[0](*args)

    @property
    def device(self):
        return self._teacher[0].device

    @property
    def dtype(self):
        return self._teacher[0].dtype

    @property
    def config(self):
        return self._teacher[0].config


class DMDR(DecoupledDMD):
    def __init__(self, teacher, cfg: DMDRConfig, latent_shape, empty_caption, reward=None, decode=None,
                 student=None, sampler=None):
        super().__init__(teacher, cfg.distill, latent_shape, empty_caption, sampler)
        self.dmdr, self.reward, self.decode = cfg.dmdr, reward, decode
        self.step = 0
        self._metrics: dict[str, float] = {}
        if student is not None:
            self.student.load_state_dict(student.state_dict())
        # DPO's reference: the student as the run starts, frozen.
        self.reference_student = (copy.deepcopy(self.student).requires_grad_(False).eval()
                                  if cfg.dmdr.rl == "dpo" else None)
        if cfg.dmdr.dynadg:
            base = copy.deepcopy(teacher).requires_grad_(False).eval()
            self.lora = LoRA.create(base, cfg.dmdr.fake_lora_rank)
            self.fake_score = _ScaledLoRA(base, self.lora, lambda: cfg.dmdr.fake_scale)
            self.teacher = _ScaledLoRA(base, self.lora, lambda: dynadg_real_scale(
                self.step, cfg.dmdr.dynadg_steps, cfg.dmdr.real_scale_start))
        rl = self.rl_term()
        self.metric_names = ((("reward/mean",) if cfg.dmdr.reward_tilt or rl != "none" else ())
                             + (("reward/flat_groups",) if rl in GROUPED else ())
                             + (("real_scale",) if cfg.dmdr.dynadg else ())
                             + (("implicit_accuracy",) if rl == "dpo" else ())
                             + (("awr_loss",) if rl == "awr" else ()))

    def rl_term(self) -> str:
        """The RL term in effect: ``dmdr.rl``, or "none" at λ_rl = 0."""
        return self.dmdr.rl if self.dmdr.rl_weight > 0 else "none"

    def modules(self):
        if self.dmdr.dynadg:
            return {"student": self.student, "fake_score": self.lora}
        return super().modules()

    def metrics(self):
        return dict(self._metrics)

    # -- DynaRS -------------------------------------------------------------------------------

    def draw_renoise(self, x, t):
        draws = super().draw_renoise(x, t)
        if self.dmdr.dynars and "dm" in draws:
            tau = time_from_sigma(dynars_sigmas(self.step, self.dmdr.dynars_steps, len(t)))
            draws["dm"] = Renoise(tau.clamp(self.distill.tau_min, self.distill.tau_max), draws["dm"].noise)
        return draws

    def fake_score_loss(self, x, captions):
        if not self.dmdr.dynars:
            return super().fake_score_loss(x, captions)
        sigma = dynars_sigmas(self.step, self.dmdr.dynars_steps, len(x))
        return flow_matching_loss(self.fake_score, x, captions, sigma, cpu_randn(x.shape, device=x.device))

    # -- the step -------------------------------------------------------------------------------

    def training_step(self, batch, step):
        self.step = step
        if self.dmdr.dynadg:
            self._metrics["real_scale"] = dynadg_real_scale(step, self.dmdr.dynadg_steps, self.dmdr.real_scale_start)
        rl = self.rl_term()
        if not (self.dmdr.reward_tilt or rl != "none"):
            return super().training_step(batch, step)
        captions, prompts = list(batch["captions"]), list(batch["prompts"])
        if rl in GROUPED:  # groups of one prompt's samples, consecutive
            captions = [c for c in captions for _ in range(self.dmdr.group_size)]
            prompts = [p for p in prompts for _ in range(self.dmdr.group_size)]
        x, k, sigma, update_student = self.student_prediction(captions, step)
        losses = {"fake_score": self.fake_score_loss(x.detach(), captions)}
        if not update_student:
            return losses
        if self.dmdr.dm_weight == 0:  # RL alone: the control without distribution matching
            if rl == "awr":
                rewards, finished = self._rollout_rewards(x, k, captions, prompts)
                losses["student"] = self.dmdr.rl_weight * self.awr_loss(x, finished, rewards)
            else:
                losses["student"] = -self.dmdr.rl_weight * self._refl_reward(x, prompts)
            return losses
        draws = self.draw_renoise(x, time_from_sigma(sigma))
        weights = {}
        if self.dmdr.reward_tilt or rl in GROUPED:
            rewards, finished = self._rollout_rewards(x, k, captions, prompts)
            if self.dmdr.reward_tilt:
                tilt = torch.exp(rewards / rewards.pow(2).mean().sqrt().clamp_min(1e-8))
                weights["all"] = tilt / tilt.mean()
            if rl == "grpo":
                weights["ca"] = 1 + self.dmdr.rl_weight * group_advantages(rewards, self.dmdr.group_size)
        g = self.weighted_direction(x, captions, draws, weights)
        losses["student"] = generator_loss(x, g)
        if rl == "refl":
            losses["student"] = losses["student"] - self.dmdr.rl_weight * self._refl_reward(x, prompts)
        if rl == "dpo":
            losses["student"] = losses["student"] + self.dmdr.rl_weight * self.dpo_loss(finished, rewards, captions)
        if rl == "awr":
            losses["student"] = losses["student"] + self.dmdr.rl_weight * self.awr_loss(x, finished, rewards)
        return losses

    def _refl_reward(self, x, prompts) -> torch.Tensor:
        """ReFL's objective: the mean reward of the decoded one-step prediction ``x``, with its
        graph (the reward is differentiable)."""
        rewards = score(self.reward, self.decode(x.squeeze(2) if x.ndim == 5 else x), prompts)
        self._metrics["reward/mean"] = rewards.mean().item()
        return rewards.mean()

    def awr_loss(self, x, finished, rewards) -> torch.Tensor:
        """Advantage-weighted regression of the student's prediction ``x`` toward the finished
        rollouts it led to: ``mean_i max(A_i, 0)·mean_elements (x_i − sg(x0_i))²`` with A GRPO's
        group-relative advantage. Zero for a group whose samples all scored the same, and at
        the student's last step, where the prediction is the finished sample."""
        weights = group_advantages(rewards, self.dmdr.group_size).clamp_min(0)
        errors = (x.float() - finished.detach().float()).pow(2).flatten(1).mean(1)
        loss = (weights.to(errors) * errors).mean()
        self._metrics["awr_loss"] = loss.item()
        return loss

    def dpo_loss(self, finished, rewards, captions) -> torch.Tensor:
        """Diffusion-DPO on on-policy pairs at the student's own noise levels (the maintainers'
        advice: offline pairs hurt few-step ability): in each group the best finished sample
        against the worst (ties left out), re-noised with one ε to one σ of the student's
        schedule; errors of the student and of its frozen starting point."""
        n = self.dmdr.group_size
        grouped = rewards.view(-1, n)
        keep = (grouped.max(1).values > grouped.min(1).values).nonzero().flatten()
        if len(keep) == 0:
            return sum(p.sum() for p in self.student.parameters()) * 0.0
        rows = torch.arange(len(grouped))[keep]
        winners = finished.view(-1, n, *finished.shape[1:])[rows, grouped.argmax(1)[keep]]
        losers = finished.view(-1, n, *finished.shape[1:])[rows, grouped.argmin(1)[keep]]
        caps = [captions[int(r) * n] for r in rows]
        j = torch.randint(self.distill.student_steps, (len(rows),))
        pair = NoisedPairs(winners, losers, self.sigmas[j], torch.randn_like(winners))
        e_w, e_l = pair.errors(self.student, caps)
        with torch.no_grad():
            r_w, r_l = pair.errors(self.reference_student, caps)
        loss, accuracy = diffusion_dpo_loss(e_w, e_l, r_w, r_l, self.dmdr.dpo_beta)
        self._metrics["implicit_accuracy"] = accuracy.item()
        return loss

    @torch.no_grad()
    def _rollout_rewards(self, x, k: int, captions, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's finished N-step rollout and its reward: x (the student's prediction at
        step k) re-noised to σ_{k+1} and sampled on to the end, as the exported student would."""
        x = x.detach()
        if k + 1 < self.distill.student_steps:
            rest = self.sigmas[k + 1:]
            z = add_noise(x, cpu_randn(x.shape, device=x.device), rest[0])
            x = backward_simulation(self.student, z, rest, captions, len(rest) - 1)
        rewards = score(self.reward, self.decode(x.squeeze(2) if x.ndim == 5 else x), prompts)
        self._metrics["reward/mean"] = rewards.mean().item()
        if self.rl_term() in GROUPED:
            self._metrics["reward/flat_groups"] = flat_groups(rewards, self.dmdr.group_size)
        return rewards, x

    @torch.no_grad()
    def weighted_direction(self, x, captions, draws, weights: dict[str, torch.Tensor]):
        """:meth:`student_direction` with per-sample weights: ``weights["all"]`` on the whole
        direction (RT-DM), ``weights["ca"]`` on the CA term only (GRPO); absent: 1."""
        if "ca" not in weights:
            g = self.student_direction(x, captions, draws)
        else:
            ca = {"ca": draws["ca"]}
            rest = {k: v for k, v in draws.items() if k != "ca"}
            g_ca = self.student_direction(x, captions, ca)
            g = (self.student_direction(x, captions, rest) if rest else 0) + _per_sample(weights["ca"], x) * g_ca
        if "all" in weights:
            g = _per_sample(weights["all"], x) * g
        return g


def _per_sample(values, like):
    return values.to(like).view(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------


def train(cfg: DMDRConfig) -> Path:
    from ..pipeline import ZImagePipeline
    from ..s3dit import S3DiT

    if not Path(cfg.data.teacher).is_dir():
        raise ZImageKitError(f"data.teacher: no folder {cfg.data.teacher}; point it at the multi-step teacher")
    seed_everything(cfg.run.seed)
    uses_reward = cfg.dmdr.reward_tilt or (cfg.dmdr.rl != "none" and cfg.dmdr.rl_weight > 0)
    reward = load_reward(cfg.dmdr.reward) if uses_reward else None
    if cfg.dmdr.rl == "refl" and uses_reward and not getattr(reward, "differentiable", False):
        raise ZImageKitError(f"dmdr.rl=refl back-propagates through the reward, but {reward_name(reward)} is not "
                             f"differentiable (it sets no differentiable = True); use rl: grpo or another reward")
    pipe = ZImagePipeline.from_pretrained(cfg.data.teacher)
    cfg = resolve(cfg, pipe)
    student = None
    if cfg.dmdr.student is not None:
        folder = Path(cfg.dmdr.student)
        student = S3DiT.from_pretrained(folder / "transformer" if (folder / "transformer").is_dir() else folder)
        if student.config != cfg.model:
            raise ZImageKitError(f"dmdr.student {folder} has another transformer config than the teacher's")
    f = pipe.vae_scale_factor
    latent_shape = (cfg.model.in_channels, 1, cfg.data.height // f, cfg.data.width // f)

    def decode(latents):  # differentiable (ReFL): the VAE's weights are frozen, its graph is kept
        return pipe.decode(latents, "pt")

    def sampler(model, prompts, seeds):
        return as_student_pipeline(model, pipe, cfg)(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                                     progress=False)

    algorithm = DMDR(pipe.transformer, cfg, latent_shape, pipe.encode_prompt([""])[0], reward, decode, student, sampler)
    print(f"DMDR on {cfg.data.teacher}: rl {cfg.dmdr.rl} (weight {cfg.dmdr.rl_weight:g}), reward tilt "
          f"{cfg.dmdr.reward_tilt}, DynaDG {cfg.dmdr.dynadg}, DynaRS {cfg.dmdr.dynars}")
    trainer = Trainer(cfg, algorithm, prompt_source(pipe.encode_prompt, cfg.data, cfg.train.batch_size))
    trainer.fit()
    return trainer.run_dir


def export(run_dir: Path, out: Path, use_ema: bool = True) -> None:
    """The run's student as a few-step Z-Image folder, exactly as Decoupled-DMD exports one."""
    from ..fileio import atomic_folder

    with atomic_folder(out) as tmp:
        student_pipeline(Path(run_dir), use_ema, DMDRConfig).save_pretrained(tmp, torch.bfloat16)
