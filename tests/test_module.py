"""ViTClassifier: optimiser groups, schedule, freezing, EMA, Mixup, class matching and the checkpoint contract."""

from __future__ import annotations

import csv
import itertools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from timm.data import create_transform
from timm.loss import SoftTargetCrossEntropy

import vit
from vit.data import DigitsDataModule
from vit.module import ViTClassifier

TINY = dict(img_size=8, in_chans=1, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def tiny(**kw) -> ViTClassifier:
    config = {**TINY, **kw.pop("config", {})}
    return ViTClassifier(model_name=None, model_config=config, **kw)


def digits(**kw) -> DigitsDataModule:
    return DigitsDataModule(**{"batch_size": 256, **kw})


def fit(model: ViTClassifier, dm=None, **kw) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer = L.Trainer(**{**options, **kw})
    trainer.fit(model, datamodule=dm or digits())
    return trainer


def test_weight_decay_skips_norms_biases_position_embeddings_and_tokens():
    model = tiny(weight_decay=0.05)
    decay = {id(p): g["weight_decay"] for g in model.build_optimizer().param_groups for p in g["params"]}
    for name, p in model.model.named_parameters():
        exempt = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert decay[id(p)] == (0.0 if exempt else 0.05), name


def test_layer_decay_gives_deeper_blocks_larger_learning_rates():
    model = tiny(lr=1e-3, layer_decay=0.5)
    lr = {id(p): g["lr"] for g in model.build_optimizer().param_groups for p in g["params"]}
    params = dict(model.model.named_parameters())
    layers = TINY["depth"] + 2  # stem, blocks, head
    expected = lambda layer: 1e-3 * 0.5 ** (layers - 1 - layer)
    assert lr[id(params["patch_embed.proj.weight"])] == pytest.approx(expected(0))
    assert lr[id(params["pos_embed"])] == pytest.approx(expected(0))
    for i in range(TINY["depth"]):
        assert lr[id(params[f"blocks.{i}.attn.qkv.weight"])] == pytest.approx(expected(i + 1))
    assert lr[id(params["head.weight"])] == pytest.approx(1e-3)


class _RecordLR(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, *args):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_every_step():
    record = _RecordLR()
    model = tiny(lr=1e-3, warmup_epochs=1, min_lr_ratio=0.1)
    fit(model, max_epochs=4, callbacks=[record], limit_train_batches=3, limit_val_batches=0)
    lrs = record.lrs
    steps_per_epoch = len(lrs) // 4
    warm = lrs[:steps_per_epoch]
    assert warm == pytest.approx([1e-3 * (i + 1) / steps_per_epoch for i in range(steps_per_epoch)])
    decay = lrs[steps_per_epoch:]
    assert decay[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in itertools.pairwise(decay))  # strictly falling at every step
    total = len(lrs)
    progress = (total - 1 - steps_per_epoch) / (total - steps_per_epoch)
    assert lrs[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))


@pytest.mark.parametrize(("warmup_epochs", "warns"), [(3, True), (1, False)])
def test_a_run_no_longer_than_its_warmup_says_its_lr_never_decays(warmup_epochs, warns, recwarn):
    model = tiny(warmup_epochs=warmup_epochs)
    fit(model, max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    said = [str(w.message) for w in recwarn if "warmup_epochs" in str(w.message)]
    if warns:  # 2 batches an epoch: the 3-epoch warmup takes 6 steps of the run's 4
        assert len(said) == 1 and said[0].startswith("vit: warmup_epochs 3 (6 steps) lasts the whole run (4 steps)")
    else:
        assert not said


def test_frozen_backbone_trains_only_the_head():
    model = tiny(freeze_backbone=True, lr=1e-2)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    fit(model, limit_train_batches=2, limit_val_batches=0)
    after = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


def test_ema_weights_serve_validation_and_checkpoints(tmp_path):
    model = tiny(ema_decay=0.5, lr=1e-2)
    trainer = fit(model, limit_train_batches=3, limit_val_batches=1)
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.ema.module(x))
        assert not torch.allclose(model.model(x), model.ema.module(x), atol=1e-4)  # the control
        assert torch.load(path, weights_only=True)["vit"]["weights_prefix"] == "ema.module."
        exported, _ = vit.load_model(path)
        assert torch.allclose(exported.eval()(x), model.ema.module(x), atol=1e-6)


def test_the_ema_takes_in_every_optimiser_step_including_the_last():
    model = tiny(ema_decay=0.999, lr=1e-2)  # timm's EMA warmup: the first update copies the weights (decay 0)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    fit(model, limit_train_batches=1, limit_val_batches=0)
    trained, ema = model.model.state_dict(), model.ema.module.state_dict()
    assert not torch.equal(trained["head.weight"], before["head.weight"])  # the control: the step moved it
    assert all(torch.allclose(ema[k], trained[k], atol=1e-7) for k in trained)


