"""Weight formats of the S3-DiT: Hugging Face (diffusers) names, ComfyUI single files, and
safetensors folders. The model itself only knows its own module tree; everything about
foreign names and files lives here.

* Hugging Face / diffusers names are canonical: ``S3DiT.state_dict()`` produces them and
  ``load_state_dict()`` takes them. The model stores q/k/v and w1/w3 fused, so per-module
  hooks split and join those tensors at the boundary.
* ComfyUI / original single files (``Comfy-Org/z_image_turbo``) are converted to the
  Hugging Face names on load (the mapping of diffusers' single-file converter, spec §3).
* Only safetensors are ever read: no pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ZImageKitError
from .fileio import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DIFFUSERS_CLASS = "ZImageTransformer2DModel"

# ----------------------------------------------------------------------------------------
# Fused internal tensors <-> Hugging Face names
# ----------------------------------------------------------------------------------------

# internal suffix -> Hugging Face suffixes it is the dim-0 concatenation of
FUSED = {
    "attention.qkv.weight": ("attention.to_q.weight", "attention.to_k.weight", "attention.to_v.weight"),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}
RENAMED = {"attention.to_out.weight": "attention.to_out.0.weight"}


def _to_hf(module, state_dict, prefix, local_metadata):
    """state_dict post-hook of a TransformerBlock: present fused tensors under HF names."""
    for internal, parts in FUSED.items():
        key = prefix + internal
        if key in state_dict:
            for name, chunk in zip(parts, state_dict.pop(key).chunk(len(parts), dim=0)):
                state_dict[prefix + name] = chunk
    for internal, hf in RENAMED.items():
        if prefix + internal in state_dict:
            state_dict[prefix + hf] = state_dict.pop(prefix + internal)


def _from_hf(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook of a TransformerBlock: join HF tensors into fused ones."""
    for internal, parts in FUSED.items():
        keys = [prefix + p for p in parts]
        if all(k in state_dict for k in keys):
            state_dict[prefix + internal] = torch.cat([state_dict.pop(k) for k in keys], dim=0)
    for internal, hf in RENAMED.items():
        if prefix + hf in state_dict:
            state_dict[prefix + internal] = state_dict.pop(prefix + hf)


def register_hf_key_hooks(blocks) -> None:
    """Make each of ``blocks`` (S3-DiT transformer blocks, with fused q/k/v and w1/w3) save and
    load under Hugging Face names."""
    for block in blocks:
        block.register_state_dict_post_hook(_to_hf)
        block.register_load_state_dict_pre_hook(_from_hf)


