"""Quantized transformers: our torch dequantization equals the gguf package's reference on every
block layout; a tiny S3-DiT written to GGUF loads, stays quantized in memory, equals its
dequantized float twin and diffusers' own GGUF loading of the same file, and stays within a
stated distance of the unquantized model; fp8 weight-only likewise; bad files get one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # a test extra; pyproject's [test] installs it
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFWriter, quants  # noqa: E402

from s3dit_oracle import max_rel_err, mixed_outputs  # noqa: E402
from zimagekit.errors import ZImageKitError  # noqa: E402
from zimagekit.quantized import BLOCKS, QuantizedLinear, dequantize, quantize_fp8, stored_bytes  # noqa: E402
from zimagekit.s3dit import S3DiT, S3DiTConfig  # noqa: E402

# dim 256 so the K-quants' 256-weight super-blocks fit every row of width dim; the FFN's
# inner width (682) fits no block, so w2 stays F16, as quantizers do with such rows.
CFG = S3DiTConfig(dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                  axes_dims=(32, 48, 48), axes_lens=(256, 64, 64))
# Relative error of the model's output against the unquantized model (mixed_outputs' batch),
# per type: the documented tolerance (README, "Quantized weights"), with headroom over what
# these tests measure.
# Measured 2026-12-04: Q8_0 0.010, Q5_K 0.071, Q4_K 0.134, Q4_0 0.169 (K-quants from the simple
# quantizer below; llama.cpp's searches its grids and does better), fp8 0.037, fp8 with fp8
# matmuls 0.043 (2026-12-05).
TOLERANCE = {"Q8_0": 0.02, "Q5_K": 0.1, "Q4_K": 0.2, "Q4_0": 0.25, "fp8": 0.06, "fp8-matmul": 0.1}


def random_blocks(kind: str, n: int, seed: int = 0, d_max: float = 2e-2) -> np.ndarray:
    """Valid blocks of ``kind``: random bits with the fp16 scale fields set to small positive
    numbers up to ``d_max`` (random bits there would be NaN or huge)."""
    rng = np.random.default_rng(seed)
    _, size = BLOCKS[kind]
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    half = lambda: rng.uniform(d_max / 20, d_max, (n, 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if kind in ("Q8_0", "Q4_0"):
        blocks[:, :2] = half()
    elif kind in ("Q4_K", "Q5_K"):
        blocks[:, 0:2], blocks[:, 2:4] = half(), half()
    else:  # Q6_K: d is last
        blocks[:, -2:] = half()
    return blocks


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_dequantization_equals_the_gguf_reference(kind):
    n, _ = BLOCKS[kind]
    blocks = random_blocks(kind, 64)
    rows = blocks.reshape(8, -1)  # 8 rows of 8 blocks
    expected = quants.dequantize(rows, getattr(T, kind))
    got = dequantize(torch.from_numpy(rows), kind, (8, 8 * n))
    assert torch.equal(got, torch.from_numpy(expected.astype(np.float32)))


# -- a simple K-quant quantizer (the gguf package has none), enough for the tolerance test ---------


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block into the 12-byte layout."""
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def quantize_k(w: np.ndarray, kind: str) -> np.ndarray:
    """Q4_K / Q5_K blocks of ``w`` (rows a multiple of 256): per 32-weight sub-block an
    affine grid from its minimum (clipped at 0) to its maximum."""
    levels = 15 if kind == "Q4_K" else 31
    x = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0)
    step = (x.max(-1) - lo) / levels
    d, dmin = step.max(-1, keepdims=True) / 63, (-lo).max(-1, keepdims=True) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(step / np.where(d == 0, 1, d)), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / np.where(dmin == 0, 1, dmin)), 0, 63).astype(np.uint8)
    q = np.clip(np.round((x + (dmin * mn)[..., None]) / (d * sc)[..., None]), 0, levels).astype(np.uint8)
    head = [d.astype(np.float16).view(np.uint8), dmin.astype(np.float16).view(np.uint8), _pack_k_scales(sc, mn)]
    if kind == "Q5_K":
        high = (q >> 4) & 1  # (n, 8, 32): bit j of byte i = high bit of weight i of sub-block j
        head.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8))
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    head.append((low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128))
    return np.concatenate(head, axis=1).reshape(w.shape[0], -1)


