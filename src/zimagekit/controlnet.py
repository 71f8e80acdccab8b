"""The Z-Image ControlNet ("Fun ControlNet Union", diffusers' ``ZImageControlNetModel``), applied
to an S3-DiT from outside: the model file is not touched.

The ControlNet reads the control image's VAE latents (zero-padded to ``control_in_dim``
channels: 16 for v1, 33 for the 2.x releases, whose extra channels carry an inpainting mask
and masked image) through its own patch embedder, runs them beside the transformer's image
and caption streams, and returns one hint per ``control_layers_places`` entry: a residual
added to the output of that main layer, scaled by ``controlnet_conditioning_scale``.

Structure (diffusers' names, so its folders and the released single files load unchanged):

* ``control_all_x_embedder``: control patches → tokens; pads become the transformer's
  ``x_pad_token``.
* ``control_noise_refiner`` (``add_control_noise_refiner`` None, v1): modulated blocks that
  refine the control tokens as the noise refiner refines the image tokens.
* ``control_layers``: blocks over the unified [control image tokens, caption tokens]
  sequence; the first adds ``before_proj(control)`` to the transformer's unified input, each
  emits ``after_proj`` of its output as the hint for its place.
* 2.x (``add_control_noise_refiner`` ``"control_layers"`` or ``"control_noise_refiner"``):
  the control blocks first run over the image tokens alone and their hints are added after
  the matching noise-refiner layers, in the ControlNet's own pass over the noise refiner
  (the transformer's own pass gets no hints, as in diffusers).

The ControlNet shares the transformer's embedders, refiners and RoPE (its own pass runs
them again, as diffusers' does). :func:`controlled_forward` runs the transformer with the
hints added by forward hooks on its main layers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .errors import ZImageKitError
from .s3dit import S3DiT, S3DiTConfig, TransformerBlock
from .weights import check_state_dict, read_folder_weights, read_safetensors, register_hf_key_hooks

MODES = (None, "control_layers", "control_noise_refiner")


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ``ZImageControlNetModel`` config.json fields."""

    control_layers_places: tuple[int, ...] = (0,)
    control_refiner_layers_places: tuple[int, ...] = ()
    control_in_dim: int = 16
    add_control_noise_refiner: str | None = None
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    def __post_init__(self):
        if self.add_control_noise_refiner not in MODES:
            raise ZImageKitError(f"add_control_noise_refiner {self.add_control_noise_refiner!r} is not one of {MODES}")
        if 0 not in self.control_layers_places:
            raise ZImageKitError("control_layers_places must include 0 (the first control block adds to the input)")

    @classmethod
    def from_json(cls, path: Path) -> ControlNetConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ZImageKitError(f"{path}: not a readable config.json ({e})") from None
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        if values.get("control_refiner_layers_places") is None:  # diffusers writes null for "none"
            values["control_refiner_layers_places"] = ()
        try:
            return cls(**values)
        except TypeError as e:
            raise ZImageKitError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def block_config(self) -> S3DiTConfig:
        """The transformer-block shape the control blocks share with the S3-DiT."""
        head = self.dim // self.n_heads  # RoPE comes from the transformer; any valid split will do here
        return S3DiTConfig(dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, norm_eps=self.norm_eps,
                           qk_norm=self.qk_norm, axes_dims=(head,), axes_lens=(1,))


class ControlBlock(TransformerBlock):
    """A modulated block plus ``after_proj`` (its hint) and, first in its stack, ``before_proj``
    (the control tokens' entry, added to the stream they steer)."""

    def __init__(self, cfg: S3DiTConfig, first: bool):
        super().__init__(cfg, modulation=True)
        self.before_proj = nn.Linear(cfg.dim, cfg.dim) if first else None
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)


def _run_stack(blocks, control, stream, rope, mask, c) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Control blocks over ``control`` steering ``stream``: the last state and each block's hint."""
    state, hints = blocks[0].before_proj(control) + stream, []
    for block in blocks:
        state = block(state, rope, mask, c)
        hints.append(block.after_proj(state))
    return state, hints


