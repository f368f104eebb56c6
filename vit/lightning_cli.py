"""`vit fit | validate | test`: LightningCLI over `ViTClassifier` and the `vit.data` modules, with the run folders,
checkpoints and guards that `vit fit` adds, and errors as one line (status 2) instead of LightningCLI's usage dump
or a traceback. `vit.cli` hands these subcommands over; importing Lightning takes seconds, so only they do."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from vit.cli import USER_ERRORS, _one_line_warning
from vit.lightning_notes import silence_lightning_notes


def _lightning_main(argv: list[str]) -> int:
    """fit / validate / test through `ViTLightningCLI`; user errors become one line and status 2."""
    # We choose the loader processes on purpose (none for in-memory data without RandAugment, else cores - 1).
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # DDP's launcher re-runs this command in each rank, where our args are sys.argv again: that is intended
    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended.*")
    # A resumed fit writes a run folder of its own, whose best.ckpt follows the resumed epochs (README); a test or
    # validation run writes no checkpoints at all: Lightning's note that the old folder's best score is not
    # carried over says nothing new, twice (once per checkpoint callback)
    warnings.filterwarnings("ignore", ".*The dirpath has changed from.*")
    argv = shipped_configs(argv)
    cli = _lightning_cli_class()
    silence_lightning_notes()  # again, as a caller's warnings.catch_warnings may have undone the import's
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(argv[0])
            cli(args=argv)
    except SystemExit as e:  # jsonargparse's own errors and --help / --print_config
        if type(e).__name__ == "SIGTERMException":  # Lightning's, after a SIGTERM: not a usage error (2)
            return 128 + 15  # the status of a Unix command that SIGTERM ended
        if isinstance(e.__context__, KeyboardInterrupt):  # Lightning's sys.exit(1) once it handled a Ctrl-C
            return 128 + 2  # 130, as a shell reports for a command Ctrl-C ended, and as every other vit command
        return e.code if isinstance(e.code, int) else 2
    except Exception as e:  # Lightning's classes by name: importing them at the top would import Lightning
        name = type(e).__name__
        if isinstance(e, USER_ERRORS) or name == "MisconfigurationException":  # e.g. --trainer.max_epochs -3
            # jsonargparse reports a class that failed to build ("Does not validate against any of the Union
            # subtypes"), with the class's own error, which names the file and the problem, as the cause
            while isinstance(e.__cause__, USER_ERRORS):
                e = e.__cause__
            message = str(e).strip().splitlines()[0]
            print(f"vit {argv[0]}: error: {message}{LIGHTNING_HINTS.get(message, '')}", file=sys.stderr)
            return 2
        if isinstance(e, OSError) and e.filename:  # e.g. a run folder that cannot be made: read-only, not ours
            print(f"vit {argv[0]}: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
            return 2
        if name in ("NonFiniteTrainingError", "CheckpointWriteError"):  # a run that went wrong, not a bad command
            print(f"vit {argv[0]}: error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


# the repository's configs/: installed as vit/configs/ (pyproject.toml), or beside vit/ in a checkout
SHIPPED_CONFIGS = next(
    (d for d in (Path(__file__).with_name("configs"), Path(__file__).parents[1] / "configs") if any(d.glob("*.yaml"))),
    Path(__file__).with_name("configs"),
)


def shipped_configs(argv: list[str]) -> list[str]:
    """`--config digits` (or `digits.yaml`, or `configs/digits.yaml` where the current folder has no such file) is the
    digits.yaml that comes with vit, so that the README's commands work from any folder after `pip install`."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        option, equals, value = arg.partition("=")
        at = i if equals else i + 1  # where the value is: `--config=NAME`, or `--config NAME`
        if option not in ("-c", "--config") or at == len(argv):
            continue
        path = Path(value if equals else argv[at])
        if path.exists() or len(path.parts) not in (1, 2) or path.parts[:-1] not in ((), ("configs",)):
            continue
        shipped = SHIPPED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if shipped.is_file():
            argv[at] = f"{option}={shipped}" if equals else str(shipped)
    return argv


def _shipped_names() -> str:
    return ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))


