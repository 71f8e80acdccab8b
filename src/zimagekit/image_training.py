"""Flow-matching training of Z-Image's S3-DiT on an image-caption dataset (``zimagekit train``),
as full fine-tuning, LoRA, or pre-training from scratch, on one process or many, and the
export of a run as a Z-Image folder. The same config file serves every scale
(docs/training.md has the exact commands)::

    zimagekit train --config configs/train-lora.yaml                               # one GPU
    torchrun --standalone --nproc_per_node=8 -m zimagekit train --config configs/train-lora.yaml
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=run1 -m zimagekit train --config configs/train-lora.yaml        # on each node
    zimagekit train export runs/lora/3-sft OUT_FOLDER                              # LoRA merged in

``train.batch_size`` is each process's micro-batch: an update sees ``batch_size x
grad_accum_steps x processes`` samples. The frozen VAE and text encoder of the ``pretrained``
folder encode the dataset once into a cache (:mod:`zimagekit.latent_cache`); captions pass
through ``data.enhancer`` first. ``phases`` run one after another (Z-Image's curriculum:
low-resolution pre-training, arbitrary-resolution "omni" pre-training, SFT), each in its own
run directory and starting from the previous phase's final weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import parallel
from .algorithms.flow_matching import FlowMatching, FlowMatchingConfig, LoRAFlowMatching
from .errors import ZImageKitError
from .parallel import ParallelConfig
from .runconfig import load_config


@dataclass
class DataSection:
    # image folder with .txt captions, folder with metadata.jsonl/.csv, .tar shard(s), or
    # package.module:function making `count` images (zimagekit.datasets)
    path: str = ""
    count: int | None = None  # null: the whole folder; N: its first N items, or N made by a function
    resolution: int = 1024  # aspect buckets keep about resolution² pixels, sides multiples of 16
    max_aspect: float = 2.0  # widest bucket; 1.0: square images only
    max_sequence_length: int = 512  # caption tokens kept, chat template included
    enhancer: str = "none"  # prompt enhancer: none, llm:FOLDER (a local transformers model) or module:Name
    cache_dir: str = "runs/cache"  # encoded latents and caption features, reused while the inputs are unchanged
    seed: int = 0  # order of the batches
    # true: hold every latent and distinct caption on the training device (batches without file
    # reads; for a cache that fits, such as the shapes world's)
    preload: bool = False

    def __post_init__(self):
        if self.count is not None and self.count < 1:
            raise ZImageKitError(f"config key 'data.count' must be >= 1 or null, got {self.count}")
        if self.resolution < 16 or self.resolution % 16:
            raise ZImageKitError(f"config key 'data.resolution' must be a multiple of 16, got {self.resolution}")
        if self.max_aspect < 1:
            raise ZImageKitError(f"config key 'data.max_aspect' must be >= 1, got {self.max_aspect}")


@dataclass
class ComponentsSection:
    """Components taken from other folders instead of ``pretrained``'s (null: its own), as
    diffusers' ``from_pretrained(vae=...)``; ``train export`` copies them into the folder."""

    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None


@dataclass
class LoraSection:
    rank: int = 0  # 0: full fine-tuning; N: train rank-N adapters on every block's linear layers, base frozen
    alpha: float | None = None  # null: alpha = rank

    def __post_init__(self):
        if self.rank < 0:
            raise ZImageKitError(f"config key 'lora.rank' must be >= 0, got {self.rank}")


@dataclass
class Phase:
    """One stage of the curriculum; unset fields keep the top-level values."""

    name: str = "phase"
    steps: int = 1000  # optimizer updates in this phase
    path: str | None = None  # data.path (e.g. the SFT set)
    resolution: int | None = None  # data.resolution
    max_aspect: float | None = None  # data.max_aspect
    enhancer: str | None = None  # data.enhancer
    lr: float | None = None  # optim.lr


