"""Training: one run of a small language model on a task, into a run folder that is never overwritten.

A run folder holds
    config.toml      the fully resolved config (repeat the run with ``sandbox run --config <it>``)
    metrics.jsonl    one JSON object per logged train step and per evaluation
    results.json     the summary at the end (final eval loss and metric, size, speed)
    checkpoint.pt    model, optimizer, scheduler, step and every RNG state (replaced atomically)
    events.out.*     TensorBoard: losses, metric, lr, grad norm, tokens/s, per-layer state norms and gates

``--resume DIR`` reloads the checkpoint and continues; on CPU the resumed losses equal an uninterrupted
run's bit for bit, because the model, optimizer, schedule and batch generator all restart from saved state.
A non-finite loss or gradient norm stops the run (``NonFiniteLoss``) and leaves the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import torch.nn.functional as F
import typer
from torch import Tensor
from tqdm import tqdm

from sandbox.config import ATTENTION, RunConfig, load_config, resolve_config, save_config
from sandbox.layer import DECAY_INITS, resolve_impl, triton_works
from sandbox.model import LanguageModel
from sandbox.tasks import create_task
from sandbox.tasks.base import Task

CHECKPOINT = "checkpoint.pt"


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the message names the step and the checkpoint kept."""


class RunInterrupted(RuntimeError):
    """Ctrl-C during training; the message says from which checkpoint ``--resume`` will continue."""


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: '{name}' requested but no CUDA GPU is available here (use cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: '{name}' requested but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device: 'mps' requested but it is not available here (use cpu or auto)")
    return device


def choose_impl(config: RunConfig, device: torch.device) -> str:
    """The rule implementation actually used; an explicit ``triton`` must pass its self-test here."""
    if config.rule == ATTENTION:
        return "sdpa"
    if config.impl == "triton":
        if config.chunk_size not in (16, 32, 64):
            raise ValueError(f"chunk_size: the triton kernels take 16, 32 or 64, got {config.chunk_size}")
        works, reason = triton_works(device, config.chunk_size)
        if not works:
            raise ValueError(f"impl: the triton kernels do not run on {device} here ({reason}); "
                             "use --impl chunk, or a GPU (or TRITON_INTERPRET=1 on CPU, slow)")
    return resolve_impl(config.impl, device, config.chunk_size)


def new_run_folder(out: str | None, config: RunConfig) -> Path:
    """Create the run folder: ``out``, or ``runs/<rule>-<task>-<time>``; if taken, the first free ``-1``, ``-2``..."""
    base = Path(out) if out else Path("runs") / f"{config.rule}-{config.task}-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"out: '{base.parent}' exists and is not a folder") from None
    except OSError as error:
        raise ValueError(f"out: cannot create the folder '{base.parent}' ({error.strerror})") from None
    candidate, suffix = base, 0
    while True:
        try:
            candidate.mkdir()   # atomic: two runs started together cannot get the same folder
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = base.with_name(f"{base.name}-{suffix}")
        except OSError as error:
            raise ValueError(f"out: cannot create the run folder '{candidate}' ({error.strerror})") from None


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, cosine down to 0.1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the scored positions (targets -100 elsewhere)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_model(config: RunConfig, task: Task, impl: str) -> LanguageModel:
    return LanguageModel(task.vocab_size, config.rule, config.d_model, config.layers, config.heads,
                         short_conv=config.short_conv, stability_constraint=config.stability_constraint,
                         min_log_mu=config.min_log_mu, chunk_size=config.chunk_size,
                         impl=impl, decay_init=config.decay_init, momentum_init=config.momentum_init,
                         allow_neg_eigval=config.allow_neg_eigval)


def resolve_task(config: RunConfig) -> tuple[RunConfig, Task]:
    """Create the task and write its resolved parameters (and sequence length) back into the config."""
    task = create_task(config.task, config.task_args, seq_len=config.seq_len)
    task_args = {name: value for name, value in task.params().items() if name != "seq_len"}
    return resolve_config({**config.to_dict(), "task_args": task_args, "seq_len": task.seq_len}), task


class Trainer:
    """Everything one run needs; ``fit`` trains from the current step to ``config.steps``."""

    def __init__(self, config: RunConfig, progress: bool = True):
        """Build the task, model and optimizer; bad input raises ValueError here, before any folder exists."""
        self.device = choose_device(config.device)
        config, self.task = resolve_task(config)
        self.impl = choose_impl(config, self.device)
        self.config, self.progress = config, progress

        torch.manual_seed(config.seed)
        self.model = build_model(config, self.task, self.impl).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.optimizer_groups(config.weight_decay), lr=config.lr,
                                           betas=(0.9, 0.95), fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps))
        self.generator = torch.Generator().manual_seed(config.seed)   # train batches (CPU, saved in checkpoints)
        self.step = 0
        self.checkpoint_step: int | None = None
        # Speed: time and count of the training steps, summed over resumed sessions; the first step of each
        # session is left out (it compiles kernels and warms caches) unless it is the only one.
        self.train_seconds, self.timed_steps = 0.0, 0
        self.wall_seconds = 0.0

    def autocast(self):
        """bf16 autocast on GPU (the rule kernels take bf16 q, k, v; gates stay float32); full precision on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def start(self, folder: Path, resume: bool = False) -> None:
        """Attach the run folder (loading its checkpoint when resuming) and open the TensorBoard writer."""
        self.folder = folder
        if resume:
            self._load_checkpoint()
        from torch.utils.tensorboard import SummaryWriter   # imported late: it is slow to import

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=self.step + 1 if resume else None)

    # --- checkpoints -------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        state = {
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "train_seconds": self.train_seconds, "timed_steps": self.timed_steps,
            "wall_seconds": self.wall_seconds,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        temporary = self.folder / (CHECKPOINT + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.folder / CHECKPOINT)   # a crash mid-save leaves the previous checkpoint
        self.checkpoint_step = self.step

    def _load_checkpoint(self) -> None:
        path = self.folder / CHECKPOINT
        if not path.is_file():
            raise ValueError(f"resume: no {CHECKPOINT} in '{self.folder}' (the run stopped before its first checkpoint)")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            self.model.load_state_dict(state["model"])
        except Exception as error:   # truncated file, other model: report it as the user's input problem
            raise ValueError(f"resume: cannot load {path} ({type(error).__name__}); "
                             "is it a complete checkpoint of this run's model?") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.step, self.train_seconds, self.wall_seconds = state["step"], state["train_seconds"], state["wall_seconds"]
        self.timed_steps = state.get("timed_steps", self.step)   # checkpoints of earlier versions lack it
        self.checkpoint_step = self.step
        self._drop_metrics_after(self.step)

    def _drop_metrics_after(self, step: int) -> None:
        """Metrics logged after the checkpoint by the interrupted session are about to be recomputed."""
        path = self.folder / "metrics.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))

    # --- logging ----------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with (self.folder / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        split = record["split"]
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{name}", value, record["step"])

    def _log_mixer_stats(self) -> None:
        for layer, stats in enumerate(self.model.mixer_stats()):
            for name, value in stats.items():
                self.writer.add_scalar(f"layer{layer}/{name}", value, self.step)

    # --- the loop ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Mean loss and metric on ``eval_batches`` held-out batches (the same ones at every evaluation)."""
        self.model.eval()
        generator = torch.Generator().manual_seed(self.config.seed)
        losses, metrics = [], []
        for _ in range(self.config.eval_batches):
            inputs, targets = self.task.batch(self.config.batch_size, generator, split="eval")
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.autocast():
                logits, _ = self.model(inputs)
            losses.append(language_model_loss(logits, targets).item())
            metrics.append(self.task.metric(logits.float(), targets))
        self.model.train()
        return sum(losses) / len(losses), sum(metrics) / len(metrics)

    def _train_step(self, record_stats: bool) -> tuple[float, float | None, float]:
        inputs, targets = self.task.batch(self.config.batch_size, self.generator, split="train")
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        self.model.set_record_stats(record_stats)
        with self.autocast():
            logits, _ = self.model(inputs)
        loss = language_model_loss(logits, targets)
        if not torch.isfinite(loss):
            self._stop(f"loss is {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip).item()
        if not math.isfinite(grad_norm):
            self._stop(f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.scheduler.step()
        metric = self.task.metric(logits.detach().float(), targets) if record_stats else None
        return loss.item(), metric, grad_norm

    def _stop(self, what: str) -> None:
        step = self.step + 1
        where = (f"the last good checkpoint is {self.folder / CHECKPOINT} (step {self.checkpoint_step})"
                 if self.checkpoint_step is not None else "no checkpoint was written yet")
        raise NonFiniteLoss(f"{what} at step {step}; run stopped, {where} (try a lower --lr)")

    def fit(self) -> dict[str, Any]:
        """Train up to ``config.steps``, evaluating, logging and checkpointing on the way; write results.json."""
        self.session_start, self.wall_before = time.perf_counter(), self.wall_seconds
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                   desc=f"{self.config.rule} {self.config.task}", unit="step")
        try:
            self._loop(bar)
        except KeyboardInterrupt:
            where = (f"continue from step {self.checkpoint_step} with: sandbox run --resume {self.folder}"
                     if self.checkpoint_step is not None else "no checkpoint was written yet")
            raise RunInterrupted(f"interrupted at step {self.step}; {where}") from None
        finally:
            bar.close()
            self.writer.close()
        self._update_wall_seconds()
        return self._results()

    def _update_wall_seconds(self) -> None:
        self.wall_seconds = self.wall_before + time.perf_counter() - self.session_start

    def _loop(self, bar: tqdm) -> None:
        config, metric_name = self.config, self.task.metric_name
        tokens_per_step = config.batch_size * self.task.seq_len
        window_tokens, window_seconds = 0, 0.0     # tokens/s over the steps since the last log line
        session_first_step, remaining = self.step, config.steps - self.step
        while self.step < config.steps:
            log_now = (self.step + 1) % config.log_every == 0 or self.step == 0
            step_start = time.perf_counter()
            loss, metric, grad_norm = self._train_step(record_stats=log_now)
            step_seconds = time.perf_counter() - step_start
            if self.step != session_first_step or remaining == 1:
                self.train_seconds, self.timed_steps = self.train_seconds + step_seconds, self.timed_steps + 1
            self.step += 1
            window_tokens, window_seconds = window_tokens + tokens_per_step, window_seconds + step_seconds
            bar.update(1)
            if log_now:
                speed = window_tokens / window_seconds
                window_tokens, window_seconds = 0, 0.0
                self._log({"step": self.step, "split": "train", "loss": loss, metric_name: metric,
                           "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "tokens_per_second": speed})
                self._log_mixer_stats()
                bar.set_postfix_str(f"loss {loss:.3f} {metric_name} {metric:.3f} {speed:,.0f} tok/s")
            if self.step % config.eval_every == 0 or self.step == config.steps:
                eval_loss, eval_metric = self.evaluate()
                self._log({"step": self.step, "split": "eval", "loss": eval_loss, metric_name: eval_metric})
                bar.write(f"step {self.step}: eval loss {eval_loss:.4f}, {metric_name} {eval_metric:.4f}")
            if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                self._update_wall_seconds()
                self._save_checkpoint()

    def _results(self) -> dict[str, Any]:
        evals = [json.loads(line) for line in (self.folder / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in evals if r["split"] == "eval"][-1]
        last_train = [r for r in evals if r["split"] == "train"][-1]
        state_size, state_label = self.model.state_size(self.task.seq_len)
        results = {
            "rule": self.config.rule, "task": self.config.task, "task_args": self.config.task_args,
            "seq_len": self.task.seq_len, "steps": self.step, "seed": self.config.seed,
            "final_loss": final["loss"], "final_metric": final[self.task.metric_name],
            "metric_name": self.task.metric_name, "higher_is_better": self.task.higher_is_better,
            "final_train_loss": last_train["loss"],
            "parameters": self.model.parameter_count(), "state_size": state_size, "state_size_label": state_label,
            "tokens_per_second": self.timed_steps * self.config.batch_size * self.task.seq_len / self.train_seconds,
            "wall_seconds": self.wall_seconds, "device": str(self.device), "impl": self.impl,
        }
        (self.folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results

    def describe(self) -> str:
        state_size, state_label = self.model.state_size(self.task.seq_len)
        args = " ".join(f"{k}={v}" for k, v in self.config.task_args.items())
        return (f"task {self.config.task} ({args}, seq_len={self.task.seq_len}, metric {self.task.metric_name}); "
                f"model {self.config.rule}: {self.model.parameter_count():,} parameters, "
                f"{state_size:,} {state_label}; device {self.device}, impl {self.impl}")


def train(config: RunConfig, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train a new run into a fresh folder; returns the folder and the results (also in results.json)."""
    trainer = Trainer(config, progress=progress)
    folder = new_run_folder(config.out, trainer.config)
    trainer.config.out = str(folder)
    trainer.start(folder)
    save_config(trainer.config, folder / "config.toml")
    print(trainer.describe())
    return folder, trainer.fit()


def resume(folder: str | Path, overrides: dict[str, Any] | None = None,
           progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Continue the run in ``folder`` from its checkpoint. ``overrides`` may change only ``steps`` (to train
    longer; the cosine schedule then stretches to the new total) and ``device``."""
    folder = Path(folder)
    if not (folder / "config.toml").is_file():
        raise ValueError(f"resume: '{folder}' is not a run folder (no config.toml)")
    overrides = overrides or {}
    fixed = sorted(set(overrides) - {"steps", "device"})
    if fixed:
        raise ValueError(f"resume: '{fixed[0]}' cannot change when resuming (only steps and device can)")
    trainer = Trainer(resolve_config(load_config(folder / "config.toml"), overrides), progress=progress)
    trainer.start(folder, resume=True)
    if trainer.step > trainer.config.steps:
        raise ValueError(f"steps: the run is already at step {trainer.step}, got --steps {trainer.config.steps}")
    if overrides:
        save_config(trainer.config, folder / "config.toml")
    print(trainer.describe())
    print(f"resuming at step {trainer.step} of {trainer.config.steps}")
    return folder, trainer.fit()


# --- the `sandbox run` command ----------------------------------------------------------------------------

DEFAULTS = RunConfig()

def parse_task_args(pairs: list[str]) -> dict[str, str]:
    """``["num_kv_pairs=8", ...]`` -> ``{"num_kv_pairs": "8"}`` (the task converts the values)."""
    args = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"task-arg: expected NAME=VALUE, got '{pair}'")
        args[name.strip()] = value.strip()
    return args


def run_command(
    rule: Annotated[Optional[str], typer.Option(help=f"Update rule (see `sandbox rules`) or 'attention' (default {DEFAULTS.rule}).")] = None,
    task: Annotated[Optional[str], typer.Option(help=f"Task, see `sandbox tasks` (default {DEFAULTS.task}).")] = None,
    task_arg: Annotated[Optional[list[str]], typer.Option("--task-arg", help="Task parameter NAME=VALUE (repeatable).")] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Optimizer steps (default {DEFAULTS.steps}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Sequences per step (default {DEFAULTS.batch_size}).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Sequence length (default: the task's).")] = None,
    d_model: Annotated[Optional[int], typer.Option(help=f"Model width (default {DEFAULTS.d_model}).")] = None,
    layers: Annotated[Optional[int], typer.Option(help=f"Blocks (default {DEFAULTS.layers}).")] = None,
    heads: Annotated[Optional[int], typer.Option(help=f"Heads per mixer, head dim = d_model / heads (default {DEFAULTS.heads}).")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate; AdamW, warmup then cosine to 0.1x (default {DEFAULTS.lr}).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=f"AdamW weight decay, matrices only (default {DEFAULTS.weight_decay}).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help=f"Linear warmup steps (default {DEFAULTS.warmup_steps}).")] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help=f"Gradient norm clip (default {DEFAULTS.grad_clip}).")] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Seed of the initialisation and the batches (default {DEFAULTS.seed}).")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(help=f"Chunk length of the chunkwise form (default {DEFAULTS.chunk_size}).")] = None,
    short_conv: Annotated[Optional[bool], typer.Option("--short-conv/--no-short-conv", help="Causal conv4 + SiLU on q, k, v (default on).")] = None,
    stability_constraint: Annotated[Optional[bool], typer.Option("--stability-constraint/--no-stability-constraint", help="MDN stability constraint, momentum rules (default on).")] = None,
    min_log_mu: Annotated[Optional[float], typer.Option(help=f"Floor of log(mu), the momentum decay (default {DEFAULTS.min_log_mu}).")] = None,
    decay_init: Annotated[Optional[str], typer.Option(help=f"Init of the decay alpha: {', '.join(DECAY_INITS)} (default {DEFAULTS.decay_init}).")] = None,
    momentum_init: Annotated[Optional[str], typer.Option(help=f"Init of the momentum decay mu: {', '.join(DECAY_INITS)} (default {DEFAULTS.momentum_init}).")] = None,
    allow_neg_eigval: Annotated[Optional[bool], typer.Option("--allow-neg-eigval/--no-allow-neg-eigval", help="Delta rules: beta in (0, 2), transition eigenvalues down to -1 (default off).")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help=f"Evaluate every N steps and at the end (default {DEFAULTS.eval_every}).")] = None,
    eval_batches: Annotated[Optional[int], typer.Option(help=f"Held-out batches per evaluation (default {DEFAULTS.eval_batches}).")] = None,
    log_every: Annotated[Optional[int], typer.Option(help=f"Log train metrics every N steps (default {DEFAULTS.log_every}).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help=f"Checkpoint every N steps and at the end (default {DEFAULTS.checkpoint_every}).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (default auto: cuda if available).")] = None,
    impl: Annotated[Optional[str], typer.Option(help="auto, naive, chunk or triton (default auto: triton on CUDA if its self-test passes, else chunk).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder (default runs/<rule>-<task>-<time>); an existing one gets a -N suffix.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with these settings; flags override it.")] = None,
    resume_from: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder from its checkpoint.")] = None,
) -> None:
    """Train a small model with one update rule on a task; results land in a new run folder."""
    from sandbox.cli import fail

    # Only the flags actually given override the config file (typer leaves the others at None).
    given = {name: value for name, value in locals().items()
             if value is not None and name not in ("task_arg", "config", "resume_from", "fail")}
    try:
        if task_arg:
            given["task_args"] = parse_task_args(task_arg)
        if resume_from is not None:
            if config is not None:
                raise ValueError("config: --resume reuses the run's own config.toml; drop --config")
            folder, results = resume(resume_from, given)
        else:
            from_file = load_config(config) if config is not None else {}
            folder, results = train(resolve_config(from_file, given))
    except ValueError as error:
        fail(str(error))
    except NonFiniteLoss as error:
        fail(str(error), code=3)
    except RunInterrupted as error:
        fail(str(error), code=130)
    metric = results["metric_name"]
    typer.echo(f"final eval loss {results['final_loss']:.4f}, {metric} {results['final_metric']:.4f}; "
               f"{results['tokens_per_second']:,.0f} tokens/s, {results['wall_seconds']:.1f} s")
    typer.echo(f"run folder: {folder}")
