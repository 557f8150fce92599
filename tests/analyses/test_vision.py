"""`analyses.vision`: key mass per patch, sink patches, token kinds and high-norm patches equal the same quantities
computed from eager attention maps and the model's own hidden states; the figures, the report section and the
`vision` command on a folder of images."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sinkscope.analyses.vision import analyze_images, write
from sinkscope.errors import SinkscopeError
from sinkscope.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def dino():
    return tiny_model("dinov2_registers")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # [P, C, H, W]


def test_tables_equal_eager_maps_and_hidden_states(dino, pixels):
    result = analyze_images(dino, pixels, method="mean_multiple", params={"theta": 2.0}, norm_ratio=1.5)
    model = copy.deepcopy(dino.model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    alpha = torch.stack(out.attentions, 1).mean(-2).double().numpy()  # [P, L, H, n] mean over the queries
    patches = result.tables["patches"].sort_values(["prompt_id", "layer", "head", "position"])
    np.testing.assert_allclose(patches["key_mass"].to_numpy().reshape(alpha.shape), alpha, atol=1e-5)
    n = alpha.shape[-1]
    assert (patches["sink"].to_numpy().reshape(alpha.shape) == (alpha > 2.0 / n)).all()  # θ·μ, μ = 1/n
    mean = alpha.mean(2)  # [P, L, n]
    kinds = result.tables["kinds"].set_index(["prompt_id", "layer", "kind"])["mass"]
    assert kinds.loc[(1, 1, "cls")] == pytest.approx(mean[1, 1, 0], abs=1e-6)
    assert kinds.loc[(1, 1, "register")] == pytest.approx(mean[1, 1, 1:5].sum(), abs=1e-6)
    assert kinds.loc[(1, 1, "patch")] == pytest.approx(mean[1, 1, 5:].sum(), abs=1e-6)
    layers = result.tables["layers"].set_index(["prompt_id", "layer"])
    sinks = mean[0, 1, 5:] > 2.0 / n
    assert layers.loc[(0, 1), "sink_patches"] == sinks.sum()
    assert layers.loc[(0, 1), "sink_patch_mass"] == pytest.approx(mean[0, 1, 5:][sinks].sum(), abs=1e-6)
    top = int(mean[0, 1, 5:].argmax())
    assert layers.loc[(0, 1), "top_patch"] == f"patch({top // 8},{top % 8})"
    norms = result.tables["norms"]
    for site, hidden in zip((-1, 0, 1), out.hidden_states, strict=True):
        h = hidden[0].norm(dim=-1).double().numpy()  # [n] image 0
        one = norms[(norms["prompt_id"] == 0) & (norms["layer"] == site)].sort_values("position")
        np.testing.assert_allclose(one["norm"].to_numpy(), h, rtol=1e-4)
        median = np.sort(h[5:])[(64 - 1) // 2]  # the lower median of the 64 patches
        np.testing.assert_allclose(one["ratio"].to_numpy(), h / median, rtol=1e-4)
        assert (one["outlier"].to_numpy() == (h / median > 1.5)).all()
    assert result.tables["images"]["n_prefix"].tolist() == [5, 5]
    assert {"prompt_id", "layer", "head", "position", "token"} <= set(result.tables["patches"])


def test_bad_requests_are_refused(dino, pixels, tiny_llama):
    with pytest.raises(SinkscopeError, match="text model"):
        analyze_images(tiny_llama, pixels)
    with pytest.raises(SinkscopeError, match="returns a rate"):
        analyze_images(dino, pixels, method="sink_rate")
    with pytest.raises(SinkscopeError, match="above 1"):
        analyze_images(dino, pixels, norm_ratio=1.0)


def test_figures_and_report_section(dino, pixels, tmp_path):
    from sinkscope.report import write_report

    result = analyze_images(dino, pixels)
    folder = write(result, dino, tmp_path / "run", layer=0)
    assert sorted(p.name for p in folder.glob("*.png")) == ["patches_0.png", "patches_1.png", "vision_layers.png"]
    assert result.pixels.shape == (2, 64, 64, 3) and result.pixels.dtype == torch.uint8
    page = write_report(folder).read_text()
    assert "Vision: sink patches" in page and page.count("data:image/png;base64,") >= 3


def test_vision_command_on_a_folder_of_images(tmp_path):
    from PIL import Image

    from sinkscope.cli.app import app

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((50, 70, 3)) * 255).astype(np.uint8)).save(images / f"shape{i}.png")
    runner = CliRunner()
    result = runner.invoke(app, ["vision", "--model", "tiny:vit", "--images", str(images), "--out",
                                 str(tmp_path / "run"), "--method", "zscore", "--threshold", "2"])
    assert result.exit_code == 0, result.output
    assert "2 image(s), 8×8 patches + [CLS]" in result.output and "zscore (alpha=2)" in result.output
    assert (tmp_path / "run" / "patches_1.png").exists()
    bad = runner.invoke(app, ["vision", "--model", "tiny:vit", "--images", str(images), "--layer", "5"])
    assert bad.exit_code == 2 and "--layer 5" in bad.stderr
    text = runner.invoke(app, ["vision", "--model", "tiny:llama", "--images", str(images)])
    assert text.exit_code == 2 and "is a text model" in text.stderr
    for line in (["profile", "--model", "tiny:vit", "--prompt", "hi"],
                 ["stream", "--model", "tiny:vit", "--text-file", str(images / "shape0.png")]):
        refused = runner.invoke(app, line)  # text commands refuse a vision model in one line
        assert refused.exit_code == 2 and "is a vision model" in refused.stderr, refused.output