@dataclass
class ZImageTrainConfig(FlowMatchingConfig):
    pretrained: str = ""  # a Z-Image folder (Hugging Face layout): its VAE and text encoder encode the data
    # pretrained: fine-tune the folder's transformer; scratch: a fresh S3-DiT shaped by `model`
    init: Literal["pretrained", "scratch"] = "pretrained"
    # dual_stream: the MMDiT-style counterfactual of zimagekit.dual_stream (same embedders,
    # token layout and final layer; model.n_layers dual blocks, no refiners), from scratch. It
    # has no Z-Image folder layout, so it cannot be exported; it is compared from its run.
    architecture: Literal["single_stream", "dual_stream"] = "single_stream"
    components: ComponentsSection = field(default_factory=ComponentsSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    phases: tuple[Phase, ...] = ()  # empty: one run as configured


def phase_configs(cfg: ZImageTrainConfig) -> list[ZImageTrainConfig]:
    """One config per phase, each in its own run directory under the run's."""
    if not cfg.phases:
        return [cfg]
    out = []
    for i, phase in enumerate(cfg.phases):
        data = {k: v for k, v in (("path", phase.path), ("resolution", phase.resolution),
                                  ("max_aspect", phase.max_aspect), ("enhancer", phase.enhancer)) if v is not None}
        out.append(dataclasses.replace(
            cfg, phases=(),
            run=dataclasses.replace(cfg.run, dir=str(Path(cfg.run.dir) / cfg.run.name), name=f"{i + 1}-{phase.name}"),
            train=dataclasses.replace(cfg.train, steps=phase.steps),
            optim=dataclasses.replace(cfg.optim, lr=phase.lr if phase.lr is not None else cfg.optim.lr),
            data=dataclasses.replace(cfg.data, **data)))
    return out


def open_folder(cfg: ZImageTrainConfig):
    """The ``pretrained`` folder with the config's replaced components."""
    from .pipeline import ModelFolder

    if not cfg.pretrained:
        raise ZImageKitError("config key 'pretrained' is empty; point it at a Z-Image folder (its VAE and text "
                             "encoder encode the data)")
    return ModelFolder.open(cfg.pretrained, dataclasses.asdict(cfg.components))


def encoded_data(cfg: ZImageTrainConfig, folder, device):
    """The latent cache of the config's dataset, built first if missing."""
    from .datasets import make_buckets, open_dataset
    from .enhancer import load_enhancer
    from .latent_cache import build_cache, cache_key

    if not cfg.data.path:
        raise ZImageKitError("config key 'data.path' is empty; point it at an image folder, metadata file folder, "
                             "tar shard or module:function")
    dataset = open_dataset(cfg.data.path, cfg.data.count)
    buckets = make_buckets(cfg.data.resolution, folder.image_multiple, cfg.data.max_aspect)
    enhancer = load_enhancer(cfg.data.enhancer, device)
    encoders = [folder.component(n) for n in ("vae", "text_encoder", "tokenizer")]
    key = cache_key(dataset, encoders, buckets, cfg.data.max_sequence_length, enhancer.name)

    cache = build_cache(dataset, Path(cfg.data.cache_dir), key, lambda: _load_encoders(folder, device), enhancer,
                        buckets, cfg.data.max_sequence_length, device)
    if not len(cache):
        raise ZImageKitError(f"dataset {cfg.data.path}: none of its {cache.skipped} image(s) could be read; see the "
                             "warnings above")
    return cache


def _load_encoders(folder, device):
    """The folder's VAE and text encoder (replaced ones where the config says), frozen, fp32."""
    from .autoencoder import AutoencoderKL
    from .pipeline import load_text_encoder

    vae = AutoencoderKL.from_pretrained(folder.component("vae"), device=device)
    return vae.requires_grad_(False), load_text_encoder(folder, torch.float32, device)


def _sampler(folder, device, resolution: int):
    """``sampler(model, prompts, seeds)`` for the trainer's grid: the folder's pipeline (its VAE,
    text encoder, scheduler, steps and guidance) around the model being trained, which is what
    ``export`` will write, at the square training resolution. Loads both encoders once more, so
    it costs their memory for the whole run; it is built only when ``train.sample_every`` asks
    for grids."""
    from .pipeline import ZImagePipeline, read_schedule_config

    vae, text = _load_encoders(folder, device)
    schedule, raw = read_schedule_config(folder.component("scheduler") / "scheduler_config.json")

    def sample(model, prompts, seeds):
        pipe = ZImagePipeline(model, vae, text, schedule, device, scheduler_config=raw, defaults=folder.defaults)
        return [pipe(p, height=resolution, width=resolution, seed=s, progress=False)[0]
                for p, s in zip(prompts, seeds)]

    return sample


def build_transformer(cfg: ZImageTrainConfig, folder, device="cpu"):
    """The run's transformer: the folder's (``init: pretrained``), or a fresh one of the
    config's ``model`` and ``architecture`` whose widths the folder's encoders fit."""
    from .s3dit import S3DiT

    if cfg.architecture == "dual_stream" and cfg.init != "scratch":
        raise ZImageKitError("architecture: dual_stream has no pretrained weights; set init: scratch")
    if cfg.init == "pretrained":
        return S3DiT.from_pretrained(folder.component("transformer"), dtype=torch.float32, device=device)
    te = json.loads((folder.component("text_encoder") / "config.json").read_text())
    vae = json.loads((folder.component("vae") / "config.json").read_text())
    cfg.model.check_encoders(te["hidden_size"], vae["latent_channels"])
    if cfg.architecture == "dual_stream":
        from .dual_stream import DualStreamDiT

        return DualStreamDiT(cfg.model).to(device)
    return S3DiT(cfg.model).to(device)


def train_phase(cfg: ZImageTrainConfig, device, previous: Path | None = None) -> Path:
    """One run of ``cfg`` (already a single phase); ``previous``: the run directory whose
    final raw weights it starts from. Returns the run directory."""
    from .lora import LoRA
    from .trainer import IndexDataSource, Trainer, load_trained, seed_everything

    folder = open_folder(cfg)
    cache = encoded_data(cfg, folder, device)
    if cfg.data.preload:
        cache.preload(device)
    seed_everything(cfg.run.seed)  # the same fresh weights (scratch, LoRA) on every rank
    model = build_transformer(cfg, folder, device)
    lora = LoRA.create(model, cfg.lora.rank, cfg.lora.alpha) if cfg.lora.rank else None
    if lora is None:
        model.requires_grad_(True)
    group, trained = ("lora", lora) if lora is not None else ("transformer", model)
    if previous is not None:
        load_trained(previous, group, trained, use_ema=False)

    rank, world = parallel.rank(), parallel.world_size()
    buckets = cache.bucket_ids()
    sample = cache.batch([i for i, b in enumerate(buckets) if b == buckets[0]][:64], "cpu")  # one bucket
    # forward_flops counts S3-DiT's layout; a dual-stream run logs no MFU.
    tokens = None if cfg.architecture == "dual_stream" else (
        model.config.image_tokens(*sample["latents"].shape[-2:]),
        round(sum(len(c) for c in sample["captions"]) / len(sample["captions"])))
    sampler = _sampler(folder, device, cfg.data.resolution) if cfg.train.sample_every else None
    args = (model, cfg.flow, cache.empty_caption().to(device), sampler)
    kwargs = dict(tokens_per_sample=tokens, data_parallel=(rank, world))
    algorithm = LoRAFlowMatching(lora, *args, **kwargs) if lora is not None else FlowMatching(*args, **kwargs)

    data = IndexDataSource(lambda indices: cache.batch(indices, device), len(cache), cfg.train.batch_size, seed=cfg.data.seed,
                           buckets=buckets, rank=rank, world_size=world)
    trainer = Trainer(cfg, algorithm, data,
                      parallelize=lambda _: parallel.parallelize_s3dit(model, cfg.parallel, cfg.train.precision, lora))
    trainer.fit()
    if lora is not None and parallel.is_main():
        # The adapters people load (diffusers' load_lora_weights, zimagekit generate --lora).
        ema = trainer.emas.get("lora")
        if ema is None:
            lora.save(trainer.run_dir / "lora.safetensors")
        else:
            with ema.swapped_in():
                lora.save(trainer.run_dir / "lora.safetensors")
    return trainer.run_dir


def train(cfg: ZImageTrainConfig) -> Path:
    """Every phase of ``cfg`` in order (a finished phase resumes to its end at once);
    returns the last run directory."""
    device = parallel.init_distributed()
    try:
        previous = None
        for phase_cfg in phase_configs(cfg):
            previous = train_phase(phase_cfg, device, previous)
        # Every rank finished before the group is torn down: rank 0 may still be writing files
        # while another would otherwise destroy the group under it.
        parallel.barrier()
        return previous
    finally:
        parallel.shutdown()


def export(run_dir: Path, out: Path, use_ema: bool = True, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write run ``run_dir`` (one phase's directory) as a Z-Image folder: its transformer (EMA
    weights when the run kept them and ``use_ema``; a LoRA run's adapters merged into the base), stored in ``dtype`` as
    Z-Image's own transformer is, beside byte-for-byte copies of the ``pretrained`` folder's
    other components and ``model_index.json``."""
    from .lora import LoRA
    from .pipeline import save_with_transformer
    from .trainer import load_trained

    if not (Path(run_dir) / "config.yaml").is_file():
        raise ZImageKitError(f"{run_dir}: not a training run (config.yaml is missing); for a run with phases, export "
                             f"a phase's directory, e.g. {Path(run_dir) / '1-...'}")
    cfg = load_config(ZImageTrainConfig, Path(run_dir) / "config.yaml")
    if cfg.architecture != "single_stream":
        raise ZImageKitError(f"{run_dir} trained a {cfg.architecture} model, which has no Z-Image folder layout; "
                             "compare its checkpoints from the run instead")
    folder = open_folder(cfg)
    model = build_transformer(cfg, folder, "cpu")
    if cfg.lora.rank:
        lora = LoRA.create(model, cfg.lora.rank, cfg.lora.alpha)
        load_trained(run_dir, "lora", lora, use_ema and cfg.ema.enabled)
        lora.merge()  # its hooks add nothing once merged; the saved weights are the merged ones
    else:
        load_trained(run_dir, "transformer", model, use_ema and cfg.ema.enabled)
    save_with_transformer(folder, model, out, dtype)