# Lightning's words for a config that asks for what this machine lacks, and what to do about it
LIGHTNING_HINTS = {
    "No supported gpu backend found!": (
        " (this machine has no GPU: add --trainer.accelerator cpu, and for configs/cifar10_gpu.yaml also "
        "--trainer.precision 32-true --model.compile false)"
    ),
}


@functools.cache
def _lightning_cli_class() -> type:
    """`ViTLightningCLI`, defined on first use so that the light subcommands do not import Lightning (seconds)."""
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.utilities import rank_zero_warn

    from vit.ckpt_path import (
        latest_run_checkpoint,
        not_resumable,
        nothing_left_to_train,
        replaced_model_settings,
        settings_it_predates,
    )
    from vit.data import VisionDataModule
    from vit.module import ViTClassifier, other_classes
    from vit.progress import RateLimitedRichProgressBar
    from vit.resume import AtomicCheckpointIO, BestCheckpoint, LastCheckpoint, RNGStateCheckpoint, SayHowToResume
    from vit.safety import (
        CtrlCIsNeverLost,
        DropTheRunFolderOfAFailedStart,
        EndAllRanksOnError,
        StopOnNonFiniteLoss,
        WarnIfHalfPrecisionIsSlow,
        check_checkpoint,
        drop_a_run_folder_that_only_started,
    )

    class SaveRunConfig(SaveConfigCallback):
        """LightningCLI's config.yaml in the run folder, or config-vK.yaml (the next free K, as Lightning names a
        second best-v1.ckpt) where that folder already holds one: with the logger off the run folder is the
        working (or root) folder, where config.yaml may be the user's own file, the `--config` being read."""

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            log_dir = trainer.log_dir  # every rank: a broadcast
            if not self.already_saved and log_dir and trainer.is_global_zero:
                stem, suffix = os.path.splitext(self.config_filename)
                name, k = self.config_filename, 0
                while os.path.exists(os.path.join(log_dir, name)):
                    k += 1
                    name = f"{stem}-v{k}{suffix}"
                self.config_filename = name
            super().setup(trainer, pl_module, stage)

    class BriefErrorsParser(LightningArgumentParser):
        """LightningCLI's parser, whose errors show one usage line rather than all 80-odd options, and a value of
        the wrong type in the data or model section as its key and reason rather than jsonargparse's Union dump."""

        def print_usage(self, file: Any = None) -> None:
            prog = self.prog.replace(" [options]", "")
            print(f"usage: {prog} --config CONFIG [--model.* ...] [--data.* ...] [--trainer.* ...]", file=file)

        def error(self, message: str, ex: Exception | None = None) -> Any:
            # `vit fit` alone: jsonargparse reports 'required: fit.data' with the top parser's usage (no 'fit')
            missing = re.fullmatch(r"the following arguments are required: (\w+)\.data", message.strip())
            subcommands = getattr(self, "_subcommands_action", None)
            if missing and subcommands is not None and missing.group(1) in subcommands.choices:
                command, message = missing.group(1), "no data: give --config CONFIG (e.g. configs/digits.yaml)"
                if ex is not None and getattr(ex, "subcommand_parser", None) is None:
                    ex.subcommand_parser = subcommands.choices[command]  # usage and tip of `vit fit`
            missing = re.fullmatch(r'Parser key "config":\s*File does not exist: (.+)', message.strip())
            if missing:  # a name that is neither a file here nor one of vit's configs
                message = f"--config {missing.group(1)}: no such file; vit's own configs: {_shipped_names()}"
            if self.exit_on_error:
                message = _innermost_reason(message)
                if message.startswith("seed_everything: expected"):  # `null`, as a YAML user writes "no seed"
                    message += "; false turns seeding off, true picks a random seed"
            super().error(message, ex)

    class ViTLightningCLI(LightningCLI):
        """LightningCLI for `ViTClassifier` and any `vit.data` module: each run writes runs/<name>/version_N/
        with CSV logs and checkpoints/best.ckpt + last.ckpt, and ends by printing where and how it went."""

        def __init__(self, args: list[str]):
            self.checkpoint_classes: list[str] | None = None  # the class names of --ckpt_path's checkpoint
            self.resumed_step: int | None = None  # the global step --ckpt_path's checkpoint holds
            super().__init__(
                ViTClassifier,
                VisionDataModule,
                subclass_mode_data=True,
                trainer_defaults={
                    "logger": {
                        "class_path": f"{CSVLogger.__module__}.CSVLogger",
                        "init_args": {"save_dir": "runs", "name": "vit"},
                    }
                },
                save_config_callback=SaveRunConfig,
                save_config_kwargs={"overwrite": True},  # SaveRunConfig writes a new file: DDP ranks need not check
                parser_class=BriefErrorsParser,
                parser_kwargs={"prog": "vit"},  # not `cli.py` under `python -m vit.cli`
                args=args,
            )

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument(
                "--torch_threads",
                type=int | None,
                default=None,
                help="CPU threads for torch (torch.set_num_threads); tiny models train fastest with 1, above all "
                "on a busy machine. Default: torch's choice.",
            )
            parser.add_argument(
                "--float32_matmul_precision",
                type=Literal["highest", "high", "medium"],
                default="high",
                help="float32 matrix products on a GPU (torch.set_float32_matmul_precision): 'high' runs them in "
                "TF32, as timm's train.py does and Lightning advises; 'highest' keeps full float32. CPUs: float32.",
            )
            parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.monitor": "val/acc",
                    "checkpoint.mode": "max",
                    "checkpoint.filename": "best",
                    "checkpoint.auto_insert_metric_name": False,
                }
            )

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            """Adds last.ckpt written after every epoch, or every few when epochs are short (`LastCheckpoint`;
            ModelCheckpoint's own save_last follows the monitored checkpoint, so it stops at the last improvement),
            the non-finite-loss guard, a warning when this CPU can only emulate the half precision asked for, the
            RNG states in every checkpoint (exact resume), checkpoints written atomically, and Lightning's Rich bar
            unless the config has a progress bar of its own or turns bars off."""
            config = self._get(self.config_init, "trainer", default={})
            callbacks = config.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            # --trainer.enable_checkpointing false: no best.ckpt, no last.ckpt (Lightning refuses either otherwise)
            best = self._get(self.config_init, "checkpoint")
            self.last_checkpoint = (
                LastCheckpoint(
                    dirpath=best.dirpath, enable_version_counter=getattr(best, "_enable_version_counter", True)
                )
                if config.get("enable_checkpointing") is not False
                else None
            )
            guards = [StopOnNonFiniteLoss(), EndAllRanksOnError(), WarnIfHalfPrecisionIsSlow(), CtrlCIsNeverLost()]
            drop = DropTheRunFolderOfAFailedStart()
            guards.append(drop)
            callbacks = [*callbacks, *guards, *([RNGStateCheckpoint()] if self.subcommand == "fit" else [])]
            if self.last_checkpoint is not None:
                callbacks.append(self.last_checkpoint)
                if self.subcommand == "fit":  # after `drop`: its on_exception has run when this one says what is left
                    callbacks.append(SayHowToResume(self.last_checkpoint, drop))
            plugins = config.get("plugins") or []
            plugins = plugins if isinstance(plugins, list) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):  # a CheckpointIO of the user's wins
                kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
            if config.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks
            ):
                # Lightning's default redraws from a thread woken 100 times a second, which takes the GIL (and
                # a core's share) from the training loop, and updates after every batch. Each redraw lays out Rich's
                # whole table (1.5-2.5 ms here); 4 a second, Rich's own default for live displays, cost 1% less
                # of a digits run than 10 and still follow every epoch's end
                callbacks.append(RateLimitedRichProgressBar(refresh_rate=4))
            trainer = super().instantiate_trainer(**kwargs, callbacks=callbacks)
            if self.last_checkpoint is not None:
                # The monitored checkpoint must come first: it is `trainer.checkpoint_callback` (`--ckpt_path best`)
                trainer.callbacks.remove(self.last_checkpoint)
                trainer.callbacks.append(self.last_checkpoint)
            return trainer

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
            if self.last_checkpoint is None:  # checkpointing is off: drop best.ckpt's callback (`--checkpoint.*`)
                callbacks = [c for c in callbacks if not isinstance(c, BestCheckpoint)]
            return super()._instantiate_trainer(config, callbacks)

        def _parse_ckpt_path(self) -> None:
            """Refuse an unsafe --ckpt_path in one line before LightningCLI reads its hyperparameters."""
            subcommand = self.config.get("subcommand")
            which = self.config[subcommand].get("ckpt_path") if subcommand else None
            if which in ("last", "best"):  # Lightning's shortcuts, which find nothing in a new process's run folder
                trainer = self.config[subcommand]["trainer"]
                dirpath = self.config[subcommand]["checkpoint"].get("dirpath")
                found = latest_run_checkpoint(trainer.get("logger"), which, dirpath, trainer.get("default_root_dir"))
                self.config[subcommand]["ckpt_path"] = str(found)
            path = self.config[subcommand].get("ckpt_path") if subcommand else None
            checkpoint = check_checkpoint(path)
            if checkpoint is not None and (problem := not_resumable(path, checkpoint, subcommand == "fit")):
                raise ValueError(problem)
            meta = checkpoint.get("vit") if isinstance(checkpoint, dict) else None
            self.checkpoint_classes = meta.get("class_names") if isinstance(meta, dict) else None
            self.resumed_step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
            model = self.config[subcommand].get("model") if subcommand else None
            asked = model.as_dict() if model is not None else None
            # Lightning 2.6 sets every model argument to the checkpoint's hyperparameters, whatever the config
            # and command line say: say which of theirs are dropped, rather than train or test without a word
            super()._parse_ckpt_path()
            if asked is None or self.config[subcommand]["model"] is model:
                return  # no checkpoint, or one without hyperparameters
            restored = self.config[subcommand]["model"]
            for key, default in settings_it_predates(checkpoint.get("hyper_parameters") or {}).items():
                restored[key] = default
            restored["compile"] = asked["compile"]  # this machine's choice (a GPU run's checkpoint on a CPU)
            changes = replaced_model_settings(asked, restored.as_dict(), fitting=subcommand == "fit")
            if changes:
                ckpt = self.config[subcommand]["ckpt_path"]
                tail = (
                    f"to train with new ones, start a new run from its weights (--model.pretrained {ckpt})"
                    if subcommand == "fit"
                    else "its model is used as it was trained"
                )
                rank_zero_warn(
                    f"vit: {ckpt} brings its own model settings, which replace these of the config and command "
                    f"line: {', '.join(changes)}; {tail}"
                )

        def _refuse_other_classes(self) -> None:
            """--ckpt_path on data of other classes: say so, naming both lists, before the checkpoint's model (whose
            head fits its own classes) meets the data; when the class counts differ, the model's setup would
            otherwise ask for --model.num_classes, which the checkpoint overrides."""
            names = getattr(self.datamodule, "class_names", None)  # None until setup for the CIFAR modules
            saved = self.checkpoint_classes
            if saved and names and list(saved) != list(names):
                raise ValueError(other_classes(self.config[self.subcommand]["ckpt_path"], saved, names))

        def before_fit(self) -> None:
            self._refuse_other_classes()

        def before_validate(self) -> None:
            self._refuse_other_classes()

        def before_test(self) -> None:
            self._refuse_other_classes()

        def before_instantiate_classes(self) -> None:
            import torch

            config = self.config[self.subcommand]
            # Lightning's torch.load unpickles anything when asked to (or under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)
            if "weights_only" in config:
                config["weights_only"] = True
            # Denormal floats (below 1e-38) appear as a model trains and make CPU arithmetic on them many times
            # slower (measured: 305 vs 446 images/s for a trained CIFAR ViT on one thread). Flushing them to zero
            # changes nothing a float32 model can tell; the threads torch starts later inherit the setting.
            torch.set_flush_denormal(True)
            threads = config.get("torch_threads")
            if threads:
                torch.set_num_threads(threads)
            # Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (fork safety with GPUs); without a GPU it only
            # makes torch.cuda.is_available(), which AdamW calls every step, load NVML anew each time (ms under load).
            if not torch.cuda.is_available():
                os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
            else:  # GPUs only: on a CPU, 'medium' has oneDNN multiply float32 matrices in bfloat16
                torch.set_float32_matmul_precision(config.get("float32_matmul_precision") or "high")

        def after_fit(self) -> None:
            self._report(fitted=True)

        def after_validate(self) -> None:
            self._report()

        def after_test(self) -> None:
            self._report()

        def _report(self, fitted: bool = False) -> None:
            # plain print: paths must not be wrapped or read as Rich markup
            trainer = self.trainer
            run_folder = trainer.log_dir  # every rank: under DDP this is a broadcast from rank 0
            if not trainer.is_global_zero:  # one report per run, not one per process
                return
            if fitted and self.resumed_step is not None and trainer.global_step == self.resumed_step:
                # Lightning only logs that the loop is done: say why, and how to go on, and leave no empty folder
                rank_zero_warn(nothing_left_to_train(self.config["fit"]["ckpt_path"], trainer))
                # a logger's version folder only: with the logger off, log_dir is the working (or root) folder
                if trainer.logger is not None and drop_a_run_folder_that_only_started(run_folder):
                    run_folder = None
            if run_folder:
                print(f"run folder: {run_folder}")
            if fitted:
                if self.last_checkpoint is None:
                    print("checkpoints: none (--trainer.enable_checkpointing false)")
                else:
                    best, last = trainer.checkpoint_callback.best_model_path, self.last_checkpoint.best_model_path
                    if trainer.fast_dev_run:  # Lightning writes no checkpoint then: no blank paths
                        print("checkpoints: none (--trainer.fast_dev_run writes none)")
                    else:  # no best.ckpt when its metric was never logged (--trainer.limit_val_batches 0)
                        best = best or f"none ({trainer.checkpoint_callback.monitor} was never logged)"
                        print(f"checkpoints: best {best}  last {last or 'none'}")
                metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items())}
                if metrics:
                    print("final metrics: " + "  ".join(f"{k} {_format_metric(v)}" for k, v in metrics.items()))

    return ViTLightningCLI