def quantize(a: np.ndarray, kind: str) -> np.ndarray:
    return quantize_k(a, kind) if kind in ("Q4_K", "Q5_K") else quants.quantize(a, getattr(T, kind))


def write_gguf(path, state: dict, kind: str, layout: str = "comfy", random_k: bool = False, only=lambda key: True) -> None:
    """``state`` (Hugging Face names) as a GGUF file in ComfyUI's layout (fused qkv, original
    names) or diffusers'; every 2-D ``.weight`` whose rows fit ``kind``'s blocks is quantized."""
    from zimagekit.weights import FUSED

    if layout == "comfy":
        renamed = {}
        for key, value in state.items():
            if key.endswith("attention.to_k.weight") or key.endswith("attention.to_v.weight"):
                continue
            if key.endswith("attention.to_q.weight"):
                stem = key.removesuffix("to_q.weight")
                key, value = stem + "qkv.weight", torch.cat([state[stem + f"to_{p}.weight"] for p in "qkv"])
            key = key.replace("attention.to_out.0.", "attention.out.").replace("attention.norm_q.", "attention.q_norm.")
            key = key.replace("attention.norm_k.", "attention.k_norm.")
            key = key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
            renamed["model.diffusion_model." + key] = value
        state = renamed
    assert FUSED  # the layouts above are the ones weights.py maps
    writer = GGUFWriter(str(path), "zimage")
    n, _ = BLOCKS[kind]
    for key, value in state.items():
        a = value.float().numpy()
        if key.endswith(".weight") and a.ndim == 2 and a.shape[1] % n == 0 and only(key):  # weights, not pad tokens
            # random blocks: weights of about ±0.05, so the network's outputs stay moderate
            data = (random_blocks(kind, a.size // n, seed=len(key), d_max=4e-5).reshape(a.shape[0], -1) if random_k
                    else quantize(a, kind))
            writer.add_tensor(key, data, raw_dtype=getattr(T, kind))
        else:
            writer.add_tensor(key, a.astype(np.float16) if a.ndim == 2 else a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def float_twin(path) -> S3DiT:
    """The GGUF file dequantized by the gguf package into an ordinary float model."""
    from gguf import GGUFReader

    from zimagekit.weights import comfy_to_hf

    state = {}
    for t in GGUFReader(str(path)).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        state[t.name] = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape)
    model = S3DiT(CFG)
    model.load_state_dict(comfy_to_hf(state))
    return model.eval()


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = S3DiT(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_K", "Q4_K", "Q4_0"])
def test_gguf_model_stays_quantized_and_is_close_to_the_float_model(tmp_path, base, kind):
    path = tmp_path / f"m-{kind}.gguf"
    write_gguf(path, base.state_dict(), kind)
    model = S3DiT.from_pretrained(path, dtype=torch.float32).eval()
    assert isinstance(model.layers[0].attention.qkv, QuantizedLinear)
    assert isinstance(model.layers[0].feed_forward.w13, QuantizedLinear)  # w1/w3 joined in their format
    assert not isinstance(model.layers[0].feed_forward.w2, QuantizedLinear)  # 682-wide rows: F16
    assert stored_bytes(model) < 0.5 * stored_bytes(base)
    # exactly the gguf package's dequantization, then the model's arithmetic
    assert max_rel_err(mixed_outputs(model, CFG), mixed_outputs(float_twin(path), CFG)) <= 1e-5
    assert max_rel_err(mixed_outputs(model, CFG), mixed_outputs(base, CFG)) <= TOLERANCE[kind]


@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K"])
def test_gguf_in_diffusers_names_loads_and_agrees_with_diffusers_gguf_loading(tmp_path, base, kind):
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    path = tmp_path / f"m-{kind}.gguf"
    write_gguf(path, base.state_dict(), kind, layout="diffusers", random_k=True)  # every bit pattern
    ours = S3DiT.from_pretrained(path, dtype=torch.float32).eval()
    base.save_pretrained(tmp_path / "config")  # diffusers reads config.json from here
    reference = ZImageTransformer2DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(tmp_path / "config"), local_files_only=True).eval()
    # Ours equals the gguf package's dequantization exactly (test above); diffusers' K-quant
    # dequantization rounds its scales through fp16 (5e-4 relative on Q6_K weights), hence 2e-3.
    assert max_rel_err(mixed_outputs(ours, CFG), mixed_outputs(reference, CFG)) <= 2e-3


def test_fp8_weight_only_is_close_and_survives_a_dtype_cast(base):
    import copy

    model = quantize_fp8(copy.deepcopy(base))
    layer = model.layers[0].attention.qkv
    assert isinstance(layer, QuantizedLinear) and layer.data.dtype == torch.float8_e4m3fn
    assert max_rel_err(mixed_outputs(model, CFG), mixed_outputs(base, CFG)) <= TOLERANCE["fp8"]
    model.to(torch.bfloat16)
    assert layer.data.dtype == torch.float8_e4m3fn and layer.bias is None
    with pytest.raises(ZImageKitError, match="holds quantized layers"):
        model.save_pretrained("/nonexistent/never-written")
    assert stored_bytes(model) < 0.6 * stored_bytes(base) / 2  # below half of bf16


def test_fp8_matmul_is_the_closed_form_of_two_rowwise_scaled_e4m3_matrices(base):
    """y = (s_x x8)(s_w w8)ᵀ + b, with x8 and s_x the input's rows scaled to e4m3 by their
    absmax / 448: computed here in float64 from the same e4m3 values."""
    import copy

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([torch.nn.Module()])
    holder.layers[0].proj = linear
    layer = quantize_fp8(holder, matmul=True).layers[0].proj
    x = torch.randn(3, 5, 64) * torch.logspace(-2, 2, 64)  # columns of very different sizes
    rows = x.reshape(-1, 64).double()
    s_x = rows.abs().amax(dim=1, keepdim=True) / 448
    x8 = (rows.float() / s_x.float()).to(torch.float8_e4m3fn).double()
    expected = (x8 * s_x) @ (layer.data.double() * layer.scale.double()).T + linear.bias.double()
    got = layer(x)
    assert got.shape == (3, 5, 48)
    torch.testing.assert_close(got.reshape(-1, 48).double(), expected, rtol=1e-5, atol=1e-5)

    model = quantize_fp8(copy.deepcopy(base), matmul=True)
    err = max_rel_err(mixed_outputs(model, CFG), mixed_outputs(base, CFG))
    assert err <= TOLERANCE["fp8-matmul"]
    assert err > max_rel_err(mixed_outputs(quantize_fp8(copy.deepcopy(base)), CFG), mixed_outputs(base, CFG))


def test_bad_gguf_files_are_one_line(tmp_path, base):
    path = tmp_path / "m.gguf"
    write_gguf(path, base.state_dict(), "Q8_0")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ZImageKitError, match="not a readable GGUF file .*truncated") as error:
        S3DiT.from_pretrained(path)
    assert "\n" not in str(error.value)
    writer = GGUFWriter(str(tmp_path / "iq.gguf"), "zimage")
    writer.add_tensor("layers.0.attention.qkv.weight", np.zeros((4, 66), np.uint8), raw_dtype=T.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ZImageKitError, match="stored as IQ2_XXS, which zimagekit cannot dequantize"):
        S3DiT.from_pretrained(tmp_path / "iq.gguf")
    small = S3DiTConfig(dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                        axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
    write_gguf(tmp_path / "other.gguf", S3DiT(small).state_dict(), "Q8_0")
    with pytest.raises(ZImageKitError, match="does not fit this S3-DiT"):
        S3DiT.from_pretrained(tmp_path / "other.gguf", config=CFG)


def test_generate_with_a_gguf_transformer_fp8_and_a_lora(tiny_model_dir, tmp_path, capsys):
    """The command line swaps in a GGUF transformer (same images as the pipeline given the same
    file), keeps a LoRA on its quantized layers as hooks, and runs fp8."""
    from PIL import Image

    from zimagekit.cli import main
    from zimagekit.lora import LoRA
    from zimagekit.pipeline import ZImagePipeline

    dense = S3DiT.from_pretrained(tiny_model_dir / "transformer")
    write_gguf(tmp_path / "t.gguf", dense.state_dict(), "Q8_0")
    lora = LoRA.create(dense, rank=2)
    with torch.no_grad():
        for p in lora.B.values():
            p.normal_(0, 0.3)
    lora.save(tmp_path / "l.safetensors")
    out = tmp_path / "g.png"
    common = ["generate", "a cat", "--model", str(tiny_model_dir), "-s", "3", "--dtype", "fp32", "--no-progress",
              "-W", "96", "-H", "64", "--steps", "3"]
    assert main([*common, "--transformer", str(tmp_path / "t.gguf"), "--lora", f"{tmp_path / 'l.safetensors'}:0.5",
                 "-o", str(out)]) == 0
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, transformer=tmp_path / "t.gguf")
    assert isinstance(pipe.transformer.layers[0].attention.qkv, QuantizedLinear)
    LoRA.load(pipe.transformer, tmp_path / "l.safetensors", 0.5)  # hooks, as the command keeps them
    expected = pipe("a cat", seed=3, width=96, height=64, num_inference_steps=3, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert "Model: " + tiny_model_dir.name + " + t.gguf" in Image.open(out).text["parameters"]
    assert main([*common, "--fp8", "-o", str(tmp_path / "f.png")]) == 0
    assert main([*common, "--fp8-matmul", "-o", str(tmp_path / "m.png")]) == 0
    assert "(fp8 matmul)" in Image.open(tmp_path / "m.png").text["parameters"]
    capsys.readouterr()
    assert main([*common, "--transformer", str(tmp_path / "t.gguf"), "--fp8", "-o", str(tmp_path / "y.png")]) == 2
    assert "t.gguf is already quantized; leave out fp8" in capsys.readouterr().err
    capsys.readouterr()
    assert main([*common, "--transformer", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "x.png")]) == 2
    assert "missing.gguf: no such file" in capsys.readouterr().err


