"""End-to-end tests of run_pretraining.py, run in-process with a tiny model on data written here: image folders and
parquet files, map-style and streamed; artifacts, reloading, argument files, early errors on bad input, skipped
images in a corrupt stream, and exact resumption from a checkpoint."""

from __future__ import annotations

import io
import json
import os
import sys

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForPreTraining, TrainerCallback

from transformers_cim import CIMConfig, CIMForPreTraining
from transformers_cim.training.checkpoints import last_complete_checkpoint
from transformers_cim.training.trainer import NonFiniteLossError, cosine_momentum

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
import run_pretraining  # noqa: E402
from transformers_cim.training.pretraining import apply_overrides  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

# ViT with 1 layer, width 32, 8 px patches: 32 px views, 24 px context (3x3 tokens), 2 exemplars of 8 px (1 token)
TINY_OVERRIDES = (
    "image_size=32,context_size=24,exemplar_size=8,num_exemplars=2,decoder_hidden_size=32,"
    "decoder_num_attention_heads=2,encoder.num_hidden_layers=1,encoder.hidden_size=32,"
    "encoder.intermediate_size=64,encoder.num_attention_heads=2,encoder.patch_size=8"
)
LEARNING_RATE = "3e-3"  # loss falls in every seed tried (0.2-0.3 lower after 30-40 steps at 1e-3 .. 1e-2)


# ---------------------------------------------------------------------------------------------------------------
# data written by the tests
# ---------------------------------------------------------------------------------------------------------------


