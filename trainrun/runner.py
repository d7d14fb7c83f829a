"""Train a run from its validated config: start it in its directory (or continue it from its
checkpoint), with the components trainrun.builders makes, hand it to the loop, and report
how it ended."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainrun import (
    checkpoint,
    determinism,
    devices,
    distributed,
    flops,
    opening,
    resume,
    rundir,
    signals,
    validation,
)
from trainrun.builders import build_components
from trainrun.config import Config
from trainrun.console import Console
from trainrun.errors import ConfigError, NotTrainrun, reason
from trainrun.loop import NonFinite, Outputs, fit
from trainrun.metrics import Metrics
from trainrun.models import hf
from trainrun.precision import Precision
from trainrun.signals import Signals, hold, release
from trainrun.state import Components
from trainrun.trackers import Identity, Trackers


def hparams(cfg: Config, choices: dict[str, str]) -> dict:
    """Flat hyper-parameters for TensorBoard's HParams view."""
    flat = {f"{group}": option for group, option in choices.items()}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", asdict(cfg))
    return flat


def device_and_precision(cfg: Config, slot: int | None = None) -> tuple[torch.device, Precision]:
    """The checks that need the machine (device, precision support), before any model or
    data is built; `slot`: which GPU of several (trainrun.devices), by default this
    process's local rank."""
    device = devices.resolve(cfg.trainer.device, devices.slot() if slot is None else slot)
    return device, Precision(cfg.precision, device)


class RunStopped(SystemExit):
    """The run ended early: stopped by a signal (128 + its number) or failed (1); `reason`
    is the line that said why it failed."""

    def __init__(self, code: int, reason: str = ""):
        super().__init__(code)
        self.reason = reason


@dataclass(frozen=True)
class Launch:
    """What the command line adds to a run besides its config; none of it changes what is
    trained."""

    record: dict[str, str] = field(default_factory=dict)  # name -> text, into .hydra/
    config_dir: Path | None = None  # --config-dir's folder, named in resume commands
    tb_name: str | None = None  # a sweep job's TensorBoard run: tb/<its swept overrides>/
    job: int | None = None  # a sweep job's number, which spreads jobs over the GPUs
    overrides: tuple[str, ...] = ()  # the command line's, as the trackers record them
    sweep: str | None = None  # a sweep job's sweep directory: the trackers' group

    def identity(self, run_dir: Path) -> Identity:
        """What the trackers record of the run besides its config (trainrun.trackers)."""
        return Identity(str(run_dir), self.overrides, self.sweep, self.job, self.tb_name)


