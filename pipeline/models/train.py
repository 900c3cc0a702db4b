"""Train a reference ConvNeXt on Fashion-MNIST on the CPU: the checkpoints the accuracy gates are measured on.

Recipe (recorded in the checkpoint sidecar): AdamW with decoupled weight decay (none on norms, biases and
layer-scale; the fused kernel: one pass over each parameter instead of five), linear warm-up then cosine decay,
label smoothing. The depthwise convolutions train through `depthwise.for_training` (the same forward, a weight
gradient that does not fall back to a GEMM on AVX2). The sidecar records how long training took and on which CPU.
Stochastic depth, flips and shifts are available but off by default: a few-epoch schedule fits better without
them. Images are upsampled from 28 to `image_size` (32 by default: the smallest size at which the four /2 stages of
a 4×4-patch stem keep a 1×1 map). Resumable: a training state is saved after every epoch and picked up by the next
run with the same recipe.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from convnext_deploy.calibration.batches import load_array, progress
from convnext_deploy.calibration.fashion_mnist import FashionMNIST
from convnext_deploy.pipeline.core.cache import publish_file
from convnext_deploy.pipeline.measure.machine import cpu_label, cpu_profile
from convnext_deploy.pipeline.models.checkpoints import save_checkpoint
from convnext_deploy.pipeline.models.convnext import ConvNeXt, create_model
from convnext_deploy.pipeline.models.depthwise import for_training
from convnext_deploy.pipeline.models.variants import Preprocessing, get_variant

PROGRESS_EVERY_S = 60.0


@dataclass(frozen=True)
class Recipe:
    variant: str
    image_size: int = 32
    epochs: int = 4
    batch_size: int = 256
    lr: float = 4e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.25
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.0
    ls_init_value: float = 0.1
    hflip: bool = False
    shift_px: int = 0
    seed: int = 0
    threads: int = 2


def recipe_for(variant: str, **overrides) -> Recipe:
    """The recorded recipe of a variant's reference: T and larger get half the learning rate of the small
    members (deeper residual stacks) and 2 epochs, so that a first deploy of T on a fresh two-core machine trains
    its reference in minutes, not half an hour (`make reference VARIANT=t EPOCHS=6` trains the longer recipe).
    The small members train 3 epochs: `make test` trains atto from a fresh clone, so its length is the suite's (a
    4th epoch adds about 0.7 pp of test top-1 and a third of the training time; `--epochs 4` trains it)."""
    v = get_variant(variant)
    large = v.dims[0] >= 96
    return Recipe(variant=v.name, **{"lr": 2e-3 if large else 4e-3, "epochs": 2 if large else 3, **overrides})


def dataset_preprocessing(train: FashionMNIST, image_size: int) -> Preprocessing:
    """Normalisation measured on the training images, stored in the checkpoint (never typed elsewhere)."""
    pixels = train.images.astype(np.float64) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    return Preprocessing(input_size=image_size, crop_pct=1.0, interpolation="bicubic",
                         mean=(mean,) * 3, std=(std,) * 3)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _augment(x: torch.Tensor, hflip: bool, shift: int, gen: torch.Generator) -> torch.Tensor:
    if hflip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if shift:
        dy, dx = (torch.randint(0, 2 * shift + 1, (2,), generator=gen)).tolist()
        h, w = x.shape[2:]
        x = F.pad(x, (shift, shift, shift, shift))[:, :, dy:dy + h, dx:dx + w]
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model: ConvNeXt, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(torch.from_numpy(x[i:i + batch_size]).contiguous(memory_format=torch.channels_last))
        correct += int((logits.argmax(1).numpy() == y[i:i + batch_size]).sum())
    return correct / len(x)


def training_time(history: list[dict], threads: int) -> dict:
    """How long the epochs took and on which CPU (a resumed run may have trained its epochs on several): the same
    recipe takes minutes on one x86 generation and several times that on another (AVX2 without AVX-512)."""
    return {"seconds": round(sum(h.get("epoch_seconds", 0.0) for h in history), 1), "threads": threads,
            "cpus": sorted({h.get("cpu", "not recorded") for h in history}), "isa": cpu_profile()["flags"],
            "torch_kernels": torch.backends.cpu.get_cpu_capability()}


def train_reference(recipe: Recipe, out: Path, log=print) -> Path:
    """Train, evaluate on the full test split, save in our format. Returns the checkpoint path."""
    variant = get_variant(recipe.variant)
    out = Path(out).with_suffix(".safetensors")
    state_path = out.with_name(out.stem + ".train-state.pt")
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)

    train, test = FashionMNIST("train"), FashionMNIST("test")
    pp = dataset_preprocessing(train, recipe.image_size)
    x_train, y_train = load_array(train, range(len(train)), pp, desc="preparing train")
    x_test, y_test = load_array(test, range(len(test)), pp, desc="preparing test")
    x_train_t, y_train_t = torch.from_numpy(x_train), torch.from_numpy(y_train)

    model = create_model(variant, num_classes=len(train.class_names), drop_path_rate=recipe.drop_path_rate,
                         ls_init_value=recipe.ls_init_value)
    model = for_training(model).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, fused=True)
    steps_per_epoch = len(x_train) // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    warmup = max(1, int(recipe.warmup_epochs * steps_per_epoch))

    start_epoch, history = 0, []
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("recipe") == asdict(recipe):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start_epoch, history = int(state["epoch"]), list(state["history"])
            log(f"resuming {variant.long_name} from epoch {start_epoch}/{recipe.epochs} ({state_path})")
        else:
            log(f"ignoring {state_path}: it was made with another recipe")

    t0 = time.perf_counter()
    last_line = t0
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        t_epoch = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum = 0.0
        bar = progress(range(steps_per_epoch), steps_per_epoch, f"epoch {epoch + 1}/{recipe.epochs}")
        for b in bar:
            step = epoch * steps_per_epoch + b
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, warmup, recipe.lr)
            idx = perm[b * recipe.batch_size:(b + 1) * recipe.batch_size]
            x = _augment(x_train_t[idx], recipe.hflip, recipe.shift_px, gen)
            loss = F.cross_entropy(model(x), y_train_t[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            if time.perf_counter() - last_line >= PROGRESS_EVERY_S:  # a line a minute where no progress bar shows
                last_line = time.perf_counter()
                done = (epoch - start_epoch) * steps_per_epoch + b + 1
                left = (total - start_epoch * steps_per_epoch - done) * (last_line - t0) / done
                log(f"training {variant.long_name}: epoch {epoch + 1}/{recipe.epochs}, step {b + 1}/{steps_per_epoch}, "
                    f"{(last_line - t0) / 60:.1f} min so far, about {left / 60:.1f} min left")
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at epoch {epoch + 1} (loss {float(loss)}); lower --lr")
        acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "test_top1": acc,
                        "seconds": time.perf_counter() - t0, "epoch_seconds": time.perf_counter() - t_epoch,
                        "cpu": cpu_label()})
        log(f"epoch {epoch + 1}/{recipe.epochs}: loss {loss_sum / steps_per_epoch:.4f}, "
            f"test top-1 {acc * 100:.2f}%, {time.perf_counter() - t0:.0f}s")
        state = {"recipe": asdict(recipe), "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch + 1,
                 "history": history}
        publish_file(state_path, lambda p: torch.save(state, p))

    model.eval()
    # the last epoch's figure is the final model's (evaluated in eval mode after its last step)
    top1 = history[-1]["test_top1"] if history else evaluate(model, x_test, y_test)
    path = save_checkpoint(
        model.to(memory_format=torch.contiguous_format), out,
        variant=variant, class_names=train.class_names, preprocessing=pp,
        recipe={**asdict(recipe), "optimizer": "AdamW (fused)", "schedule": "linear warm-up + cosine",
                "augmentation": ", ".join(a for a in ("hflip" if recipe.hflip else "",
                                                       f"±{recipe.shift_px}px shift" if recipe.shift_px else "") if a) or "none", "torch": torch.__version__,
                "history": history, "training_time": training_time(history, recipe.threads)},
        dataset={"name": "fashion-mnist", "train": train.name, "train_size": len(train),
                 "test": test.name, "test_size": len(test), "resolution": recipe.image_size},
        accuracy={"top1": top1, "split": test.name, "n": len(test), "runtime": "torch eager fp32 (cpu)"},
    )
    state_path.unlink(missing_ok=True)
    return path