def _summary(label: str, keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"{len(keys)} {label} ({shown})"


def check_state_dict(model: torch.nn.Module, state_dict: dict, strict: bool = True, source: str = "state dict",
                     what: str | None = None) -> None:
    """Raise one :class:`ZImageKitError` naming the missing, unexpected and wrong-shaped
    keys (first few of each, with counts) of a Hugging Face-named state dict; ``what`` names
    the model in the message (default: the S3-DiT and its size)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [f"{k} {given[k]} vs {expected[k]}" for k in expected if k in given and given[k] != expected[k]]
    problems = [_summary("wrong-shaped", wrong)] if wrong else []
    if strict:
        problems = ([_summary("missing", missing)] if missing else []) + ([_summary("unexpected", unexpected)] if unexpected else []) + problems
    if problems:
        raise ZImageKitError(
            f"{source} does not fit {what or f'this S3-DiT ({model.config.dim=}, {model.config.n_layers=})'}: "
            + "; ".join(problems)
            + ". Check that the weights and config.json belong to the same model."
        )


# ----------------------------------------------------------------------------------------
# ComfyUI / original single-file checkpoints
# ----------------------------------------------------------------------------------------

_COMFY_PREFIX = "model.diffusion_model."


def is_comfy_state_dict(state_dict: dict) -> bool:
    return any(k.startswith((_COMFY_PREFIX, "x_embedder.", "final_layer.")) or k.endswith("attention.qkv.weight") for k in state_dict)


def comfy_to_hf(state_dict: dict, patch_key: str = "2-1") -> dict:
    """Rename a ComfyUI / original Z-Image checkpoint to Hugging Face names: strip
    ``model.diffusion_model.``, ``x_embedder``/``final_layer`` -> ``all_*.{patch_key}``,
    ``attention.out`` -> ``attention.to_out.0``, ``q_norm``/``k_norm`` -> ``norm_q``/``norm_k``,
    split the fused ``attention.qkv`` into q, k, v; drop ``norm_final.weight``."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix(_COMFY_PREFIX)
        if key.endswith("norm_final.weight"):
            continue  # the final LayerNorm has no affine weight
        key = re.sub(r"^x_embedder\.", f"all_x_embedder.{patch_key}.", key)
        key = re.sub(r"^final_layer\.", f"all_final_layer.{patch_key}.", key)
        key = key.replace("attention.out.", "attention.to_out.0.")
        key = key.replace("attention.q_norm.", "attention.norm_q.").replace("attention.k_norm.", "attention.norm_k.")
        if key.endswith("attention.qkv.weight"):
            stem = key.removesuffix("qkv.weight")
            for name, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{stem}{name}.weight"] = chunk
            continue
        out[key] = value
    return out


def infer_config(state_dict: dict, config_class):
    """A ``config_class`` (S3DiTConfig) from the tensor shapes of a Hugging Face-named state
    dict (single files carry no config). The RoPE split is only known for the released
    head_dim 128."""
    try:
        dim, patch_dim = state_dict["all_x_embedder.2-1.weight"].shape
        cap_feat_dim = state_dict["cap_embedder.1.weight"].shape[1]
    except KeyError as e:
        raise ZImageKitError(f"cannot infer the model config: key {e} is missing; pass config=") from None
    count = lambda part: len({int(m.group(1)) for k in state_dict if (m := re.match(rf"{part}\.(\d+)\.", k))})
    qk_norm = "layers.0.attention.norm_q.weight" in state_dict
    ref = config_class()
    head_dim = state_dict["layers.0.attention.norm_q.weight"].shape[0] if qk_norm else ref.head_dim
    if head_dim != ref.head_dim:
        raise ZImageKitError(f"head_dim {head_dim} differs from the released model's {ref.head_dim}; pass config= with its axes_dims")
    return config_class(
        in_channels=patch_dim // 4, dim=dim, n_layers=count("layers"), n_refiner_layers=count("noise_refiner"),
        n_heads=dim // head_dim, n_kv_heads=dim // head_dim, qk_norm=qk_norm, cap_feat_dim=cap_feat_dim,
    )


# ----------------------------------------------------------------------------------------
# safetensors files and folders
# ----------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise ZImageKitError(f"{path}: pickle checkpoints are never loaded (unsafe); convert it to .safetensors")
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise ZImageKitError(f"{path}: weights file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ZImageKitError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt, download it again") from None


def read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Weights of a diffusers component folder: sharded (index.json) or a single file."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ZImageKitError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(folder / shard))
        return state
    if (folder / WEIGHTS_NAME).exists():
        return read_safetensors(folder / WEIGHTS_NAME)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return read_safetensors(files[0])
    raise ZImageKitError(f"{folder}: no {WEIGHTS_NAME} (or {INDEX_NAME}) found")


def load_pretrained(cls, path, dtype=None, device=None, config=None):
    """See :meth:`S3DiT.from_pretrained`; ``cls`` is the model class, ``cls.config_class`` its config."""
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_NAME).exists():
            hint = " (this looks like a pipeline folder: pass its transformer/ subfolder)" if (path / "transformer").is_dir() else ""
            raise ZImageKitError(f"{path}: no {CONFIG_NAME}{hint}")
        config = config or cls.config_class.from_json(path / CONFIG_NAME)
        state = read_folder_weights(path)
        source = str(path)
    elif path.exists():
        state = read_safetensors(path)
        source = str(path)
    else:
        raise ZImageKitError(f"{path}: no such file or folder")
    if is_comfy_state_dict(state):
        state = comfy_to_hf(state)
    if config is None:
        config = infer_config(state, cls.config_class)
    if isinstance(config, str):
        config = cls.config_class.preset(config)
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, state, source=source)
    # assign=True adopts the loaded tensors instead of copying into meta placeholders.
    torch.nn.Module.load_state_dict(model, state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def save_pretrained(model, folder, max_shard_size: int = 10 * 2**30) -> None:
    """Write config.json and safetensors weights (sharded with an index above
    ``max_shard_size`` bytes). Each file is written under a temporary name and renamed, so
    an interrupted save never leaves a half-written file under a real name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        # Fused tensors come back as views of one storage; safetensors wants each its own.
        tensors = {k: v.contiguous().clone() for k, v in shard.items()}
        atomic_write(folder / name, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        atomic_write(folder / INDEX_NAME, lambda p: p.write_text(json.dumps(index, indent=2)))
    config = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.42.1", **model.config.to_dict()}
    atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    # Remove weights of an earlier save in the other layout, which loaders would pick up.
    for stale in folder.glob("diffusion_pytorch_model*.safetensors*"):
        if stale.name not in names and not (len(shards) > 1 and stale.name == INDEX_NAME):
            stale.unlink()
