"""Semantic segmentation: the scores against hand computation, the joint image / mask transforms keeping the pair
aligned, the errors for bad masks, layer decay over UperNet, and a tiny end-to-end run of the script."""

from __future__ import annotations

import io
import json
import math
import os
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import make_tiny_resnet_config, make_tiny_vit_config
from PIL import Image

from transformers_cim import CIMForPreTraining
from transformers_cim.errors import UserValueError
from transformers_cim.training.data.segmentation import (
    MaskRules,
    SeededSegmentationDataset,
    SegmentationCollator,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    decode_mask,
    find_mask_column,
    prepare_segmentation_stream,
    segmentation_folder_dataset,
    segmentation_row,
)
from transformers_cim.training.layer_decay import param_groups_layer_decay
from transformers_cim.training.segmentation import (
    SegmentationTrainer,
    evaluate_segmentation,
    pad_to_multiple,
    render_segmentation_examples,
)
from transformers_cim.training.segmentation_data import row_names
from transformers_cim.training.segmentation_metrics import (
    ConfusionMatrix,
    confusion_counts,
    flat_scores,
    segmentation_scores,
)
from transformers_cim.transfer import upernet_for_semantic_segmentation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# class id -> colour: the image of a block-painted scene determines its mask
COLOURS = np.array([[230, 20, 20], [20, 200, 40], [30, 40, 220], [240, 240, 30]], dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def block_scene(height: int, width: int, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random layout of `block`-pixel squares of the 4 classes: (image (H, W, 3) uint8, mask (H, W))."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, len(COLOURS), (math.ceil(height / block), math.ceil(width / block)))
    mask = np.kron(grid, np.ones((block, block), dtype=np.int64))[:height, :width]
    return COLOURS[mask], mask


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------
def test_scores_match_a_hand_computed_example():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    counts = confusion_counts(predicted, target, num_labels=3, ignore_index=255)
    # rows true, columns predicted; the ignored pixel (true 255, predicted 2) is left out
    assert counts.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    scores = segmentation_scores(counts, ["a", "b", "c"])
    # IoU: a 1/(2+2-1)=1/3, b 2/(3+3-2)=1/2, c 1/(2+2-1)=1/3
    assert scores["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 1 / 2, "c": 1 / 3})
    assert scores["mean_iou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert scores["overall_accuracy"] == pytest.approx(4 / 7)
    assert scores["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_a_class_absent_everywhere_is_left_out_of_the_mean_and_the_flat_metrics():
    matrix = ConfusionMatrix(3, ignore_index=255)
    matrix.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 255]))
    matrix.update(torch.tensor([1]), torch.tensor([1]))
    scores = segmentation_scores(matrix.counts, {0: "x", 1: "y", 2: "z"})
    assert math.isnan(scores["per_class_iou"]["z"]) and scores["mean_iou"] == 1.0
    flat = flat_scores(scores)
    assert flat == {"mean_iou": 1.0, "overall_accuracy": 1.0, "mean_accuracy": 1.0, "iou_x": 1.0, "iou_y": 1.0}
    json.dumps(flat, allow_nan=False)


def test_a_target_outside_the_classes_is_refused():
    with pytest.raises(ValueError, match=r"\[7\]"):
        confusion_counts(torch.tensor([0, 1]), torch.tensor([0, 7]), num_labels=3)


# ------------------------------------------------------------------------------------------------------------
# Joint transforms
# ------------------------------------------------------------------------------------------------------------
def _as_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask)


def _mask_from_view(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class of the nearest colour, whether the pixel is that colour to within 2 levels) of an un-normalised view."""
    pixels = (view.permute(1, 2, 0) * 255).round()
    distance = (pixels[:, :, None, :] - torch.from_numpy(COLOURS).float()).abs().amax(-1)
    nearest = distance.argmin(-1)
    return nearest, distance.amin(-1) <= 2


def test_train_transform_keeps_image_and_mask_aligned_through_scale_crop_and_flip():
    image, mask = block_scene(48, 64, block=16, seed=0)
    transform = SegmentationTrainTransform((40, 40), base_size=48, mean=(0, 0, 0), std=(1, 1, 1))
    flipped = 0
    for seed in range(8):
        view, labels = transform(*_as_tensors(image, mask), torch.Generator().manual_seed(seed))
        assert view.shape == (3, 40, 40) and labels.shape == (40, 40) and labels.dtype == torch.long
        derived, exact = _mask_from_view(view)
        labelled = labels != 255
        checked = exact & labelled
        assert checked.sum() > 0.3 * labelled.sum()  # block interiors keep their exact colour
        assert (derived[checked] == labels[checked]).all()
        # the same draws again give the same pair; the flip is detected on the unflipped pair's mirror
        again_view, again_labels = transform(*_as_tensors(image, mask), torch.Generator().manual_seed(seed))
        assert torch.equal(again_view, view) and torch.equal(again_labels, labels)
        no_flip = SegmentationTrainTransform((40, 40), base_size=48, mean=(0, 0, 0), std=(1, 1, 1), hflip=False)
        _, plain = no_flip(*_as_tensors(image, mask), torch.Generator().manual_seed(seed))
        flipped += int(torch.equal(plain.flip(-1), labels) and not torch.equal(plain, labels))
    assert 0 < flipped < 8


def test_train_transform_pads_small_views_with_the_ignore_index():
    image, mask = block_scene(20, 20, block=4, seed=1)
    transform = SegmentationTrainTransform(
        32, base_size=20, scale_range=(1.0, 1.0), hflip=False, mean=(0, 0, 0), std=(1, 1, 1)
    )
    view, labels = transform(*_as_tensors(image, mask), torch.Generator().manual_seed(0))
    assert torch.equal(labels[:20, :20], torch.from_numpy(mask)) and (labels[20:] == 255).all()
    assert (labels[:, 20:] == 255).all() and (view[:, 20:, :] == 0).all()


def test_eval_transform_keeps_the_mask_at_its_size_and_pad_to_multiple():
    image, mask = block_scene(30, 45, block=5, seed=2)
    view, labels = SegmentationEvalTransform(base_size=60)(*_as_tensors(image, mask))
    assert view.shape == (3, 60, 90) and torch.equal(labels, torch.from_numpy(mask))
    assert pad_to_multiple(torch.zeros(1, 3, 30, 45), 16).shape == (1, 3, 32, 48)


# ------------------------------------------------------------------------------------------------------------
# Masks: conversions and errors
# ------------------------------------------------------------------------------------------------------------
def test_grey_mask_saved_as_rgb_is_read_from_one_channel_and_palette_masks_keep_their_indices():
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    got, _ = decode_mask({"bytes": png_bytes(np.repeat(mask[:, :, None], 3, axis=2)), "path": None})
    assert got.tolist() == mask.tolist()
    # a colour palette: reading the colours instead of the indices would be refused (or give other values)
    palette = Image.fromarray(mask, mode="P")
    palette.putpalette([channel for i in range(256) for channel in COLOURS[i % len(COLOURS)]])
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert decode_mask({"bytes": buffer.getvalue(), "path": None})[0].tolist() == mask.tolist()


def test_mask_gets_the_exif_orientation_its_image_would_get():
    image, mask = block_scene(32, 48, block=8, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees
    rotated = {}
    for name, array in (("image", image), ("mask", mask.astype(np.uint8))):
        buffer = io.BytesIO()
        Image.fromarray(array[::-1, ::-1].copy()).save(buffer, format="PNG", exif=exif.tobytes())
        rotated[name] = {"bytes": buffer.getvalue(), "path": None}
    row = segmentation_row(
        rotated["image"], rotated["mask"], SegmentationEvalTransform(mean=(0, 0, 0), std=(1, 1, 1)), MaskRules(4)
    )
    assert torch.equal(row["labels"], torch.from_numpy(mask))
    derived, exact = _mask_from_view(row["pixel_values"])
    assert exact.all() and torch.equal(derived, row["labels"])


def test_one_bit_mask_keeps_ids_zero_and_one():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 1], [1, 0]], dtype=bool)).save(buffer, format="PNG")
    assert decode_mask({"bytes": buffer.getvalue(), "path": None})[0].tolist() == [[0, 1], [1, 0]]


def test_colour_mask_is_refused_naming_the_file_and_the_fix():
    colour = COLOURS[np.array([[0, 1], [2, 3]])]
    with pytest.raises(UserValueError, match=r"row 3 \(city/0001.png\).*colour image.*class ids"):
        decode_mask({"bytes": png_bytes(colour), "path": "city/0001.png"}, where="row 3 (city/0001.png)")


def _row(image: np.ndarray, mask: np.ndarray, rules: MaskRules, name: str = "a.jpg"):
    transform = SegmentationEvalTransform()
    return segmentation_row(
        {"bytes": png_bytes(image), "path": name},
        {"bytes": png_bytes(mask), "path": None},
        transform,
        rules,
        where="row 5",
    )


def test_mask_of_another_size_is_refused():
    image, mask = block_scene(32, 48, block=8, seed=3)
    with pytest.raises(UserValueError, match=r"row 5 \(a.jpg\).*48x32.*47x32.*nearest"):
        _row(image[:, :47], mask.astype(np.uint8), MaskRules(4))


def test_labels_outside_the_classes_are_refused_and_reduce_labels_maps_zero_to_ignore():
    image, mask = block_scene(32, 48, block=8, seed=4)
    bad = mask.astype(np.uint8)
    bad[0, 0] = 9
    with pytest.raises(UserValueError, match=r"row 5 \(a.jpg\).*\[9\].*4 classes.*--reduce_labels"):
        _row(image, bad, MaskRules(4))
    ignored = mask.astype(np.uint8)
    ignored[0, 0] = 255
    assert _row(image, ignored, MaskRules(4))["labels"][0, 0] == 255
    reduced = _row(image, mask.astype(np.uint8), MaskRules(3, reduce_labels=True))["labels"]
    assert torch.equal(reduced, torch.from_numpy(np.where(mask == 0, 255, mask - 1)))


def test_undecodable_image_is_skipped_and_counted_by_the_collator():
    image, mask = block_scene(32, 48, block=8, seed=5)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes(image), "path": "ok.png"}, {"bytes": b"not an image", "path": "broken.jpg"}],
            "label": [{"bytes": png_bytes(mask.astype(np.uint8)), "path": None}] * 2,
        },
        features=features,
    )
    rows = SeededSegmentationDataset(ds, "image", "label", SegmentationTrainTransform(32), MaskRules(4))
    batch = SegmentationCollator()(rows.__getitems__([0, 1]))
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and batch["labels"].shape == (1, 32, 32)
    assert int(batch["num_skipped"]) == 1 and batch["skipped_images"][0][0] == "broken.jpg"
    # streamed: the same rows, decoded lazily, the corrupt one flagged and dropped by the collator
    stream = prepare_segmentation_stream(
        ds.to_iterable_dataset(), "image", "label", SegmentationTrainTransform(32), MaskRules(4)
    )
    batch = SegmentationCollator()(list(stream))
    assert (
        batch["labels"].shape == (1, 32, 32)
        and batch["skipped_images"][0] == ("broken.jpg", batch["skipped_images"][0][1])
        and "undecodable" in batch["skipped_images"][0][1]
    )


def test_folder_pairs_images_and_masks_by_name_and_names_the_unpaired(tmp_path):
    for name in ("b", "a"):
        image, mask = block_scene(16, 16, block=4, seed=ord(name))
        os.makedirs(tmp_path / "train" / "images", exist_ok=True)
        os.makedirs(tmp_path / "train" / "masks", exist_ok=True)
        Image.fromarray(image).save(tmp_path / "train" / "images" / f"{name}.jpg")
        Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "train" / "masks" / f"{name}.png")
    ds = segmentation_folder_dataset(str(tmp_path / "train"))
    assert [os.path.basename(r["path"]) for r in ds.cast_column("image", datasets.Image(decode=False))["image"]] == [
        "a.jpg",
        "b.jpg",
    ]
    assert find_mask_column(ds, "image") == "label"
    Image.fromarray(image).save(tmp_path / "train" / "images" / "c.jpg")
    with pytest.raises(UserValueError, match=r"1 image\(s\) have no mask.*'c'"):
        segmentation_folder_dataset(str(tmp_path / "train"))
    with pytest.raises(UserValueError, match="images/.*masks/"):
        segmentation_folder_dataset(str(tmp_path / "train" / "images"))
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "train" / "masks" / "c.png")
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "train" / "masks" / "c.bmp")
    with pytest.raises(UserValueError, match=r"c\.bmp and .*c\.png differ only in their extension"):
        segmentation_folder_dataset(str(tmp_path / "train"))


def test_an_image_level_class_label_is_not_taken_for_the_mask():
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["indoor", "street"]),
            "annotation": datasets.Image(),
        }
    )
    ds = datasets.Dataset.from_dict({"image": [], "label": [], "annotation": []}, features=features)
    assert find_mask_column(ds, "image") == "annotation"


def test_missing_mask_column_is_named():
    ds = datasets.Dataset.from_dict({"image": [b""], "caption": ["x"]})
    with pytest.raises(UserValueError, match="No mask column.*--label_column_name"):
        find_mask_column(ds, "image")
    with pytest.raises(UserValueError, match="'seg' .*not found"):
        find_mask_column(ds, "image", "seg")


# ------------------------------------------------------------------------------------------------------------
# Layer decay over UperNet
# ------------------------------------------------------------------------------------------------------------
def _group_of(groups, name_to_param, name):
    param = name_to_param[name]
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_layer_decay_puts_blocks_in_order_and_neck_and_heads_on_top(single_thread):
    encoder = make_tiny_vit_config().encoder_config
    encoder.num_hidden_layers = 4
    model = upernet_for_semantic_segmentation(
        None, 3, encoder_config=encoder, image_size=32, hidden_size=16, auxiliary_channels=8
    )
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5, base_lr=1.0)
    params = dict(model.named_parameters())
    assert _group_of(groups, params, "backbone.beit.embeddings.patch_embeddings.projection.weight")["lr"] == 0.5**5
    for i in range(4):
        assert _group_of(groups, params, f"backbone.beit.layers.{i}.mlp.fc1.weight")["lr"] == 0.5 ** (4 - i)
    for name in params:
        if name.startswith(("backbone.fpn", "decode_head", "auxiliary_head")):
            assert _group_of(groups, params, name)["lr"] == 1.0, name
    assert sum(len(g["params"]) for g in groups) == len(params)

    resnet = upernet_for_semantic_segmentation(
        None, 3, encoder_config=make_tiny_resnet_config().encoder_config, hidden_size=16, auxiliary_channels=8
    )
    groups = param_groups_layer_decay(resnet, weight_decay=0.05, layer_decay=0.5, base_lr=1.0)
    params = dict(resnet.named_parameters())
    stem = next(n for n in params if "embedder" in n)
    assert _group_of(groups, params, stem)["lr"] == 0.5**5
    stage3 = next(n for n in params if ".stages.3." in n)
    assert _group_of(groups, params, stage3)["lr"] == 0.5
    assert _group_of(groups, params, "decode_head.classifier.weight")["lr"] == 1.0


# ------------------------------------------------------------------------------------------------------------
# The script, end to end
# ------------------------------------------------------------------------------------------------------------
def write_tiny_dataset(root, rows: dict[str, int]) -> None:
    """A Hub-layout parquet dataset of 32x48 block scenes and their masks (255 at the border), with id2label.json."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    for offset, (split, count) in enumerate(rows.items()):
        images, masks = [], []
        for i in range(count):
            image, mask = block_scene(32, 48, block=8, seed=100 * offset + i)
            mask = mask.astype(np.uint8)
            mask[0, :] = 255
            images.append({"bytes": png_bytes(image), "path": f"{split}-{i}.png"})
            masks.append({"bytes": png_bytes(mask), "path": None})
        os.makedirs(root / "data", exist_ok=True)
        datasets.Dataset.from_dict({"image": images, "label": masks}, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    (root / "id2label.json").write_text(
        json.dumps({str(i): n for i, n in enumerate(["red", "green", "blue", "yellow"])})
    )


def test_script_trains_evaluates_predicts_and_saves_a_pipeline_model(tmp_path, single_thread):
    from transformers import pipeline

    import run_semantic_segmentation

    write_tiny_dataset(tmp_path / "blocks", {"train": 6, "validation": 3, "test": 2})
    config = make_tiny_vit_config()
    config.encoder_config.num_hidden_layers = 4
    CIMForPreTraining(config).save_pretrained(tmp_path / "cim")
    out = tmp_path / "seg"
    results = run_semantic_segmentation.main(
        [
            "--model_name_or_path",
            str(tmp_path / "cim"),
            "--dataset_name",
            str(tmp_path / "blocks"),
            "--crop_size",
            "32",
            "--decoder_hidden_size",
            "16",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "1e-3",
            "--layer_decay",
            "0.9",
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--num_figure_images",
            "2",
            "--output_dir",
            str(out),
            "--report_to",
            "none",
            "--dataloader_num_workers",
            "0",
        ]
    )
    saved = json.loads((out / "all_results.json").read_text())
    for prefix in ("eval", "test"):
        assert 0 <= saved[f"{prefix}_mean_iou"] <= 1 and 0 <= saved[f"{prefix}_overall_accuracy"] <= 1
        assert any(key.startswith(f"{prefix}_iou_") for key in saved)
    assert saved["eval_images"] == 3 and saved["skipped_images"] == 0
    assert results["eval_mean_iou"] == saved["eval_mean_iou"]
    card = (out / "README.md").read_text()
    assert "model-index" in card and "mean_iou" in card and "image-segmentation" in card
    figure = Image.open(out / "segmentation_examples.png")
    assert figure.width >= 3 * 48 and figure.height > 2 * 100
    assert sorted(os.listdir(out / "predictions")) == ["test-0.png", "test-1.png"]
    assert Image.open(out / "predictions" / "test-0.png").size == (48, 32)
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 48} and processor["do_reduce_labels"] is False

    segment = pipeline("image-segmentation", model=str(out))
    found = segment(Image.fromarray(block_scene(40, 60, block=10, seed=9)[0]))
    assert found and {o["label"] for o in found} <= {"red", "green", "blue", "yellow"}
    assert all(o["mask"].size == (60, 40) for o in found)


def test_script_names_a_missing_mask_column_and_a_colour_mask(tmp_path, single_thread):
    import run_semantic_segmentation

    root = tmp_path / "colour"
    write_tiny_dataset(root, {"train": 2})
    config = make_tiny_vit_config()
    config.encoder_config.num_hidden_layers = 4
    CIMForPreTraining(config).save_pretrained(tmp_path / "cim")
    common = [
        "--model_name_or_path",
        str(tmp_path / "cim"),
        "--dataset_name",
        str(root),
        "--crop_size",
        "32",
        "--decoder_hidden_size",
        "16",
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--do_train",
        "--output_dir",
        str(tmp_path / "o"),
        "--report_to",
        "none",
    ]
    with pytest.raises(UserValueError, match="at least 2"):
        run_semantic_segmentation.main(common + ["--per_device_train_batch_size", "1"])
    with pytest.raises(UserValueError, match="2 images, fewer than one batch"):
        run_semantic_segmentation.main(common + ["--per_device_train_batch_size", "4"])
    with pytest.raises(UserValueError, match="'segmentation_map' .*not found.*columns are \\['image', 'label'\\]"):
        run_semantic_segmentation.main(common + ["--label_column_name", "segmentation_map"])
    image, mask = block_scene(32, 48, block=8, seed=0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes(image), "path": "x.png"}] * 2,
            "label": [{"bytes": png_bytes(COLOURS[mask]), "path": "x_mask.png"}] * 2,
        },
        features=features,
    ).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(UserValueError, match=r"row [01] \(x.png\).*colour image"):
        run_semantic_segmentation.main(common + ["--overwrite_output_dir"])


