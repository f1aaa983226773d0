"""The import paths of the modules that moved to `transformers_cim.training` keep working for one release, warn
with the new path, and reach the very module the new path names (one set of classes, patchable either way)."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

# old path -> a name it must still provide and the module that now defines it
MOVED = {
    "transformers_cim.trainer": ("CIMTrainer", "transformers_cim.training.trainer"),
    "transformers_cim.finetune": ("load_encoder_for_classification", "transformers_cim.encoder_loading"),
    "transformers_cim.segmentation": ("SegmentationTrainer", "transformers_cim.training.segmentation"),
    "transformers_cim.segmentation_metrics": ("segmentation_scores", "transformers_cim.training.segmentation_metrics"),
    "transformers_cim.checkpoints": ("checkpoint_to_resume", "transformers_cim.training.checkpoints"),
    "transformers_cim.streaming": ("ResumableImageStream", "transformers_cim.training.streaming"),
    "transformers_cim.training_utils": ("SkippedImages", "transformers_cim.training.utils"),
    "transformers_cim.script_args": ("ScriptArgumentParser", "transformers_cim.training.script_args"),
    "transformers_cim.modelcard": ("build_model_card", "transformers_cim.training.modelcard"),
    "transformers_cim.knn": ("KNNCallback", "transformers_cim.training.knn"),
    "transformers_cim.seeding": ("numpy_rng", "transformers_cim.training.seeding"),
    "transformers_cim.data": ("SkippingCollator", "transformers_cim.training.data"),
    "transformers_cim.data.collate": ("SkippingCollator", "transformers_cim.training.data.collate"),
}


def fresh_import(name: str):
    """Import `name` as a first import would (the alias warns only when its module runs)."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".") or name.startswith(k + ".")]:
        if not key.startswith("transformers_cim.training") and key != "transformers_cim":
            del sys.modules[key]
    return importlib.import_module(name)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_reaches_the_new_module(old):
    name, new = MOVED[old]
    with pytest.warns(
        FutureWarning, match=rf"`{old.rsplit('.collate', 1)[0]}` moved to .*`{new.rsplit('.collate', 1)[0]}`"
    ):
        module = fresh_import(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_an_alias_module_is_the_new_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = fresh_import("transformers_cim.trainer")
    assert old is importlib.import_module("transformers_cim.training.trainer")


def test_split_module_reexports_every_public_name():
    """`finetune` was split in five: the old path re-exports the public names of all of them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        finetune = fresh_import("transformers_cim.finetune")
    expected = {
        "ClassificationTrainer",
        "LinearProbeForImageClassification",
        "LinearProbeHead",
        "cutmix_box",
        "is_no_weight_decay",
        "layer_id_for_parameter",
        "load_encoder_for_classification",
        "mixup_cutmix",
        "num_layers_for_decay",
        "param_groups_layer_decay",
        "resize_vit_position_embeddings",
        "smooth_one_hot",
        "soft_target_cross_entropy",
    }  # the __all__ of finetune.py before the move
    assert expected <= set(finetune.__all__)
    assert all(hasattr(finetune, n) for n in expected)


def test_moved_visualization_callback_warns():
    import transformers_cim.visualization as visualization
    from transformers_cim.training.visualization_callback import VisualizationCallback

    with pytest.warns(FutureWarning, match="transformers_cim.training.visualization_callback"):
        assert visualization.VisualizationCallback is VisualizationCallback
    with pytest.raises(AttributeError):
        visualization.not_a_name  # noqa: B018


def test_library_import_does_not_load_the_training_side():
    """`import transformers_cim` (config, models, pretext, Auto registration) imports nothing of the training side."""
    import subprocess

    code = (
        "import sys, transformers_cim; "
        "print(sorted(m for m in sys.modules if m.startswith('transformers_cim.training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_name_exported_by_the_package_still_imports():
    import transformers_cim

    assert {"CIMConfig", "CIMForPreTraining", "sample_pretext"} <= set(transformers_cim.__all__)
    missing = [name for name in transformers_cim.__all__ if not hasattr(transformers_cim, name)]
    assert not missing
