"""Decoupled-DMD distillation of a flow S3-DiT into an N-step student (Liu et al. 2025, Eq. 8 and
Algorithm 1; DMD2, Yin et al. 2024), the step between Z-Image and Z-Image-Turbo (Z-Image §4.5).

Three networks, all S3-DiTs initialised from the teacher: the frozen *real score* (the teacher,
queried with CFG α = 1 + w in Z-Image's ``pos + w·(pos − neg)`` convention), the *student* G,
and the *fake score*, trained online on G's samples with the pre-training flow-matching loss.
With x = G(z_t) and every direction written as a difference of x̂ predictions (a score
difference is a positive multiple of the x̂ difference, and DMD's weighting cancels it):

    Δ_DM = x̂_real^c(x_τDM) − x̂_fake(x_τDM)                       distribution matching
    Δ_CA = (α − 1)·(x̂_real^c(x_τCA) − x̂_real^u(x_τCA))            CFG augmentation
    g    = −(Δ_DM / N_DM + Δ_CA / N_CA),     L_G = ½·mean((x − sg(x − g))²)

Each term is re-noised with its own τ and its own fresh ε. The modes choose the τ ranges (model
time, t = 1 is clean; see ``MODES``): ``hybrid`` (the paper's ④, default) τ_CA ~ U(t, 1) and
τ_DM ~ U(0, 1); ``constrained`` (③) both above t; ``coupled`` is DMD2 (one τ ~ U(0, 1) and
one ε for both, g = (x̂_fake − x̂_real^cfg)/mean|x − x̂_real^cfg|); ``ca_only`` and ``dm_only``
keep one term (§3.1). The fake score gets ``fake_updates_per_student`` updates per student
update (DMD2's two-time-scale rule), and the student trains on inputs from backward
simulation (DMD2's ``sample_backward``), so training and sampling see the same inputs.

Launch (prompts only: the world's training captions through the teacher folder's text
encoder; no images)::

    zimagekit distill --config configs/shapes/distill.yaml [key=value ...]
    zimagekit distill export runs/shapes-distill OUT_FOLDER

All time conventions come from :mod:`zimagekit.sampling` (σ = 1 − t; the S3-DiT gets t).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ZImageKitError
from ..runconfig import load_config, require_config
from ..s3dit import S3DiT, S3DiTConfig
from ..sampling import (
    ScheduleConfig,
    add_noise,
    cfg_combine,
    cpu_randn,
    get_sigmas,
    sample_euler,
    sigma_from_time,
    time_from_sigma,
    velocity,
    x0_from_velocity,
)
from ..fileio import atomic_folder
from .prompt_data import PromptData, prompt_source
from ..trainer import Algorithm, TrainConfig, Trainer, load_trained, seed_everything
from .flow_matching import Sampler

# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

Mode = Literal["hybrid", "coupled", "ca_only", "dm_only", "constrained"]

# The re-noise draws each mode makes, by term, and whether that draw's τ is restricted to
# levels cleaner than the student's input level t (τ ~ U(t, 1), True) or spans the whole
# range (τ ~ U(0, 1), False). "shared" is DMD2's single draw that serves both terms.
MODES: dict[str, dict[str, bool]] = {
    "hybrid": {"dm": False, "ca": True},  # Decoupled-DMD ④ (Eq. 8, Algorithm 1)
    "coupled": {"shared": False},  # DMD2 (Table 1 ①)
    "ca_only": {"ca": True},  # §3.1: fast, then saturates and collapses
    "dm_only": {"dm": False},  # §3.1: the real score without CFG; slow
    "constrained": {"dm": True, "ca": True},  # Table 1 ③: DM cannot see noisy levels
}


@dataclass
class DistillSection:
    """The algorithm's knobs. Where the papers are silent (spec §2 "Not given") the choice is
    written next to the field."""

    mode: Mode = "hybrid"
    # N, the student's transformer calls per image. 8 is Z-Image-Turbo's; DMD2 uses 4.
    student_steps: int = 8
    # The student's σ schedule, get_sigmas(N, schedule): shift(linspace(1, 1/N, N)). null: the
    # teacher folder's scheduler (what the teacher samples with); shift 1 with N = 4 gives
    # DMD2's {999, 749, 499, 249}/1000.
    schedule: ScheduleConfig | None = None
    # w of the real score's CFG, pos + w·(pos − neg), so α = 1 + w. Sample the teacher with
    # the same w when comparing it with the student (spec §6 pitfalls).
    guidance_scale: float = 3.0
    # TTUR: the student updates on every K-th trainer step, the fake score on every step.
    # DMD2 uses 5 (ImageNet, SDXL) or 10 (SD1.5); the Decoupled-DMD paper gives no number.
    fake_updates_per_student: int = 5
    # Every re-noise level τ (model time) is drawn inside [tau_min, tau_max]: DMD2's clipping
    # of its DM timesteps to [0.02, 0.98]·T, applied to both terms here. Near τ = 1 every x̂
    # is x itself, so the terms and the normaliser mean|x − x̂_real| all go to 0 and their
    # ratio is noise; near τ = 0 every x̂ is close to the data mean and says nothing about x.
    # τ_CA ~ U(t, 1) becomes U(max(t, tau_min), tau_max).
    tau_min: float = 0.02
    tau_max: float = 0.98
    # The per-sample normaliser of each term (not specified for the decoupled case):
    #   "cfg":    mean|x − x̂_real^cfg| at that term's own τ (the spec's proposal). With
    #             τ_CA = τ_DM and one ε, hybrid is then exactly DMD2's update.
    #   "branch": each term by its own real target: DM by mean|x − x̂_real^c| (no
    #             unconditional teacher call at τ_DM), CA by mean|x − x̂_real^cfg|. Equal to
    #             "cfg" when w = 0.
    normalizer: Literal["cfg", "branch"] = "cfg"

    def __post_init__(self):
        require_config(self.student_steps >= 1, "distill.student_steps", f"must be >= 1, got {self.student_steps}")
        require_config(self.guidance_scale >= 0, "distill.guidance_scale",
                 f"must be >= 0 (α = 1 + w), got {self.guidance_scale}")
        require_config(self.fake_updates_per_student >= 1, "distill.fake_updates_per_student",
                 f"must be >= 1, got {self.fake_updates_per_student}")
        require_config(0 <= self.tau_min < self.tau_max <= 1, "distill.tau_min",
                 f"and distill.tau_max must satisfy 0 <= tau_min < tau_max <= 1, got {self.tau_min}, {self.tau_max}")
        require_config(self.mode != "ca_only" or self.guidance_scale > 0, "distill.guidance_scale",
                 "is 0, so mode ca_only has no gradient (Δ_CA = w·(...)); set guidance_scale > 0")


@dataclass
class DistillData(PromptData):
    """The teacher folder, and the prompts (see :class:`PromptData`) the student is distilled on."""

    teacher: str = "src/zimagekit/models/shapes-teacher"


@dataclass
class DistillConfig(TrainConfig):
    """``train.steps`` counts trainer updates, i.e. fake-score updates; the student gets
    ``train.steps // distill.fake_updates_per_student`` of them."""

    # The student's architecture is the teacher's; null reads it from the teacher folder, and
    # the run's saved config.yaml records it (export builds the student from it).
    model: S3DiTConfig | None = None
    distill: DistillSection = field(default_factory=DistillSection)
    data: DistillData = field(default_factory=DistillData)


