"""The report section of a `sinkscope vision` run: where attention goes per layer ([CLS], registers, sink patches),
the per-image layer table, and the patch figures the command drew (key mass on the image grid, sink patches outlined,
high-norm patches crossed)."""

from __future__ import annotations

import html

from sinkscope.report.sections import SectionContent, register_section, table_html
from sinkscope.report.views import figures_html, help_text, tables_of
from sinkscope.store import Run

MAX_IMAGES = 16  # patch figures embedded (the command draws at most this many)


@register_section("vision", title="Vision: sink patches", order=45)
def vision_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("layers", ["cls_mass", "register_mass", "sink_patch_mass"]) or not tables.has("images"):
        return None
    layers = tables.read("layers")
    images = tables.read("images")
    summary = tables.manifest.get("summary") or {}
    mean = layers.groupby("layer", sort=True)[["cls_mass", "register_mass", "patch_mass", "sink_patch_mass",
                                                "sink_patches", "outlier_patches"]].mean().reset_index()
    method = html.escape(str(summary.get("method", "the detector")))
    body = help_text(
        f"Key mass α_k: the mean attention token k receives from every query (a distribution over the image's tokens). "
        f"Sink patches: patches {method} flags in the head-mean α; high-norm patches: ‖h‖ above "
        f"{html.escape(str(summary.get('norm_ratio', '')))}× the image's median patch norm after the block (Darcet et "
        "al., 'Vision Transformers Need Registers'). Means over the images.")
    body += table_html(mean.round(4), "vision-layers", caption="Per layer (mean over images)")
    body += table_html(layers.round(4), "vision-images", caption="Per image and layer")
    names = dict(zip(images["prompt_id"], images["image"], strict=True))
    captions = [("vision_layers.png", "mass on [CLS], registers and sink patches per layer")]
    captions += [(f"patches_{pid}.png", f"{names[pid]}: key mass on the patch grid")
                 for pid in sorted(names)[:MAX_IMAGES]]
    return SectionContent(html=body + figures_html(tables, captions))