def texture(index: int, rng: np.random.Generator, width: int = 48, height: int = 40) -> Image.Image:
    """A colour gradient with a few random bright rectangles and noise: structure to localise exemplars in."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([xx / width * 255, yy / height * 255, np.full_like(xx, (index * 37) % 256)], -1)
    for _ in range(3):
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        arr[y0 : y0 + rng.integers(4, 16), x0 : x0 + rng.integers(4, 16)] = rng.integers(0, 256, 3)
    arr += rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(path, images: list, extra_columns: dict | None = None) -> str:
    """`images`: PIL images or raw bytes (stored as undecoded Image values)."""
    values = [img if isinstance(img, (Image.Image, dict)) else {"bytes": img, "path": None} for img in images]
    columns = {"image": values, **(extra_columns or {})}
    features = datasets.Features(
        {"image": datasets.Image(), **{k: datasets.Value("int64") for k in (extra_columns or {})}}
    )
    # written by pyarrow: datasets' to_parquet opens every path to size it, and one record points nowhere on purpose
    pq.write_table(datasets.Dataset.from_dict(columns, features=features).data.table, str(path))
    return str(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for cls in ("stripes", "blobs"):
        os.makedirs(root / cls)
        for i in range(16):
            texture(i, rng, width=40 + (i % 3) * 8, height=40 + (i % 2) * 8).save(root / cls / f"{i:02d}.png")
    return str(root)


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory) -> str:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("parquet") / "train.parquet"
    # 128 rows: 30 steps of 4 never exhaust the stream (datasets sleeps 5 s each time a parquet stream ends)
    return write_parquet(path, [texture(i, rng) for i in range(128)], {"label": list(range(128))})


@pytest.fixture(scope="module")
def symmetric_folder(tmp_path_factory) -> str:
    """Square, left-right symmetric images: with --view_scale 1 1 the search view does not depend on the random
    crop or flip, so two runs see identical pixels whatever the augmentation RNG did."""
    root = tmp_path_factory.mktemp("symmetric")
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        for i in range(12):
            half = rng.integers(0, 256, (40, 20, 3)).astype(np.uint8)
            Image.fromarray(np.concatenate([half, half[:, ::-1]], 1)).save(root / cls / f"{i:02d}.png")
    # 2 of the 24 files are unusable (6 steps x 4 = 24: each is met exactly once)
    Image.new("RGB", (1, 1)).save(root / "a" / "05.png")
    png = (root / "b" / "07.png").read_bytes()
    (root / "b" / "07.png").write_bytes(png[: len(png) // 2])
    return str(root)


def base_args(output_dir, *extra: str, steps: int = 4) -> list[str]:
    return [
        "--output_dir",
        str(output_dir),
        "--config_name",
        "vit-tiny-patch16",
        "--config_overrides",
        TINY_OVERRIDES,
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--dataloader_pin_memory",
        "false",
        "--disable_tqdm",
        "true",
        "--save_strategy",
        "no",
        "--cache_dir",
        os.path.join(str(output_dir), "..", "hf-cache"),
        *extra,
    ]


def logged(output_dir, key: str = "loss") -> list[dict]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return [entry for entry in json.load(f)["log_history"] if key in entry]


def with_callbacks(monkeypatch, *callbacks: TrainerCallback) -> None:
    """Makes run_pretraining build its trainer with extra callbacks (the CLI has no hook for them)."""
    base = run_pretraining.CIMTrainer

    class Trainer(base):
        def __init__(self, *args, **kwargs):
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + list(callbacks)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(run_pretraining, "CIMTrainer", Trainer)


@pytest.fixture
def no_training(monkeypatch):
    """Bad input must fail before a model is built (hence before any training)."""

    def refuse(*args, **kwargs):
        raise AssertionError("run_pretraining got as far as building the model")

    monkeypatch.setattr(run_pretraining, "build_model", refuse)


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------


def check_artifacts(output_dir: str) -> None:
    for name in (
        "model.safetensors",
        "config.json",
        "README.md",
        "correlation_maps.png",
        "preprocessor_config.json",
        "all_results.json",
        "trainer_state.json",
    ):
        assert os.path.isfile(os.path.join(output_dir, name)), name
    # the model card: YAML header with the tags
    with open(os.path.join(output_dir, "README.md")) as f:
        card = f.read()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert {"self-supervised", "cim", "image-feature-extraction"} <= set(header["tags"])
    assert header["pipeline_tag"] == "image-feature-extraction"
    # the correlation-map figure is a real PNG: header row + one 160 px row per (image, exemplar) pair, 4 columns
    with open(os.path.join(output_dir, "correlation_maps.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(os.path.join(output_dir, "correlation_maps.png")) as figure:
        figure.verify()
    with Image.open(os.path.join(output_dir, "correlation_maps.png")) as figure:
        assert figure.format == "PNG" and figure.width == 4 * 160 and figure.height > 160
        assert len(set(np.asarray(figure.convert("L")).ravel().tolist())) > 10  # not a blank image
    # reloads through the Auto classes, with every weight found
    model, info = AutoModelForPreTraining.from_pretrained(output_dir, output_loading_info=True)
    assert isinstance(model, CIMForPreTraining)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    saved = load_file(os.path.join(output_dir, "model.safetensors"))
    assert any(k.startswith("target_encoder.") for k in saved)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert processor.crop_size == {"height": 32, "width": 32}  # the evaluation transform: resize, centre crop
    # ... bicubic, as the views were resized in training and evaluation (issue 14, item 6)
    assert processor.resample == Image.Resampling.BICUBIC and processor.do_center_crop
    pixels = processor(Image.new("RGB", (50, 40), (120, 30, 200)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert model(pixels.expand(2, -1, -1, -1).contiguous()).loss.isfinite()


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streamed"])
@pytest.mark.parametrize("source", ["folder", "parquet"])
def test_end_to_end_loss_falls_and_artifacts(source, streaming, image_folder, parquet_file, tmp_path):
    out = tmp_path / "out"
    data = ["--train_dir", image_folder] if source == "folder" else ["--train_files", parquet_file]
    args = base_args(out, *data, "--learning_rate", LEARNING_RATE, "--logging_steps", "5", steps=30)
    if streaming:
        args += ["--streaming", "--shuffle_buffer_size", "64"]
    results = run_pretraining.main(args)
    assert results["skipped_images"] == 0
    losses = [entry["loss"] for entry in logged(out)]
    assert len(losses) == 6
    assert losses[-1] < losses[0], losses
    assert all(np.isfinite(losses))
    momenta = [entry["momentum"] for entry in logged(out)]
    assert momenta == pytest.approx([round(cosine_momentum(s - 1, 30, 0.99, 1.0), 6) for s in range(5, 31, 5)])
    check_artifacts(str(out))
    with open(out / "all_results.json") as f:
        assert json.load(f)["skipped_images"] == 0
    header = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert "license" not in header  # none given: none invented (--license states one)


def test_correlation_maps_reach_tensorboard(image_folder, tmp_path):
    """The figure callback finds the Trainer's TensorBoard writer through the trainer it was built with."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "out"
    run_pretraining.main(
        base_args(
            out, "--train_dir", image_folder, "--report_to", "tensorboard", "--visualize_every_steps", "1", steps=2
        )
    )
    runs = [root for root, _, files in os.walk(out / "runs") if any("tfevents" in f for f in files)]
    assert len(runs) == 1
    events = event_accumulator.EventAccumulator(runs[0], size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("pretext/correlation_maps")] == [1, 2]


