"""Real interruptions of a streamed pre-training run (a separate process, two DataLoader workers): SIGKILL between
checkpoints, SIGTERM mid-step and SIGKILL in the middle of writing a checkpoint. Each is resumed with
`--resume_from_checkpoint last` and must end with the weights, losses and momenta of the uninterrupted run, having
trained on exactly the same batches (none replayed, none skipped), across the end of a pass over the stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OVERRIDES = (
    "image_size=32,context_size=24,exemplar_size=8,num_exemplars=2,decoder_hidden_size=32,"
    "decoder_num_attention_heads=2,encoder.num_hidden_layers=1,encoder.hidden_size=32,"
    "encoder.intermediate_size=64,encoder.num_attention_heads=2,encoder.patch_size=8"
)
# 2 shards x 12 records (1 undecodable each), 2 workers, batch 4: a pass is 6 batches, so 10 steps cross into the
# second pass; checkpoints at steps 4 and 8
MAX_STEPS, SAVE_STEPS = 10, 4

# Runs run_pretraining.main in this process and appends one JSON line per training batch (the step it is trained in
# and a hash of its pixels) to $CIM_TEST_RECORDS. $CIM_TEST_INTERRUPT is "<signal>:<step>" (the signal is sent to
# this process while step <step> is being trained) or "save:<step>" (SIGKILL once checkpoint-<step> has its weights
# and optimizer on disk but not yet its trainer_state.json).
DRIVER = textwrap.dedent("""
    import hashlib, json, os, signal, sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    import run_pretraining
    from transformers import TrainerCallback

    records = open(os.environ["CIM_TEST_RECORDS"], "a")
    kind, _, at = os.environ.get("CIM_TEST_INTERRUPT", "none:0").partition(":")
    at = int(at)

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if kind in ("SIGKILL", "SIGTERM") and state.global_step + 1 == at:
                os.kill(os.getpid(), getattr(signal, kind))
            return control

    class Trainer(run_pretraining.CIMTrainer):
        def __init__(self, *args, **kwargs):
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [Interrupt()]
            super().__init__(*args, **kwargs)
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                pixels = inputs["pixel_values"].cpu().numpy().tobytes()
                records.write(json.dumps(dict(step=self.state.global_step,
                                              sum=hashlib.sha1(pixels).hexdigest()[:16])) + "\\n")
                records.flush()
            return super().compute_loss(model, inputs, *args, **kwargs)
        def _save_rng_state(self, output_dir):
            super()._save_rng_state(output_dir)
            if kind == "save" and self.state.global_step == at:
                os.kill(os.getpid(), signal.SIGKILL)
    run_pretraining.CIMTrainer = Trainer
    run_pretraining.main(sys.argv[1:])
""")


def write_shards(root) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)) for _ in range(12)]
        images[5] = {"bytes": f"corrupt {k}".encode(), "path": None}
        path = str(root / f"train-{k:05d}-of-00002.parquet")
        datasets.Dataset.from_dict(
            {"image": images}, features=datasets.Features({"image": datasets.Image()})
        ).to_parquet(path)
        paths.append(path)
    return paths


def run(tmp_path, shards: list[str], name: str, interrupt: str = "none:0", resume: bool = False):
    """One run of the driver into output dir `name`; its batches go to `name`.jsonl (`name`-resumed.jsonl when
    resuming)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=REPO_ROOT))
    records = tmp_path / (f"{name}-resumed.jsonl" if resume else f"{name}.jsonl")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_CACHE=str(tmp_path / "hf-cache"),
        CIM_TEST_RECORDS=str(records),
        CIM_TEST_INTERRUPT=interrupt,
    )
    command = [
        sys.executable,
        str(driver),
        "--train_files",
        *shards,
        "--streaming",
        "--shuffle_buffer_size",
        "6",
        "--output_dir",
        str(tmp_path / name),
        "--config_name",
        "vit-tiny-patch16",
        "--config_overrides",
        TINY_OVERRIDES,
        "--max_steps",
        str(MAX_STEPS),
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "2",
        "--disable_tqdm",
        "true",
        "--save_strategy",
        "steps",
        "--save_steps",
        str(SAVE_STEPS),
        "--logging_steps",
        "1",
        "--seed",
        "11",
        "--use_cpu",
        "true",
    ]
    if resume:
        command += ["--resume_from_checkpoint", "last"]
    return subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)


