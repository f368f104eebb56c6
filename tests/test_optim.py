"""`--model.optimizer`: timm's optimisers by name (vit.optim), each given only the settings it takes."""

from __future__ import annotations

import _cli
import pytest
import torch
import torch.nn.functional as F
from test_module import TINY, fit, tiny
from timm.optim import Lamb, Lion, Lookahead, get_optimizer_info, list_optimizers

from vit.cli import main
from vit.model import VisionTransformer, ViTConfig
from vit.module import ViTClassifier
from vit.optim import build_optimizer

QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]


def _buildable_here(name: str) -> bool:
    info = get_optimizer_info(name)
    # apex and bitsandbytes need their packages and a GPU; Kron compiles for about a minute on its first step
    return not isinstance(info.opt_class, str) and not info.second_order and not name.startswith("kron")


@pytest.mark.parametrize(("name", "kind"), [("sgd", torch.optim.SGD), ("lamb", Lamb), ("lion", Lion)])
def test_other_optimisers_train_through_lightning_on_digits(name, kind):
    model = tiny(optimizer=name, lr=1e-2, warmup_epochs=0)  # a one-step warmup: the full LR at once
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer = fit(model, limit_train_batches=3, limit_val_batches=0)
    assert type(trainer.optimizers[0]) is kind
    after = model.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"head.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= moved
    assert all(v.isfinite().all() for v in after.values())


def test_sgd_gets_the_momentum_asked_and_no_betas():
    optimizer = tiny(optimizer="sgd", momentum=0.8, weight_decay=0.05).build_optimizer()
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:
        assert group["momentum"] == 0.8 and group["nesterov"]  # timm's 'sgd' is Nesterov's ('momentum' is not)
        assert "betas" not in group and group["fused"]  # torch's fused SGD kernel, as AdamW's
    assert sorted({g["weight_decay"] for g in optimizer.param_groups}) == [0.0, 0.05]


def test_the_default_is_fused_torch_adamw_over_the_same_groups():
    model = tiny(lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    optimizer = model.build_optimizer()
    assert type(optimizer) is torch.optim.AdamW
    params = dict(model.model.named_parameters())
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay) == len(params)
    depth = TINY["depth"]

    def layer(name: str) -> int:  # timm's group_matcher: the stem, each block (the final norm with the last), the head
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return {"norm": depth, "head": depth + 1}.get(name.split(".")[0], 0)

    for name, p in params.items():
        exempt = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert decay[id(p)] == (0.0 if exempt else 0.05), name
        assert lr[id(p)] == pytest.approx(1e-3 * 0.5 ** (depth + 1 - layer(name))), name
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["fused"]
        assert "momentum" not in group


def test_betas_left_unset_are_the_optimisers_own_and_set_ones_are_passed():
    assert tiny(optimizer="lion").build_optimizer().param_groups[0]["betas"] == (0.9, 0.99)  # Lion's, not AdamW's
    assert tiny(optimizer="lion", betas=(0.95, 0.98)).build_optimizer().param_groups[0]["betas"] == (0.95, 0.98)
    assert tiny(optimizer="adamw", betas=[0.9, 0.95]).build_optimizer().param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("name", [n for n in list_optimizers() if _buildable_here(n)])
def test_every_timm_optimiser_builds_and_steps(name):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.from_dict(TINY))
    optimizer = build_optimizer(model, name, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # ADOPT's first step only estimates the gradients' second moment
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.arange(4)).backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lookahead_wraps_the_named_optimiser_as_timm_does():
    optimizer = tiny(optimizer="lookahead_sgd").build_optimizer()
    assert type(optimizer) is Lookahead and type(optimizer._base_optimizer) is torch.optim.SGD


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": "admw"}, "--model.optimizer admw: not one of timm's optimisers; did you mean adamw, "),
        ({"optimizer": "lookahead_lamd"}, "--model.optimizer lookahead_lamd: not one of timm's optimisers; did you "),
        ({"optimizer": "zzz"}, "--model.optimizer zzz: not one of timm's optimisers; timm.optim.list_optimizers() "),
        ({"optimizer": "adahessian"}, "--model.optimizer adahessian: a second-order optimiser, which vit fit does "),
        ({"optimizer": "sgd", "betas": (0.9, 0.99)}, "--model.betas [0.9, 0.99]: sgd takes no betas; it takes "),
        ({"optimizer": "adan", "betas": (0.9, 0.99)}, "--model.betas [0.9, 0.99]: adan takes 3 betas"),
    ],
)
def test_an_optimiser_it_cannot_make_is_one_line_before_the_model_is_built(options, message, monkeypatch):
    monkeypatch.setattr(ViTClassifier, "_build_model", lambda self: pytest.fail("built the model first"))
    with pytest.raises(ValueError) as error:
        ViTClassifier(**options)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    if options["optimizer"] == "lookahead_lamd":
        assert "lookahead_lamb" in str(error.value)


def test_a_checkpoint_written_before_the_optimizer_setting_loads_as_adamw(tmp_path):
    trainer = fit(tiny(lr=1e-2, warmup_epochs=0), limit_train_batches=2, limit_val_batches=0)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint["hyper_parameters"]
    del saved["optimizer"], saved["momentum"]
    saved["betas"] = (0.9, 0.999)  # the old default, saved with every checkpoint
    torch.save(checkpoint, path)
    loaded = ViTClassifier.load_from_checkpoint(path)
    assert loaded.hparams.optimizer == "adamw" and loaded.hparams.momentum == 0.9
    optimizer = loaded.build_optimizer()
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_vit_fit_trains_with_the_optimiser_named_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *_cli.TINY_DIGITS, *QUICK, "--model.optimizer", "sgd", "--model.momentum", "0.8"]) == 0
    checkpoint = torch.load("runs/digits/version_0/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["optimizer"] == "sgd"
    state = checkpoint["optimizer_states"][0]
    assert {g["momentum"] for g in state["param_groups"]} == {0.8}
    assert all("momentum_buffer" in s for s in state["state"].values())  # SGD's state, not AdamW's exp_avg
    capsys.readouterr()
    assert main(["fit", *_cli.TINY_DIGITS, *QUICK, "--model.optimizer", "admw"]) == 2
    assert capsys.readouterr().err == (
        "vit fit: error: --model.optimizer admw: not one of timm's optimisers; did you mean adamw, radamw, nadamw?\n"
    )
