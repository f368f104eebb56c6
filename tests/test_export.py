"""`vit export`: ONNX files that onnxruntime runs at any batch size with torch's logits, and safetensors files
that `vit predict` and `vit.load_pretrained` accept."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import vit
from tests.tiny_checkpoints import CLASS_NAMES, data_config, tiny_model, write_lightning_ckpt, write_timm_state_dict
from vit.cli import main
from vit.export import export_onnx
from vit.predict import Predictor

CUSTOM = dict(mean=[0.2, 0.3, 0.4], std=[0.3, 0.2, 0.1], crop_pct=1.0, interpolation="bilinear")


def onnxruntime_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def assert_same_logits_at_batch_1_and_3(model: vit.VisionTransformer, path: Path) -> None:
    for batch in (1, 3):
        x = torch.randn(batch, model.cfg.in_chans, *model.cfg.img_hw)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(onnxruntime_logits(path, x), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(reg_tokens=4, no_embed_class=True, global_pool="avg", in_chans=1)],
    ids=["cls-token", "registers-avg-pool-grey"],
)
def test_onnx_export_runs_in_onnxruntime_with_torchs_logits(overrides, tmp_path, capsys):
    model = tiny_model(**overrides)
    vit.save_safetensors(model, tmp_path / "tiny.safetensors", class_names=CLASS_NAMES)
    argv = ["export", "-c", str(tmp_path / "tiny.safetensors"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main(argv) == 0
    assert "m.onnx" in capsys.readouterr().out
    assert_same_logits_at_batch_1_and_3(model, tmp_path / "m.onnx")


def test_an_onnx_file_that_disagrees_with_torch_is_flagged_on_stderr(tmp_path, capsys, monkeypatch):
    import vit.export

    vit.save_safetensors(tiny_model(), tmp_path / "tiny.safetensors", class_names=CLASS_NAMES)
    argv = ["export", "-c", str(tmp_path / "tiny.safetensors"), "--out", str(tmp_path / "m.onnx")]
    assert main(argv) == 0 and "warning" not in capsys.readouterr().err  # a good export: nothing to say
    monkeypatch.setattr(vit.export, "onnx_logit_difference", lambda model, path: 0.25)  # as a broken graph would
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (
        err
        == f"vit export: warning: {tmp_path / 'm.onnx'}: onnxruntime's logits differ from torch's by 2.5e-01; "
        + ("do not deploy it unchecked\n")
    )


def test_onnx_file_carries_config_class_names_and_preprocessing(tmp_path):
    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt", **CUSTOM)
    assert main(["export", "-c", str(ckpt), "--out", str(tmp_path / "sub" / "m.onnx")]) == 0  # format from suffix
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "sub" / "m.onnx")).metadata_props}
    assert props["class_names"] == CLASS_NAMES
    assert props["model_config"] == tiny_model().cfg.to_dict()
    assert props["data_config"] == data_config(tiny_model(), **CUSTOM)


def test_onnx_falls_back_to_the_torchscript_exporter(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_refuses(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("pretend the dynamo exporter cannot handle this graph")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_refuses)
    model = tiny_model()
    with pytest.warns(UserWarning, match="TorchScript"):
        export_onnx(model, tmp_path / "legacy.onnx", class_names=CLASS_NAMES)
    assert_same_logits_at_batch_1_and_3(model, tmp_path / "legacy.onnx")


def test_safetensors_round_trip_keeps_weights_names_and_preprocessing(tmp_path, capsys):
    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt", **CUSTOM)
    out = tmp_path / "exported.safetensors"
    assert main(["export", "-c", str(ckpt), "--format", "safetensors", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta["class_names"] == CLASS_NAMES and meta["data_config"] == data_config(tiny_model(), **CUSTOM)

    original = tiny_model()
    torch.manual_seed(1)
    fresh = vit.VisionTransformer(original.cfg).eval()
    vit.load_pretrained(fresh, out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), original(x), rtol=0, atol=0)

    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(images[-1])
    capsys.readouterr()
    assert main(["predict", *map(str, images), "-c", str(out), "--format", "json"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert from_export == Predictor.from_checkpoint(ckpt).predict(images)


def test_export_of_an_unknown_format_or_missing_checkpoint_is_a_usage_error(tmp_path, capsys):
    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt")
    assert main(["export", "-c", str(ckpt), "--out", str(tmp_path / "model.bin")]) == 2
    assert "--format" in capsys.readouterr().err
    assert main(["export", "-c", str(tmp_path / "absent.ckpt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "absent.ckpt: no such file" in capsys.readouterr().err


def test_export_of_weights_without_a_model_config_says_so(tmp_path, capsys):
    torch.save(tiny_model().state_dict(), tmp_path / "bare.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing half-written, no warnings: just the one-line error
        assert main(["export", "-c", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "no model config" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_export_of_plain_timm_weights_with_model_carries_the_variant_and_timms_logits(tmp_path, capsys):
    reference = write_timm_state_dict(tmp_path / "timm_tiny.safetensors")
    argv = ["-c", str(tmp_path / "timm_tiny.safetensors"), "--model", "vit_tiny_patch16_224"]
    assert main(["export", *argv, "--out", str(tmp_path / "m.safetensors")]) == 0
    exported, _ = vit.load_model(tmp_path / "m.safetensors")  # no --model needed any more
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
@pytest.mark.parametrize("out", ["folder", "a_file/m.x"], ids=["existing-folder", "under-a-file"])
def test_export_to_a_path_it_cannot_write_is_one_line_and_no_exporter_warning(fmt, out, tmp_path, capsys):
    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    assert main(["export", "-c", str(ckpt), "--format", fmt, "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vit export: error: {tmp_path / out}") and len(err.splitlines()) == 1
    assert not any((tmp_path / "folder").iterdir())


def test_onnx_write_errors_are_not_taken_for_an_exporter_failure(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'dynamo exporter failed, using the TorchScript one'
        with pytest.raises(FileNotFoundError):
            export_onnx(tiny_model(), tmp_path / "absent" / "m.onnx")


def test_export_warns_when_the_suffix_names_the_other_format(tmp_path, capsys):
    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt")
    assert main(["export", "-c", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "m.onnx")]) == 0
    assert (
        capsys.readouterr().err
        == f"vit export: warning: {tmp_path / 'm.onnx'}: safetensors written under a .onnx name; vit and timm read "
        "safetensors only from .safetensors files\n"
    )
    with safe_open(str(tmp_path / "m.onnx"), framework="pt") as f:  # it is what --format said
        assert "model_config" in f.metadata()


@pytest.mark.parametrize(
    "overrides", [{}, dict(reg_tokens=2, no_embed_class=True, global_pool="avg")], ids=["cls-token", "registers"]
)
def test_onnx_of_a_dynamic_img_size_model_runs_at_other_sizes_with_torchs_logits(overrides, tmp_path, capsys):
    model = tiny_model(dynamic_img_size=True, **overrides)
    export_onnx(model, tmp_path / "dyn.onnx")
    for hw in [(32, 32), (48, 48), (16, 56), (8, 8)]:  # the native size, larger, non-square, a single patch
        x = torch.randn(3, 3, *hw)
        with torch.no_grad():
            torch.testing.assert_close(onnxruntime_logits(tmp_path / "dyn.onnx", x), model(x), rtol=0, atol=1e-4)


def test_onnx_metadata_and_timms_transform_reproduce_vit_predict(tmp_path):
    """What the README tells a service to do: preprocessing from the file's own metadata, onnxruntime alone."""
    from timm.data import create_transform

    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt", **CUSTOM)
    assert main(["export", "-c", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    transform = create_transform(**meta["data_config"])
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30 + 9 * i, 40, 3), np.uint8)).save(images[-1])
    x = np.stack([transform(Image.open(p).convert("RGB")).numpy() for p in images])
    probs = torch.from_numpy(session.run(["logits"], {"image": x})[0]).softmax(-1)
    for p, result in zip(probs, Predictor.from_checkpoint(ckpt).predict(images, topk=5)):
        assert [meta["class_names"][i] for i in p.argsort(descending=True)] == [
            r["label"] for r in result["predictions"]
        ]
        torch.testing.assert_close(
            p[[r["index"] for r in result["predictions"]]].tolist(),
            [r["prob"] for r in result["predictions"]],
            rtol=0,
            atol=1e-5,
        )


