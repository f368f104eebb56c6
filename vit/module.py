"""`ViTClassifier`: the training logic around a `VisionTransformer` (loss, Mixup/CutMix, timm's optimisers with
layer-wise LR decay (`vit.optim`), warmup + cosine schedule, EMA, metrics) and the `.ckpt` contract that
`vit.weights` reads."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from timm.data import Mixup, resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from vit.checkpoint_files import CheckpointError, short_list
from vit.datamodule import plain_data_config
from vit.factory import create_model
from vit.flops import counting_cpu_attention
from vit.lightning_notes import silence_lightning_notes  # called when vit.datamodule is imported, and at setup
from vit.model import VisionTransformer, ViTConfig
from vit.optim import DEFAULT_OPTIMIZER, build_optimizer, check_optimizer_settings
from vit.schedule import (
    WarmupCosine,
    steps_per_epoch,
    time_budgeted,
    warn_max_time_cuts_the_schedule,
    warn_resumed_schedule_misfits,
    warn_warmup_outlasts_the_run,
)
from vit.weights import read_checkpoint, transfer_weights

TRAINABLE_WHEN_FROZEN = ("head.", "fc_norm.")  # a frozen backbone still trains the classifier


class CountCpuAttentionInTheSummary(Callback):
    """Lightning's model summary (a callback's `on_fit_start`, before this one's: a module's callbacks come last)
    counts CPU attention by torch's SDPA formula: `vit.flops.counting_cpu_attention` is open from setup until fit
    start, or until an error ends the run, and torch's FLOP registry is as it was afterwards."""

    def __init__(self) -> None:
        self._scope = contextlib.ExitStack()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # only fit prints a summary
            self._scope.enter_context(counting_cpu_attention())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._scope.close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._scope.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._scope.close()


