"""Stage 3: every precision of the target, and the INT8 recipes compared with the default, each built once per
key of everything it depends on: the source's content, the effective settings, the calibration (and control)
samples, the toolchain versions, this project's code the build imports, the input sizes, the model info."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from convnext_deploy.pipeline.core.cache import cached_dir, code_digest, key_of, sha256_file
from convnext_deploy.pipeline.core.forked import in_child
from convnext_deploy.pipeline.decisions import screen
from convnext_deploy.pipeline.measure.latency import Spread
from convnext_deploy.pipeline.stages.context import DEFAULT, SMOOTHING_OFF, Context
from convnext_deploy.pipeline.stages.export import Source, Sources, formed
from convnext_deploy.pipeline.stages.prepare import model_info
from convnext_deploy.targets.base import Artifact, BuildRequest, LabelledData, Runner


@dataclass
class Recipe:
    """One INT8 candidate: what it was built from and with, and the result. Its runner is loaded when first asked
    for and can be released: every candidate's session of a large variant held at once (and their fresh loads for
    timing) would multiply the deploy's memory by the number of candidates."""

    source: Source
    options: object  # the target's typed options
    artifact: Artifact
    load: Callable[[], Runner]
    _runner: Runner | None = field(default=None, repr=False)

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = self.load()
        return self._runner

    def release(self) -> None:
        self._runner = None


@dataclass
class Built:
    artifacts: dict[str, Artifact]  # precision → artifact ("int8": the default recipe until `decide` chooses)
    runners: dict[str, Runner]
    recipes: dict[str, Recipe]  # every INT8 candidate, the default (DEFAULT) first; empty without INT8
    # precision → the artifact as built, where `artifacts` holds it finished for the device (pipeline.stages.finish)
    finished_from: dict[str, Artifact] = field(default_factory=dict)
    screen: dict | None = None  # the screen of a large variant's candidates (pipeline.decisions.screen), if run
    # (runner, its session's box) for each runner `let_go` can empty: every holder of the runner (the evidence's
    # reference, the default recipe) shares the one session, and its release
    held: list[tuple[Runner, list]] = field(default_factory=list, repr=False)


def let_go(ctx: Context, built: Built) -> None:
    """Every held session of `built` dropped, its runner loading the artifact again when it is next run: a stage
    that times fresh loads (the latency harness's spread) would otherwise hold a large variant's sessions twice
    (ConvNeXt-XL's validation: two FP32 sessions, each its weights twice), and a rebuild's forked child would add
    its own peak to theirs (OpenVINO L's latency-aware rebuild: 7.9 GiB). What the runners say of themselves stays."""
    for p, runner in list(built.runners.items()):
        box = next((b for r, b in built.held if r is runner), None)
        if box is not None:
            box.clear()
        elif p in built.artifacts:
            built.runners[p] = releasable(partial(ctx.target.load_runner, built.artifacts[p], ctx.cfg.threads),
                                          built.held, runner)
    for recipe in built.recipes.values():
        recipe.release()


def drop_modules(src: Sources, built: Built) -> None:
    """The torch modules the builds started from, let go once their artifacts stand for them (after the decisions
    and the sensitivity measurement): the smoothed copy's own tensors, about half a variant's weights, were held to
    the end of the deploy. The checkpoint's module stays with the context (validation runs it eagerly)."""
    for source in (src.plain, src.int8, *(r.source for r in built.recipes.values())):
        if source is not None:
            source.model = None


def structure_only(ctx: Context, src: Sources, built: Built) -> None:
    """Once every form is exported and built, a smoothed source of an ONNX build keeps only what its later rebuilds
    (latency-aware, fallback) read of its torch module: the structure that names float layers by network order, which
    the checkpoint's module has too. The smoothed copy's own tensors (about half a variant's weights: ConvNeXt-XL's
    0.7 GB) were held through the decisions. A target converting from torch (no ONNX) keeps its weights."""
    for source in (src.int8, *(r.source for r in built.recipes.values())):
        if source is not None and source.onnx_path is not None and source.model is not None:
            source.model = ctx.ck.model


