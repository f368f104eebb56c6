"""Lightning's model summary of a ViTClassifier: real FLOPs (CPU attention included) for one image of the model's
input size, in any precision, without changing what training does."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

import vit
from vit.data import DigitsDataModule
from vit.module import ViTClassifier

TINY = dict(img_size=8, in_chans=1, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
# the oracle: torch's counter, given torch's own SDPA formula for the op that SDPA runs on CPU
WITH_CPU_ATTENTION = {CPU_SDPA: lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v)}


class RecordedSummary(ModelSummary):
    """Lightning's summary callback, keeping the total FLOPs it prints."""

    totals: list[int]

    def __init__(self) -> None:
        super().__init__(max_depth=1)
        RecordedSummary.totals = []

    @staticmethod
    def summarize(*args, total_flops: int, **kwargs) -> None:
        RecordedSummary.totals.append(total_flops)
        ModelSummary.summarize(*args, total_flops=total_flops, **kwargs)


def fit(model: ViTClassifier, callbacks=(), **kw) -> L.Trainer:
    options = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False)
    options |= dict(enable_progress_bar=False, num_sanity_val_steps=0, limit_train_batches=2, limit_val_batches=1)
    trainer = L.Trainer(**{**options, **kw}, callbacks=list(callbacks))
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    return trainer


def counted(model: torch.nn.Module, x: torch.Tensor, mapping: dict) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model.eval()(x)
    return counter.get_total_flops()


def test_summary_total_flops_are_torchs_count_of_one_forward_with_cpu_attention():
    classifier = ViTClassifier(model_name=None, model_config=TINY)
    fit(classifier, [RecordedSummary()])
    x = torch.zeros(1, TINY["in_chans"], TINY["img_size"], TINY["img_size"])
    expected, without_attention = counted(classifier.model, x, WITH_CPU_ATTENTION), counted(classifier.model, x, {})
    assert RecordedSummary.totals == [expected]
    assert expected > without_attention > 0
    assert CPU_SDPA not in flop_registry  # torch's registry is as it was: other counters are not changed


def test_a_trainer_that_fits_then_tests_adds_the_attention_callback_once_and_says_nothing_of_it():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where Lightning's info lines go
    logger.addHandler(handler)
    try:
        classifier = ViTClassifier(model_name=None, model_config=TINY)
        trainer = fit(classifier, enable_model_summary=False)
        trainer.test(classifier, datamodule=DigitsDataModule(batch_size=64), verbose=False)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "configure_callbacks" in r.getMessage()]  # "... will override existing ..."
    assert sum(type(c).__name__ == "CountCpuAttentionInTheSummary" for c in trainer.callbacks) == 1


def test_a_run_that_fails_at_fit_start_leaves_torchs_flop_registry_as_it_was():
    class Fail(Callback):
        def on_fit_start(self, trainer, pl_module):
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        fit(ViTClassifier(model_name=None, model_config=TINY), [Fail()], enable_model_summary=False)
    assert CPU_SDPA not in flop_registry


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [
        (dict(img_size=16, model_overrides=dict(in_chans=1, embed_dim=64, depth=1, num_heads=4)), (1, 16, 16)),
        (dict(model_name="vit_nano_patch4_32", model_overrides=dict(depth=1)), (3, 32, 32)),
        (dict(model_name="vit_tiny_patch16_224", num_classes=10, model_overrides=dict(depth=1)), (3, 224, 224)),
        ("checkpoint", (1, 24, 24)),
    ],
    ids=["digits", "cifar", "finetune-224", "checkpoint-defined"],
)
def test_summary_runs_one_image_of_each_models_own_input_size(kwargs, size, tmp_path):
    if kwargs == "checkpoint":  # the architecture comes from the file
        source = vit.VisionTransformer(vit.ViTConfig(**{**TINY, "img_size": 24}))
        kwargs = dict(model_name=None, pretrained=str(vit.save_safetensors(source, tmp_path / "w.safetensors")))
    classifier = ViTClassifier(**kwargs)
    summary = Summary(classifier, max_depth=1)
    assert summary.in_sizes[summary.layer_names.index("model")] == [1, *size]
    assert summary.total_flops == counted(classifier.model, torch.zeros(1, *size), {}) > 0


def test_summary_runs_in_the_precision_the_trainer_converts_the_model_to():
    fit(ViTClassifier(model_name=None, model_config=TINY), [RecordedSummary()], precision="bf16-true")
    assert RecordedSummary.totals[0] > 0


def test_the_summary_forward_leaves_seeded_training_unchanged():
    # Dropout, drop-path and the batch augmentation all draw random numbers: a summary that drew any would
    # change the weights
    config = {**TINY, "drop_rate": 0.1, "drop_path_rate": 0.1}
    weights = []
    for summary in (False, True):
        L.seed_everything(0, verbose=False)
        classifier = ViTClassifier(model_name=None, model_config=config)
        fit(classifier, enable_model_summary=summary, max_epochs=2)
        weights.append(classifier.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_with_ema_the_summary_counts_the_ema_model_that_evaluation_runs():
    classifier = ViTClassifier(model_name=None, model_config=TINY, ema_decay=0.99)
    summary = Summary(classifier, max_depth=1)
    x = torch.zeros(1, TINY["in_chans"], TINY["img_size"], TINY["img_size"])
    row = summary.layer_names.index("ema")
    assert summary.in_sizes[row] == list(x.shape)  # '?' when the forward went around the EMA wrapper
    assert sum(summary.flop_counts["ema"].values()) == counted(classifier.ema.module, x, {}) > 0
