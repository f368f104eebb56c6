"""`vit predict` on large folders and in scripts: results stream out as they are classified, Ctrl-C and SIGTERM end
a run in one line with the signal's status and the output so far, and folders are walked as torchvision walks them."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import make_dataset

from tests.tiny_checkpoints import write_safetensors
from vit.cli import main
from vit.images import IMAGE_EXTENSIONS
from vit.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write_safetensors(tmp_path / "tiny.safetensors")


def save_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"{i:03d}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
    return paths


def test_iter_predict_yields_the_first_results_before_reading_the_later_images(checkpoint, tmp_path, monkeypatch):
    paths = save_images(tmp_path / "many", 12)
    predictor = Predictor.from_checkpoint(checkpoint, batch_size=2, num_workers=0)
    read = []
    preprocess = predictor.preprocess
    monkeypatch.setattr(predictor, "preprocess", lambda source: (read.append(source), preprocess(source))[1])
    results = predictor.iter_predict(tmp_path / "many")
    first = next(results)
    assert first["path"] == str(paths[0]) and len(read) == 2  # one batch read, not the whole folder
    assert [r["path"] for r in [first, *results]] == [str(p) for p in paths] and len(read) == 12
    assert predictor.predict(iter(paths))[3]["predictions"] == predictor.predict(paths[3])[0]["predictions"]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_output_is_written_as_the_results_come(fmt, checkpoint, tmp_path):
    paths = save_images(tmp_path / "many", 3)
    results = Predictor.from_checkpoint(checkpoint, num_workers=0).predict(paths)
    stream = io.StringIO()
    seen = []

    def slowly():
        for r in results:
            seen.append(stream.getvalue())
            yield r

    from vit.predict import write_results

    write_results(slowly(), fmt, stream)
    assert all(str(paths[i]) in seen[i + 1] for i in range(2))  # result i was out before result i + 1 was asked for
    if fmt == "json":
        assert stream.getvalue() == json.dumps(results, indent=2) + "\n"
        empty = io.StringIO()
        write_results(iter([]), "json", empty)
        assert json.loads(empty.getvalue()) == []


def _stop_at(n: int, exception: type[BaseException] | None, monkeypatch) -> None:
    """Reading the n-th image raises `exception` (Ctrl-C), or sends this process SIGTERM when it is None."""
    calls = []
    preprocess = Predictor.preprocess

    def stopping(self, source):
        calls.append(source)
        if len(calls) == n:
            if exception is None:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise exception
        return preprocess(self, source)

    monkeypatch.setattr(Predictor, "preprocess", stopping)


@pytest.mark.parametrize("fmt", ["csv", "json"])
@pytest.mark.parametrize("how, status", [("Ctrl-C", 130), ("SIGTERM", 143)])
def test_a_run_stopped_halfway_keeps_the_finished_results_and_says_so_in_one_line(
    how, status, fmt, checkpoint, tmp_path, capsys, monkeypatch
):
    save_images(tmp_path / "many", 10)
    _stop_at(5, KeyboardInterrupt if how == "Ctrl-C" else None, monkeypatch)
    fallback = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("SIGTERM reached the test, not vit predict"))
    try:
        argv = ["predict", str(tmp_path / "many"), "-c", str(checkpoint), "--format", fmt]
        code = main([*argv, "--batch-size", "1", "--num-workers", "0"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C came out of vit predict as a traceback")
    finally:
        signal.signal(signal.SIGTERM, fallback)
    out, err = capsys.readouterr()
    assert code == status
    assert err == f"vit predict: stopped by {how} after 4 inputs: the output is incomplete\n"
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [Path(r["path"]).name for r in rows[::5]] == [f"{i:03d}.png" for i in range(4)]
        assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"] * 4  # whole rows, all four images complete
    else:
        with pytest.raises(json.JSONDecodeError):  # an unterminated list: never mistaken for a complete one
            json.loads(out)
        assert json.loads(out + "\n]") and len(json.loads(out + "\n]")) == 4


def test_sigterm_to_the_whole_process_group_with_workers_ends_in_one_line(checkpoint, tmp_path):
    """A scheduler signals every process of the job: the decoding workers too. Reading is slowed so that the run
    is still going when the first rows come out."""
    save_images(tmp_path / "many", 200)
    argv = ["predict", str(tmp_path / "many"), "-c", str(checkpoint), "--format", "csv", "--num-workers", "2"]
    slow = (
        "import time, vit.predict as p; read = p.read_image; "
        "p.read_image = lambda *a, **k: (time.sleep(0.05), read(*a, **k))[1]; "
        f"from vit.cli import main; raise SystemExit(main({argv!r} + ['--batch-size', '4']))"
    )
    with subprocess.Popen(
        [sys.executable, "-c", slow],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as child:
        assert child.stdout.readline().startswith("path,rank")  # flushed as the workers were forked
        assert ".png,1," in child.stdout.readline()  # the first block of rows is out: mid-run
        os.killpg(child.pid, signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 143
    assert err.startswith("vit predict: stopped by SIGTERM after ") and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("worker_init", [False, True])
def test_a_worker_says_nothing_when_the_main_process_stops_while_taking_a_batch(worker_init):
    """A batch goes from a worker to the main process as a file descriptor, handed over by multiprocessing's
    resource_sharer thread in the worker; a main process stopped by SIGTERM or Ctrl-C mid-handover breaks that
    connection, and the thread prints a BrokenPipeError traceback after `vit predict`'s one line (1 run in 12 here).
    The same handover, to a client that hangs up at once, in a worker set up as vit.predict sets up its workers."""
    handover = f"""
