"""This package's CIM side by side with the authors' code (weivision/Correlational-Image-Modeling).

    python benchmarks/authors_side_by_side.py --authors_code /path/to/Correlational-Image-Modeling

1. Equality on identical inputs: their ``CorrelationalAutoencoderViT`` at a small size (ViT width 192, 2 layers,
   3 heads, patch 8, 96 px views, 64 px context, 6 exemplars of 32 px, decoder 256 wide / 8 heads), their init,
   saved in their checkpoint format and converted with ``cim-convert-original``'s function; both models get the
   same context, exemplars and maps; loss, probabilities, logits and every gradient are compared, then the
   weights after one AdamW step and one EMA update of each side.
2. Training curves from the same converted weights, the same photos (the scikit-image photos of our quick start;
   ``--data`` for a Hub-layout dataset folder such as ../shared/data/imagenette-160, ``--max_images`` of it), the
   same images at every step, optimizer (AdamW (0.9, 0.95), wd 0.05 on matrices), warm-up + cosine lr, EMA
   momentum 0.99 -> 1 (cosine) and batch: each side with its own pretext (theirs: their ``CorrlationDataset``,
   PIL per image on the CPU; ours: ``sample_pretext`` inside ``forward``), photometric exemplar augmentation on
   and off. Per window of steps: mean loss, the loss of the constant prior map, their ratio, and images/s (data
   pipeline included). Each side's prior is the per-pixel mean of its own true maps over the run, scored with the
   same cross-entropy (per-exemplar mean summed over K, both sides' loss convention) on each window's maps.

Their code is imported at run time from ``--authors_code`` (see ``_authors.py`` for the run-time shims to
torchvision and numpy that let it import on today's versions; their files are not modified or copied). It needs
``timm`` and ``torchvision``, which are not dependencies of this package. Run with ``OMP_NUM_THREADS=1``; the
default (400 steps x 2 settings x 2 sides at batch 8) takes about 10 minutes on one thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _authors as A  # noqa: E402
import _authors_compare as C  # noqa: E402
from _common import command_line, machine_lines, markdown_table  # noqa: E402

from transformers_cim.data import default_image_dataset, load_image_dataset  # noqa: E402
from transformers_cim.data.collate import SeededImageDataset  # noqa: E402
from transformers_cim.data.transforms import RandomResizedCropFlip  # noqa: E402
from transformers_cim.pretext_metrics import correlation_prior  # noqa: E402

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "authors_side_by_side_cpu.md")
SIDES = ("theirs", "ours")


@dataclass
class Window:
    """What one side saw and did over a window of steps."""

    first_step: int
    losses: list[float] = field(default_factory=list)
    mask_sum: torch.Tensor | None = None
    maps: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(self, loss: float, masks: torch.Tensor, images: int, seconds: float) -> None:
        summed = masks.detach().double().sum(dim=(0, 1))
        self.mask_sum = summed if self.mask_sum is None else self.mask_sum + summed
        self.losses.append(loss)
        self.maps += masks.shape[0] * masks.shape[1]
        self.images += images
        self.seconds += seconds


@dataclass
class RunResult:
    side: str
    augmentation: bool
    windows: list[Window]
    num_exemplars: int

    def prior(self) -> torch.Tensor:
        """The per-pixel mean of this side's true maps over the whole run."""
        total = sum(w.mask_sum for w in self.windows)
        return total / sum(w.maps for w in self.windows)

    def prior_loss(self, window: Window) -> float:
        return A.constant_map_loss(window.mask_sum, window.maps, self.prior(), self.num_exemplars)

    def mean_loss(self, window: Window) -> float:
        return sum(window.losses) / len(window.losses)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train_side(
    side: str,
    authors,
    sizes: A.Sizes,
    converted_dir: str,
    authors_state: dict,
    images_folder: str,
    photos,
    augmentation: bool,
    args: argparse.Namespace,
) -> RunResult:
    """Trains one side for ``args.steps`` steps from the shared initial weights, with its own pretext."""
    torch.manual_seed(args.seed)
    if side == "theirs":
        model = A.build_authors_model(authors, sizes, args.seed)
        model.load_state_dict(authors_state)
        dataset = A.authors_dataset(authors, images_folder, sizes, augmentation)
        A.seed_global_rngs(args.seed)
    else:
        model = A.CIMForPreTraining.from_pretrained(converted_dir)
        model.config.exemplar_augmentation = augmentation
        view = RandomResizedCropFlip(
            size=sizes.image, scale=sizes.view_scale, mean=A.IMAGENET_MEAN, std=A.IMAGENET_STD
        )
        dataset = SeededImageDataset(photos, "image", view, seed=args.seed)
    model.train()
    optimizer = A.adamw(
        model, args.lr, args.weight_decay, predictor_lr_scale=args.our_predictor_lr_scale if side == "ours" else 1.0
    )
    windows: list[Window] = []
    batches = A.batch_indices(len(photos), args.batch_size, args.seed)
    for step in range(args.steps):
        if step % args.window == 0:
            windows.append(Window(step))
        start = time.perf_counter()
        epoch, indices = next(batches)
        A.set_lr(optimizer, A.warmup_cosine_lr(step, args.steps, args.warmup_steps, args.lr))
        if side == "theirs":
            loss, masks = A.authors_step_loss(model, A.authors_batch(dataset, indices))
        else:
            dataset.set_epoch(epoch)
            pixel_values = torch.stack([dataset[i]["pixel_values"] for i in indices])
            loss, masks = A.our_step_loss(model, pixel_values, args.seed, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        momentum = A.ema_momentum(step, args.steps)
        if side == "theirs":
            A.authors_momentum_update(model, momentum)
        else:
            model.momentum_update(momentum)
        windows[-1].add(float(loss), masks, len(indices), time.perf_counter() - start)
    return RunResult(side, augmentation, windows, sizes.num_exemplars)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def equality_table(differences: list[C.Difference]) -> str:
    rows = [
        [
            d.quantity,
            f"{d.max_abs:.2e}",
            d.where or "",
            d.compared,
            ("yes" if d.max_abs <= A.TOLERANCE else "**NO**") if C.gated(d) else "-",
        ]
        for d in differences
    ]
    return markdown_table(
        ["quantity", "max abs difference", "largest at", "tensors / values", f"<= {A.TOLERANCE:g}"],
        rows,
        align="lrlrc",
    )


def training_table(results: list[RunResult]) -> str:
    """One row per window: loss / prior of each side, and images/s, for each augmentation setting."""
    rows = []
    settings = sorted({r.augmentation for r in results}, reverse=True)
    for augmentation in settings:
        pair = {r.side: r for r in results if r.augmentation == augmentation}
        for index, _ in enumerate(pair["ours"].windows):
            cells = [
                ("on" if augmentation else "off"),
                f"{pair['ours'].windows[index].first_step}-"
                f"{pair['ours'].windows[index].first_step + len(pair['ours'].windows[index].losses) - 1}",
            ]
            for side in SIDES:
                run, window = pair[side], pair[side].windows[index]
                loss, prior = run.mean_loss(window), run.prior_loss(window)
                cells += [
                    f"{loss:.3f}",
                    f"{prior:.3f}",
                    f"**{loss / prior:.3f}**",
                    f"{window.images / window.seconds:.1f}",
                ]
            rows.append(cells)
    headers = ["aug", "steps"]
    for side in SIDES:
        headers += [f"{side}: loss", f"{side}: prior", f"{side}: loss/prior", f"{side}: img/s"]
    return markdown_table(headers, rows, align="ll" + "r" * 8)


def summary_table(results: list[RunResult], last: int) -> str:
    """Mean loss / prior of the last ``last`` windows and the run's images/s, per side and setting."""
    rows = []
    for run in results:
        tail = run.windows[-last:]
        ratio = sum(run.mean_loss(w) / run.prior_loss(w) for w in tail) / len(tail)
        images, seconds = sum(w.images for w in run.windows), sum(w.seconds for w in run.windows)
        prior = run.prior()
        rows.append(
            [
                run.side,
                "on" if run.augmentation else "off",
                f"{ratio:.3f}",
                f"{images / seconds:.1f}",
                f"{float(prior.mean()):.3f}",
                f"{float(prior.max()):.3f}",
            ]
        )
    return markdown_table(
        ["side", "aug", f"loss/prior, last {last} windows", "img/s (whole run)", "prior map: mean", "prior map: max"],
        rows,
        align="llrrrr",
    )


def our_config_prior_line(results: list[RunResult], converted_dir: str) -> str:
    """Cross-check of our empirical prior against `correlation_prior` (our box distribution, 8192 boxes)."""
    config = A.CIMForPreTraining.config_class.from_pretrained(converted_dir)
    analytic = correlation_prior(config, generator=torch.Generator().manual_seed(0))
    ours = [r for r in results if r.side == "ours"][0]
    return (
        f"Cross-check: our empirical prior map vs `correlation_prior` (our box distribution, 8192 boxes): max "
        f"abs difference {float((ours.prior() - analytic).abs().max()):.3f}, mean {float(ours.prior().mean()):.3f}"
        f" vs {float(analytic.mean()):.3f}."
    )


def load_photos(args: argparse.Namespace):
    if args.data is None:
        return default_image_dataset()
    photos = load_image_dataset(args.data, split="train")
    count = min(args.max_images, len(photos))
    return photos.shuffle(seed=args.seed).select(range(count))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--authors_code",
        default=os.environ.get(A.AUTHORS_ENV),
        help=f"checkout of weivision/Correlational-Image-Modeling (default: ${A.AUTHORS_ENV})",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="dataset folder in Hub layout (e.g. ../shared/data/imagenette-160); default: the "
        "scikit-image photos of the quick start",
    )
    parser.add_argument("--max_images", type=int, default=1024, help="images of --data used (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--window", type=int, default=50, help="steps per row of the training table")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--warmup_steps", type=int, default=40)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--augmentation", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument(
        "--our_predictor_lr_scale",
        type=float,
        default=1.0,
        help="lr multiple of our 1-logit predictor (2 with half the weight decay reproduces their "
        "2-logit predictor's Adam steps; default %(default)s: as our trainer)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip_training", action="store_true", help="part 1 only")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if not args.authors_code:
        parser.error(f"pass --authors_code DIR or set {A.AUTHORS_ENV} (a checkout of their repository)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    authors = A.import_authors_code(args.authors_code)
    sizes = A.Sizes()
    lines = [
        "# Side by side with the authors' code",
        "",
        f"Command: `{command_line()}`",
        "",
        *machine_lines(
            torch.device("cpu"),
            args.threads,
            extra=f"Their code: {authors.path} (commit {C.git_commit(authors.path)}); this "
            f"repository: commit {C.git_commit(os.path.dirname(__file__))}; package imported "
            f"from {os.path.dirname(C.transformers_cim_path())}",
        ),
        "",
    ]
    with A.temporary_directory() as work_dir:
        differences = C.compare_on_fixed_inputs(authors, sizes, os.path.join(work_dir, "equality"), seed=args.seed)
        lines += [
            "## 1. Equality on identical inputs (fp32)",
            "",
            f"Their model at {sizes.describe()}; their init, converted with cim-convert-original; batch 4, "
            "the same context, exemplars and maps on both sides. The step: AdamW lr 1e-4, wd 0.05, eps "
            f"{A.STEP_CHECK_EPS:g}, our predictor at {A.PREDICTOR_TWO_LOGIT_LR:g}x lr and 1/"
            f"{A.PREDICTOR_TWO_LOGIT_LR:g} wd (their two logits), then EMA momentum 0.99.",
            "",
            equality_table(differences),
            "",
        ]
        print("\n".join(lines), flush=True)
        if not args.skip_training:
            lines += training_report(authors, sizes, work_dir, args)
    text = "\n".join(lines).rstrip() + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(f"(written to {args.output})")
    return 0 if all(d.max_abs <= A.TOLERANCE for d in differences if C.gated(d)) else 1


def training_report(authors, sizes: A.Sizes, work_dir: str, args: argparse.Namespace) -> list[str]:
    """Part 2: both sides trained from the same converted weights, each setting of --augmentation."""
    initial = A.build_authors_model(authors, sizes, args.seed)
    converted = A.convert_authors_model(initial, sizes, os.path.join(work_dir, "training"))
    converted_dir = os.path.join(work_dir, "training", "converted")
    del converted
    photos = load_photos(args)
    folder = A.write_image_folder(photos, "image", os.path.join(work_dir, "images"))
    results = []
    for setting in args.augmentation:
        for side in SIDES:
            started = time.time()
            results.append(
                train_side(
                    side, authors, sizes, converted_dir, initial.state_dict(), folder, photos, setting == "on", args
                )
            )
            print(f"trained {side}, augmentation {setting}: {time.time() - started:.0f} s", flush=True)
    data = args.data or "the scikit-image photos of the quick start"
    return [
        "## 2. Training curves, same initial weights",
        "",
        f"{args.steps} steps, batch {args.batch_size}, {len(photos)} images ({data}), the same images at every step "
        f"on both sides; AdamW (0.9, 0.95), wd {args.weight_decay} on matrices (not norms, biases, CLS), peak lr "
        f"{args.lr:g}, {args.warmup_steps} warm-up steps then cosine to 0, EMA momentum 0.99 -> 1 (cosine), fp32, "
        f"{args.threads} thread(s); our predictor at {args.our_predictor_lr_scale:g}x lr. Loss: per-exemplar mean "
        "cross-entropy summed over the K = 6 exemplars (both sides). Prior: each side's per-pixel mean true map "
        "over its run, scored on each window's maps with the same loss; loss/prior < 1 means the model locates the "
        "exemplar better than the best constant map. img/s: data pipeline (search view, exemplars, maps) + forward "
        "+ backward + AdamW + EMA, single process.",
        "",
        training_table(results),
        "",
        summary_table(results, last=2),
        "",
        our_config_prior_line(results, converted_dir),
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