# ----------------------------------------------------------------------------------------
# The maths: x̂ predictions, losses, backward simulation
# ----------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped to broadcast against a (B, ...) batch, on its device and dtype."""
    return values.to(like).view(-1, *([1] * (like.ndim - 1)))


def denoise(model, x: torch.Tensor, sigma: torch.Tensor, captions) -> torch.Tensor:
    """x̂0 of ``model`` at x_σ, in fp32: the S3-DiT takes t = 1 − σ and predicts v = x0 − ε,
    and x̂0 = x_σ + σ·v. ``sigma`` is (B,)."""
    v = model(x, time_from_sigma(sigma), captions)
    return x0_from_velocity(x.float(), v.float(), _per_sample(sigma, x))


def flow_matching_loss(model, x0: torch.Tensor, captions, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The pre-training loss of :class:`~zimagekit.algorithms.flow_matching.FlowMatching` at
    given noise levels σ (B,) and noise ε: mean ‖model(x_σ, 1 − σ, c) − (x0 − ε)‖² over every
    element (PAPER eq. 1). The fake score trains with exactly this (DMDR: velocity MSE)."""
    x_t = add_noise(x0, noise, _per_sample(sigma, x0))
    pred = model(x_t, time_from_sigma(sigma), captions)
    return F.mse_loss(pred.float(), velocity(x0, noise).float())


def generator_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """DMD's proxy L_G = ½·mean((x − sg(x − g))²). Its gradient in x is g / x.numel(), so the
    student sees the direction g without a backward pass through any score network."""
    return 0.5 * F.mse_loss(x, (x - g).detach())


def _dmd_scale(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample normaliser mean_CHW |x − x̂_real| (DMD2 sd_guidance.py)."""
    return (x - real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def backward_simulation(model, noise: torch.Tensor, sigmas: torch.Tensor, captions, steps: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The latent at ``sigmas[steps]`` that the N-step student sampler reaches from ``noise`` (at
    sigmas[0] = 1): the first ``steps`` steps of :func:`~zimagekit.sampling.sample_euler` with
    fresh noise (predict x̂, re-noise it to the next level: DMD2's ``sample_backward``, and what
    the exported student samples with). ``steps = 0`` is the noise itself; ``steps = N`` is the
    finished sample, because re-noising to σ = 0 returns x̂ exactly. Fresh noise comes from
    ``generator`` (default: torch's global RNG)."""

    def velocity_of(x, sigma, i):
        return model(x, time_from_sigma(sigma).expand(len(x)), captions).float()

    return sample_euler(velocity_of, noise, sigmas[: steps + 1],
                        fresh_noise=lambda i: cpu_randn(noise.shape, generator, noise.device))


@dataclass
class Renoise:
    """One re-noising of the student's x: model time τ (B,) (t = 1 − σ, 1 is clean) and its
    own fresh noise ε."""

    tau: torch.Tensor
    noise: torch.Tensor

    def apply(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_τ, σ) with x_τ = τ·x + (1 − τ)·ε."""
        sigma = sigma_from_time(self.tau)
        return add_noise(x, self.noise, _per_sample(sigma, x)), sigma


# ----------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------


class DecoupledDMD(Algorithm):
    """Trains ``student`` and ``fake_score``, both copies of ``teacher``, which stays frozen
    and outside :meth:`modules`. ``distill.schedule`` must be set (the command fills in the
    teacher's). ``latent_shape`` is one latent's (C, F, H, W); ``empty_caption`` the
    (L, cap_feat_dim) feature of the empty prompt, the unconditional input of CFG exactly as
    the pipeline uses it. ``sampler(model, prompts, seeds)`` draws the sample grid.

    A batch is ``{"captions": list of (L_i, cap_feat_dim)}``: prompts only, no images.
    """

    ema_groups = ("student",)  # the fake score's EMA would never be used

    def __init__(self, teacher: S3DiT, distill: DistillSection, latent_shape: tuple[int, int, int, int],
                 empty_caption: torch.Tensor, sampler: Sampler | None = None):
        if distill.schedule is None:
            raise ValueError("DecoupledDMD needs distill.schedule; resolve it from the teacher first")
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = copy.deepcopy(teacher).requires_grad_(True).train()
        self.fake_score = copy.deepcopy(teacher).requires_grad_(True).train()
        self.distill = distill
        self.latent_shape = tuple(latent_shape)
        self.empty_caption = empty_caption
        self.sampler = sampler
        _, frames, h, w = self.latent_shape
        self.sigmas = get_sigmas(distill.student_steps, distill.schedule, teacher.config.image_tokens(h, w, frames))
        # τ_CA ~ U(max(t, tau_min), tau_max) must be a real interval at every student step.
        cleanest = float(time_from_sigma(self.sigmas[-2]))
        if any(MODES[distill.mode].values()) and cleanest >= distill.tau_max:
            raise ZImageKitError(f"the student's last step is at t = {cleanest:.3f}, so mode {distill.mode} "
                                 f"has no τ in (t, distill.tau_max={distill.tau_max}]; raise tau_max, use fewer "
                                 f"student_steps or a larger schedule shift")

    def modules(self):
        return {"student": self.student, "fake_score": self.fake_score}

    # -- one step ---------------------------------------------------------------------------

    def training_step(self, batch, step):
        captions = list(batch["captions"])
        x, k, sigma, update_student = self.student_prediction(captions, step)
        losses = {"fake_score": self.fake_score_loss(x.detach(), captions)}
        if update_student:
            g = self.student_direction(x, captions, self.draw_renoise(x, time_from_sigma(sigma)))
            losses["student"] = generator_loss(x, g)
        return losses

    def student_prediction(self, captions, step: int):
        """``(x, k, σ_k, update_student)``: the student's x̂ at step k of its own rollout, with
        grad only on the steps the student updates. Backward simulation (DMD2 sample_backward):
        one k per batch, uniform over the N steps; the student trains on what its own k-step
        rollout gives at σ_k."""
        k = int(torch.randint(self.distill.student_steps, ()))
        noise = cpu_randn((len(captions), *self.latent_shape), device=self.teacher.device)
        z = backward_simulation(self.student, noise, self.sigmas, captions, k)
        sigma = self.sigmas[k].expand(len(captions))
        # TTUR: trainer steps count from 1, so the student's m-th update is step m·K.
        update_student = step % self.distill.fake_updates_per_student == 0
        with torch.set_grad_enabled(update_student):
            x = denoise(self.student, z, sigma, captions)
        return x, k, sigma, update_student

    def fake_score_loss(self, x: torch.Tensor, captions) -> torch.Tensor:
        """The fake score's update on the student's (detached) samples: the pre-training loss
        at τ' ~ U(0, 1) (Algorithm 1; DMD2 draws its fake timestep uniformly too), the range
        it is queried on. Conditional only: it is never asked for an unconditional x̂ (CFG
        α_fake = 1, as DMD2 asserts), so it gets no caption dropout."""
        sigma = sigma_from_time(torch.rand(len(x)))
        return flow_matching_loss(self.fake_score, x, captions, sigma, cpu_randn(x.shape, device=x.device))

    def draw_renoise(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, Renoise]:
        """This mode's re-noise draws (see ``MODES``) for student samples ``x`` taken at model
        time ``t`` (B,): each term its own τ and its own ε (Eq. 8: independent re-noising)."""
        lo, hi = self.distill.tau_min, self.distill.tau_max
        draws = {}
        for term, above_t in MODES[self.distill.mode].items():
            low = t.clamp(min=lo) if above_t else torch.full_like(t, lo)
            draws[term] = Renoise(low + (hi - low) * torch.rand(len(t)), cpu_randn(x.shape, device=x.device))
        return draws

    @torch.no_grad()
    def student_direction(self, x: torch.Tensor, captions, draws: dict[str, Renoise]) -> torch.Tensor:
        """g of the update (spec §2, "Update equations"); the student moves along −g, toward
        the real score's x̂ and away from the fake's. Only frozen outputs under no_grad enter,
        so the student loss cannot reach the teacher or the fake score."""
        x = x.detach().float()
        w = self.distill.guidance_scale  # α − 1
        if "shared" in draws:  # DMD2 compute_distribution_matching_loss, verbatim
            x_tau, sigma = draws["shared"].apply(x)
            real = cfg_combine(*self._real(x_tau, sigma, captions), w)
            return (denoise(self.fake_score, x_tau, sigma, captions) - real) / _dmd_scale(x, real)
        g = torch.zeros_like(x)
        if "dm" in draws:
            x_tau, sigma = draws["dm"].apply(x)
            fake = denoise(self.fake_score, x_tau, sigma, captions)
            if self.distill.normalizer == "cfg":
                cond, uncond = self._real(x_tau, sigma, captions)
                scale = _dmd_scale(x, cfg_combine(cond, uncond, w))
            else:
                cond = denoise(self.teacher, x_tau, sigma, captions)
                scale = _dmd_scale(x, cond)
            g = g - (cond - fake) / scale
        if "ca" in draws:
            x_tau, sigma = draws["ca"].apply(x)
            cond, uncond = self._real(x_tau, sigma, captions)
            g = g - w * (cond - uncond) / _dmd_scale(x, cfg_combine(cond, uncond, w))
        return g

    def _real(self, x_tau: torch.Tensor, sigma: torch.Tensor, captions) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's conditional and unconditional x̂ at x_τ, in one batch as the pipeline
        runs CFG; unconditional = the empty prompt's features."""
        both = denoise(self.teacher, torch.cat([x_tau, x_tau]), torch.cat([sigma, sigma]),
                       list(captions) + [self.empty_caption] * len(x_tau))
        return both.chunk(2)

    def sample(self, prompts, seeds):
        if self.sampler is None:
            return super().sample(prompts, seeds)
        return self.sampler(self.student, prompts, seeds)


# ----------------------------------------------------------------------------------------
# Few-step sampling
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def as_student_pipeline(student: S3DiT, teacher_pipe, cfg: DistillConfig):
    """``student`` in a pipeline with the teacher's text encoder and VAE, whose schedule is the
    student's and whose defaults are N steps, guidance 0 (the student has CFG distilled in),
    sampled stochastically like backward simulation (x̂ re-noised with fresh noise at each
    step, the noise drawn from each image's own generator): the one place a student is
    sampled, by the training grid, evaluation and :func:`export` alike."""
    from ..pipeline import ZImagePipeline

    defaults = {"num_inference_steps": cfg.distill.student_steps, "guidance_scale": 0.0,
                "height": cfg.data.height, "width": cfg.data.width}
    schedule = replace(cfg.distill.schedule, stochastic_sampling=True)
    return ZImagePipeline(student, teacher_pipe.vae, teacher_pipe.text_encoder, schedule, defaults=defaults)


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------


def resolve(cfg: DistillConfig, pipe) -> DistillConfig:
    """``cfg`` with every "take the teacher's" null filled in from the teacher ``pipe``, so the
    run's saved config names the exact model, schedule and image size."""
    from ..request import check_image_size

    teacher = pipe.transformer.config
    if cfg.model is not None and cfg.model != teacher:
        raise ZImageKitError(f"config 'model' differs from the teacher's transformer config in {cfg.data.teacher}; "
                             f"set model: null (the student is a copy of the teacher)")
    data = replace(cfg.data, height=cfg.data.height or pipe.defaults["height"],
                   width=cfg.data.width or pipe.defaults["width"])
    check_image_size(data.width, data.height, pipe.image_multiple)
    distill = replace(cfg.distill, schedule=cfg.distill.schedule or pipe.schedule)
    return replace(cfg, model=teacher, distill=distill, data=data)


def train(cfg: DistillConfig) -> Path:
    from ..pipeline import ZImagePipeline

    if not Path(cfg.data.teacher).is_dir():
        raise ZImageKitError(f"data.teacher: no folder {cfg.data.teacher}; export a teacher there first "
                             f"(zimagekit train export RUN_DIR {cfg.data.teacher})")
    seed_everything(cfg.run.seed)
    pipe = ZImagePipeline.from_pretrained(cfg.data.teacher)
    cfg = resolve(cfg, pipe)
    f = pipe.vae_scale_factor
    latent_shape = (cfg.model.in_channels, 1, cfg.data.height // f, cfg.data.width // f)

    def sampler(model, prompts, seeds):
        return as_student_pipeline(model, pipe, cfg)(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                                     progress=False)

    algorithm = DecoupledDMD(pipe.transformer, cfg.distill, latent_shape, pipe.encode_prompt([""])[0], sampler)
    trainer = Trainer(cfg, algorithm, prompt_source(pipe.encode_prompt, cfg.data, cfg.train.batch_size))
    trainer.fit()
    return trainer.run_dir


def student_pipeline(run_dir: Path, use_ema: bool = True, config_cls: type[DistillConfig] = DistillConfig):
    """The run's latest student (EMA weights by default) as :func:`as_student_pipeline` samples
    it: what :func:`export` writes, and what evaluation samples each checkpoint with.
    ``config_cls``: the run's config class (DMDR's extends this module's)."""
    from ..pipeline import ZImagePipeline

    if not (run_dir / "config.yaml").is_file():
        raise ZImageKitError(f"{run_dir}: not a distillation run (config.yaml is missing)")
    cfg = load_config(config_cls, run_dir / "config.yaml")
    student = S3DiT(cfg.model).requires_grad_(False).eval()
    load_trained(run_dir, "student", student, use_ema)
    return as_student_pipeline(student, ZImagePipeline.from_pretrained(cfg.data.teacher), cfg)


def export(run_dir: Path, out: Path, use_ema: bool = True) -> None:
    """Write :func:`student_pipeline` as a Z-Image folder, the transformer and VAE stored in bf16
    (``zimagekit train export`` stores a teacher's transformer so too): the shipped models' 60 MB
    budget holds two bf16 transformers, not an fp32 one beside the teacher."""
    with atomic_folder(out) as tmp:
        student_pipeline(run_dir, use_ema).save_pretrained(tmp, torch.bfloat16)
