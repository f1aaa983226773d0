"""Tests for transformers_cim.training.data: sources, column detection, decoding, transforms, batching, workers."""

from __future__ import annotations

import io
import logging
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from transformers_cim.training import data
from transformers_cim.training.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    RandomResizedCropFlip,
    ResizeCenterCrop,
    SkippingCollator,
    build_classification_transform,
    build_pretraining_transform,
    check_num_workers,
    count_shards,
    decode_image,
    default_image_dataset,
    find_image_column,
    find_label_column,
    load_image_dataset,
    prepare_dataset,
)

IMAGENETTE = "/work/shared/data/imagenette-160"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def two_colour_image(size=(48, 40), left=(220, 20, 30), right=(20, 40, 230)) -> Image.Image:
    """Left half one colour, right half another: a flip or a wrong channel order is visible."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = left
    arr[:, size[0] // 2 :] = right
    return Image.fromarray(arr)


def expected_normalised(rgb) -> torch.Tensor:
    return torch.tensor([(c / 255.0 - m) / s for c, m, s in zip(rgb, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


@pytest.fixture(scope="module")
def default_ds() -> datasets.Dataset:
    return default_image_dataset()


def write_image_folder(root, classes=("cat", "dog"), per_class=3) -> None:
    rng = np.random.default_rng(0)
    for ci, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (32 + 4 * i, 40, 3), dtype=np.uint8)
            arr[..., ci] = 255
            Image.fromarray(arr).save(folder / f"{i}.png")


def write_parquet(path, n=6, corrupt: dict[int, bytes] | None = None) -> list[bytes]:
    """Parquet with an Image feature column ``image`` and ClassLabel ``label``; rows in ``corrupt`` get those bytes."""
    rng = np.random.default_rng(1)
    blobs = [encode(Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)), "PNG") for _ in range(n)]
    for i, blob in (corrupt or {}).items():
        blobs[i] = blob
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)]
    rows = {"image": images, "label": [i % 2 for i in range(n)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return blobs


# ---------------------------------------------------------------------------------------------------------------
# default dataset
# ---------------------------------------------------------------------------------------------------------------


def test_default_image_dataset_real_distinct_rgb_photos(default_ds):
    assert len(default_ds) >= 8
    assert isinstance(default_ds.features["image"], datasets.Image)
    assert isinstance(default_ds.features["label"], datasets.ClassLabel)
    names = default_ds.features["label"].names
    assert len(set(names)) == len(names) == len(default_ds)
    assert {"astronaut", "coffee", "chelsea"} <= set(names)
    raw = default_ds.cast_column("image", datasets.Image(decode=False))
    digests = set()
    for row in raw:
        image = decode_image(row["image"])
        assert image is not None and image.mode == "RGB" and min(image.size) >= 64
        assert np.asarray(image).std() > 5  # a real picture, not a flat placeholder
        digests.add(hash(np.asarray(image.resize((16, 16))).tobytes()))
    assert len(digests) == len(default_ds)


def test_default_image_dataset_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = load_image_dataset()  # nothing given -> default
    assert len(ds) >= 8 and find_image_column(ds.features) == "image" and find_label_column(ds.features) == "label"
    streamed = load_image_dataset(streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert next(iter(streamed))["image"].size == ds[0]["image"].size


# ---------------------------------------------------------------------------------------------------------------
# decode_image
# ---------------------------------------------------------------------------------------------------------------


def test_decode_cmyk_jpeg_keeps_colour():
    blob = encode(Image.new("RGB", (40, 30), (200, 30, 40)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(blob)).mode == "CMYK"
    image = decode_image(blob)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.abs(np.asarray(image, int)[15, 20] - (200, 30, 40)).max() <= 6


def test_decode_rgba_png_composites_on_white():
    arr = np.zeros((30, 40, 4), np.uint8)
    arr[:, :20] = (10, 200, 30, 255)  # opaque green
    arr[:, 20:] = (0, 0, 0, 0)  # fully transparent black -> white
    image = decode_image({"bytes": encode(Image.fromarray(arr, "RGBA"), "PNG"), "path": "x.png"})
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((5, 5)) == (10, 200, 30)
    assert image.getpixel((35, 5)) == (255, 255, 255)


def test_decode_palette_png():
    palette_image = Image.new("P", (32, 24), 1)
    palette_image.putpalette([0, 0, 0, 250, 100, 5] + [0] * 762)
    blob = encode(palette_image, "PNG")
    assert Image.open(io.BytesIO(blob)).mode == "P"
    image = decode_image(blob)
    assert image.mode == "RGB" and image.size == (32, 24) and image.getpixel((3, 3)) == (250, 100, 5)


def test_decode_grayscale_png(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (20, 18), 77).save(path)
    for value in (str(path), path, {"bytes": None, "path": str(path)}):
        image = decode_image(value)
        assert image.mode == "RGB" and image.size == (20, 18) and image.getpixel((1, 1)) == (77, 77, 77)


def test_decode_16bit_grayscale_png_is_rescaled():
    arr = np.full((30, 40), 65535, np.uint16)
    arr[:, :20] = 128 * 257
    blob = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(blob)).mode.startswith("I")
    image = decode_image(blob)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((0, 0)) == (128, 128, 128) and image.getpixel((39, 0)) == (255, 255, 255)


def test_decode_numpy_and_pil_inputs():
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[..., 2] = 180
    assert decode_image(arr).getpixel((0, 0)) == (0, 0, 180)
    assert decode_image(np.full((20, 30), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert decode_image(arr.transpose(2, 0, 1)).size == (30, 20)  # CHW
    assert decode_image(Image.new("LA", (20, 20), (50, 255))).getpixel((0, 0)) == (50, 50, 50)


@pytest.mark.parametrize(
    "value",
    [b"", 42, None, 3.5, "/no/such/file.png", {"bytes": None, "path": None}, b"not an image at all", np.zeros(5)],
    ids=["empty", "int", "none", "float", "missing-path", "empty-dict", "garbage", "1d-array"],
)
def test_decode_bad_values_give_none(value):
    assert decode_image(value) is None


def test_decode_truncated_jpeg_gives_none():
    rng = np.random.default_rng(0)
    blob = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    assert decode_image(blob) is not None
    assert decode_image(blob[: len(blob) // 2]) is None


def test_decode_min_size():
    assert decode_image(encode(Image.new("RGB", (1, 1)), "PNG")) is None
    assert decode_image(Image.new("RGB", (15, 100))) is None
    assert decode_image(Image.new("RGB", (16, 100))) is not None
    assert decode_image(Image.new("RGB", (8, 8)), min_size=4) is not None


# ---------------------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------------------


def test_random_resized_crop_seeded_reproducible(default_ds):
    image = default_ds[0]["image"]
    transform = RandomResizedCropFlip(size=64)
    a = transform(image, rng=np.random.default_rng(123))
    b = transform(image, rng=np.random.default_rng(123))
    c = transform(image, rng=np.random.default_rng(124))
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32 and a.is_contiguous()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_resized_crop_constant_colour_normalisation():
    transform = RandomResizedCropFlip(size=32)
    out = transform(Image.new("RGB", (90, 70), (200, 100, 50)), rng=np.random.default_rng(0))
    expected = expected_normalised((200, 100, 50)).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_random_resized_crop_full_square_equals_resize():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 50, 3), dtype=np.uint8))
    transform = RandomResizedCropFlip(size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    out = transform(image, rng=np.random.default_rng(0))
    resized = np.asarray(image.resize((24, 24), Image.Resampling.BICUBIC), np.float32) / 255.0
    mean, std = np.array(IMAGENET_DEFAULT_MEAN, np.float32), np.array(IMAGENET_DEFAULT_STD, np.float32)
    expected = torch.from_numpy((resized - mean) / std).permute(2, 0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_random_resized_crop_params_within_bounds_and_flip_happens():
    transform = RandomResizedCropFlip(size=16, scale=(0.2, 1.0))
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = transform.get_params(100, 60, rng)
        assert 0 <= left and 0 <= top and left + w <= 100 and top + h <= 60 and w > 0 and h > 0
    # impossible ratio -> central fallback clamps the ratio
    strict = RandomResizedCropFlip(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert strict.get_params(100, 60, rng) == (20, 0, 60, 60)
    # flip: the left half (red) lands on the right for some seeds, never for hflip=False
    image = two_colour_image()
    full = dict(size=16, scale=(1.0, 1.0), ratio=(48 / 40, 48 / 40))
    flipped = [RandomResizedCropFlip(**full)(image, np.random.default_rng(s))[0, 8, 1] < 0 for s in range(20)]
    assert 0 < sum(flipped) < 20
    assert not any(
        RandomResizedCropFlip(**full, hflip=False)(image, np.random.default_rng(s))[0, 8, 1] < 0 for s in range(20)
    )


def test_random_resized_crop_unseeded_follows_torch_seed():
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (60, 60, 3), dtype=np.uint8))
    transform = RandomResizedCropFlip(size=16)
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(0)
    assert torch.equal(a, transform(image))


def test_resize_center_crop():
    transform = ResizeCenterCrop(size=32)  # shorter side -> int(32 / 0.875) = 36
    assert transform.resized_shape(80, 40) == (72, 36)
    assert transform.resized_shape(40, 80) == (36, 72)
    out = transform(two_colour_image((80, 40)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    red, blue = expected_normalised((220, 20, 30)), expected_normalised((20, 40, 230))
    torch.testing.assert_close(out[:, 16, 2], red, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 16, 29], blue, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        ResizeCenterCrop(crop_pct=1.5)


@pytest.mark.parametrize(
    "size, crop_pct, image_size",
    [(32, 0.875, (72, 78)), (32, 0.875, (97, 61)), (48, 1.0, (123, 77)), (224, 0.875, (300, 200))],
)
def test_saved_image_processor_computes_the_eval_transform(tmp_path, size, crop_pct, image_size):
    """What `pipeline()` / `AutoImageProcessor` users get is the evaluated view: same resize (bicubic), same crop
    offsets (72 x 78 -> 36 x 39: 7 rows to cut, 3 above), same normalisation."""
    from transformers import AutoImageProcessor

    transform = ResizeCenterCrop(size, crop_pct=crop_pct, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    transform.image_processor().save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    rng = np.random.default_rng(size + image_size[0])
    image = Image.fromarray(rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8))
    pixels = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, transform(image), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# columns
# ---------------------------------------------------------------------------------------------------------------


def test_find_columns_by_feature_and_name():
    features = datasets.Features(
        {"idx": datasets.Value("int64"), "picture": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])}
    )
    assert find_image_column(features) == "picture"
    assert find_label_column(features) == "y"
    assert find_image_column(["id", "jpg", "cls"]) == "jpg"
    assert find_label_column(["id", "jpg", "cls"]) == "cls"
    assert find_label_column(["image"]) is None
    assert find_image_column(["a", "img"], requested="a") == "a"  # no features: trust the request


def test_find_columns_errors():
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64"), "text": datasets.Value("string")}
    )
    with pytest.raises(ValueError, match=r"not found.*'image'.*'label'.*'text'"):
        find_image_column(features, requested="photo")
    with pytest.raises(ValueError, match="not an image"):
        find_image_column(features, requested="label")
    with pytest.raises(ValueError, match="not an image"):
        find_image_column(features, requested="text")
    with pytest.raises(ValueError, match="No image column"):
        find_image_column(["id", "text"])
    with pytest.raises(ValueError, match=r"No image column"):  # an int column named "image" is not an image
        find_image_column(datasets.Features({"image": datasets.Value("int32")}))
    with pytest.raises(ValueError, match=r"not found.*'text'"):
        find_label_column(features, requested="class")


# ---------------------------------------------------------------------------------------------------------------
# load_image_dataset
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_load_image_folder(tmp_path, streaming):
    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", per_class=1)
    ds = load_image_dataset(
        train_dir=str(tmp_path / "train"),
        validation_dir=str(tmp_path / "val"),
        streaming=streaming,
        cache_dir=str(tmp_path / "cache"),
    )
    assert ds.features["label"].names == ["cat", "dog"]
    assert find_image_column(ds.features) == "image"
    rows = list(ds)
    assert len(rows) == 6 and sorted(r["label"] for r in rows) == [0, 0, 0, 1, 1, 1]
    val = load_image_dataset(
        train_dir=str(tmp_path / "train"),
        validation_dir=str(tmp_path / "val"),
        split="validation",
        streaming=streaming,
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(list(val)) == 2


@pytest.mark.parametrize("streaming", [False, True])
def test_load_parquet_files(tmp_path, streaming):
    blobs = write_parquet(tmp_path / "train.parquet", n=5)
    write_parquet(tmp_path / "valid.parquet", n=3)
    kwargs = dict(
        train_files=[str(tmp_path / "train.parquet")],
        validation_files=[str(tmp_path / "valid.parquet")],
        streaming=streaming,
        cache_dir=str(tmp_path / "cache"),
    )
    ds = load_image_dataset(**kwargs)
    assert isinstance(ds, datasets.IterableDataset if streaming else datasets.Dataset)
    assert find_image_column(ds.features) == "image" and find_label_column(ds.features) == "label"
    rows = list(prepare_dataset(ds, "image", lambda b: {"raw": [v["bytes"] for v in b["image"]]}))
    assert [r["raw"] for r in rows] == blobs
    assert len(list(load_image_dataset(split="validation", **kwargs))) == 3


def test_load_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"train_dir.*nope"):
        load_image_dataset(train_dir=missing)
    with pytest.raises(FileNotFoundError, match=r"validation_files.*nope"):
        load_image_dataset(validation_files=[missing + ".parquet"])
    with pytest.raises(FileNotFoundError, match=r"dataset_name.*nope"):
        load_image_dataset(dataset_name=missing)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no image files"):
        load_image_dataset(train_dir=str(tmp_path / "empty"))
    write_parquet(tmp_path / "t.parquet", n=2)
    with pytest.raises(ValueError, match=r"More than one data source"):
        load_image_dataset(dataset_name=IMAGENETTE, train_files=[str(tmp_path / "t.parquet")])
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"'validation' does not exist.*\['train'\]"):
            load_image_dataset(
                train_files=[str(tmp_path / "t.parquet")],
                split="validation",
                streaming=streaming,
                cache_dir=str(tmp_path / "cache"),
            )
    (tmp_path / "t.xyz").write_text("?")
    with pytest.raises(ValueError, match="Cannot tell the format"):
        load_image_dataset(train_files=[str(tmp_path / "t.xyz")])


@pytest.mark.skipif(not os.path.isdir(IMAGENETTE), reason="imagenette-160 not available")
def test_load_hub_layout_dir_bad_split():
    with pytest.raises(ValueError, match=r"'test' does not exist.*'train', 'validation'"):
        load_image_dataset(dataset_name=IMAGENETTE, split="test", streaming=True)


# ---------------------------------------------------------------------------------------------------------------
# batching with corrupt rows
# ---------------------------------------------------------------------------------------------------------------


def test_streamed_parquet_with_corrupt_rows_is_skipped_exactly(tmp_path):
    good = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)), "JPEG")
    corrupt = {1: good[: len(good) // 2], 4: b"", 6: encode(Image.new("RGB", (1, 1)), "PNG")}
    write_parquet(tmp_path / "c.parquet", n=8, corrupt=corrupt)
    ds = load_image_dataset(train_files=[str(tmp_path / "c.parquet")], streaming=True)
    transform = RandomResizedCropFlip(size=24)
    fn = build_classification_transform("image", "label", transform, min_size=16)
    loader = torch.utils.data.DataLoader(
        prepare_dataset(ds, "image", fn, streaming_batch_size=3), batch_size=4, collate_fn=SkippingCollator()
    )
    batches = list(loader)
    assert [int(b["num_skipped"]) for b in batches] == [1, 2]
    assert [b["pixel_values"].shape for b in batches] == [(3, 3, 24, 24), (2, 3, 24, 24)]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [0, 0, 1, 1, 1]  # rows 0, 2, 3, 5, 7
    assert all(b["pixel_values"].abs().sum(dim=(1, 2, 3)).gt(0).all() for b in batches)


def test_map_style_pretraining_transform_and_all_invalid_batch(tmp_path):
    corrupt = {0: b"", 1: b"\xff\xd8\xff\xe0 truncated"}
    write_parquet(tmp_path / "c.parquet", n=3, corrupt=corrupt)
    ds = load_image_dataset(train_files=[str(tmp_path / "c.parquet")], cache_dir=str(tmp_path / "cache"))
    prepared = prepare_dataset(ds, "image", build_pretraining_transform("image", RandomResizedCropFlip(size=20), 16))
    assert isinstance(prepared, datasets.Dataset) and ds.features["image"].decode  # original left untouched
    rows = [prepared[i] for i in range(3)]
    assert [r["cim_valid"] for r in rows] == [False, False, True]
    assert torch.equal(rows[0]["pixel_values"], torch.zeros(3, 20, 20))
    collate = SkippingCollator()
    batch = collate(rows[:2])
    assert batch["pixel_values"].shape == (0, 3, 20, 20) and int(batch["num_skipped"]) == 2
    assert "labels" not in batch
    batch = collate(rows)
    assert batch["pixel_values"].shape == (1, 3, 20, 20) and int(batch["num_skipped"]) == 2


def test_classification_transform_missing_label_is_invalid():
    fn = build_classification_transform("img", "y", ResizeCenterCrop(size=16), min_size=16)
    out = fn({"img": [Image.new("RGB", (30, 30), (5, 5, 5)), Image.new("RGB", (30, 30))], "y": [3, None]})
    assert out["cim_valid"] == [True, False] and out["labels"] == [3, -100]
    batch = SkippingCollator()([{k: v[i] for k, v in out.items()} for i in range(2)])
    assert batch["labels"].tolist() == [3] and batch["labels"].dtype == torch.long


def test_prepare_dataset_rejects_unknown_column(default_ds):
    with pytest.raises(ValueError, match="not in the dataset"):
        prepare_dataset(default_ds, "photo", lambda b: b)


# ---------------------------------------------------------------------------------------------------------------
# workers and shards
# ---------------------------------------------------------------------------------------------------------------


def test_count_shards_and_check_num_workers(default_ds, caplog):
    assert count_shards(default_ds) == 1
    assert count_shards(default_ds.to_iterable_dataset(num_shards=4)) == 4
    assert check_num_workers(0, 8) == 0
    assert check_num_workers(4, 8) == 4
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        assert check_num_workers(3, 8) == 2
        assert check_num_workers(16, 4) == 4
        assert check_num_workers(2, 1) == 1
    assert len(caplog.records) == 3 and "shard" in caplog.records[0].getMessage()


# ---------------------------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir(IMAGENETTE), reason="imagenette-160 not available")
def test_imagenette_streamed_two_batches():
    ds = load_image_dataset(dataset_name=IMAGENETTE, split="validation", streaming=True)
    assert count_shards(ds) == 4
    image_column, label_column = find_image_column(ds.features), find_label_column(ds.features)
    assert (image_column, label_column) == ("image", "label")
    fn = build_classification_transform(image_column, label_column, RandomResizedCropFlip(size=64), min_size=16)
    prepared = prepare_dataset(ds, image_column, fn, streaming_batch_size=8)
    loader = torch.utils.data.DataLoader(prepared, batch_size=8, collate_fn=SkippingCollator())
    for step, batch in enumerate(loader):
        assert batch["pixel_values"].shape == (8, 3, 64, 64) and int(batch["num_skipped"]) == 0
        assert batch["labels"].min() >= 0 and batch["labels"].max() < 10
        assert -3 < batch["pixel_values"].mean() < 3 and batch["pixel_values"].std() > 0.1
        if step == 1:
            break


def test_seeded_image_dataset_views_depend_on_index_and_epoch_only():
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)) for _ in range(6)]
    images[2] = {"bytes": b"truncated", "path": None}
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    transform = data.RandomResizedCropFlip(size=16, scale=(0.2, 1.0))
    seeded = data.SeededImageDataset(ds, "image", transform, min_size=8, seed=1)
    assert len(seeded) == 6
    first = [seeded[i] for i in range(6)]
    assert [row["cim_valid"] for row in first] == [True, True, False, True, True, True]
    # fetched again, out of order, in a batch, after other draws of the global RNG: the same views
    torch.rand(100)
    again = seeded.__getitems__([5, 0, 3])
    for row, index in zip(again, [5, 0, 3]):
        assert torch.equal(row["pixel_values"], first[index]["pixel_values"])
    # the next pass and another seed give other views of the same image
    seeded.set_epoch(1)
    assert not torch.equal(seeded[0]["pixel_values"], first[0]["pixel_values"])
    other = data.SeededImageDataset(ds, "image", transform, min_size=8, seed=2)
    assert not torch.equal(other[0]["pixel_values"], first[0]["pixel_values"])