def test_a_loaded_ema_module_predicts_and_explains_as_its_checkpoint_does(tmp_path):
    model = tiny(ema_decay=0.5, lr=1e-2)
    fit(model, limit_train_batches=3, limit_val_batches=1).save_checkpoint(tmp_path / "ema.ckpt")
    module = ViTClassifier.load_from_checkpoint(tmp_path / "ema.ckpt")
    assert module.inference_model is module.ema.module and tiny().inference_model is not None
    x = torch.rand(4, 1, 8, 8)
    from_file = vit.Predictor.from_checkpoint(tmp_path / "ema.ckpt")  # what `vit predict` uses
    from_module = vit.Predictor(module)  # its EMA weights, class names and preprocessing
    assert from_module.class_names == from_file.class_names and from_module.data_config == from_file.data_config
    with torch.no_grad():
        torch.testing.assert_close(from_module.model(x), from_file.model(x))
        assert not torch.allclose(module.model.eval()(x), from_file.model(x), atol=1e-4)  # the control
    for explained in (module, module.inference_model):
        torch.testing.assert_close(vit.explain(explained, x, "chefer"), vit.explain(from_file.model, x, "chefer"))
    with pytest.raises(TypeError, match=r"a vit\.VisionTransformer or a ViTClassifier, not Linear"):
        vit.Predictor(torch.nn.Linear(2, 2))


def test_a_loaded_module_is_tested_with_the_preprocessing_it_was_trained_with(tmp_path):
    trained = tiny()
    preprocessing = {"mean": [0.3], "std": [0.2]}
    trainer = fit(trained, digits(preprocessing=preprocessing), limit_train_batches=2, limit_val_batches=1)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    expected = trainer.test(trained, digits(preprocessing=preprocessing), verbose=False)
    loaded, data = ViTClassifier.load_from_checkpoint(tmp_path / "m.ckpt"), digits()  # no preprocessing given
    assert trainer.test(loaded, data, verbose=False) == expected
    assert data.data_config["std"] == pytest.approx([0.2]) and loaded.data_config["std"] == pytest.approx([0.2])
    overridden = digits(preprocessing={"std": [0.4]})  # what a user passes still wins
    trainer.test(ViTClassifier.load_from_checkpoint(tmp_path / "m.ckpt"), overridden, verbose=False)
    assert overridden.data_config["mean"] == pytest.approx([0.3]) and overridden.data_config["std"] == pytest.approx(
        [0.4]
    )


def test_trainer_predict_gives_the_test_splits_probabilities_as_vit_predict_would(tmp_path):
    module = tiny()
    trainer = fit(module, digits(), limit_train_batches=2, limit_val_batches=1)
    data = digits()
    batches = trainer.predict(module, datamodule=data)  # the test split, as STAGE_SPLITS['predict'] says
    probs = torch.cat(batches)
    x = torch.cat([b[0] for b in data.test_dataloader()])
    predictor = vit.Predictor(module)
    assert probs.shape == (360, 10) and torch.allclose(probs.sum(-1), torch.ones(360))
    torch.testing.assert_close(probs, predictor.model(x).softmax(-1))


def test_mixup_and_cutmix_train_on_soft_targets_even_with_odd_batches():
    model = tiny(mixup_alpha=0.8, cutmix_alpha=1.0)
    calls = []
    original = SoftTargetCrossEntropy.forward
    SoftTargetCrossEntropy.forward = lambda self, x, target: calls.append(target.shape) or original(self, x, target)
    try:
        fit(model, digits(batch_size=63), limit_train_batches=2, limit_val_batches=0)
    finally:
        SoftTargetCrossEntropy.forward = original
    assert calls == [torch.Size([62, 10])] * 2  # soft targets over 10 classes; one image dropped to pair them