def test_plan_weight_bytes_equal_a_loaded_gguf_models_memory(tmp_path):
    """zimagekit plan's arithmetic against the bytes a model holds whose blocks' linear weights
    are Q8_0 and everything else bf16 (dim 96: every block row, the FFN's 256 included, fits
    Q8_0's 32-weight blocks)."""
    from zimagekit.plan import weight_bytes

    cfg = S3DiTConfig(dim=96, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                      axes_dims=(16, 16, 16), axes_lens=(256, 64, 64))
    blocks = ("layers.", "noise_refiner.", "context_refiner.")
    write_gguf(tmp_path / "m.gguf", S3DiT(cfg).state_dict(), "Q8_0", layout="diffusers", only=lambda k: k.startswith(blocks))
    model = S3DiT.from_pretrained(tmp_path / "m.gguf", dtype=torch.bfloat16, config=cfg)
    # qkv, to_out, w13, w2 and adaLN in 2 layers and the noise refiner; no adaLN in the context refiner
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 2 * 5 + 5 + 4
    assert stored_bytes(model) == weight_bytes(cfg, "Q8_0")
    assert weight_bytes(cfg, "bf16") == 2 * sum(p.numel() for p in S3DiT(cfg).parameters())


def test_bf16_tensors_in_a_gguf_file_load(tmp_path, base):
    """The reader hands BF16 over as raw bytes (numpy has no bfloat16)."""
    path = tmp_path / "bf16.gguf"
    writer = GGUFWriter(str(path), "zimage")
    state = base.state_dict()
    for key, value in state.items():
        a = value.float().numpy()
        if a.ndim == 2:
            writer.add_tensor(key, quants.quantize(a, T.BF16), raw_dtype=T.BF16)
        else:
            writer.add_tensor(key, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = S3DiT.from_pretrained(path, dtype=torch.float32, config=CFG)
    weight = model.state_dict()["layers.0.attention.to_q.weight"]
    assert torch.equal(weight, state["layers.0.attention.to_q.weight"].to(torch.bfloat16).float())