def releasable(load: Callable[[], Runner], held: list, described: Runner | None = None) -> Runner:
    """A runner whose session lives in a box `let_go` can empty (registered in `held`): loaded now, or, given the
    runner that `described` it, when first run."""
    box: list[Runner] = [] if described is not None else [load()]
    held.append((runner := _boxed(described or box[0], load, box), box))
    return runner


def _boxed(held: Runner, load: Callable[[], Runner], box: list) -> Runner:
    """`held`'s description over the session in `box`: a call on an empty box loads one with `load` and keeps it."""

    def loaded() -> Runner:
        if not box:
            box.append(load())
        return box[0]

    return replace(held, run=lambda x: loaded().run(x),
                   native=None if held.native is None else (lambda x: loaded().native(x)),
                   device_ms=None if held.device_ms is None else (lambda x: loaded().device_ms(x)))


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
        if source.onnx_path is not None:
            art.metadata["graph_form"] = source.form
        art.save_metadata(tmp)

    # in a child process: what a build allocates goes back to the kernel when it ends (pipeline.core.forked)
    directory, cached = cached_dir(f"artifacts/{target.name}", key,
                                   lambda tmp: in_child(build, tmp, what=f"{target.name} {precision} build"),
                                   log=ctx.log)
    ctx.log(f"{target.name} {precision}: {'cached' if cached else 'built'} ({directory})")
    return Artifact.load_metadata(directory)


def build(ctx: Context, src: Sources) -> Built:
    target, cfg = ctx.target, ctx.cfg
    validation = ctx.control if cfg.accuracy_control else None  # only a build that decides on it reads it
    artifacts = {p: build_one(ctx, src.plain, p, ctx.options) for p in ctx.precisions if p != "int8"}
    if src.int8 is not None:
        artifacts["int8"] = build_one(ctx, src.int8, "int8", ctx.options, validation)
    artifacts = {p: artifacts[p] for p in ctx.precisions}
    if src.int8 is None:
        held: list = []
        return Built(artifacts, {p: releasable(partial(target.load_runner, a, cfg.threads), held)
                                 for p, a in artifacts.items()}, {}, held=held)
    load = partial(target.load_runner, threads=cfg.threads)
    others: dict[str, Recipe] = {}
    inputs = [(r.name, src.int8 if r.smoothed else src.plain, r.form, target.make_options(**{**cfg.options, **r.options}))
              for r in target.int8_recipes]
    if src.smoothing is not None:  # smoothing is one candidate among the others: kept where accuracy needs it
        inputs.append((SMOOTHING_OFF, src.plain, src.plain.form, target.make_options(**ctx.int8_defaults,
                                                                                       **cfg.options)))
    inputs, screened = [i for i in inputs if cfg.alternatives or i[0] == cfg.recipe], None
    if inputs and screen.applies(ctx):  # a large variant: full builds only for the candidates that can win
        kept, screened = screen.shortlist(ctx, src.plain, [(DEFAULT, src.int8, src.int8.form, ctx.options), *inputs],
                                          build_one, formed)
        inputs = [i for i in inputs if i[0] in {k[0] for k in kept}]
    for name, source, form, options in inputs:
        source = formed(ctx, source, form)
        art = build_one(ctx, source, "int8", options)
        others[name] = Recipe(source, options, art, partial(load, art))
    # loaded once every build is done: a large variant's FP32 session (its weights twice, prepacked) is not held
    # beside the screen's and the builds' children
    held: list = []
    runners = {p: releasable(partial(load, a), held) for p, a in artifacts.items()}
    recipes = {DEFAULT: Recipe(src.int8, ctx.options, artifacts["int8"], partial(load, artifacts["int8"]),
                               runners["int8"]), **others}
    return Built(artifacts, runners, recipes, screen=screened, held=held)


def spread(ctx: Context, artifacts: dict[str, Artifact], instances: int | None = None) -> Spread:
    """The latency harness's rounds spread over `instances` fresh loads of each labelled artifact (default: the
    deploy's `loads`)."""
    return Spread({label: partial(ctx.target.load_runner, a, ctx.cfg.threads) for label, a in artifacts.items()},
                  instances or ctx.cfg.loads)