@pytest.mark.parametrize("mixing", [{"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0}])
def test_mixing_with_one_image_a_batch_is_refused_rather_than_skipping_every_step(mixing):
    # the odd image out of each batch is dropped to pair the rest: a batch of one left nothing, and fit "trained"
    with pytest.raises(ValueError, match=r"--data\.batch_size 1 leaves none to pair"):
        fit(tiny(**mixing), digits(batch_size=1), limit_train_batches=2, limit_val_batches=0)


def test_class_count_mismatch_without_head_reset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_classes=3 but the data \(DigitsDataModule\) has 10 classes"):
        fit(tiny(num_classes=3, config={"num_classes": 3}), limit_train_batches=1)


def test_num_classes_none_gives_a_new_head_for_the_data(tmp_path):
    model = tiny(num_classes=None, config={"num_classes": 4}, ema_decay=0.9)
    trainer = fit(model, limit_train_batches=1, limit_val_batches=1)
    assert model.model.head.out_features == 10 and model.ema.module.head.out_features == 10
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert ViTClassifier.load_from_checkpoint(tmp_path / "m.ckpt").model.num_classes == 10


@pytest.mark.parametrize("new_head", [False, True])
def test_a_head_whose_checkpoint_names_no_classes_is_kept_by_position_and_said_so(tmp_path, new_head, caplog):
    from safetensors.torch import save_file

    source = vit.VisionTransformer(vit.ViTConfig(**TINY))  # as many classes as digits, but no names: timm's file
    torch.nn.init.normal_(source.head.weight)
    save_file(source.state_dict(), tmp_path / "plain.safetensors")
    options = {"new_head": True} if new_head else {}  # the default keeps it
    model = tiny(pretrained=str(tmp_path / "plain.safetensors"), lr=0.0, weight_decay=0.0, **options)
    fit(model, limit_train_batches=1, limit_val_batches=0)
    same = {k: torch.equal(v, source.state_dict()[k]) for k, v in model.model.state_dict().items()}
    assert all(v for k, v in same.items() if not k.startswith("head."))  # the body always loads
    if new_head:
        assert not same["head.weight"] and "a new 10-class head (new_head)" in caplog.text
    else:
        assert same["head.weight"] and "kept the 10-class head" in caplog.text and "--model.new_head" in caplog.text


def test_checkpoint_carries_the_vit_contract_in_plain_values(tmp_path):
    model = tiny()
    trainer = fit(model, limit_train_batches=2, limit_val_batches=1)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain values only: no pickled objects
    meta = checkpoint["vit"]
    assert meta["model_config"] == model.model.cfg.to_dict()
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert meta["weights_prefix"] == "model."
    assert meta["data_config"] == {
        "input_size": [1, 8, 8],
        "interpolation": "bicubic",
        "mean": [0.5],
        "std": [0.5],
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    create_transform(**meta["data_config"])  # timm understands it
    assert all(k.startswith(("model.", "val_metrics", "test_metrics")) for k in checkpoint["state_dict"])

    x = torch.randn(3, 1, 8, 8)
    restored = ViTClassifier.load_from_checkpoint(path).eval()
    assert restored.class_names == meta["class_names"] and restored.data_config == meta["data_config"]
    fresh = vit.VisionTransformer(vit.ViTConfig(**meta["model_config"]))
    vit.load_pretrained(fresh, path)
    with torch.no_grad():
        expected = model.eval()(x)
        assert torch.allclose(restored(x), expected, atol=1e-6)
        assert torch.allclose(fresh.eval()(x), expected, atol=1e-6)


def test_compiled_model_trains_and_keeps_its_state_dict_keys(tmp_path):
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()  # a backend that counts the graphs it is given
    model = tiny(compile=counter)
    plain = tiny()
    keys = list(model.state_dict())
    fit(model, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    assert counter.frame_count >= 1  # the model's forward went through torch.compile
    assert list(model.state_dict()) == keys == list(plain.state_dict())


def test_the_logs_hold_each_written_steps_own_loss_and_learning_rate(tmp_path):
    # training_step logs only on the steps Lightning writes (every log_every_n_steps): every written row must
    # still carry that very step's loss and learning rate, not a stale one from an earlier step
    class Record(Callback):
        def __init__(self):
            self.seen: dict[int, tuple[float, float]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lr = trainer.optimizers[0].param_groups[-1]["lr"]  # the LR that training_step sees

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen[trainer.global_step - 1] = (float(outputs["loss"]), self.lr)

    record = Record()
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    fit(tiny(), digits(batch_size=64), logger=logger, log_every_n_steps=3, limit_train_batches=10, callbacks=[record])
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    assert [int(row["step"]) for row in rows] == [2, 5, 8]
    for row in rows:
        loss, lr = record.seen[int(row["step"])]
        assert float(row["train/loss"]) == pytest.approx(loss) and float(row["train/lr"]) == pytest.approx(lr)


@pytest.mark.parametrize(("classes", "metrics"), [(3, ["val/acc"]), (10, ["val/acc", "val/acc5"])])
def test_top5_accuracy_is_reported_only_when_there_are_more_than_five_classes(classes, metrics):
    module = ViTClassifier(model_name="vit_nano_patch4_32", num_classes=classes)
    assert sorted(module.val_metrics.keys()) == metrics  # with five or fewer, top-5 accuracy is always 1