def run_training(cfg: Config, run_dir: Path, config_yaml: str, choices: dict[str, str],
        launch: Launch = Launch()) -> dict:
    """Train (or continue) the run described by cfg in run_dir; return the metrics.json
    summary. Raises RunStopped when a signal stopped the run or it failed.

    Nothing is written into run_dir until the run is built and its checkpoint loaded: a run
    refused before then (ConfigError) leaves the directory as it found it, and removes it if
    it was empty; the launch's record is written into run_dir/.hydra once it starts."""
    # the GPU of this process's local rank, which the launch's environment gives before
    # the group is joined (devices.slot); only a job alone on its node goes by its number
    device, precision = device_and_precision(cfg, devices.slot(launch.job))
    world = distributed.init(device)  # a no-op when the CLI joined already, or for one process
    if cfg.trainer.strategy == "fsdp":
        world = distributed.init_single(device)  # FSDP needs a process group, even of one
    key = "hydra.run.dir" if cfg.resume in (None, "auto") else "resume"
    claim = rundir.claim(run_dir, key) if world.main else None  # checks it for links too
    console = Console(silent=not world.main)
    try:
        try:
            rundir.check(run_dir, key)
            resume_from, damaged = resume.locate(cfg, run_dir)
            if cfg.resume is None:
                opening.refuse_used(run_dir, launch.config_dir)
            console.config(config_yaml)
            console.info("options: " + " ".join(f"{g}={o}" for g, o in choices.items()))
            saved = resume.reproducibility(resume_from)  # {}: a fresh run, an older checkpoint
            components = build_components(cfg, device, precision, console, world,
                                          pretrained=resume_from is None,
                                          threads=resume.threads(saved, world.size))
            if resume_from is not None:
                resume.check_tokenizer(components.tokenizer, resume_from)
                resume.check_data(resume.data_record(components.train, components.val),
                                  resume_from)
                load_checkpoint(components, resume_from)
                console.info(f"resumed from {resume_from} at update {components.counters.k}")
                for note in [*determinism.differences(saved, determinism.record(device,
                                                                                world.size)),
                             *ema_notes(components, resume_from)]:
                    console.warning(note)
                for note in [*components.resume_notes(), *resume.schedule_notes(
                        cfg, checkpoint.read_meta(resume_from), components.counters.k,
                        components.schedule)]:
                    console.info(note)
            for note in validation_notes(components, resume_from):
                console.warning(note)
            console.info(validation.describe(components))
            signals.check()  # the last point where a start-up stop leaves nothing behind
        except BaseException:  # a refused start or a start-up signal (StartupStop)
            rundir.release(run_dir)
            rundir.remove_if_empty(run_dir)
            raise
        hold()  # from here the run writes its directory: a stop is a stopped run
        if world.main:
            try:
                opening.write_first_files(run_dir, console, launch.record, damaged,
                                          components.tokenizer, device)
            except opening.StartFailed as failed:
                print(f"trainrun: {failed}", file=sys.stderr)
                rundir.release(run_dir)
                rundir.remove_if_empty(run_dir)
                raise RunStopped(1, str(failed)) from None
        trackers = Trackers(cfg.trackers, run_dir, launch.identity(run_dir),
                            hparams(cfg, choices), console) if world.main else None
        peak = flops.peak_flops(device, precision.mode)
        metrics = Metrics(run_dir, console, cfg.trainer.log_every, cfg.trainer.max_steps,
                          first_step=components.counters.k + 1, writes=world.main,
                          earlier_seconds=components.counters.wall_seconds,
                          tb_name=launch.tb_name, trackers=trackers,
                          flops_per_token=components.raw_model.flops_per_token(cfg.data.seq_len),
                          peak_flops=peak * world.size if peak else None)
        meta = {"config": json.loads(json.dumps(asdict(cfg))), "schemas": resume.schemas(cfg),
                "tokenizer": resume.tokenizer_record(components.tokenizer),
                "data": resume.data_record(components.train, components.val),
                "reproducibility": determinism.record(device, world.size),
                "validation": validation.record(components.val, components.val_size),
                **init_from_record(cfg, resume_from)}
        outputs = Outputs(metrics, console, run_dir / "checkpoints", meta,
                          saved_k=components.counters.k if resume_from is not None else None)
        status = "failed"
        try:
            with Signals(on_hangup=console.detach_terminal) as stops:
                status = fit(components, outputs, stops)
        finally:
            if hasattr(components.order, "close"):  # a stream's reading thread ends with the run
                components.order.close()
            summary = metrics.finish(summarize(components, status), hparams(cfg, choices))
        return report_end(summary, run_dir, console, stops, outputs.failure, world,
                          launch.config_dir)
    finally:
        release()
        determinism.restore()
        console.close()
        if claim is not None:
            claim.release()
        distributed.close()  # the group's threads end before the interpreter does


def ema_notes(t: Components, path: Path) -> list[str]:
    """What a resume does with the weights' average when only one of the checkpoint and the
    run has one (trainer.ema_decay set on resume, or set to null)."""
    has = checkpoint.has_ema(path)
    if t.ema is not None and not has:
        return [f"{path.name} holds no average of the weights (it was trained with "
                f"trainer.ema_decay=null): the average starts from its weights, of update "
                f"{t.counters.k}"]
    if t.ema is None and has:
        return [f"{path.name} holds an average of the weights, which this run drops "
                f"(trainer.ema_decay=null): its checkpoints hold none"]
    return []


def summarize(t: Components, status: str) -> dict:
    c = t.counters
    return {"status": status, "steps": c.k, "tokens": c.tokens, "train_loss": c.train_loss,
            "val_loss": c.val_loss, "best_val_loss": c.best_val_loss,
            "skipped_updates": c.skipped_updates,  # times and tokens/s: Metrics.finish
            "parameters": t.raw_model.num_params(), "val_bleu": c.val_bleu,
            "val_chrf": c.val_chrf, "val_loss_ema": c.val_loss_ema,
            "sources": sources(t)}


