"""Stage 3: every precision of the target, and the INT8 recipes compared with the default, each built once per
key of everything it depends on: the source's content, the effective settings, the calibration (and control)
samples, the toolchain versions, this project's code the build imports, the input sizes, the model info."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.cache import cached_dir, code_digest, key_of
from pipeline.checkpoints import sha256_file
from pipeline.stages.context import Context
from pipeline.stages.export import Source, Sources
from pipeline.stages.prepare import model_info
from targets.base import Artifact, BuildRequest, LabelledData, Runner

SMOOTHING_OFF = "ours without outlier smoothing"


@dataclass
class Built:
    artifacts: dict[str, Artifact]  # precision → artifact
    runners: dict[str, Runner]
    recipes: dict[str, Artifact]  # INT8 recipes compared with the default: name → artifact
    recipe_runners: dict[str, Runner]


def _content_digest(source: Source) -> str:
    """What the build reads: the ONNX file's bytes, or (a target converting from torch) the weights."""
    if source.onnx_path is not None:
        return sha256_file(source.onnx_path)
    h = hashlib.sha256()
    for k, v in source.model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_one(ctx: Context, source: Source, precision: str, options, validation: LabelledData | None = None) -> Artifact:
    target, int8 = ctx.target, precision == "int8"
    info = model_info(ctx.ck)
    key = key_of("build", target.name, precision, _content_digest(source), target.build_config(precision, options),
                 ctx.calibration.manifest_sha256 if int8 else None, validation.ids_sha256 if validation else None,
                 target.describe_environment(), code_digest(target.module), ctx.sizes, info)

    def build(tmp) -> None:
        art = target.build(BuildRequest(precision, source.onnx_path, source.model, tmp,
                                        ctx.calibration if int8 else None, validation, ctx.sizes, options, info))
        art.save_metadata(tmp)

    directory, cached = cached_dir(f"artifacts/{target.name}", key, build, log=ctx.log)
    ctx.log(f"{target.name} {precision}: {'cached' if cached else 'built'} ({directory})")
    return Artifact.load_metadata(directory)


def build(ctx: Context, src: Sources) -> Built:
    target, cfg = ctx.target, ctx.cfg
    validation = ctx.control if cfg.accuracy_control else None  # only a build that decides on it reads it
    artifacts = {p: build_one(ctx, src.plain, p, ctx.options) for p in target.precisions if p != "int8"}
    if src.int8 is not None:
        artifacts["int8"] = build_one(ctx, src.int8, "int8", ctx.options, validation)
    artifacts = {p: artifacts[p] for p in target.precisions}
    recipes = {}
    if cfg.alternatives and src.int8 is not None:
        for r in target.int8_recipes:
            recipes[r.name] = build_one(ctx, src.int8 if r.smoothed else src.plain, "int8",
                                        target.make_options(**{**cfg.options, **r.options}))
        if src.smoothing is not None:
            recipes[SMOOTHING_OFF] = build_one(ctx, src.plain, "int8", target.make_options(**cfg.options))
    return Built(artifacts, {p: target.load_runner(a, cfg.threads) for p, a in artifacts.items()},
                 recipes, {n: target.load_runner(a, cfg.threads) for n, a in recipes.items()})
