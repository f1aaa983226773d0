"""Short pre-training runs that say whether CIM learns its pretext task, judged against the constant prior.

Each run trains `CIMForPreTraining` for a few hundred steps on real photos (Imagenette, or the scikit-image
photos of the quick start) with the plain recipe (AdamW, warm-up + cosine, EMA momentum callback logic),
then scores a fixed held-out set of views and exemplar boxes: loss and IoU of the model against the loss and
IoU of the best constant map under the same box distribution (`transformers_cim.prior`). A ratio
loss / prior_loss clearly under 1 means the model locates *this* exemplar, not where exemplars usually are.

    python benchmarks/pretext_ablation.py --runs default easy easy:lr=1e-3 --steps 300
    python benchmarks/pretext_ablation.py --runs "exact:set=exemplar_box_mode=exact" --data skimage
    python benchmarks/pretext_ablation.py --data skimage --score outputs/cim-quickstart   # score saved checkpoints

A run is `name[:key=value[:key=value...]]`; keys are `lr`, `warmup` (fraction), `batch`, `steps`, `clip`,
`set=<config field>=<value>` (repeatable, `encoder.<field>` for the encoder) and the named bundles in
`BUNDLES`. Results are printed as a table and appended as JSON lines to `--out`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers_cim import CIMConfig, CIMForPreTraining  # noqa: E402
from transformers_cim.pretext import augmentation_ramp  # noqa: E402
from transformers_cim.pretext_metrics import correlation_iou, correlation_prior, prior_metrics  # noqa: E402
from transformers_cim.training.layer_decay import is_no_weight_decay  # noqa: E402
from transformers_cim.training.trainer import cosine_momentum  # noqa: E402

IMAGENETTE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenette-160")

# the quick start's sizes: ViT-Tiny width, 6 layers, patch 8, 128 / 96 / 32 px, decoder 256 x 8 heads
BASE = {
    "image_size": 128,
    "context_size": 96,
    "exemplar_size": 32,
    "decoder_hidden_size": 256,
    "decoder_num_attention_heads": 8,
    "encoder.num_hidden_layers": 6,
    "encoder.patch_size": 8,
}
BUNDLES = {
    "default": {},
    # the easiest task: no rotation, no photometric change
    "easy": {"exemplar_max_rotation": 0.0, "exemplar_augmentation": False},
}


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text in ("true", "false", "True", "False"):
        return text.lower() == "true"
    if "," in text:
        return [parse_value(t) for t in text.split(",")]
    return text


def parse_run(spec: str) -> tuple[str, dict, dict]:
    """'name:key=val:...' -> (name, config settings, training settings)."""
    name, *items = spec.split(":")
    config_settings = dict(BASE)
    train = {}
    bundle = name.split("+")
    for part in bundle:
        if part in BUNDLES:
            config_settings.update(BUNDLES[part])
    for item in items:
        key, value = item.split("=", 1)
        if key == "set":
            field, value = value.split("=", 1)
            config_settings[field] = parse_value(value)
        else:
            train[key] = parse_value(value)
    return spec, config_settings, train


def build_config(settings: dict) -> CIMConfig:
    config = CIMConfig.from_preset("vit-tiny-patch16")
    for key, value in settings.items():
        if key.startswith("encoder."):
            setattr(config.encoder_config, key.split(".", 1)[1], value)
        else:
            setattr(config, key, value)
    return CIMConfig.from_dict(config.to_dict())


def load_images(source: str, count: int, size: int, split: str = "train") -> torch.Tensor:
    """(N, 3, size+16, size+16) uint8 images, decoded once."""
    from PIL import Image

    images = []
    if source == "skimage":
        from transformers_cim.training.data import default_image_dataset  # the quick start's photos

        pil_images = list(default_image_dataset()["image"])
    else:
        import glob

        import pyarrow.parquet as pq

        pil_images = []
        for path in sorted(glob.glob(os.path.join(IMAGENETTE, "data", f"{split}-*.parquet"))):
            for row in pq.read_table(path, columns=["image"]).column("image").to_pylist():
                pil_images.append(Image.open(io.BytesIO(row["bytes"])))
                if len(pil_images) >= count:
                    break
            if len(pil_images) >= count:
                break
    side = size + size // 8
    for image in pil_images[:count]:
        image = image.convert("RGB").resize((side, side), Image.BICUBIC)
        images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(side, side, 3))
    return torch.stack(images).permute(0, 3, 1, 2).contiguous()


def views(
    images: torch.Tensor,
    indices: torch.Tensor,
    size: int,
    generator: torch.Generator,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """Random size x size crops with random flips, normalised."""
    side = images.shape[-1]
    out = []
    offsets = torch.randint(0, side - size + 1, (len(indices), 2), generator=generator)
    flips = torch.rand(len(indices), generator=generator) < 0.5
    for i, index in enumerate(indices.tolist()):
        y, x = offsets[i].tolist()
        crop = images[index, :, y : y + size, x : x + size]
        out.append(crop.flip(-1) if flips[i] else crop)
    batch = torch.stack(out).float() / 255
    return (batch - mean) / std


def run(spec: str, images: torch.Tensor, held_out: torch.Tensor, args) -> dict:
    name, settings, train = parse_run(spec)
    config = build_config(settings)
    steps = int(train.get("steps", args.steps))
    batch = int(train.get("batch", args.batch))
    lr = float(train.get("lr", args.lr))
    warmup = float(train.get("warmup", args.warmup))
    clip = float(train.get("clip", args.clip))
    torch.manual_seed(args.seed)
    model = CIMForPreTraining(config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if not is_no_weight_decay(n, p)]
    no_decay = [p for n, p in trainable if is_no_weight_decay(n, p)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    data_gen = torch.Generator().manual_seed(args.seed)
    pretext_gen = torch.Generator().manual_seed(args.seed + 1)
    start = time.time()
    losses = []
    model.train()
    for step in range(steps):
        model.augmentation_strength.fill_(augmentation_ramp(step, steps, config.exemplar_augmentation_ramp))
        indices = torch.randint(0, len(images), (batch,), generator=data_gen)
        pixels = views(images, indices, config.image_size, data_gen, mean, std)
        out = model(pixel_values=pixels, generator=pretext_gen)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        model.momentum_update(cosine_momentum(step + 1, steps, config.momentum_start, config.momentum_end))
        losses.append(out.loss.item())
        if args.verbose and (step + 1) % 50 == 0:
            print(f"  {name} step {step + 1}: loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    model.augmentation_strength.fill_(1.0)
    train_seconds = time.time() - start
    result = evaluate(model, config, held_out, args.seed)
    result.update(
        run=name,
        steps=steps,
        batch=batch,
        lr=lr,
        warmup=warmup,
        clip=clip,
        train_loss_last50=sum(losses[-50:]) / min(50, len(losses)),
        seconds=round(train_seconds, 1),
    )
    return result


def lr_factor(step: int, warmup: float, steps: int) -> float:
    """Linear warm-up over the first `warmup` fraction of `steps`, then cosine to 0."""
    warmup_steps = max(1, int(warmup * steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))


@torch.no_grad()
def evaluate(model: CIMForPreTraining, config: CIMConfig, held_out: torch.Tensor, seed: int) -> dict:
    """Loss / IoU on fixed held-out views and boxes, next to the constant prior of the same box distribution."""
    model.eval()
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(seed + 100)
    pixels = views(held_out, torch.arange(len(held_out)), config.image_size, gen, mean, std)
    losses, ious, logits_all, labels_all = [], [], [], []
    for chunk in pixels.split(32):
        out = model(pixel_values=chunk, generator=gen)
        losses.append(out.loss.item() * len(chunk))
        ious.append(correlation_iou(out.logits, out.correlation_labels).item() * len(chunk))
        logits_all.append(out.logits)
        labels_all.append(out.correlation_labels)
    logits, labels = torch.cat(logits_all), torch.cat(labels_all)
    prior = correlation_prior(config, generator=torch.Generator().manual_seed(seed + 7))
    prior_loss, prior_iou = (float(v) for v in prior_metrics(prior, labels, config))
    loss = sum(losses) / len(pixels)
    # do the maps move with the exemplar? correlation of (prediction - its mean over exemplars) with the truth
    probs = logits.sigmoid()
    centred = probs - probs.mean(dim=(0, 1), keepdim=True)
    truth = labels - labels.mean(dim=(0, 1), keepdim=True)
    follow = (centred * truth).sum() / (centred.norm() * truth.norm()).clamp(min=1e-8)
    # the same within each image (means over its K exemplars removed): an image-specific "where exemplars
    # usually are on this image" map scores 0 here; only maps that move with the exemplar score
    centred = probs - probs.mean(dim=1, keepdim=True)
    truth = labels - labels.mean(dim=1, keepdim=True)
    follow_within = (centred * truth).sum() / (centred.norm() * truth.norm()).clamp(min=1e-8)
    return {
        "follow_within_image": round(float(follow_within), 3),
        "loss": round(loss, 4),
        "prior_loss": round(prior_loss, 4),
        "loss_ratio": round(loss / prior_loss, 3),
        "iou": round(sum(ious) / len(pixels), 4),
        "prior_iou": round(prior_iou, 4),
        "follow": round(float(follow), 3),
    }


def score_checkpoints(args) -> None:
    """Loss, IoU and follow of saved checkpoints against the prior, on held-out views at each one's own sizes."""
    for path in args.score:
        model = CIMForPreTraining.from_pretrained(path)
        size = model.config.image_size
        held_out = load_images(
            args.data, args.num_held_out, size, split="train" if args.data == "skimage" else "validation"
        )
        result = evaluate(model, model.config, held_out, args.seed)
        print(path, json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=["default", "easy"])
    parser.add_argument("--data", choices=["imagenette", "skimage"], default="imagenette")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--num_held_out", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--out", default=None, help="Append each result as a JSON line to this file.")
    parser.add_argument(
        "--score",
        nargs="+",
        default=None,
        metavar="CHECKPOINT",
        help="Instead of training, score saved CIMForPreTraining checkpoints on the held-out views.",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.score:
        score_checkpoints(args)
        return
    size = build_config(BASE).image_size
    images = load_images(args.data, args.num_images, size)
    if args.data == "skimage":
        held_out = images
    else:
        held_out = load_images(args.data, args.num_held_out, size, split="validation")
    print(
        f"{'run':48s} {'steps':>5s} {'loss':>7s} {'prior':>7s} {'ratio':>6s} {'IoU':>6s} {'prior':>6s} "
        f"{'follow':>6s} {'s':>6s}"
    )
    for spec in args.runs:
        r = run(spec, images, held_out, args)
        print(
            f"{r['run']:48s} {r['steps']:5d} {r['loss']:7.3f} {r['prior_loss']:7.3f} {r['loss_ratio']:6.3f} "
            f"{r['iou']:6.3f} {r['prior_iou']:6.3f} {r['follow']:6.3f} {r['seconds']:6.0f}",
            flush=True,
        )
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