def sources(t: Components) -> dict | None:
    """A mixture's sources for metrics.json: each one's weight, the sequences drawn from it
    and the epochs they make, and its last val/loss; None for one source."""
    if not hasattr(t.order, "seen"):
        return None
    return {name: {"weight": t.order.weights[name], **seen,
                   "val_loss": finite(t.counters.val_sources.get(name))}
            for name, seen in t.order.seen().items()}


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def report_end(summary: dict, run_dir: Path, console: Console, signals: Signals,
           failure: checkpoint.NoSpace | NonFinite | None = None,
           world: distributed.World = distributed.ONE_PROCESS,
           config_dir: Path | None = None) -> dict:
    """Report how the run ended (rank 0 only); raise RunStopped unless it completed."""
    if not world.main:
        if summary["status"] != "completed":
            raise RunStopped(signals.exit_status if summary["status"] == "stopped" else 1)
        return summary
    resume_command = resume.command(run_dir, config_dir)
    if world.size > 1:
        resume_command = (f"the same launch with {resume_command.split(' ', 1)[1]} "
                          f"(e.g. torchrun --nproc_per_node={world.size} -m {resume_command}; "
                          f"another number of processes continues the same data)")
    if summary["status"] == "stopped":
        console.command(f"stopped at update {summary['steps']}; to continue:", resume_command)
        raise RunStopped(signals.exit_status)
    if summary["status"] == "failed" and failure is not None:
        then = (f"continue with: {resume_command}" if failure.previous is not None
                else "start the run again")
        advice = "free space" if isinstance(failure, checkpoint.NoSpace) else failure.advice
        reason = f"failed: {failure}; {advice}, then {then}"
        print(f"trainrun: {reason}", file=sys.stderr)
        raise RunStopped(1, reason)
    if summary["status"] == "failed":
        reason = (f"failed: too many non-finite updates in a row at update {summary['steps']}; "
                  f"last good checkpoint in {run_dir / 'checkpoints'}")
        print(f"trainrun: {reason}", file=sys.stderr)
        raise RunStopped(1, reason)
    shown = {k: "n/a" if v is None else v for k, v in summary.items()}
    console.info(f"done: {shown['steps']} updates, val_loss {shown['val_loss']:.6} "
                 f"(best {shown['best_val_loss']:.6}), {shown['tokens_per_sec']:.6} tok/s, "
                 f"{shown['wall_seconds']:.1f}s; run directory {run_dir}")
    return summary


def load_checkpoint(t: Components, path: Path) -> None:
    """Continue from checkpoint `path`: its files are refused in one line (ConfigError) when
    they are not what trainrun writes, whatever meta.json's checksums say."""
    try:
        state = checkpoint.load(path, t.raw_model, t.replicas, t.optimizer, t.ema)
        try:
            t.load_state_dict(state)
        except ConfigError:  # another seed or data than the checkpoint's: said as such
            raise
        except (ValueError, KeyError, TypeError, IndexError, AttributeError,
                RuntimeError) as error:  # what loading the components raises
            what = f"{reason(error)} missing" if isinstance(error, KeyError) else reason(error)
            raise NotTrainrun(f"{path / checkpoint.STATE_FILE}: not a trainer state of this "
                              f"run ({what})") from None
        if t.counters.k != checkpoint.step_number(path):
            raise NotTrainrun(f"{path / checkpoint.STATE_FILE}: the state after update "
                              f"{t.counters.k}, in the checkpoint of update "
                              f"{checkpoint.step_number(path)}")
    except NotTrainrun as error:
        raise ConfigError("resume", f"{error}; allowed: a checkpoint written by trainrun") \
            from None


def validation_notes(t: Components, resume_from: Path | None) -> list[str]:
    """What the run's validation set means for a fresh run (the deprecated eval_batches) or a
    resumed one (validation.resumed); a checkpoint whose record is not trainrun's is refused
    in one line."""
    if resume_from is None:
        return validation.deprecated(t.cfg, t.val_size, resumed=False)
    try:
        return validation.resumed(t, checkpoint.read_meta(resume_from))
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError("resume", f"{resume_from / checkpoint.META_FILE}: not a meta.json "
                                    f"that trainrun wrote ({reason(error)}); allowed: a "
                                    f"checkpoint written by trainrun") from None


def init_from_record(cfg: Config, resume_from: Path | None) -> dict:
    """meta.json's `init_from` (the folder and the sha256 of its weights) when the run's
    weights started from model.init_from; a resumed run keeps its checkpoint's."""
    if resume_from is not None:
        return {k: v for k, v in checkpoint.read_meta(resume_from).items() if k == "init_from"}
    return {"init_from": hf.source(cfg.model)} if cfg.model.init_from is not None else {}