class ViTClassifier(L.LightningModule):
    """Image classification with a `VisionTransformer` (`self.model`); `forward(x)` returns logits.

    Args:
        model_name: a variant from `vit models`, e.g. 'vit_nano_patch4_32'; None: the architecture of
            `pretrained` (a checkpoint that carries its config, such as a `vit fit` .ckpt).
        model_overrides: `ViTConfig` fields that change the variant, e.g. {'depth': 4, 'drop_path_rate': 0.1}.
        model_config: a whole `ViTConfig` as a dict; used instead of `model_name` when given.
        pretrained: starting weights: True for timm's default weights of `model_name`, a timm name or tag, or a
            local file in any format `vit.load_pretrained` reads. A new input size resamples the position
            embeddings; a new class count resets the head.
        img_size: input size (a pretrained model is resampled to it).
        num_classes: classes of the head; None: as many as the data has. A number that differs from the
            data's is an error.
        optimizer: any of timm's optimisers (`timm.optim.list_optimizers()`, as timm's train.py `--opt`), e.g.
            'adamw', 'sgd' (Nesterov), 'lamb', 'lion'; `lookahead_<name>` wraps one in Lookahead.
        lr: peak learning rate, reached after `warmup_epochs`, then cosine decay to `lr * min_lr_ratio`.
        weight_decay: never applied to norms, biases, position embeddings and tokens.
        betas: for optimisers that take betas; None: the optimiser's own (AdamW's (0.9, 0.999), Lion's (0.9, 0.99)).
        momentum: for optimisers that take momentum (SGD, LARS, RMSprop...).
        layer_decay: layer-wise LR decay for fine-tuning (e.g. 0.75): block i gets lr * decay^(depth - i).
        freeze_backbone: train only the head (and the final norm of 'avg' pooling).
        new_head: start a new head even where `pretrained`'s fits the data (as many classes, and names that match
            or none): a checkpoint that names no classes otherwise keeps its head, its outputs taken in order.
        label_smoothing: for the cross-entropy (and the Mixup targets).
        mixup_alpha, cutmix_alpha: timm's Mixup/CutMix strengths; 0 turns each off.
        ema_decay: keep an exponential moving average of the weights, used for validation, test and export.
        compile: `torch.compile` the model (True: inductor; a string names another backend). The state-dict keys
            stay the same. Compiling takes tens of seconds, paid once for training and once for evaluation.
    """

    def __init__(
        self,
        model_name: str | None = "vit_nano_patch4_32",
        model_overrides: dict[str, Any] | None = None,
        model_config: dict[str, Any] | None = None,
        pretrained: bool | str | None = None,
        img_size: int | None = None,
        num_classes: int | None = None,
        optimizer: str = DEFAULT_OPTIMIZER,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, ...] | None = None,
        momentum: float = 0.9,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.01,
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
        new_head: bool = False,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        ema_decay: float | None = None,
        compile: bool | str = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_optimizer_settings(optimizer, betas)  # before building the model and reading the data
        self.model = self._build_model()
        self.class_names: list[str] | None = None
        self.data_config: dict[str, Any] | None = None
        self._prepare_training_parts()

    # ------------------------------------------------------------------------------------------ model
    def _build_model(self) -> VisionTransformer:
        model = self._make_model()
        # The input size is this model's own, whatever the checkpoint's preprocessing said (vit.weights copies
        # the source's input_size into pretrained_cfg, which is wrong after resampling to a new size).
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (model.cfg.in_chans, *model.cfg.img_hw)}
        return model

    @property
    def _pretrained_source(self) -> Any:
        """Where the starting weights come from: `pretrained`, or with `pretrained: true` the timm tag in model_name."""
        h = self.hparams
        return h.model_name if h.pretrained is True else h.pretrained

    def _make_model(self) -> VisionTransformer:
        h = self.hparams
        overrides = dict(h.model_overrides or {})
        source = self._pretrained_source
        checkpoint = read_checkpoint(source) if source else None
        self._pretrained_classes = checkpoint.class_names if checkpoint else None  # what its head was trained on
        self._pretrained_outputs = checkpoint.num_classes if checkpoint else 0  # its head's size (0: no head)
        if h.model_config is None and h.model_name is not None:
            try:  # a pretrained model keeps the checkpoint's head until `setup` matches it to the data
                return create_model(
                    h.model_name,
                    pretrained=checkpoint or False,
                    num_classes=h.num_classes,
                    img_size=h.img_size,
                    **overrides,
                )
            except CheckpointError as e:
                if checkpoint is None or checkpoint.model_config is None:
                    raise
                raise CheckpointError(
                    f"{e}; the checkpoint carries its own architecture: --model.model_name null builds it"
                ) from None
        config = h.model_config or (checkpoint.model_config if checkpoint else None)
        if config is None:
            where = f"{h.pretrained} carries no model config; " if checkpoint else ""
            raise ValueError(f"{where}set model_name (a variant from `vit models`) or model_config")
        given = {"img_size": h.img_size, "num_classes": h.num_classes}
        model = VisionTransformer(
            ViTConfig.from_dict({**config, **overrides, **{k: v for k, v in given.items() if v is not None}})
        )
        if checkpoint is not None:
            transfer_weights(model, checkpoint)  # resamples position embeddings, resets a differing head
        return model

    def _prepare_training_parts(self) -> None:
        """What depends on the head: frozen parameters, EMA copy, metrics, Mixup."""
        h, n = self.hparams, self.model.num_classes
        if h.freeze_backbone:
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith(TRAINABLE_WHEN_FROZEN))
        self.ema = ModelEmaV3(self.model, decay=h.ema_decay, use_warmup=True) if h.ema_decay else None
        if self.ema is not None:  # timm leaves the copy in eval mode; let Lightning switch it with the rest
            self.ema.train(self.training)
            # updated in place, never by gradients: DDP would otherwise wait for their gradients and fail
            self.ema.requires_grad_(False)
        if n >= 2:  # a headless model (num_classes=0) gets its head, and metrics, from the data at setup
            accuracy = partial(MulticlassAccuracy, n, average="micro")
            top = {"acc": accuracy(top_k=1)} | ({"acc5": accuracy(top_k=5)} if n > 5 else {})  # else always 1.0
            metrics = MetricCollection(top)
            self.val_metrics = metrics.clone(prefix="val/")
            self.test_metrics = metrics.clone(prefix="test/")
        mixing = h.mixup_alpha > 0 or h.cutmix_alpha > 0
        self.mixup = (
            Mixup(
                mixup_alpha=h.mixup_alpha, cutmix_alpha=h.cutmix_alpha, label_smoothing=h.label_smoothing, num_classes=n
            )
            if mixing
            else None
        )

    @property
    def example_input_array(self) -> torch.Tensor:
        """One zero image of the model's input size, in its parameters' dtype (bf16-true and 16-true convert them):
        Lightning's model summary runs it, in eval mode and without gradients, for its FLOPs and tensor sizes."""
        return torch.zeros(
            1, self.model.cfg.in_chans, *self.model.cfg.img_hw, dtype=next(self.model.parameters()).dtype
        )

    def configure_callbacks(self) -> list[Callback]:
        # Once per Trainer: Lightning announces a callback that replaces one of the same type (a test after a fit)
        if any(isinstance(c, CountCpuAttentionInTheSummary) for c in self.trainer.callbacks):
            return []
        return [CountCpuAttentionInTheSummary()]

    @property
    def inference_model(self) -> VisionTransformer:
        """The `VisionTransformer` that evaluation, export and `vit predict` use: the EMA copy when EMA is on (whose
        weights differ from `.model`'s, the trained ones), else `.model`."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes); in eval mode from the EMA weights when EMA is on."""
        # through the EMA wrapper, not its .module: Lightning's summary then shows the EMA row's FLOPs and sizes
        net = self.ema if self.ema is not None and not self.training else self.model
        return net(x)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Match the head to the data's classes and take the data's preprocessing and class names."""
        silence_lightning_notes()  # again: a warnings.catch_warnings around the import would have undone it
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and getattr(datamodule, "class_names", None):
            self._match_classes(len(datamodule.class_names), type(datamodule).__name__)
            self._match_pretrained_head(list(datamodule.class_names))
            self.class_names = list(datamodule.class_names)
        batch_size = getattr(getattr(datamodule, "hparams", None), "batch_size", None)
        if stage == "fit" and self.mixup is not None and batch_size == 1:
            # training_step drops the odd image out of each batch: with one image a batch, every step would be skipped
            raise ValueError(
                "Mixup/CutMix (--model.mixup_alpha, --model.cutmix_alpha) mix the images of a batch in pairs: "
                "--data.batch_size 1 leaves none to pair and nothing would train; use an even batch size"
            )
        data_config = getattr(datamodule, "data_config", None)
        if data_config is not None:
            expected = [self.model.cfg.in_chans, *self.model.cfg.img_hw]
            if list(data_config["input_size"]) != expected and not self.model.cfg.dynamic_img_size:
                raise ValueError(
                    f"the data's input_size {list(data_config['input_size'])} differs from the model's {expected}; "
                    "set --model.img_size (or drop input_size from --data.preprocessing)"
                )
            self.data_config = plain_data_config(data_config)
        if self.data_config is None:
            self.data_config = plain_data_config(resolve_data_config(model=self.model))
        if self.hparams.compile and getattr(self.model, "_compiled_call_impl", None) is None:
            backend = "inductor" if self.hparams.compile is True else self.hparams.compile
            self.model.compile(backend=backend)  # in place: the state-dict keys keep no `_orig_mod.` prefix

    def _match_classes(self, n: int, where: str) -> None:
        have = self.model.num_classes
        if have == n:
            return
        if self.hparams.num_classes is not None:
            raise ValueError(
                f"the model has num_classes={have} but the data ({where}) has {n} classes; "
                f"set --model.num_classes {n}, or null to follow the data"
            )
        self.model.reset_classifier(n)
        self._prepare_training_parts()
        if self.hparams.pretrained:  # a model built from scratch had a variant's default head: nothing to say
            rank_zero_info(f"vit: a new {n}-class head for the data (the model had {have} outputs)")

    def _match_pretrained_head(self, names: list[str]) -> None:
        """A pretrained head as large as the data's class list, but trained on other names, must not pass for a
        head of these classes: reorder its rows when the names are the same, else start a new head. A head whose
        checkpoint names no classes is kept by position, and said so (`new_head` starts a new one)."""
        source, self._pretrained_classes = self._pretrained_classes, None  # once, before training starts
        origin = self._pretrained_source
        outputs, self._pretrained_outputs = self._pretrained_outputs, 0
        if outputs != len(names) or self.model.num_classes != len(names):
            return  # no head came from the checkpoint, or `_match_classes` replaced it
        hf_default = [f"LABEL_{i}" for i in range(len(names))]  # Hugging Face's marker for "no label names"
        nameless = not source or list(source) == hf_default
        if self.hparams.new_head:
            self.model.reset_classifier(len(names))
            rank_zero_info(f"vit: a new {len(names)}-class head (new_head), not the head of {origin}")
        elif nameless:  # a plain timm state dict: its head may have been trained on other classes than these
            rank_zero_info(
                f"vit: kept the {len(names)}-class head of {origin}, which names no classes, as the "
                f"data's {short_list(names, 5)} in that order; --model.new_head true starts a new head"
            )
            return
        elif list(source) == names:
            return
        elif sorted(source) == sorted(names):
            order = torch.tensor([list(source).index(name) for name in names])
            with torch.no_grad():
                for p in self.model.head.parameters():
                    p.copy_(p[order])
            rank_zero_info(f"vit: the head of {origin} reordered to the data's class order")
        else:
            self.model.reset_classifier(len(names))
            rank_zero_info(
                f"vit: a new {len(names)}-class head: {origin} was trained on other classes "
                f"({short_list(list(source), 5)})"
            )
        self._prepare_training_parts()

    # --------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch[0], batch[1]
        if self.mixup is not None and len(x) % 2:  # timm's batch Mixup pairs images: drop an odd one out
            x, y = x[:-1], y[:-1]
        if len(x) == 0:
            return None  # every image of the batch was unreadable
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            loss = SoftTargetCrossEntropy()(self.model(x), soft)
        else:
            loss = F.cross_entropy(self.model(x), y, label_smoothing=self.hparams.label_smoothing)
        # Lightning writes training metrics every `log_every_n_steps` only, yet processes every `self.log` call
        # (~1.5 ms, 6% of a digits step): log on the steps it writes, so the logs hold the same values.
        if self.trainer._logger_connector.should_update_logs or self.trainer.fast_dev_run:
            self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
            self.log("train/lr", self.optimizers().param_groups[-1]["lr"], batch_size=len(x))
        return loss

    def on_train_start(self) -> None:
        warn_resumed_schedule_misfits(self.trainer)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser's step, then the EMA's update from the weights it made, as timm's train.py orders them.
        (`on_before_zero_grad` runs before the step's backward: the EMA would lag a step and miss the last one.)"""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # global_step still counts the steps before this one: 0 copies the first step's
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities (B, num_classes) of a batch of images, or of a loader's (images, labels)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)

    def _evaluate(self, batch: Any, metrics: MetricCollection, split: str) -> None:
        x, y = batch[0], batch[1]
        if len(x) == 0:
            return
        logits = self(x)
        # averaged over the processes under DDP (the accuracies are torchmetrics, which sync themselves)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), prog_bar=True, batch_size=len(x), sync_dist=True)
        metrics.update(logits, y)
        self.log_dict(metrics, prog_bar=True, batch_size=len(x))

    def build_optimizer(self) -> torch.optim.Optimizer:
        """`vit.optim.build_optimizer` with this module's settings: AdamW unless `optimizer` names another."""
        h = self.hparams
        return build_optimizer(self.model, h.optimizer, h.lr, h.weight_decay, h.layer_decay, h.betas, h.momentum)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        total = self.trainer.estimated_stepping_batches
        warmup = max(1, round(self.hparams.warmup_epochs * steps_per_epoch(self.trainer)))
        schedule = WarmupCosine(warmup, float(total), self.hparams.min_lr_ratio)
        # a resumed run trains on the checkpoint's schedule, not this one (`warn_resumed_schedule_misfits` says so)
        fresh = not (self.trainer.ckpt_path or self.trainer.fast_dev_run or time_budgeted(self.trainer))
        if warmup >= total and fresh:
            warn_warmup_outlasts_the_run(self.hparams.warmup_epochs, warmup, total)
        if fresh:
            warn_max_time_cuts_the_schedule(self.trainer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    # ------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> ViTClassifier:
        """Lightning's loader, held to `torch.load(weights_only=True)`: a file that would run code is refused."""
        from vit.safety import check_checkpoint  # one line naming the file, before Lightning opens it

        check_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **{**kwargs, "weights_only": True})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the `vit` entry (model config, class names, preprocessing, which weights to use) and make the
        saved hyperparameters rebuild this exact model without fetching `pretrained` again."""
        checkpoint["vit"] = {
            "model_config": self.model.cfg.to_dict(),
            "class_names": list(self.class_names) if self.class_names else None,
            "data_config": plain_data_config(self.data_config or resolve_data_config(model=self.model)),
            "weights_prefix": "ema.module." if self.ema is not None else "model.",
        }
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            checkpoint["hyper_parameters"] = {
                **hparams,
                "model_config": self.model.cfg.to_dict(),
                "model_overrides": None,
                "pretrained": None,
                "img_size": None,
                "num_classes": self.model.num_classes,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("vit") or {}
        saved = meta.get("class_names")
        if saved and self.class_names and list(saved) != list(self.class_names):  # the data's, set up just before
            raise ValueError(
                other_classes(getattr(self._trainer, "ckpt_path", None) or "the checkpoint", saved, self.class_names)
            )
        self.class_names = saved
        self.data_config = meta.get("data_config")
        if self.data_config:  # a data module set up later (a test of a loaded module) reads the trained preprocessing
            self.model.pretrained_cfg = {**self.model.pretrained_cfg, **self.data_config}


def other_classes(checkpoint: str, saved: list[str], names: list[str]) -> str:
    """The error for resuming, validating or testing a checkpoint on data of other classes."""
    return (
        f"{checkpoint} was trained on the classes {short_list(list(saved), 5)}, but the data has "
        f"{short_list(list(names), 5)}: its outputs would be scored against other labels"
    )
