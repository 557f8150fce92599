"""Vision transformers: captured statistics equal eager `output_attentions` for every tiny vision family (ViT, DeiT,
DINOv2 with and without registers, CLIP and SigLIP vision towers), hidden-state sites equal the model's own hidden
states, and images in (files, folders, PIL images, pixel values) give the same capture."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sinkscope.capture import CaptureConfig, run_capture
from sinkscope.capture.hidden import decoder_layers
from sinkscope.errors import SinkscopeError
from sinkscope.models import TINY_VISION_FAMILIES, tiny_model

FAMILIES = sorted(TINY_VISION_FAMILIES)
PREFIX = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_registers": 5, "clip_vision": 1, "siglip_vision": 0}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return tiny_model(request.param)


def _pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))  # [P, C, H, W]


def _eager(lm, pixels):
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    return model, out


def test_capture_equals_eager(loaded):
    """Key mass α_k (mean over the queries, all of which see every key), selected rows and row entropies equal the
    eager attention maps of every layer."""
    pixels = _pixels()
    _, out = _eager(loaded, pixels)
    trace = run_capture(loaded, pixels, CaptureConfig(rows=[0, -1], entropy=True), batch_size=2)
    maps = torch.stack(out.attentions, dim=1)  # [P, L, H, n, n]
    n = maps.shape[-1]
    assert trace.key_mass.shape == maps.shape[:-1]
    assert n == PREFIX[loaded.info.name.removeprefix("tiny:")] + 64
    torch.testing.assert_close(trace.key_mass, maps.mean(-2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trace.key_count, torch.full(trace.key_count.shape, float(n)))
    torch.testing.assert_close(trace.rows, maps[..., [0, n - 1], :], atol=1e-5, rtol=1e-4)
    entropy = -torch.special.xlogy(maps, maps).sum(-1)
    torch.testing.assert_close(trace.entropy, entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trace.key_mass.sum(-1), torch.ones(trace.key_mass.shape[:-1]), atol=1e-5, rtol=0)
    assert trace.input_ids == [[-1] * n] * 3 and trace.lengths.tolist() == [n] * 3


def test_capture_keeps_the_models_output(loaded):
    """The capture computes the layers' outputs from its own chunks: the last hidden state equals SDPA's."""
    pixels = _pixels(2)
    with torch.no_grad():
        native = loaded.model(pixel_values=pixels).last_hidden_state
        from sinkscope.capture.attention import use_sinkscope_attention

        with use_sinkscope_attention(loaded.model):
            again = loaded.model(pixel_values=pixels).last_hidden_state  # no session: the native kernel
    torch.testing.assert_close(native, again)


def _attn_site(model, family: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """x + Attn_l(norm(x)): the residual stream after block l's attention, recomputed from the eager modules."""
    block = decoder_layers(model)[layer]

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if family in ("vit", "deit"):
        return x + first(block.attention(block.layernorm_before(x)))
    if family.startswith("dinov2"):
        return x + block.layer_scale1(first(block.attention(block.norm1(x))))
    return x + first(block.self_attn(block.layer_norm1(x)))  # CLIP, SigLIP