def _format_metric(value: float) -> str:
    """Four decimals, as for accuracies and losses; a small value (a learning rate near the end of its schedule)
    in scientific notation rather than as 0.0000."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"


def _innermost_reason(message: str) -> str:
    """'data.batch_size: Expected a <class 'int'>. Got value: ten' from jsonargparse's report of a class argument
    that failed ('Parser key "data": Does not validate against any of the Union subtypes ... Parser key
    "batch_size": Expected ...'); other messages as they are."""
    keys = re.findall(r'Parser key "([^"]+)":\s*\n\s*(.+)', message)
    if "Does not validate against any of the Union subtypes" not in message or not keys:
        return message
    refused = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*Option '(\w+)' is not accepted", message)
    if refused:  # e.g. --data.auto_augment for DigitsDataModule, which augments whole batches, not images
        path, option = refused.groups()
        taken = ", ".join(_init_options(path))
        return f"--{keys[0][0]}.{option}: {path.rsplit('.', 1)[-1]} has no such option (it takes {taken})"
    if len(keys) > 1:  # a class's own argument: the class's parser said what is wrong
        return f"{keys[0][0]}.{keys[1][0]}: {keys[1][1].strip()}"
    required = re.search(
        r"Problem with given class_path '[^']+':\s*\n\s*the following arguments are required: (.+)", message
    )
    if required:  # e.g. ImageFolderDataModule without train_dir
        names = ", ".join(f"--{keys[0][0]}.{name.strip()}" for name in required.group(1).split(","))
        return f"{names} {'is' if ',' not in names else 'are'} required"
    # classes ('float'), and 'tuple[float, ...]' (--model.betas) as a list, as YAML and the command line write it
    pattern = r"<class '(?:[\w.]+\.)?(\w+)'>|(?:tuple|list)\[(\w+), \.\.\.\]"
    types = [t or f"list of {item}" for t, item in re.findall(pattern, message.split("Errors:")[0])]
    given = re.search(r"Given value: (.*)", message)
    if not types or not given:
        return message
    types = ["null" if t == "NoneType" else t for t in types]  # as a YAML file or the command line spells it
    return f"{keys[0][0]}: expected {' or '.join(types)}, got {given.group(1).strip()!r}"


def _init_options(class_path: str) -> list[str]:
    """The keyword arguments of `class_path`'s constructor, with those a `**kwargs` passes on to its bases."""
    module, name = class_path.rsplit(".", 1)
    options: list[str] = []
    for cls in importlib.import_module(module).__dict__[name].__mro__:
        if "__init__" not in vars(cls):
            continue
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        options += [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(options))
