"""Stage 2: what the builds start from. The checkpoint's checked ONNX export (none for a target that converts
from torch) and, for INT8, the model with its norm-channel outliers migrated (pipeline.decisions.outliers) and its export;
a recipe starting from another graph form (pipeline.models.graph_forms) gets that form's checked export of the same
model (`formed`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from convnext_deploy.pipeline.core.cache import code_digest, key_of
from convnext_deploy.pipeline.models.graph_forms import DEFAULT_FORM
from convnext_deploy.pipeline.models.onnx_export import ExportResult, export_cached
from convnext_deploy.pipeline.stages.context import Context

# images × one image's multiply-accumulates each export's parity check runs (torch and ONNX Runtime on each image):
# ConvNeXt-T's 32 images at 224 px, XL's 4 (61 G each), where 32 were 3 minutes of XL's export and builds
PARITY_MACS = 1.5e11
PARITY_IMAGES = (4, 32)  # the fewest and the most


@dataclass
class Source:
    """A model a build starts from: the torch module and, for an ONNX target, its checked export."""

    model: torch.nn.Module | None  # None once its artifacts are built and decided on (build.drop_modules)
    onnx_path: Path | None
    key: str = ""  # what its exports are keyed by: the checkpoint's sha256, or the smoothing's key
    form: str = DEFAULT_FORM


@dataclass
class Sources:
    export: ExportResult | None  # the checkpoint's own export, as the report describes it
    plain: Source  # the checkpoint's weights: float precisions, and INT8 recipes that never smooth
    int8: Source | None  # what the default INT8 is built from (smoothed unless switched off)
    smoothing: dict | None  # what the smoothing did (None: off, or no INT8)


def export(ctx: Context) -> Sources:
    ck, log = ctx.ck, ctx.log
    result = None
    if ctx.target.converter is None:
        result = export_cached(ck.model, ck.sha256, ck.variant.name, parity_images(ctx), form=ctx.target.form)
        log(f"export ({result.form}): opset {result.opset}, parity max |Δlogit| {result.parity.max_abs_diff:.2e}, "
            f"agreement {result.parity.top1_agreement:.3f} on {result.parity.n} images "
            f"({'cached' if result.cached else 'exported'})")
    plain = Source(ck.model, result.path if result else None, ck.sha256, ctx.target.form)
    if not ctx.has_int8 or not ctx.cfg.smoothing:
        return Sources(result, plain, plain if ctx.has_int8 else None, None)
    smoothed, info = smooth(ctx, ctx.cfg.smoothing)
    return Sources(result, plain, smoothed, info)


def smooth(ctx: Context, alpha: float) -> tuple[Source, dict]:
    """SmoothQuant-style migration on the calibration images, and the smoothed model's export."""
    from convnext_deploy.pipeline.decisions.outliers import migrate, stats_of

    ck, calib_x = ctx.ck, ctx.calibration.images
    model, info = migrate(ck.model, calib_x, alpha)  # one pass over the images gives both statistics
    before, after = stats_of(info.pop("ranges_before")), stats_of(info.pop("ranges_after"))
    info.update(outlier_ratio_before=before.worst_ratio, outlier_ratio_after=after.worst_ratio,
                worst_layer_before=before.worst_layer, calibration_ids_sha256=ctx.calibration.manifest_sha256)
    ctx.log(f"smoothing (α {alpha}): largest norm-output channel range / median {before.worst_ratio:.1f} → "
            f"{after.worst_ratio:.1f} ({before.worst_layer})")
    if ctx.target.converter is not None:  # a torch-source target converts the smoothed model itself
        return Source(model, None), info
    key = key_of("smoothed", ck.sha256, alpha, ctx.calibration.manifest_sha256,
                 code_digest("convnext_deploy.pipeline.decisions.outliers"))
    exported = export_cached(model, key, ck.variant.name, parity_images(ctx), form=ctx.target.form)
    return Source(model, exported.path, key, ctx.target.form), info


def formed(ctx: Context, source: Source, form: str | None) -> Source:
    """`source` exported in graph `form` (checked against the same torch model); itself where the form is its own
    (or None) or the target converts from torch."""
    if form is None or form == source.form or source.onnx_path is None:
        return source
    if source.model is ctx.ck.model and source.key != ctx.ck.sha256:  # pipeline.stages.build.structure_only
        raise RuntimeError(f"{source.key}: a source whose module stands in for its structure cannot be exported again")
    result = export_cached(source.model, source.key, ctx.ck.variant.name, parity_images(ctx), form=form)
    ctx.log(f"export ({form}): parity max |Δlogit| {result.parity.max_abs_diff:.2e} "
            f"({'cached' if result.cached else 'exported'})")
    return Source(source.model, result.path, source.key, form)


def parity_images(ctx: Context):
    """The calibration images each export's parity check runs on: as many as `PARITY_MACS` allow, within
    `PARITY_IMAGES` (an export error shows on every image; the count bounds a large variant's cost)."""
    from convnext_deploy.pipeline.measure.peak import model_macs

    lo, hi = PARITY_IMAGES
    n = max(lo, min(hi, int(PARITY_MACS // model_macs(ctx.ck.model, ctx.ck.preprocessing.input_size))))
    return ctx.calibration.images[:n]