import os, socket, sys, threading
from multiprocessing import resource_sharer
import vit.predict
{"vit.predict._worker_stops_quietly(0)" if worker_init else ""}
handled, hook = threading.Event(), sys.excepthook
sys.excepthook = lambda *error: (hook(*error), handled.set())  # whatever the hook does, then say it ran
shared = resource_sharer.DupFd(os.pipe()[0])  # the worker's side of sending a batch
client = socket.socket(socket.AF_UNIX)
client.connect(resource_sharer._resource_sharer._address)
client.close()  # the main process stopped mid-handover
assert handled.wait(60), "the handover's thread never reported its broken connection"
hook(ValueError, ValueError("other errors are still reported"), None)
"""
    err = subprocess.run([sys.executable, "-c", handover], cwd=ROOT, capture_output=True, text=True).stderr
    assert err.endswith("ValueError: other errors are still reported\n"), err
    if worker_init:
        assert err == "ValueError: other errors are still reported\n"
    else:  # the traceback that a worker set up otherwise prints: the case is real
        assert "BrokenPipeError" in err and "resource_sharer.py" in err, err


def test_symbolic_links_to_folders_are_followed_as_torchvision_follows_them(checkpoint, tmp_path):
    root = tmp_path / "photos"
    save_images(root / "cat", 2)
    save_images(tmp_path / "elsewhere", 2)
    (root / "dog").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    expected = make_dataset(str(root), {"cat": 0, "dog": 1}, extensions=tuple(IMAGE_EXTENSIONS))
    results = Predictor.from_checkpoint(checkpoint, num_workers=0).predict(root)
    assert [r["path"] for r in results] == sorted(path for path, _ in expected)
    assert len(results) == 4 and all(r["error"] is None for r in results)


def test_a_symbolic_link_loop_is_skipped_with_a_warning(checkpoint, tmp_path):
    root = tmp_path / "photos"
    paths = save_images(root / "cat", 2)
    (root / "cat" / "again").symlink_to(root, target_is_directory=True)  # photos/cat/again/cat/again/...
    with pytest.warns(UserWarning, match=r"again: skipped: a symbolic link back to .*photos, a folder above it"):
        results = Predictor.from_checkpoint(checkpoint, num_workers=0).predict(root)
    assert [r["path"] for r in results] == [str(p) for p in paths]


@pytest.mark.parametrize("fmt", ["csv", "table"])
def test_a_file_name_that_is_not_utf8_is_written_as_its_own_bytes_under_a_strict_utf8_stdout(
    fmt, checkpoint, tmp_path, monkeypatch, capsys
):
    # A UTF-8 locale other than C.UTF-8 (en_US.UTF-8, or PYTHONIOENCODING=utf-8) makes stdout strict: the name's
    # surrogates stopped the run with "surrogates not allowed" after the rows before it
    save_images(tmp_path / "old", 2)
    os.rename(tmp_path / "old" / "000.png", os.fsencode(tmp_path / "old") + b"/caf\xe9.png")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["predict", str(tmp_path / "old"), "-c", str(checkpoint), "--format", fmt, "-q"]) == 0
    stdout.flush()
    assert b"caf\xe9.png" in stdout.buffer.getvalue()


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_files_from_classifies_the_listed_paths_after_the_arguments(via, checkpoint, tmp_path, monkeypatch, capsys):
    first, listed, *folder = save_images(tmp_path / "photos", 4)
    os.rename(listed, os.fsencode(listed.parent) + b"/caf\xe9.png")  # a Latin-1 name, as `find` prints it
    monkeypatch.chdir(tmp_path)  # relative paths in the list are from the current folder, as tar -T reads them
    lines = [b"photos/caf\xe9.png", b"", b"   ", os.fsencode(folder[0]), b"photos/missing.png", b"photos"]
    data = b"\r\n".join(lines) + b"\n"  # a list written on Windows reads the same
    if via == "file":
        (tmp_path / "list.txt").write_bytes(data)
    else:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    source = "list.txt" if via == "file" else "-"
    argv = ["predict", str(first), "--files-from", source, "-c", str(checkpoint), "--format", "json"]
    assert main(argv) == 1  # the missing file is a failed input, as it is on the command line
    results = json.loads(capsys.readouterr().out)
    expected = [str(first), os.fsdecode(b"photos/caf\xe9.png"), str(folder[0]), "photos/missing.png"]
    expected += sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "photos").iterdir())  # the folder, walked
    assert [r["path"] for r in results] == expected
    assert [r["error"] for r in results].count("no such file or folder") == 1
    assert results[3]["error"] == "no such file or folder"
    assert all(r["error"] is None and r["predictions"] for i, r in enumerate(results) if i != 3)


def test_files_from_alone_replaces_the_arguments_and_may_list_nothing(checkpoint, tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"\n\n")  # a `find` that found nothing
    assert (
        main(["predict", "--files-from", str(tmp_path / "empty.txt"), "-c", str(checkpoint), "--format", "json"]) == 0
    )
    out, err = capsys.readouterr()
    assert json.loads(out) == [] and err == "vit predict: warning: --files-from lists no files: nothing to classify\n"


def test_files_from_a_missing_list_or_no_source_at_all_is_a_usage_error(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--files-from", str(tmp_path / "nolist.txt"), "-c", str(checkpoint)])
    last = capsys.readouterr().err.splitlines()[-1]
    assert (
        stop.value.code == 2
        and last == f"vit predict: error: argument --files-from: {tmp_path}/nolist.txt: no such file"
    )
    assert main(["predict", "-c", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err == "vit predict: error: no SOURCE: name image files or folders, or list them with --files-from FILE\n"


def test_more_workers_than_cores_is_warned_once(checkpoint, tmp_path, monkeypatch, capsys):
    save_images(tmp_path / "few", 3)
    monkeypatch.setattr(torch._utils, "cpu_count", lambda: 1)  # what torch's check reads: a one-core machine
    argv = ["predict", str(tmp_path / "few"), "-c", str(checkpoint), "--num-workers", "2", "-q", "--format", "csv"]
    assert main(argv) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "worker processes" in line]
    assert len(warned) == 1 and warned[0].startswith("vit predict: warning: This DataLoader will create 2 worker")


# Ctrl-C arrives just as `module` starts to import: a finder first on sys.meta_path sends this process SIGINT when
# asked for it, so the KeyboardInterrupt comes inside that import, every time. Then what the console script runs.
CTRL_C_DURING_IMPORT = """
import os, signal, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
from vit.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize(
    "argv, module",
    [
        (["predict", "photo.png", "-c", "missing.ckpt"], "torch"),  # the first second of every command
        (["fit", "--config", "configs/digits.yaml"], "lightning"),  # the next few seconds of fit, validate, test
    ],
)
def test_ctrl_c_while_the_command_imports_ends_in_one_line_with_status_130(argv, module):
    code = CTRL_C_DURING_IMPORT.format(module=module, argv=argv)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr == f"vit {argv[0]}: stopped by Ctrl-C\n"