class ZImageControlNet(nn.Module):
    """See the module docstring. Build with :meth:`from_pretrained`."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        blocks = config.block_config()
        self.control_layers = nn.ModuleList(
            [ControlBlock(blocks, first=i == 0) for i in range(len(config.control_layers_places))])
        self.control_all_x_embedder = nn.ModuleDict({
            f"{p}-{pf}": nn.Linear(pf * p * p * config.control_in_dim, config.dim)
            for p, pf in zip(config.all_patch_size, config.all_f_patch_size)})
        if config.add_control_noise_refiner is None:
            self.control_noise_refiner = nn.ModuleList(
                [TransformerBlock(blocks, modulation=True) for _ in range(config.n_refiner_layers)])
        elif config.add_control_noise_refiner == "control_noise_refiner":
            self.control_noise_refiner = nn.ModuleList(
                [ControlBlock(blocks, first=i == 0) for i in range(config.n_refiner_layers)])
        else:
            self.control_noise_refiner = None
        register_hf_key_hooks(m for m in self.modules() if isinstance(m, TransformerBlock))

    def check_transformer(self, model: S3DiT, source: str = "the ControlNet") -> None:
        cfg, base = self.config, model.config
        if (cfg.dim, cfg.n_heads) != (base.dim, base.n_heads):
            raise ZImageKitError(f"{source} is for a transformer of width {cfg.dim} with {cfg.n_heads} heads, this one "
                                 f"has {base.dim} and {base.n_heads}; use the ControlNet made for this model")
        if max(cfg.control_layers_places) >= base.n_layers or (
                cfg.add_control_noise_refiner and max(cfg.control_refiner_layers_places, default=0) >= base.n_refiner_layers):
            raise ZImageKitError(f"{source} adds hints after layer {max(cfg.control_layers_places)}, but this transformer "
                                 f"has {base.n_layers} layers")

    def hints(self, model: S3DiT, img, cap, c, lay, control: torch.Tensor, scale: float, p: int, pf: int) -> dict:
        """Hints by main-layer index, for the embedded streams of :meth:`S3DiT.embed`; ``control``
        is (B, control_in_dim, F, H, W) latents."""
        cfg, B = self.config, img.shape[0]
        patches = model.patchify(control.to(img.dtype), p, pf).flatten(0, 1)
        rows = torch.cat([self.control_all_x_embedder[f"{p}-{pf}"](patches), model.x_pad_token.to(img.dtype)])
        ctrl = rows[lay.img_gather].view(B, -1, model.config.dim)

        x = img
        if cfg.add_control_noise_refiner is not None:
            stack = self.control_layers if cfg.add_control_noise_refiner == "control_layers" else self.control_noise_refiner
            ctrl, refiner_hints = _run_stack(stack, ctrl, img, lay.img_rope, lay.img_mask, c)
            refiner_hints = {place: refiner_hints[k] * scale for k, place in enumerate(cfg.control_refiner_layers_places)}
        for i, block in enumerate(model.noise_refiner):
            x = block(x, lay.img_rope, lay.img_mask, c)
            if cfg.add_control_noise_refiner is not None and i in refiner_hints:
                x = x + refiner_hints[i]
        for block in model.context_refiner:
            cap = block(cap, lay.cap_rope, lay.cap_mask, None)
        if cfg.add_control_noise_refiner is None:
            for block in self.control_noise_refiner:
                ctrl = block(ctrl, lay.img_rope, lay.img_mask, c)

        def unified(image_stream):
            if lay.uni_gather is None:
                return torch.cat([image_stream, cap], dim=1)
            return torch.cat([image_stream.flatten(0, 1), cap.flatten(0, 1)])[lay.uni_gather].view(B, -1, cfg.dim)

        _, hints = _run_stack(self.control_layers, unified(ctrl), unified(x), lay.uni_rope, lay.uni_mask, c)
        return {place: hint * scale for place, hint in zip(cfg.control_layers_places, hints)}

    # -- weights ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, base: S3DiTConfig | None = None, dtype: torch.dtype | None = None,
                        device=None) -> ZImageControlNet:
        """A diffusers ``ZImageControlNetModel`` folder, or a released single file (the config
        is then read from its keys; ``base``, the transformer's config, gives the spacing of
        the control layers over its main layers: 6 blocks over 30 layers sit at 0, 5, ... 25)."""
        path = Path(path)
        if path.is_dir():
            config = ControlNetConfig.from_json(path / "config.json")
            state = read_folder_weights(path)
        elif path.is_file():
            state = read_safetensors(path)
            config = infer_config(state, base or S3DiTConfig(), str(path))
        else:
            raise ZImageKitError(f"{path}: no such file or folder")
        if config.add_control_noise_refiner == "control_layers":  # 2.0 files carry an unused refiner
            state = {k: v for k, v in state.items() if not k.startswith("control_noise_refiner.")}
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, state, source=str(path), what="this ControlNet config")
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).requires_grad_(False).eval()

    def save_pretrained(self, folder) -> None:
        from safetensors.torch import save_file

        from .fileio import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        atomic_write(folder / "diffusion_pytorch_model.safetensors",
                     lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        config = {"_class_name": "ZImageControlNetModel", "_diffusers_version": "0.42.1", **self.config.to_dict()}
        atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def infer_config(state: dict, base: S3DiTConfig, source: str = "ControlNet") -> ControlNetConfig:
    """A released file's config from its tensors: width and input channels from the patch
    embedder, the number of control blocks, and the variant from the refiner's keys (v1: plain
    blocks; 2.x: control blocks, whose ``before_proj`` is zero in 2.0, where they are unused)."""
    key = next((k for k in state if k.startswith("control_all_x_embedder.") and k.endswith(".weight")), None)
    if key is None:
        raise ZImageKitError(f"{source}: no control_all_x_embedder weight; not a Z-Image ControlNet file")
    dim, patch_dim = state[key].shape
    p, pf = (int(n) for n in key.split(".")[1].split("-"))
    count = len({k.split(".")[1] for k in state if k.startswith("control_layers.")})
    refiners = len({k.split(".")[1] for k in state if k.startswith("control_noise_refiner.")})
    control_in_dim = patch_dim // (p * p * pf)
    if "control_noise_refiner.0.after_proj.weight" not in state and control_in_dim <= base.in_channels:
        mode = None  # v1: plain refiner blocks, latent channels only
    else:  # 2.x: the inpainting channels; 2.0 ships its refiner zeroed (or not at all) and steers with control_layers
        before = state.get("control_noise_refiner.0.before_proj.weight")
        mode = "control_layers" if before is None or not bool(before.any()) else "control_noise_refiner"
        refiners = refiners or base.n_refiner_layers
    spacing = max(base.n_layers // max(count, 1), 1)
    head_dim = base.head_dim
    return ControlNetConfig(
        control_layers_places=tuple(i * spacing for i in range(count)),
        control_refiner_layers_places=tuple(range(refiners)) if mode else (),
        control_in_dim=control_in_dim, add_control_noise_refiner=mode,
        all_patch_size=(p,), all_f_patch_size=(pf,), dim=dim, n_refiner_layers=max(refiners, base.n_refiner_layers),
        n_heads=dim // head_dim, n_kv_heads=dim // head_dim, norm_eps=base.norm_eps, qk_norm=base.qk_norm)


def controlled_forward(model: S3DiT, controlnet: ZImageControlNet, x, t, cap_feats, control: torch.Tensor,
                       scale: float = 1.0):
    """``model(x, t, cap_feats)`` with the ControlNet's hints added after their main layers."""
    p, pf = model.config.all_patch_size[0], model.config.all_f_patch_size[0]
    img, cap, c, lay = model.embed(x, t, cap_feats, p, pf)
    hints = controlnet.hints(model, img, cap, c, lay, control, scale, p, pf)
    handles = [model.layers[i].register_forward_hook(lambda module, inputs, out, h=h: out + h) for i, h in hints.items()]
    try:
        return model.head(model.trunk(img, cap, c, lay), c, lay, torch.is_tensor(x), p, pf)
    finally:
        for handle in handles:
            handle.remove()