def test_hidden_sites_equal_the_model(loaded):
    """The embed and block sites equal the model's hidden states, the attn site x + Attn(norm(x)) recomputed from
    the eager modules, and hidden_norms their L2 norms."""
    family = loaded.info.name.removeprefix("tiny:")
    pixels = _pixels(2)
    model, out = _eager(loaded, pixels)
    trace = run_capture(loaded, pixels, CaptureConfig(rows=None, hidden=["embed", "attn", "block"]))
    norms = run_capture(loaded, pixels, CaptureConfig(rows=None, hidden=["embed", "attn", "block"],
                                                      hidden_norms=True))
    assert [(s.layer, s.sublayer) for s in trace.sites] == [(-1, "embed"), (0, "attn"), (0, "block"), (1, "attn"),
                                                             (1, "block")]
    hs = out.hidden_states
    torch.testing.assert_close(trace.hidden[:, 0], hs[0], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for layer in range(2):
            torch.testing.assert_close(trace.hidden[:, 1 + 2 * layer], _attn_site(model, family, layer, hs[layer]),
                                       atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(trace.hidden[:, 2 + 2 * layer], hs[layer + 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(norms.hidden_norms, trace.hidden.norm(dim=-1), atol=1e-4, rtol=1e-4)


def test_tokens_name_the_prefix_and_the_patch_grid():
    lm = tiny_model("dinov2_registers")
    trace = run_capture(lm, _pixels(1), CaptureConfig(rows=None))
    assert trace.tokens[0][:6] == ["[CLS]", "[REG0]", "[REG1]", "[REG2]", "[REG3]", "patch(0,0)"]
    assert trace.tokens[0][-1] == "patch(7,7)" and trace.tokens[0][5 + 8] == "patch(1,0)"
    assert trace.info["image"] == {"prefix": ["[CLS]", "[REG0]", "[REG1]", "[REG2]", "[REG3]"], "grid": [8, 8],
                                   "patch_size": [8, 8], "size": [64, 64]}
    frame = trace.to_frame("keys")
    assert set(frame["token"]) >= {"[CLS]", "[REG3]", "patch(7,7)"} and len(frame) == 2 * 4 * 69
    deit = run_capture(tiny_model("deit"), _pixels(1), CaptureConfig(rows=None))
    assert deit.tokens[0][:3] == ["[CLS]", "[DIST]", "patch(0,0)"]


def _write_images(folder, count: int = 3) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        array = (rng.random((40 + 10 * i, 50, 3)) * 255).astype(np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def test_files_folders_and_pil_images_give_the_processors_pixels(tmp_path):
    """A folder, its files and the opened images capture the same statistics as the processor's pixel values."""
    from PIL import Image

    lm = tiny_model("vit")
    paths = _write_images(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")  # skipped in a folder
    config = CaptureConfig(rows=None)
    from_folder = run_capture(lm, tmp_path, config)
    from_files = run_capture(lm, [str(p) for p in paths], config, batch_size=2)
    images = [Image.open(p).convert("RGB") for p in paths]
    pixels = lm.image_processor(images=images, return_tensors="pt")["pixel_values"]
    from_pixels = run_capture(lm, pixels, config)
    assert from_folder.prompts == ["img0.png", "img1.png", "img2.png"] == from_files.prompts
    assert from_pixels.prompts == ["image 0", "image 1", "image 2"]
    for trace in (from_files, run_capture(lm, images, config)):
        torch.testing.assert_close(trace.key_mass, from_folder.key_mass)
    torch.testing.assert_close(from_pixels.key_mass, from_folder.key_mass, atol=1e-6, rtol=1e-5)


def test_bad_images_are_refused_in_one_line(tmp_path):
    lm = tiny_model("vit")
    (tmp_path / "empty").mkdir()
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(bytes(range(0, 256, 5)))
    cases = [
        (tmp_path / "missing.png", "no such image"),
        (tmp_path / "empty", "holds no image files"),
        (garbage, "not an image that Pillow can read"),
        (torch.randn(1, 3, 32, 32), "takes 64×64 images"),
        (torch.randn(3, 64), "pixel values must be"),
        ([], "no images given"),
    ]
    for images, message in cases:
        with pytest.raises(SinkscopeError, match=message):
            run_capture(lm, images, CaptureConfig(rows=None))
    with pytest.raises(SinkscopeError, match="no next-token head"):
        run_capture(lm, _pixels(1), CaptureConfig(logprobs=True))


def test_dinov2_takes_other_image_sizes():
    """DINOv2 interpolates its position embeddings: a 48×80 image is a 6×10 grid."""
    trace = run_capture(tiny_model("dinov2"), torch.randn(1, 3, 48, 80), CaptureConfig(rows=None))
    assert trace.info["image"]["grid"] == [6, 10] and trace.key_mass.shape[-1] == 61


def test_a_saved_vision_model_loads_with_its_image_processor(tmp_path):
    """A folder with a vision model and its image processor loads like a Hub checkpoint (safetensors, no tokenizer);
    a CLIP checkpoint (text + vision) loads its vision tower."""
    import transformers

    from sinkscope.models import load_model, tiny_config

    lm = tiny_model("dinov2_registers")
    lm.model.save_pretrained(tmp_path / "dino")
    lm.image_processor.save_pretrained(tmp_path / "dino")
    again = load_model(tmp_path / "dino")
    assert again.tokenizer is None and type(again.image_processor).__name__ == "BitImageProcessorPil"
    assert again.info.model_type == "dinov2_with_registers" and not again.info.is_causal
    pixels = _pixels(1)
    torch.testing.assert_close(run_capture(again, pixels, CaptureConfig(rows=None)).key_mass,
                               run_capture(lm, pixels, CaptureConfig(rows=None)).key_mass)
    vision = tiny_config("clip_vision").to_dict()
    config = transformers.CLIPConfig(vision_config=vision, text_config={"hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2}, projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(tmp_path / "clip")
    tiny_model("clip_vision").image_processor.save_pretrained(tmp_path / "clip")
    clip = load_model(tmp_path / "clip")
    assert type(clip.model).__name__ == "CLIPVisionModel" and clip.info.n_layers == 2
    assert run_capture(clip, pixels, CaptureConfig(rows=None)).tokens[0][0] == "[CLS]"