def test_python_dash_m_vit_is_the_vit_command():
    done = subprocess.run(
        [sys.executable, "-m", "vit", "models", "vit_tiny*"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vit_tiny_patch16_224" in done.stdout


def test_the_command_line_offers_exactly_the_attention_methods_and_head_fusions_of_vit_explain():
    from vit import cli
    from vit.explain import HEAD_FUSIONS, METHODS  # `vit.explain` itself is the function

    assert sorted(cli.ATTENTION_METHODS) == sorted(METHODS)
    assert sorted(cli.HEAD_FUSIONS) == sorted(HEAD_FUSIONS)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--help"], "usage: vit"),
        (["predict", "a.png"], "--checkpoint/-c"),
        (["export", "-c", "x.ckpt", "-o", "m.onnx", "--format", "tflite"], "invalid choice: 'tflite'"),
        (["attention", "--help"], "raw, rollout, grad_rollout, chefer"),
        (["attention", "a.png", "-c", "x", "-o", "m.png", "--method", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_help_and_usage_errors_come_without_importing_torch(argv, says):
    # seconds of torch's import before `vit --help`, or before a mistyped option is named, is a newcomer's first wait
    code = f"""
import contextlib, io, sys
from vit.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), contextlib.suppress(SystemExit):
    main({argv!r})
print(out.getvalue())
print("torch imported:", "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert says in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("torch imported: False")