def trained_batches(tmp_path, name: str) -> list[dict]:
    with open(tmp_path / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def logged(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return [entry for entry in json.load(f)["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    shards = write_shards(root)
    proc = run(root, shards, "reference")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, shards


def check_matches_reference(root, name: str, resumed_from: int) -> None:
    reference, resumed = root / "reference", root / name
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("target_encoder.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    entries_a, entries_b = logged(reference), logged(resumed)
    assert [e["step"] for e in entries_b] == list(range(1, MAX_STEPS + 1))
    assert [e["momentum"] for e in entries_b] == [e["momentum"] for e in entries_a]
    assert [e["epoch"] for e in entries_b] == pytest.approx([e["epoch"] for e in entries_a])
    assert [e["loss"] for e in entries_b] == pytest.approx([e["loss"] for e in entries_a], abs=1e-6)
    assert entries_b[-1]["skipped_images"] == entries_a[-1]["skipped_images"] > 0
    # batches: what the interrupted run trained on before its checkpoint, then what the resumed run trained on, is
    # the uninterrupted run's sequence (batches trained after the checkpoint and lost with the kill are redone)
    reference_batches = trained_batches(root, "reference")
    assert [b["step"] for b in reference_batches] == list(range(MAX_STEPS))
    combined = [b for b in trained_batches(root, name) if b["step"] < resumed_from]
    combined += trained_batches(root, f"{name}-resumed")
    assert combined == reference_batches


def checkpoints(output_dir) -> list[str]:
    return sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-"))


def resume(root, shards, name: str) -> None:
    proc = run(root, shards, name, resume=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Resuming the stream where" in proc.stderr  # continued from the saved position, not replayed


def test_sigkill_between_checkpoints(uninterrupted):
    root, shards = uninterrupted
    proc = run(root, shards, "killed", interrupt="SIGKILL:7")
    assert proc.returncode == -signal.SIGKILL
    assert [b["step"] for b in trained_batches(root, "killed")] == list(range(6))  # killed while training step 7
    assert checkpoints(root / "killed") == ["checkpoint-4"]
    resume(root, shards, "killed")
    check_matches_reference(root, "killed", resumed_from=4)


def test_sigterm_saves_a_checkpoint_at_the_end_of_the_step_and_resumes(uninterrupted):
    root, shards = uninterrupted
    proc = run(root, shards, "terminated", interrupt="SIGTERM:7")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-4000:]
    assert "Received SIGTERM" in proc.stderr
    # the step in progress finished and was saved (in the stream's second pass); no final model was written
    assert checkpoints(root / "terminated") == ["checkpoint-4", "checkpoint-7"]
    assert not (root / "terminated" / "model.safetensors").exists()
    state = json.loads((root / "terminated" / "checkpoint-7" / "cim_stream_state_0.json").read_text())
    assert state["epoch"] == 1 and state["num_roles"] == 2
    resume(root, shards, "terminated")
    check_matches_reference(root, "terminated", resumed_from=7)


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(uninterrupted):
    root, shards = uninterrupted
    proc = run(root, shards, "torn", interrupt="save:8")
    assert proc.returncode == -signal.SIGKILL
    torn = root / "torn" / "checkpoint-8"
    assert (torn / "model.safetensors").is_file() and not (torn / "trainer_state.json").exists()
    proc = run(root, shards, "torn", resume=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Skipping" in proc.stderr and "checkpoint-8" in proc.stderr  # the half-written one was passed over
    check_matches_reference(root, "torn", resumed_from=4)