def test_exported_safetensors_load_into_timm_key_for_key_with_the_same_logits(tmp_path):
    import timm
    from safetensors.torch import load_file

    model = vit.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, depth=2).eval()
    path = vit.save_safetensors(model, tmp_path / "m.safetensors", class_names=["a", "b", "c"])
    kw = dict(num_classes=3, img_size=32, depth=2)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    plain.load_state_dict(load_file(str(path)), strict=True)
    with safe_open(str(path), framework="pt") as f:
        data = json.loads(f.metadata()["data_config"])
    overlay = dict(file=str(path), num_classes=3, **data)  # as the README shows; `file` wins over the hub: offline
    hub = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for theirs in (plain, hub):
            torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=1e-6)
    assert timm.data.resolve_data_config(model=hub)["input_size"] == [3, 32, 32]


def test_export_refuses_to_write_over_the_checkpoint_it_exports(tmp_path, capsys):
    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt")
    before = ckpt.read_bytes()
    assert main(["export", "-c", str(ckpt), "--format", "safetensors", "--out", str(ckpt)]) == 2
    assert "last.ckpt is the checkpoint being exported" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_a_safetensors_export_that_fails_midway_leaves_the_file_that_was_there(tmp_path, capsys, monkeypatch):
    import errno
    import os

    import safetensors.torch

    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt")
    out = tmp_path / "model.safetensors"
    assert main(["export", "-c", str(ckpt), "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert main(["export", "-c", str(ckpt), "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", out.name]


def test_safetensors_under_another_suffix_warns_that_it_will_not_load_again(tmp_path, capsys):
    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt")
    assert main(["export", "-c", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "m.bin")]) == 0
    assert "safetensors written under a .bin name; vit and timm read safetensors only from .safetensors" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("before", [b"the previous export", None], ids=["over-a-file", "new-file"])
@pytest.mark.parametrize("stop", [KeyboardInterrupt, "SIGTERM"])
def test_an_onnx_export_stopped_midway_leaves_the_file_that_was_there(before, stop, tmp_path, capsys, monkeypatch):
    import signal

    import vit.export

    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt")
    out = tmp_path / "model.onnx"
    if before is not None:
        out.write_bytes(before)

    def stopped(path, metadata):  # after the graph is written, before its metadata: a valid ONNX file, but bare
        assert onnx.load(str(path)).graph.node
        if stop == "SIGTERM":  # `kill`, `timeout`: Python's default action would end the process, cleanup skipped
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), "SIGTERM would end the export where it stands"
            handler(signal.SIGTERM, None)
        raise KeyboardInterrupt

    monkeypatch.setattr(vit.export, "_add_onnx_metadata", stopped)
    status = main(["export", "-c", str(ckpt), "--out", str(out)])
    name, number = ("SIGTERM", 143) if stop == "SIGTERM" else ("Ctrl-C", 130)
    assert (status, capsys.readouterr().err) == (number, f"vit export: stopped by {name}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", *(["model.onnx"] if before else [])]
    assert before is None or out.read_bytes() == before


def test_an_export_into_a_read_only_folder_names_out_not_its_temporary_file(tmp_path, capsys, monkeypatch):
    import errno
    import os

    import vit.export

    def read_only(model, path):  # what the exporter meets on a read-only mount, writing beside --out
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(vit.export, "_write_onnx", read_only)
    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt")
    out = tmp_path / "model.onnx"
    assert main(["export", "-c", str(ckpt), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"vit export: error: {out}: could not write it (Read-only file system)\n"