def test_any_tracker_gets_the_figure_and_pretext_metrics_without_extra_flags(image_folder, tmp_path):
    """--report_to alone: the figure reaches the tracker about 10 times per run and at the last step (before the
    tracker closes), with no extra files; the pretext metrics are logged next to the loss."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "out"
    run_pretraining.main(
        base_args(out, "--train_dir", image_folder, "--report_to", "tensorboard", "--logging_steps", "5", steps=20)
    )
    runs = [root for root, _, files in os.walk(out / "runs") if any("tfevents" in f for f in files)]
    events = event_accumulator.EventAccumulator(runs[0], size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [event.step for event in events.Images("pretext/correlation_maps")] == list(range(2, 21, 2))
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/pretext_iou", "train/prior_iou", "train/loss_to_prior", "train/momentum"} <= scalars
    assert [event.step for event in events.Scalars("train/pretext_iou")] == [5, 10, 15, 20]
    assert sorted(f for f in os.listdir(out) if f.startswith("correlation_maps")) == ["correlation_maps.png"]


def test_figure_goes_to_wandb_and_mlflow_like_trackers():
    from PIL import Image as PILImage

    from transformers_cim.training.visualization_callback import log_figure_to_integrations

    class FakeWandb:
        logged = []

        @staticmethod
        def Image(image):
            return ("wandb-image", image.size)

        @classmethod
        def log(cls, values):
            cls.logged.append(values)

    class FakeMlflow:
        logged = []

        @classmethod
        def log_image(cls, image, key, step):
            cls.logged.append((image.size, key, step))

    class WandbCallback:
        _wandb, _initialized = FakeWandb, True

    class MLflowCallback:
        _ml_flow, _initialized = FakeMlflow, True

    grid = PILImage.new("RGB", (8, 6))
    assert log_figure_to_integrations([WandbCallback(), MLflowCallback(), object()], grid, 7) == [
        "WandbCallback",
        "MLflowCallback",
    ]
    assert FakeWandb.logged == [{"pretext/correlation_maps": ("wandb-image", (8, 6)), "train/global_step": 7}]
    assert FakeMlflow.logged == [((8, 6), "pretext_correlation_maps", 7)]


def test_knn_monitor_logs_top1_every_n_steps(image_folder, tmp_path):
    """--knn_eval_steps: k-NN top-1 on labelled images (class sub-folders) every N steps and at the last one, next to
    the loss in the log history, in all_results.json and on the card; no validation split: one clear error."""
    out = tmp_path / "out"
    results = run_pretraining.main(
        base_args(
            out,
            "--train_dir",
            image_folder,
            "--validation_dir",
            image_folder,
            "--knn_eval_steps",
            "2",
            "--knn_max_train_samples",
            "12",
            "--knn_max_eval_samples",
            "8",
            "--knn_k",
            "5",
            "--logging_steps",
            "2",
            steps=5,
        )
    )
    entries = logged(out, "knn_top1")
    assert [entry["step"] for entry in entries] == [2, 4, 5]
    assert all(0.0 <= entry["knn_top1"] <= 1.0 for entry in entries)
    assert results["knn_top1"] == entries[-1]["knn_top1"]
    with open(out / "all_results.json") as f:
        assert json.load(f)["knn_top1"] == entries[-1]["knn_top1"]
    assert "| knn_top1 |" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="--knn_eval_steps needs a labelled validation split"):
        run_pretraining.main(base_args(tmp_path / "other", "--train_dir", image_folder, "--knn_eval_steps", "2"))


def test_streamed_run_logs_the_pass_over_the_data(image_folder, tmp_path):
    """A stream has no length, so the Trainer's `epoch` is steps / max_steps; `stream_epoch` says which pass over the
    data the last batch came from: 32 images, batches of 4, 12 steps = one pass and a half."""
    out = tmp_path / "out"
    run_pretraining.main(
        base_args(
            out,
            "--train_dir",
            image_folder,
            "--streaming",
            "--shuffle_buffer_size",
            "8",
            "--logging_steps",
            "4",
            steps=12,
        )
    )
    assert [(entry["step"], entry["stream_epoch"]) for entry in logged(out)] == [(4, 0), (8, 0), (12, 1)]


def test_json_arguments_file(image_folder, tmp_path):
    out = tmp_path / "out"
    args = {
        "train_dir": image_folder,
        "output_dir": str(out),
        "config_name": "vit-tiny-patch16",
        "config_overrides": TINY_OVERRIDES,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "learning_rate": 2e-3,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "view_scale": [0.8, 1.0],
        "cache_dir": str(tmp_path / "hf-cache"),
        "license": "mit",
    }
    path = tmp_path / "args.json"
    path.write_text(json.dumps(args))
    run_pretraining.main([str(path)])
    entries = logged(out)
    assert [entry["step"] for entry in entries] == [1, 2, 3]
    assert all(entry["learning_rate"] == pytest.approx(2e-3) for entry in entries)  # explicit lr kept as given
    with open(out / "config.json") as f:
        assert json.load(f)["context_size"] == 24
    assert os.path.isfile(out / "model.safetensors")
    assert yaml.safe_load((out / "README.md").read_text().split("---\n")[1])["license"] == "mit"


# ---------------------------------------------------------------------------------------------------------------
# bad input fails before training, with a clear message
# ---------------------------------------------------------------------------------------------------------------


def test_config_overrides_typed_by_field_and_unknown_keys_named():
    config = CIMConfig.from_preset("vit-tiny-patch16")
    apply_overrides(config, "num_exemplars=4, encoder.num_hidden_layers=6,exemplar_augmentation=false")
    assert (config.num_exemplars, config.encoder_config.num_hidden_layers, config.exemplar_augmentation) == (
        4,
        6,
        False,
    )
    with pytest.raises(ValueError, match="CIMConfig has no field 'num_exemplar'"):
        apply_overrides(config, "num_exemplar=4")
    with pytest.raises(ValueError, match="ViTConfig has no field 'layers'"):
        apply_overrides(config, "encoder.layers=4")
    with pytest.raises(ValueError, match="'num_exemplars' is not key=value"):
        apply_overrides(config, "num_exemplars")
    with pytest.raises(ValueError, match="--config_overrides: CIMConfig: invalid literal for int"):
        apply_overrides(config, "num_exemplars=four")


def test_encoder_width_that_its_heads_do_not_divide_is_refused(no_training, image_folder, tmp_path):
    """Issue 14, item 9: hidden_size 100 with 3 heads would build 99-wide attention; the config refuses it."""
    args = base_args(tmp_path / "out", "--train_dir", image_folder)
    index = args.index("--config_overrides") + 1
    args[index] = (
        args[index]
        .replace("encoder.hidden_size=32", "encoder.hidden_size=100")
        .replace("encoder.num_attention_heads=2", "encoder.num_attention_heads=3")
    )
    with pytest.raises(
        ValueError,
        match=r"Invalid CIM configuration: The encoder's `hidden_size`=100 is not divisible "
        r"by its `num_attention_heads`=3",
    ):
        run_pretraining.main(args)


def test_missing_train_dir(no_training, tmp_path):
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        run_pretraining.main(base_args(tmp_path / "out", "--train_dir", missing))


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streamed"])
def test_unknown_image_column_lists_columns(no_training, parquet_file, tmp_path, streaming):
    args = base_args(tmp_path / "out", "--train_files", parquet_file, "--image_column_name", "picture")
    with pytest.raises(ValueError, match="picture") as excinfo:
        run_pretraining.main(args + (["--streaming"] if streaming else []))
    assert "'image'" in str(excinfo.value) and "'label'" in str(excinfo.value)


def test_non_image_column_is_refused(no_training, parquet_file, tmp_path):
    with pytest.raises(ValueError, match="'label' is not an image column"):
        run_pretraining.main(
            base_args(tmp_path / "out", "--train_files", parquet_file, "--image_column_name", "label")
        )


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streamed"])
def test_parquet_whose_first_images_are_corrupt(no_training, tmp_path, streaming):
    rng = np.random.default_rng(3)
    jpeg = encode(texture(0, rng), "JPEG")
    bad = [jpeg[: len(jpeg) // 3], b"\x00" * 100, b"not an image", encode(Image.new("RGB", (8, 8)))] * 5
    path = write_parquet(tmp_path / "bad.parquet", bad + [texture(i, rng) for i in range(4)])
    args = base_args(tmp_path / "out", "--train_files", path, *(["--streaming"] if streaming else []))
    with pytest.raises(ValueError, match=r"None of the first 16 values of column 'image' is a usable image"):
        run_pretraining.main(args)


def test_streaming_without_max_steps(no_training, parquet_file, tmp_path):
    args = base_args(tmp_path / "out", "--train_files", parquet_file, "--streaming")
    args[args.index("--max_steps") + 1] = "-1"
    with pytest.raises(ValueError, match="--max_steps"):
        run_pretraining.main(args)


def test_huge_learning_rate_stops_with_non_finite_loss(image_folder, tmp_path):
    out = tmp_path / "out"
    args = base_args(
        out,
        "--train_dir",
        image_folder,
        "--learning_rate",
        "1e6",
        "--warmup_steps",
        "0",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
        steps=20,
    )
    with pytest.raises(NonFiniteLossError, match="The loss became (nan|inf) at step") as excinfo:
        run_pretraining.main(args)
    step = int(str(excinfo.value).split(" at step ")[1].split(";")[0])
    assert 1 <= step < 20
    last = out / f"checkpoint-{step}"  # saved every step: the one written right before the bad loss
    weights = load_file(str(last / "model.safetensors"))
    for name, tensor in weights.items():
        assert torch.isfinite(tensor).all(), name
    assert not os.path.exists(out / f"checkpoint-{step + 1}")
    assert not os.path.exists(out / "model.safetensors")  # no final model from a diverged run


# ---------------------------------------------------------------------------------------------------------------
# corrupt records in a stream
# ---------------------------------------------------------------------------------------------------------------


def corrupt_mix(rng: np.random.Generator) -> tuple[list, int]:
    """40 records, 6 unusable (truncated JPEG, zero bytes, a 1x1 image, junk bytes, a text file, a path to a file
    that does not exist); CMYK, RGBA, palette and grayscale images (usable) mixed in. Returns (records, number of
    unusable records)."""
    records: list = []
    for i in range(40):
        image = texture(i, rng)
        records.append(
            {1: image.convert("CMYK"), 2: image.convert("RGBA"), 3: image.convert("P"), 4: image.convert("L")}.get(
                i % 10, image
            )
        )
    jpeg = encode(texture(99, rng), "JPEG")
    unusable = {
        5: jpeg[: len(jpeg) // 2],
        15: b"",
        25: encode(Image.new("RGB", (1, 1)), "PNG"),
        35: b"\xff\xd8junk",
        21: b"id,label\n1,cat\n2,dog\n",
        31: {"bytes": None, "path": "images/missing.jpg"},
    }
    for index, value in unusable.items():
        records[index] = value
    records[11] = encode(texture(11, rng).convert("CMYK"), "JPEG")  # a CMYK JPEG file, not only a CMYK array
    return records, len(unusable)


def test_skipped_images_are_counted_once_and_named(symmetric_folder, tmp_path, caplog):
    """Two epochs over a folder with 2 unusable files of 24: skipped_images is 2 (images, not the 4 times they were
    met), and the log names each file with the reason, at warning level."""
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        results = run_pretraining.main(base_args(out, "--train_dir", symmetric_folder, steps=12))
    assert results["skipped_images"] == 2
    named = sorted(
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and r.getMessage().startswith("Skipped training image")
    )
    assert len(named) == 2
    assert named[0].startswith(
        f"Skipped training image {os.path.join(symmetric_folder, 'a', '05.png')}: too small "
        "(1x1 px, shorter side under 32)"
    )
    assert named[1].startswith(f"Skipped training image {os.path.join(symmetric_folder, 'b', '07.png')}: undecodable")


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "map"])
def test_corrupt_records_are_skipped_and_counted(streaming, tmp_path, caplog):
    records, unusable = corrupt_mix(np.random.default_rng(4))
    shards = [write_parquet(tmp_path / f"part-{k}.parquet", records[k * 20 : (k + 1) * 20]) for k in range(2)]
    out = tmp_path / "out"
    # 10 steps x 4 = 40 records: every record is consumed exactly once (no cycling of the stream)
    args = base_args(out, "--train_files", *shards, "--logging_steps", "5", "--learning_rate", LEARNING_RATE, steps=10)
    if streaming:
        args += ["--streaming"]
    with caplog.at_level("WARNING"):
        results = run_pretraining.main(args)
    assert results["skipped_images"] == unusable == 6
    # named by the file (the record that has a path), else by stream record or row, with the reason; first 5 only
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped training image")]
    assert len(named) == 5 and "counted, not logged" in named[-1]
    reasons = ("undecodable (", "too small (", "empty (", "file not found")
    assert all(any(f": {reason}" in m for reason in reasons) for m in named), named
    by_number = "stream record " if streaming else "row "
    assert sum(m.startswith(f"Skipped training image {by_number}") for m in named) >= 4
    with open(out / "all_results.json") as f:
        assert json.load(f)["skipped_images"] == 6
    entries = logged(out)
    assert entries[-1]["step"] == 10 and entries[-1]["skipped_images"] == 6
    assert all(np.isfinite(entry["loss"]) for entry in entries)


# ---------------------------------------------------------------------------------------------------------------
# resuming
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streamed"])
def test_resume_continues_exactly(streaming, symmetric_folder, tmp_path, monkeypatch, stop_at_step):
    """Interrupted at step 3 of 6 and resumed: the same weights (online and EMA target), losses and momenta as an
    uninterrupted run, random crops and flips included. Streamed, the stream continues from its saved position;
    map-style, the Trainer skips the sampler's first 3 batches and every row's view is seeded by its index."""
    stream = ["--streaming", "--shuffle_buffer_size", "16"] if streaming else []

    def args(out, *extra):
        return base_args(
            out,
            "--train_dir",
            symmetric_folder,
            "--view_scale",
            "0.3",
            "1",
            "--learning_rate",
            "1e-3",
            "--save_strategy",
            "steps",
            "--save_steps",
            "3",
            "--logging_steps",
            "1",
            "--seed",
            "7",
            *stream,
            *extra,
            steps=6,
        )

    run_a, run_b = tmp_path / "A", tmp_path / "B"
    results_a = run_pretraining.main(args(run_a))
    with monkeypatch.context() as patch:
        with_callbacks(patch, stop_at_step(3))
        run_pretraining.main(args(run_b))
    assert sorted(d for d in os.listdir(run_b) if d.startswith("checkpoint-")) == ["checkpoint-3"]
    assert [entry["step"] for entry in logged(run_b)] == [1, 2, 3]
    # map-style: run again as it was (the newest complete checkpoint in output_dir is resumed); streamed: with `last`
    results_b = run_pretraining.main(args(run_b, *(["--resume_from_checkpoint", "last"] if streaming else [])))
    # the skipped-image count covers the whole run, not only the part after the resumption
    assert results_a["skipped_images"] == results_b["skipped_images"] == 2
    assert [e["skipped_images"] for e in logged(run_b)] == [e["skipped_images"] for e in logged(run_a)]

    a, b = load_file(str(run_a / "model.safetensors")), load_file(str(run_b / "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(k.startswith("target_encoder.") for k in a) and any(k.startswith("vit.") for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    # and not trivially: training moved the weights away from checkpoint-3
    a3 = load_file(str(run_a / "checkpoint-3" / "model.safetensors"))
    assert any(not torch.allclose(a3[k], a[k]) for k in a if k.startswith("target_encoder."))
    entries_a, entries_b = logged(run_a), logged(run_b)
    assert [e["step"] for e in entries_b] == [1, 2, 3, 4, 5, 6]
    assert [e["momentum"] for e in entries_b] == [e["momentum"] for e in entries_a]
    assert [e["momentum"] for e in entries_a] == pytest.approx(
        [round(cosine_momentum(s, 6, 0.99, 1.0), 6) for s in range(6)]
    )
    assert [e["loss"] for e in entries_b] == pytest.approx([e["loss"] for e in entries_a], abs=1e-6)


def test_resume_last_skips_a_half_written_checkpoint(tmp_path, caplog):
    complete, half_written, cut_short = tmp_path / "checkpoint-3", tmp_path / "checkpoint-5", tmp_path / "checkpoint-6"
    complete.mkdir()
    (complete / "trainer_state.json").write_text("{}")
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"")  # killed before trainer_state.json was written
    cut_short.mkdir()
    (cut_short / "trainer_state.json").write_text('{"global_step": 6, "log_hi')  # killed while writing it
    assert last_complete_checkpoint(str(tmp_path)) == str(complete)
    args = run_pretraining.CIMTrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="last")
    assert args.checkpoint_to_resume() == str(complete)
    args = run_pretraining.CIMTrainingArguments(output_dir=str(tmp_path))
    assert args.checkpoint_to_resume() == str(complete)  # by default too
    args = run_pretraining.CIMTrainingArguments(output_dir=str(tmp_path), overwrite_output_dir=True)
    assert args.checkpoint_to_resume() is None
    args = run_pretraining.CIMTrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint=str(half_written))
    with pytest.raises(ValueError, match="incomplete"):
        args.checkpoint_to_resume()


def test_a_checkpoint_of_another_model_in_output_dir_is_refused(image_folder, tmp_path, tiny_vit_config):
    """A checkpoint that does not fit the model being trained (here: other sizes) is never resumed; the error names the
    folder and the way out, and --overwrite_output_dir starts afresh."""
    out = tmp_path / "out"
    CIMForPreTraining(tiny_vit_config()).save_pretrained(out / "checkpoint-2")
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(
        ValueError,
        match=r"Cannot resume from \S*checkpoint-2: its weights do not fit this run's "
        r"CIMForPreTraining .*--overwrite_output_dir",
    ):
        run_pretraining.main(base_args(out, "--train_dir", image_folder, steps=1))
    run_pretraining.main(base_args(out, "--train_dir", image_folder, "--overwrite_output_dir", steps=1))
    with open(out / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 1


def test_fsdp_is_refused_with_the_reason(no_training, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(ValueError, match="does not support FSDP yet: the EMA update"):
        run_pretraining.main(base_args(tmp_path / "out", "--train_dir", image_folder))
