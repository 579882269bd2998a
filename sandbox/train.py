"""Training: one run of a small language model on a task, into a run folder that is never overwritten.

The run folder's files (config.toml, metrics.jsonl, results.json, checkpoint.pt, TensorBoard events) and how
they are written are ``sandbox.runfolder``'s business; the trainer holds the folder's lock while it runs, so a
second trainer in the same folder is refused.

``--resume DIR`` reloads the checkpoint and continues; on CPU the resumed losses equal an uninterrupted
run's bit for bit: the model and optimizer restart from saved state, and the learning rate and the batch of
each step are functions of the step number.
It refuses a config.toml edited since the checkpoint (only ``steps`` and ``device`` may change).
A non-finite loss or gradient norm stops the run (``NonFiniteLoss``) and leaves the last good checkpoint.

Speed: the training step runs without host synchronisation. Batches are generated a block of steps at a
time and copied to the device in one go; the loss and gradient norm of every step land in a device buffer
that is read (and checked for NaN) only on logging steps and before evaluations and checkpoints. With
``compile`` (the default) the whole step on CUDA (forward, backward, clipping, AdamW) is captured once as a
CUDA graph and replayed; ``inductor`` also sends the forward and loss through ``torch.compile`` (fewer, fused
kernels: faster steps, but tens of seconds of compilation on a fresh machine). If either fails, a one-line
note says so and the run goes on eagerly.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import torch.nn.functional as F
import typer
from torch import Tensor
from tqdm import tqdm

from sandbox.config import ATTENTION, RunConfig, load_config, resolve_config
from sandbox.errors import fail
from sandbox.inits import DECAY_INITS
from sandbox.layer import resolve_impl, triton_works
from sandbox.model import LanguageModel
from sandbox.provenance import collect as collect_provenance
from sandbox.rules.rule import TRITON_MISSING, triton_installed
from sandbox.runfolder import CHECKPOINT, CONFIG, RunFolder, config_differences, is_run_folder
from sandbox.tasks import create_task
from sandbox.tasks.base import Task, split_generator
from sandbox.threads import default_threads, keep_freed_memory, use_threads

BLOCK_TOKENS = 2**18    # training tokens generated (on the CPU) and copied to the device at a time
CAPTURE_AFTER = 3       # eager steps before a CUDA-graph capture: kernels compile and caches fill outside it
# Settings that --resume may change; every other key of config.toml must match the checkpoint's.
RESUMABLE_CHANGES = {"steps", "device", "out"}


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


def choose_impl(config: RunConfig, device: torch.device, seq_len: int) -> str:
    """The rule implementation actually used; an explicit ``triton`` must pass its self-test here.

    The self-test runs the run's own rule, sequence length, heads, head size and (on CUDA, bf16) dtype, so the
    kernels it compiles are the ones the training steps use.
    """
    if config.rule == ATTENTION:
        if config.impl != "auto":
            raise ValueError(f"impl: '{config.impl}' is an implementation of the update rules; the attention "
                             "baseline always runs PyTorch's scaled_dot_product_attention (use --impl auto)")
        return "sdpa"
    self_test = {"rule_name": config.rule, "shape": (1, seq_len, config.heads, config.d_model // config.heads),
                 "dtype": torch.bfloat16 if device.type == "cuda" else torch.float32}
    if config.impl == "triton":
        if config.chunk_size not in (16, 32, 64):
            raise ValueError(f"chunk_size: the triton kernels take 16, 32 or 64, got {config.chunk_size}")
        if not triton_installed():
            raise ValueError(f"impl: {TRITON_MISSING}; use --impl chunk")
        works, reason = triton_works(device, config.chunk_size, **self_test)
        if not works:
            raise ValueError(f"impl: the triton kernels do not run on {device} here ({reason}); "
                             "use --impl chunk, or a GPU (or TRITON_INTERPRET=1 on CPU, slow)")
    return resolve_impl(config.impl, device, config.chunk_size, **self_test)


def stream_block(task: Task, split: str, seed: int, index: int, steps: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """Block ``index`` of ``split``'s stream for run seed ``seed``: ``steps`` batches as ``inputs, targets``
    ``[steps, batch_size, seq_len]`` on the CPU, one ``task.batch`` call from ``split_generator(seed, split, index)``."""
    inputs, targets = task.batch(split, steps * batch_size, split_generator(seed, split, index))
    shape = (steps, batch_size, -1)
    return inputs.view(shape), targets.view(shape)


class BatchStream:
    """The batches of one split, step by step: the batch of step ``s`` depends only on the task, the seed, the
    batch size and ``s``, so a resumed run continues the same stream.

    Steps come in blocks of about ``BLOCK_TOKENS`` tokens: block ``i`` is ``stream_block(..., i, ...)`` on the
    CPU (the same stream on every device), copied to the device at once; a step then only indexes into it.
    """

    def __init__(self, task: Task, split: str, seed: int, batch_size: int, device: torch.device):
        self.task, self.split, self.seed, self.batch_size, self.device = task, split, seed, batch_size, device
        self.block_steps = max(1, BLOCK_TOKENS // (batch_size * task.seq_len))
        self.block_index: int | None = None

    def get(self, step: int) -> tuple[Tensor, Tensor]:
        """``inputs, targets`` ``[batch_size, seq_len]`` of step ``step``, on the device."""
        index = step // self.block_steps
        if index != self.block_index:
            block = stream_block(self.task, self.split, self.seed, index, self.block_steps, self.batch_size)
            pin = self.device.type == "cuda"   # pinned memory: the copy does not wait for the device
            self.inputs, self.targets = ((t.pin_memory() if pin else t).to(self.device, non_blocking=True)
                                         for t in block)
            self.block_index = index
        return self.inputs[step % self.block_steps], self.targets[step % self.block_steps]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, cosine down to 0.1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the scored positions (targets -100 elsewhere)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def estimate_training_bytes(sizes: dict[str, int], heads: int, chunk_size: int) -> int:
    """A rough upper estimate of the memory one training step needs: weights, gradients and AdamW's two
    moments in float32, and the activations kept for the backward pass (per token: a few dozen d_model-wide
    vectors per layer, the chunk form's states and intra-chunk products, and the logits).
    ``sizes``: d_model, layers, batch_size, seq_len, vocab_size."""
    d, layers, vocab = sizes["d_model"], sizes["layers"], sizes["vocab_size"]
    parameters = vocab * d + layers * 14 * d * d
    per_token = layers * (40 * d + 8 * chunk_size * heads + 4 * d * d // (heads * chunk_size)) + 3 * vocab
    return 16 * parameters + 4 * sizes["batch_size"] * sizes["seq_len"] * per_token


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not POSIX: assume a small machine
        return 16 * 2**30


def check_memory(config: RunConfig, task: Task, device: torch.device, failed: bool = False) -> None:
    """Refuse a model or batch far too big for this machine before allocating it, naming the size argument
    whose reduction to 1 would shrink the estimate most. ``failed``: an allocation already failed, refuse."""
    sizes = {"d_model": config.d_model, "layers": config.layers, "batch_size": config.batch_size,
             "seq_len": task.seq_len, "vocab_size": task.vocab_size}
    needed, available = estimate_training_bytes(sizes, config.heads, config.chunk_size), device_memory_bytes(device)
    if needed <= available and not failed:
        return
    name = min(sizes, key=lambda n: estimate_training_bytes({**sizes, n: 1}, config.heads, config.chunk_size))
    flag = "--task-arg vocab_size" if name == "vocab_size" else f"--{name.replace('_', '-')}"
    need = "the model does not fit in" if failed else f"training would need about {needed / 2**30:,.1f} GiB of"
    raise ValueError(f"{name}: {sizes[name]} is too large: {need} {device}'s memory ({available / 2**30:,.1f} GiB); "
                     f"use a smaller {flag}")


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
        self.impl = choose_impl(config, self.device, self.task.seq_len)
        self.config, self.progress = config, progress

        check_memory(config, self.task, self.device)
        torch.manual_seed(config.seed)
        try:
            self.model = build_model(config, self.task, self.impl).to(self.device)
        except (RuntimeError, MemoryError) as error:   # the estimate was too low: still no folder, no traceback
            if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
                raise
            check_memory(config, self.task, self.device, failed=True)
        on_cuda = self.device.type == "cuda"
        self.capture = config.compile and on_cuda   # replay the step as a CUDA graph (after CAPTURE_AFTER steps)
        # Under capture the learning rate is a device tensor that each step refills (a float would be baked
        # into the graph); the capturable AdamW keeps its step counts on the device too.
        lr = torch.tensor(config.lr, device=self.device) if self.capture else config.lr
        self.optimizer = torch.optim.AdamW(self.model.optimizer_groups(config.weight_decay), lr=lr,
                                           betas=(0.9, 0.95), fused=on_cuda, capturable=self.capture)
        self.forward_loss = self._forward_loss
        if config.compile and config.inductor:
            self.forward_loss = torch.compile(self._forward_loss)
        self.train_batches = BatchStream(self.task, "train", config.seed, config.batch_size, self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        # Loss and gradient norm of the last log_every steps, on the device: read on logging steps only.
        self.step_stats = torch.zeros(config.log_every, 2, device=self.device)
        self.unchecked_from = 0    # first step whose stats have not been checked for NaN yet
        self.session_steps = 0     # steps run by this process (a resumed run starts again at 0)
        self.eval_sets: dict[str, tuple[Tensor, Tensor]] = {}
        self.step = 0
        self.checkpoint_step: int | None = None
        # Speed: time and count of the training steps, summed over resumed sessions; each session's warm-up
        # steps (compilation, CUDA-graph capture) are left out unless it has no others (see _loop).
        self.train_seconds, self.timed_steps = 0.0, 0
        self.wall_seconds = 0.0

    def autocast(self):
        """bf16 autocast on GPU (the rule kernels take bf16 q, k, v; gates stay float32); full precision on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def start(self, run_folder: RunFolder, resume: bool = False) -> None:
        """Attach the (locked) run folder, loading its checkpoint when resuming, and open the TensorBoard writer."""
        self.run_folder, self.folder = run_folder, run_folder.path
        if resume:
            self._load_checkpoint()
        from torch.utils.tensorboard import SummaryWriter   # imported late: it is slow to import

        self.writer = SummaryWriter(log_dir=str(self.folder))

    # --- checkpoints -------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        state = {
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(), "train_seconds": self.train_seconds, "timed_steps": self.timed_steps,
            "wall_seconds": self.wall_seconds, "config": self.config.to_dict(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        self.run_folder.save_checkpoint(state)   # atomic: a crash mid-save leaves the previous checkpoint
        self.checkpoint_step = self.step

    def _load_checkpoint(self) -> None:
        state = self.run_folder.load_checkpoint(self.device)
        if "config" in state:   # checkpoints of earlier versions lack it
            changed = config_differences(state["config"], self.config.to_dict(), RESUMABLE_CHANGES)
            if changed:
                raise ValueError(f"resume: {self.folder / CONFIG} differs from the run's checkpoint in "
                                 f"{'; '.join(changed)}; undo the edit (only steps and device may change), "
                                 "or start a new run with --config")
        try:
            self.model.load_state_dict(state["model"])
        except Exception as error:   # another model's weights: report it as the user's input problem
            raise ValueError(f"resume: cannot load {self.folder / CHECKPOINT} ({type(error).__name__}); "
                             "is it a checkpoint of this run's model?") from None
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.step, self.train_seconds, self.wall_seconds = state["step"], state["train_seconds"], state["wall_seconds"]
        self.timed_steps = state.get("timed_steps", self.step)   # checkpoints of earlier versions lack it
        self.checkpoint_step = self.unchecked_from = self.step
        # The interrupted session's later records and TensorBoard events are about to be recomputed.
        self.run_folder.keep_metrics_until(self.step)
        self.run_folder.keep_events_until(self.step)

    # --- logging ----------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.run_folder.append_metrics(record)
        split = record["split"]
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{name}", value, record["step"])

    def _log_mixer_stats(self) -> None:
        for layer, stats in enumerate(self.model.mixer_stats()):
            for name, value in stats.items():
                self.writer.add_scalar(f"layer{layer}/{name}", value, self.step)

    # --- the loop ---------------------------------------------------------------------------------------
    def _eval_set(self, split: str) -> tuple[Tensor, Tensor]:
        """The ``eval_batches`` batches of ``split`` on the device, ``[eval_batches, batch_size, T]``; the
        same at every evaluation (block 0 of the split's stream)."""
        if split not in self.eval_sets:
            config = self.config
            inputs, targets = stream_block(self.task, split, config.seed, 0, config.eval_batches, config.batch_size)
            self.eval_sets[split] = (inputs.to(self.device), targets.to(self.device))
        return self.eval_sets[split]

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> tuple[float, float]:
        """Mean loss and metric on the ``eval_batches`` batches of ``split`` (valid during training, test at the
        end). The mixers record their gate and state statistics on the first batch (for TensorBoard)."""
        self.model.eval()
        inputs, targets = self._eval_set(split)
        losses, metrics = [], []
        for i in range(len(inputs)):
            self.model.set_record_stats(i == 0)
            with self.autocast():
                logits, _ = self.model(inputs[i])
            losses.append(language_model_loss(logits, targets[i]))
            metrics.append(self.task.metric(logits.float(), targets[i]))
        self.model.set_record_stats(False)
        self.model.train()
        return torch.stack(losses).double().mean().item(), sum(metrics) / len(metrics)

    def _lr(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based)."""
        return self.config.lr * lr_factor(step, self.config.warmup_steps, self.config.steps)

    def _set_lr(self) -> None:
        lr = self._lr(self.step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)   # on the device: no synchronisation
            elif self.capture:
                group["lr"] = torch.tensor(lr, device=self.device)   # a loaded checkpoint brought a float
            else:
                group["lr"] = lr

    def _forward_loss(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with self.autocast():
            logits, _ = self.model(inputs)
        return language_model_loss(logits, targets), logits

    def _step(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Forward, backward, clipping, AdamW, from gradients set to None; returns ``[loss, grad norm]`` and
        the logits, on the device (nothing here waits for the device: it can be captured as a CUDA graph)."""
        loss, logits = self.forward_loss(inputs, targets)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return torch.stack([loss.detach().float(), grad_norm.float()]), logits.detach()

    def _eager_step(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        if not self.capture:
            return self._step(inputs, targets)
        # The steps before a CUDA-graph capture run on a side stream, as capture requires of its warm-up.
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self._step(inputs, targets)
        main.wait_stream(side)
        return out

    def _capture(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Record the whole step as a CUDA graph on fixed input buffers, then replay it for this step."""
        self.static_batch = (inputs.clone(), targets.clone())
        self.optimizer.zero_grad(set_to_none=True)   # the gradients are then allocated inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_out = self._step(*self.static_batch)
        graph.replay()
        self.graph = graph
        return self.static_out

    def _train_step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One training step, eager, captured or replayed; its loss and grad norm go to ``step_stats``.
        Returns the logits (valid until the next step)."""
        self._set_lr()
        if self.graph is not None:
            self.static_batch[0].copy_(inputs)
            self.static_batch[1].copy_(targets)
            self.graph.replay()
            stats, logits = self.static_out
        else:
            compiled = self.forward_loss != self._forward_loss
            try:
                if self.capture and self.session_steps == CAPTURE_AFTER:
                    stats, logits = self._capture(inputs, targets)
                else:
                    stats, logits = self._eager_step(inputs, targets)
            except Exception as error:
                if not (compiled or self.capture):
                    raise
                first_line = (str(error).strip().splitlines() or [""])[0][:160]
                print(f"note: capturing the training step failed ({type(error).__name__}: {first_line}); "
                      "training without --compile")
                self.capture, self.forward_loss, self.graph = False, self._forward_loss, None
                stats, logits = self._eager_step(inputs, targets)
        self.step_stats[self.step % len(self.step_stats)].copy_(stats)
        return logits

    def _check_stats(self) -> tuple[float, float]:
        """Read the loss and grad norm of the steps since the last check (this waits for the device); stop at
        the first non-finite one. Returns the last step's."""
        stats = self.step_stats.tolist()
        for step in range(self.unchecked_from, self.step):
            loss, grad_norm = stats[step % len(stats)]
            for name, value in (("loss", loss), ("gradient norm", grad_norm)):
                if not math.isfinite(value):
                    self._stop(f"{name} is {value}", step + 1)
        self.unchecked_from = self.step
        return tuple(stats[(self.step - 1) % len(stats)])

    def _stop(self, what: str, step: int) -> None:
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
        test_loss, test_metric = self.evaluate("test")
        self._update_wall_seconds()
        return self._results(test_loss, test_metric)

    def _update_wall_seconds(self) -> None:
        self.wall_seconds = self.wall_before + time.perf_counter() - self.session_start

    def _loop(self, bar: tqdm) -> None:
        """The steps, timed in windows between the points where the host waits for the device anyway (logging,
        evaluation, checkpoints). The session's warm-up steps (compilation, capture) are timed only if the
        session has no others."""
        config, metric_name = self.config, self.task.metric_name
        tokens_per_step = config.batch_size * self.task.seq_len
        warmup = CAPTURE_AFTER + 1 if self.capture else 1
        self.session_steps = 0
        warm_seconds, warm_steps = 0.0, 0                     # windows that held warm-up steps
        window_start, window_steps, window_warm = time.perf_counter(), 0, True

        def close_window() -> float:
            nonlocal window_start, window_steps, window_warm, warm_seconds, warm_steps
            seconds, window_steps_closed = time.perf_counter() - window_start, window_steps
            if window_warm:
                warm_seconds, warm_steps = warm_seconds + seconds, warm_steps + window_steps
            else:
                self.train_seconds, self.timed_steps = self.train_seconds + seconds, self.timed_steps + window_steps
            open_window()
            return window_steps_closed * tokens_per_step / seconds

        def open_window() -> None:
            nonlocal window_start, window_steps, window_warm
            window_start, window_steps, window_warm = time.perf_counter(), 0, self.session_steps < warmup

        while self.step < config.steps:
            log_now = (self.step + 1) % config.log_every == 0 or self.step == 0
            inputs, targets = self.train_batches.get(self.step)
            logits = self._train_step(inputs, targets)
            self.step, self.session_steps, window_steps = self.step + 1, self.session_steps + 1, window_steps + 1
            bar.update(1)
            evaluate = self.step % config.eval_every == 0 or self.step == config.steps
            checkpoint = self.step % config.checkpoint_every == 0 or self.step == config.steps
            if log_now or evaluate or checkpoint or self.session_steps == warmup:
                loss, grad_norm = self._check_stats()
                speed = close_window()
            if log_now:
                metric = self.task.metric(logits.float(), targets)
                self._log({"step": self.step, "split": "train", "loss": loss, metric_name: metric,
                           "lr": self._lr(self.step - 1),
                           "grad_norm": grad_norm, "tokens_per_second": speed})
                bar.set_postfix_str(f"loss {loss:.3f} {metric_name} {metric:.3f} {speed:,.0f} tok/s")
            if evaluate:
                eval_loss, eval_metric = self.evaluate("valid")
                self._log({"step": self.step, "split": "valid", "loss": eval_loss, metric_name: eval_metric})
                self._log_mixer_stats()
                bar.write(f"step {self.step}: valid loss {eval_loss:.4f}, {metric_name} {eval_metric:.4f}")
            if checkpoint:
                self._update_wall_seconds()
                self._save_checkpoint()
            if evaluate or checkpoint:
                open_window()   # evaluation and checkpoints are not training time
        if self.timed_steps == 0:   # a session of warm-up steps only
            self.train_seconds, self.timed_steps = warm_seconds, warm_steps

    def _results(self, test_loss: float, test_metric: float) -> dict[str, Any]:
        evals = self.run_folder.read_metrics()
        final = [r for r in evals if r["split"] == "valid"][-1]
        last_train = [r for r in evals if r["split"] == "train"][-1]
        state_size, state_label = self.model.state_size(self.task.seq_len)
        results = {
            "rule": self.config.rule, "task": self.config.task, "task_args": self.config.task_args,
            "seq_len": self.task.seq_len, "steps": self.step, "seed": self.config.seed,
            "final_loss": final["loss"], "final_metric": final[self.task.metric_name],
            "metric_name": self.task.metric_name, "higher_is_better": self.task.higher_is_better,
            "final_train_loss": last_train["loss"], "test_loss": test_loss, "test_metric": test_metric,
            "parameters": self.model.parameter_count(), "state_size": state_size, "state_size_label": state_label,
            "tokens_per_second": self.timed_steps * self.config.batch_size * self.task.seq_len / self.train_seconds,
            "wall_seconds": self.wall_seconds, "device": str(self.device), "impl": self.impl,
            "compiled": self.forward_loss != self._forward_loss, "cuda_graph": self.graph is not None,
            "provenance": collect_provenance(self.device, sys.argv),   # of the session that finished the run
        }
        self.run_folder.write_results(results)
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
    with RunFolder.create(config.out, trainer.config) as folder:
        trainer.start(folder)
        folder.write_config(trainer.config)
        print(trainer.describe())
        return folder.path, trainer.fit()


def resume(folder: str | Path, overrides: dict[str, Any] | None = None,
           progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Continue the run in ``folder`` from its checkpoint. ``overrides`` may change only ``steps`` (to train
    longer; the cosine schedule then stretches to the new total) and ``device``."""
    overrides = overrides or {}
    fixed = sorted(set(overrides) - {"steps", "device"})
    if fixed:
        raise ValueError(f"resume: '{fixed[0]}' cannot change when resuming (only steps and device can)")
    with RunFolder.open(folder) as run_folder:
        trainer = Trainer(resolve_config(run_folder.read_config(), overrides), progress=progress)
        trainer.start(run_folder, resume=True)
        if trainer.step > trainer.config.steps:
            raise ValueError(f"steps: the run is already at step {trainer.step}, got --steps {trainer.config.steps}")
        if overrides:
            run_folder.write_config(trainer.config)
        print(trainer.describe())
        print(f"resuming at step {trainer.step} of {trainer.config.steps}")
        return run_folder.path, trainer.fit()


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
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Capture the training step on CUDA as one CUDA graph replayed every step; falls back to eager with a note if capture fails (default on).")] = None,
    inductor: Annotated[Optional[bool], typer.Option("--inductor/--no-inductor", help="With --compile, also torch.compile the forward and loss: faster steps, slower start (default off).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder (default runs/<rule>-<task>-<time>); an existing one gets a -N suffix.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with these settings; flags override it.")] = None,
    resume_from: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder from its checkpoint.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: the idle cores, or OMP_NUM_THREADS when set).")] = None,
) -> None:
    """Train a small model with one update rule on a task; results land in a new run folder."""
    # Only the flags actually given override the config file (typer leaves the others at None).
    given = {name: value for name, value in locals().items()
             if value is not None and name not in ("task_arg", "config", "resume_from", "threads", "fail")}
    try:
        if threads is not None and threads < 1:
            raise ValueError(f"threads: expected a positive integer, got {threads}")
        use_threads(threads or default_threads())
        keep_freed_memory()
        if task_arg:
            given["task_args"] = parse_task_args(task_arg)
        if resume_from is not None:
            if config is not None:
                raise ValueError("config: --resume reuses the run's own config.toml; drop --config")
            folder, results = resume(resume_from, given)
        else:
            from_file = load_config(config) if config is not None else {}
            if config is not None and config.name == CONFIG and is_run_folder(config.parent):
                from_file.pop("out", None)   # a run's config (older versions saved its folder): repeat it elsewhere
            folder, results = train(resolve_config(from_file, given))
    except ValueError as error:
        fail(str(error))
    except NonFiniteLoss as error:
        fail(str(error), code=3)
    except RunInterrupted as error:
        fail(str(error), code=130)
    metric = results["metric_name"]
    typer.echo(f"final valid loss {results['final_loss']:.4f}, {metric} {results['final_metric']:.4f} "
               f"(test: loss {results['test_loss']:.4f}, {metric} {results['test_metric']:.4f}); "
               f"{results['tokens_per_second']:,.0f} tokens/s, {results['wall_seconds']:.1f} s")
    typer.echo(f"run folder: {folder}")
