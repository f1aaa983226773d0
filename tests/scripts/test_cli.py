"""The command line as a new user meets it: user errors end in one line, not a traceback (both scripts run as a
subprocess: a missing path, a bad flag value, an empty dataset or a checkpoint of the wrong kind prints
``<script>: error: <message>`` on stderr and exits with status 2); ``--help`` lists each script's own argument groups
before the Trainer's flags; the learning rate is explained once, factor by factor; no pin_memory warning on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from transformers_cim.errors import UserError, UserPathError, UserValueError, exit_on_user_error
from transformers_cim.training.script_args import TRAINER_GROUP_TITLE, accelerator_available, set_learning_rate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "training"), os.path.join(ROOT, "tests", "scripts")]
from test_finetune import make_color_folder, save_tiny_cim  # noqa: E402
from test_run_pretraining import base_args  # noqa: E402

import run_image_classification  # noqa: E402
import run_pretraining  # noqa: E402


def run_script(script: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
        PYTHONWARNINGS="ignore",
    )
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args, "--report_to", "none"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, script: str, *fragments: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{script}: error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_user_error_types_are_also_the_builtin_errors():
    assert issubclass(UserValueError, ValueError) and issubclass(UserValueError, UserError)
    assert issubclass(UserPathError, FileNotFoundError) and issubclass(UserPathError, UserError)

    def fail():
        raise UserValueError("two\n  lines")

    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(fail, prog="prog")
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_color_folder(str(root / "train"), per_class=3, classes=["red", "blue"])
    save_tiny_cim(str(root / "cim"))
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("the photos are elsewhere")
    return root


@pytest.mark.parametrize("case", ["missing path", "bad flag value", "checkpoint of another kind"])
def test_fine_tuning_user_errors_are_one_line(case, data, tmp_path):
    args = [
        "--model_name_or_path",
        str(data / "cim"),
        "--train_dir",
        str(data / "train"),
        "--image_size",
        "32",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    if case == "missing path":
        args[1] = str(tmp_path / "no-such-checkpoint")
        expected = ["no-such-checkpoint' does not exist"]
    elif case == "bad flag value":
        args += ["--layer_decay", "1.5"]
        expected = ["--layer_decay must be in (0, 1], got 1.5"]
    else:  # item 7: a pre-training checkpoint in output_dir is never resumed by fine-tuning
        save_tiny_cim(str(tmp_path / "out" / "checkpoint-7"))
        (tmp_path / "out" / "checkpoint-7" / "trainer_state.json").write_text("{}")
        expected = [
            f"Cannot resume from {tmp_path / 'out' / 'checkpoint-7'}: it holds a CIMForPreTraining",
            "pass --overwrite_output_dir to start afresh there, or use another --output_dir",
        ]
    result = run_script("run_image_classification.py", *args, tmp_path=tmp_path)
    assert_one_line_error(result, "run_image_classification.py", *expected)


@pytest.mark.parametrize("case", ["dataset folder without images", "bad flag value"])
def test_pretraining_user_errors_are_one_line(case, data, tmp_path):
    if case == "dataset folder without images":  # item 8: which folder, what was found, what was expected
        args = ["--dataset_name", str(data / "notes")]
        expected = [
            f"dataset_name='{data / 'notes'}' is a local folder with no images: found 1 file(s) (README.txt)",
            "Expected image files",
            "parquet layout",
        ]
    else:
        args = ["--train_dir", str(data / "train"), "--config_overrides", "num_exemplars=four"]
        expected = ["--config_overrides: CIMConfig: invalid literal for int"]
    result = run_script("run_pretraining.py", *args, "--output_dir", str(tmp_path / "out"), tmp_path=tmp_path)
    assert_one_line_error(result, "run_pretraining.py", *expected)


@pytest.mark.parametrize(
    "script, groups",
    [
        (
            run_pretraining,
            ["model:", "data:", "CIM (each overrides the config's value):", "training (the CIM recipe's"],
        ),
        (run_image_classification, ["model and fine-tuning recipe:", "data:", "training (the fine-tuning recipe's"]),
    ],
)
def test_help_lists_the_scripts_own_groups_before_the_trainers_flags(script, groups, capsys):
    with pytest.raises(SystemExit):
        script.parse_arguments(["--help"])
    text = capsys.readouterr().out
    positions = [text.index(f"\n{title}") for title in groups + [TRAINER_GROUP_TITLE]]
    assert positions == sorted(positions)
    trainer_part = text[positions[-1] :]
    assert "--num_train_epochs" in trainer_part and "--base_learning_rate" in text[: positions[-1]]
    assert "--base_learning_rate" not in trainer_part and "--warmup_steps" not in trainer_part  # recipe defaults
    assert len(text[: positions[-1]].splitlines()) < len(text.splitlines()) / 2  # the script's part is read first


def test_learning_rate_line_names_each_factor():
    args = run_pretraining.CIMTrainingArguments(
        output_dir="unused", per_device_train_batch_size=16, gradient_accumulation_steps=2
    )
    line = set_learning_rate(args, 1.5e-4, explicit=False)
    assert line.startswith(
        "lr = base_lr x total_batch / 256 = 0.00015 x 32 / 256 = 1.875e-05 (total_batch = 16 per "
        "device x 2 accumulation step(s) x 1 process(es)"
    )
    assert args.learning_rate == pytest.approx(1.875e-05)
    assert set_learning_rate(args, 1.5e-4, explicit=True).startswith("lr = 1.875e-05 (--learning_rate as given")


def test_a_cpu_run_logs_the_learning_rate_once_and_pins_no_memory(data, tmp_path, caplog, recwarn):
    args = base_args(tmp_path / "out", "--train_dir", str(data / "train"), steps=1)
    index = args.index("--dataloader_pin_memory")
    del args[index : index + 2]  # the default: pin memory, which a machine without an accelerator cannot use
    with caplog.at_level("INFO", logger="run_pretraining"):
        run_pretraining.main(args)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("lr = ")] == [
        "lr = base_lr x total_batch / 256 = 0.00015 x 4 / 256 = 2.344e-06 (total_batch = 4 per device x 1 "
        "accumulation step(s) x 1 process(es); --learning_rate sets it directly)"
    ]
    assert not [w for w in recwarn if "pin_memory" in str(w.message)]
    assert run_pretraining.CIMTrainingArguments(output_dir="unused").dataloader_pin_memory is accelerator_available()