def test_figure_shows_image_true_and_predicted_masks():
    image, mask = block_scene(32, 48, block=8, seed=6)
    pixel_values = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    figure = render_segmentation_examples(
        [(pixel_values, mask, mask)], ["r", "g", "b", "y"], (0, 0, 0), (1, 1, 1), tile_height=32
    )
    array = np.asarray(figure)
    assert array[18:50, 48:96].std() > 0 and np.array_equal(array[18:50, 48:96], array[18:50, 96:144])


def test_predicted_mask_names_stay_distinct_when_file_names_repeat_in_sub_folders(tmp_path):
    import run_semantic_segmentation

    for sub in ("a", "b"):
        os.makedirs(tmp_path / "images" / sub)
        Image.fromarray(block_scene(16, 16, block=4, seed=0)[0]).save(tmp_path / "images" / sub / "001.jpg")
    Image.fromarray(block_scene(16, 16, block=4, seed=0)[0]).save(tmp_path / "images" / "002.jpg")
    ds = segmentation_folder_dataset(str(tmp_path), "test_dir", require_masks=False)
    args = run_semantic_segmentation.DataTrainingArguments()
    assert row_names(ds, args) == ["002", "001-row-000001", "001-row-000002"]


def test_evaluation_loss_leaves_out_images_whose_pixels_are_all_ignored(single_thread):
    torch.manual_seed(0)
    encoder = make_tiny_vit_config().encoder_config
    encoder.num_hidden_layers = 4
    model = upernet_for_semantic_segmentation(
        None, 3, encoder_config=encoder, image_size=32, hidden_size=16, auxiliary_channels=8
    )
    labelled = {"pixel_values": torch.randn(3, 32, 32), "labels": torch.randint(0, 3, (32, 32))}
    ignored = {"pixel_values": torch.randn(3, 32, 32), "labels": torch.full((32, 32), 255)}
    alone = evaluate_segmentation(model, [labelled], 3)
    both = evaluate_segmentation(model, [labelled, ignored], 3)
    assert alone.loss > 0 and both.loss == pytest.approx(alone.loss)
    assert both.images == 2 and both.loss_images == 1


def test_a_training_batch_left_with_one_usable_image_adds_a_zero_loss_instead_of_a_batchnorm_error(
    tmp_path, single_thread
):
    from transformers import TrainingArguments

    encoder = make_tiny_vit_config().encoder_config
    encoder.num_hidden_layers = 4
    model = upernet_for_semantic_segmentation(
        None, 3, encoder_config=encoder, image_size=32, hidden_size=16, auxiliary_channels=8
    )
    trainer = SegmentationTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    )
    batch = {
        "pixel_values": torch.randn(1, 3, 32, 32),
        "labels": torch.randint(0, 3, (1, 32, 32)),
        "num_skipped": torch.tensor(1),
        "skipped_images": [("broken.jpg", "undecodable")],
    }
    loss = trainer.compute_loss(model.train(), batch)
    loss.backward()
    assert float(loss.detach()) == 0.0 and trainer.num_skipped_images == 1
    batch["pixel_values"], batch["labels"] = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    assert float(trainer.compute_loss(model, batch).detach()) > 0
