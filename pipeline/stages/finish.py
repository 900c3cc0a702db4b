"""Stage 4b, between the decision and the validation: the shipped artifacts (every precision the deploy reports) made
into what a device runs as it is (targets.image_input): the input the deploy was asked for (`--input image`, the
default: uint8 NHWC pixels, normalisation inside; `--input tensor`: the float NCHW tensor) and the labels and
preprocessing rule inside the model file. Validation, gates, report and bundle then measure and ship these files;
the recipe candidates the decision timed stay as built (they are compared with each other, never shipped).
`finish` takes the given Built's sessions over: it lets them go before it loads the finished artifacts'."""
from __future__ import annotations

from dataclasses import replace

from convnext_deploy.pipeline.core.cache import cached_dir, code_digest, key_of
from convnext_deploy.pipeline.core.forked import in_child
from convnext_deploy.pipeline.stages.build import Built, let_go
from convnext_deploy.pipeline.stages.context import Context
from convnext_deploy.pipeline.stages.prepare import model_info
from convnext_deploy.targets import Finish
from convnext_deploy.targets.base import Artifact


def finish(ctx: Context, built: Built) -> Built:
    target = ctx.target
    if target.finish is None:  # its artifacts are finished as built (Core ML: an ImageType classifier with labels)
        return built
    info = model_info(ctx.ck)
    spec = Finish(ctx.cfg.input, tuple(info["class_names"]), info["preprocessing"])
    # the sessions of the artifacts as built are let go first (the deploy replaces `built` with what this returns):
    # a large variant's FP32 session holds its weights twice, and was held beside each finish child and then beside
    # the finished artifacts' sessions (ConvNeXt-XL's finish: 11.2 GiB, process tree; 8.5 GiB with the children only)
    let_go(ctx, built)  # the recipes' too: reloaded from their artifacts if the recipe comparison times them
    built.runners.clear()
    artifacts = {}
    for precision, art in built.artifacts.items():
        key = key_of("finish", target.name, precision, art.sha256(), spec.input, spec.labels, spec.preprocessing,
                     target.describe_environment(), code_digest(target.module))

        def make(tmp, art=art) -> None:
            target.finish(art, spec, tmp).save_metadata(tmp)

        # in a child: rewriting a model's input holds its graph and weights more than once (pipeline.core.forked)
        directory, cached = cached_dir(f"artifacts/{target.name}", key,
                                       lambda tmp, make=make: in_child(make, tmp, what=f"{precision} finish"),
                                       log=ctx.log)
        artifacts[precision] = Artifact.load_metadata(directory)
        ctx.log(f"{target.name} {precision}: {spec.input} input {'cached' if cached else 'written'} ({directory})")
    runners = {p: target.load_runner(a, ctx.cfg.threads) for p, a in artifacts.items()}
    return replace(built, artifacts=artifacts, runners=runners, finished_from=dict(built.artifacts), held=[])
