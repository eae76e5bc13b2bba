"""User story: CUDA runs out of memory mid-run; training halves the micro-batch and continues."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_out_of_memory_halves_micro_batch_keeps_effective_batch_and_resumes(lab_root, capsys):
    from transformers import TrainerCallback

    import lab_utils as lab

    form = {
        "data.limit": 240,
        "model.max_length": 128,
        "train.max_steps": 16,
        "train.save_steps": 8,
        "train.learning_rate": 1e-3,
        "train.per_device_train_batch_size": 8,
        "train.gradient_accumulation_steps": 2,
        "train.logging_steps": 2,
    }
    run = lab.start("oom", form=form)
    tok = lab.load_tokenizer(run.cfg)
    ds = lab.prepare_data(run, tok)
    settings = lab.train_settings(run)
    model, tok = lab.load_for_training(run.cfg, "plain")
    trainer, callback = lab.build_trainer(run, model, tok, ds, settings)
    seen = []

    class FakeSmallGPU(TrainerCallback):
        """Raise the error CUDA raises when a micro-batch of more than 4 rows meets a small GPU (after step 10)."""

        def on_step_begin(self, args, state, control, **kw):
            seen.append((state.global_step, args.per_device_train_batch_size))
            if state.global_step >= 10 and args.per_device_train_batch_size > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.add_callback(FakeSmallGPU())
    result = lab.train(run, trainer, callback, lab.plan_resume(run, trainer, callback), settings)
    out = capsys.readouterr().out
    assert "Out of GPU memory at micro-batch 8: continuing from the last checkpoint with micro-batch 4 × accumulation 4" in out
    assert "Resuming from checkpoint-8 (step 8 of 16" in out
    assert result.steps == 16
    assert (run.checkpoints_dir / "checkpoint-16" / "lab_manifest.json").exists()
    assert seen[-1] == (15, 4)
    # step 10 reached the tracker before the out-of-memory error and was redone after the back-off: logged once
    from lab_utils.tracking import history

    assert [h["step"] for h in history(run) if "loss" in h] == list(range(2, 17, 2))
    assert "1 row(s) after step 8 dropped (redone now)" in out


def test_out_of_memory_at_micro_batch_one_with_checkpointing_gives_a_clear_error(lab_root):
    from transformers import TrainerCallback

    import lab_utils as lab
    from lab_utils.defaults import backoff
    from lab_utils.errors import LabError

    floor = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 16, "gradient_checkpointing": True}
    assert backoff(floor) is None  # nothing smaller to try
    run = lab.start("oom-floor", form={"data.limit": 40, "model.max_length": 64, "train.max_steps": 4,
                                       **{f"train.{k}": v for k, v in floor.items()}})
    tok = lab.load_tokenizer(run.cfg)
    ds = lab.prepare_data(run, tok)
    settings = lab.train_settings(run)
    model, tok = lab.load_for_training(run.cfg, "plain", gradient_checkpointing=True)
    trainer, callback = lab.build_trainer(run, model, tok, ds, settings)

    class FakeTinyGPU(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.add_callback(FakeTinyGPU())
    with pytest.raises(LabError) as err:
        lab.train(run, trainer, callback, lab.plan_resume(run, trainer, callback), settings)
    message = str(err.value)
    assert "out of GPU memory even at micro-batch 1 with gradient checkpointing" in message
    assert "lower model.max_length" in message  # the fix, in the same line
    assert "\n" not in message
