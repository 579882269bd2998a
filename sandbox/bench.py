"""``sandbox bench``: forward and forward+backward time and peak memory of each rule's implementations.

Implementations compared, all on the same random inputs per (shape, rule):

    naive   the per-token loop (``rule.naive``), only for short sequences: it launches kernels per token
    chunk   the chunkwise PyTorch form (``rule.chunk``)
    triton  the Triton kernels (``rule.triton``): CUDA, or the CPU under ``TRITON_INTERPRET=1`` (slow)
    fla     the matching function of flash-linear-attention (fla) 0.6.0, when ``fla`` is importable

Timing on CUDA is the median of ``triton.testing.do_bench`` after a warm-up call (which also compiles and
autotunes); on CPU it is the median of a few ``time.perf_counter`` runs, so the command works everywhere.
"Forward" is the inference forward (no autograd graph); "fwd+bwd" is the training forward followed by
``o.backward(do)``. Peak memory is ``torch.cuda.max_memory_allocated`` over one such call, less what was
allocated before the case's inputs. Each forward output is also compared with the float64 per-token loop.
A case that cannot run (too long for the loop, no GPU, fla missing) is recorded as skipped, one that raises
(out of memory, kernel error) as failed; neither stops the run. A non-finite output is noted, and timed.

Every case's time and peak memory are divided by its rule's fla counterpart's in the same shape
(``COUNTERPART``). fla autotunes each kernel for each head size (minutes per function and shape), so a long
run can be split: ``--resume`` takes an earlier run's JSON and runs only the cases it lacks.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import typer
from torch import Tensor
from tqdm import tqdm

from sandbox.errors import fail
from sandbox.provenance import device_name, distribution_version
from sandbox.rules import Rule, get_rule, list_rules
from sandbox.rules.rule import TRITON_MISSING, triton_installed
from sandbox.runfolder import write_text_atomically

IMPLS = ("naive", "chunk", "triton", "fla")
DEFAULT_SHAPES = ("8,4096,16,128", "32,512,4,64")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The ratio columns divide each case by the fla case of this rule in the same shape. fla has fast kernels for
# the four first-order rules; its momentum rule is pure PyTorch, so the momentum rules are set against the
# first-order rule that they extend (the targets of the kernel-speed issue: momentum_delta against fla
# gated delta, decay_momentum against fla simple_gla).
COUNTERPART = {"linear": "linear", "decay": "decay", "delta": "delta", "gated_delta": "gated_delta",
               "momentum_delta": "gated_delta", "decay_momentum": "decay"}

# fla 0.6.0 refuses its gated backward kernels on Hopper with 3.4 <= Triton < 3.7.1 (a compiler bug gives
# wrong gradients, fla issue 640). Lifting the guard is only acceptable to measure time.
FLA_GUARD_NOTE = ("fla's Hopper/Triton<3.7.1 guard lifted (fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True): "
                  "fla gated-kernel timings are valid, their gradients may not be")


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    D: int

    def __str__(self) -> str:
        return f"{self.B},{self.T},{self.H},{self.D}"


@dataclass
class CaseResult:
    shape: str
    rule: str
    impl: str
    status: str                            # "ok", "skipped" or "failed"
    note: str = ""
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    peak_mb: Optional[float] = None        # above what was allocated before the case; inputs included
    err_vs_loop: Optional[float] = None    # relative RMS of the forward output against the float64 loop
    vs_fla: Optional[float] = None         # time over the fla counterpart's (COUNTERPART), same shape
    peak_vs_fla: Optional[float] = None    # peak memory over the fla counterpart's


def parse_shape(text: str) -> Shape:
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise ValueError(f"--shape: expected B,T,H,D as four positive integers, e.g. 8,4096,16,128, got '{text}'")
    return Shape(*values)


def parse_impl(name: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"--impl: unknown implementation '{name}', expected one of: {', '.join(IMPLS)}")
    return name


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


def parse_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected 'cpu' or 'cuda', got '{name}'")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: 'cuda' was asked for but torch sees no CUDA GPU")
    return torch.device(name)


def import_fla():
    """The fla package, or None when it is not installed (or cannot be imported here)."""
    try:
        import fla
        import fla.ops  # noqa: F401  (the ops pull in triton; fail here rather than mid-run)
    except Exception:
        return None
    return fla


def random_inputs(rule: Rule, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """q, k, v in ``dtype`` (k l2-normalised) and the rule's gates in float32, in the ranges trained layers produce.

    Speed does not depend on the values, but zeros or saturated gates would hide overflow and NaN paths.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    B, T, H, D = shape.B, shape.T, shape.H, shape.D

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32)

    gates = {
        "log_alpha": F.logsigmoid(randn(B, T, H) + 3.0),          # alpha mostly in (0.8, 1)
        "beta": torch.sigmoid(randn(B, T, H)),
        "log_mu": F.logsigmoid(randn(B, T, H) + 1.0).clamp(min=-2.0),   # the MDN layer's floor on log mu
        "eta": torch.tanh(randn(B, T, H)) + 1.0,                  # in (0, 2) like the MDN layer
    }
    return {
        "q": randn(B, T, H, D).to(dtype),
        "k": F.normalize(randn(B, T, H, D), dim=-1).to(dtype),
        "v": randn(B, T, H, D).to(dtype),
        "gates": {name: gates[name] for name in rule.gates},
    }


def fla_call(fla, rule_name: str) -> Callable[..., Tensor] | None:
    """The fla 0.6.0 kernel computing the same ``o`` as our rule, with our gates mapped onto fla's.

    fla's ``g`` is our ``log_alpha`` (natural log). ``beta`` is cast to the activations' dtype as fla's own
    layers produce it. ``chunk_simple_gla`` has no beta, so ``decay`` folds it into v (one extra multiply,
    timed). Our keys are already l2-normalised, so fla's in-kernel normalisation is off. The momentum rules
    have none: fla's ``chunk_momentum_delta_rule`` is pure PyTorch and wrong where mu << alpha (BENCHMARKS.md).
    """
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla

    def linear(q, k, v):
        return chunk_linear_attn(q, k, v, normalize=False)[0]

    def decay(q, k, v, log_alpha, beta):
        return chunk_simple_gla(q, k, v * beta[..., None].to(v.dtype), g=log_alpha)[0]

    def delta(q, k, v, beta):
        return chunk_delta_rule(q, k, v, beta.to(q.dtype))[0]

    def gated_delta(q, k, v, log_alpha, beta):
        return chunk_gated_delta_rule(q, k, v, g=log_alpha, beta=beta.to(q.dtype))[0]

    return {fn.__name__: fn for fn in (linear, decay, delta, gated_delta)}.get(rule_name)


def skip_reason(rule: Rule, impl: str, shape: Shape, device: torch.device, fla, naive_max_t: int) -> str | None:
    if impl == "naive" and shape.T > naive_max_t:
        return f"T > {naive_max_t}: the per-token loop is too slow (--naive-max-t)"
    if impl == "triton" and not triton_installed():
        return TRITON_MISSING
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels in the (slow) interpreter on the CPU"
    if impl == "fla" and device.type != "cuda":
        return "needs a CUDA GPU"
    if impl == "fla" and fla is None:
        return "fla is not installed"
    if impl == "fla" and fla_call(fla, rule.name) is None:
        return "no fla kernel (the ratio columns use COUNTERPART)"
    return None


def make_forward(rule: Rule, impl: str, chunk_size: int, fla) -> Callable[..., Tensor]:
    """``forward(q, k, v, **gates) -> o`` for one implementation."""
    if impl == "naive":
        return lambda q, k, v, **gates: rule.naive(q, k, v, **gates)[0]
    if impl == "chunk":
        return lambda q, k, v, **gates: rule.chunk(q, k, v, chunk_size=chunk_size, **gates)[0]
    if impl == "triton":
        return lambda q, k, v, **gates: rule.triton(q, k, v, chunk_size=chunk_size, **gates)[0]
    return fla_call(fla, rule.name)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int,
              leaves: list[Tensor] | None = None) -> float:
    """Median time of ``fn`` in ms; ``leaves`` get their gradients cleared before each run."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, grad_to_none=leaves, return_mode="median"))
    times = []
    for _ in range(repeats):
        for x in leaves or []:
            x.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def loop_reference(rule: Rule, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    """The float64 per-token loop's output on the bench inputs (q, k, v rounded to ``dtype`` first, as every impl sees them)."""
    inputs = random_inputs(rule, shape, dtype, device, seed)
    with torch.no_grad():
        return rule.naive(inputs["q"].double(), inputs["k"].double(), inputs["v"].double(),
                          **{name: g.double() for name, g in inputs["gates"].items()})[0]


def relative_rms(out: Tensor, ref: Tensor) -> float:
    return ((out.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def run_case(rule: Rule, impl: str, shape: Shape, dtype: torch.dtype, device: torch.device, *,
             backward: bool, chunk_size: int, naive_max_t: int, repeats: int, seed: int, fla,
             reference: Callable[[], Tensor] | None) -> CaseResult:
    """Time one (shape, rule, impl); ``reference()`` gives the loop's output to check against (None: no check)."""
    result = CaseResult(shape=str(shape), rule=rule.name, impl=impl, status="skipped")
    reason = skip_reason(rule, impl, shape, device, fla, naive_max_t)
    if reason:
        result.note = reason
        return result
    forward = make_forward(rule, impl, chunk_size, fla)
    expected = inputs = leaves = args = grad_out = None

    def infer() -> Tensor:
        with torch.no_grad():
            return forward(**args)

    def train_step() -> None:
        forward(**args).backward(grad_out)

    warnings = []
    try:   # building the inputs can run out of memory too: that is this case failing, not the run
        expected = reference() if reference is not None else None     # before the baseline: not this case's memory
        baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        inputs = random_inputs(rule, shape, dtype, device, seed)
        leaves = [inputs["q"], inputs["k"], inputs["v"], *inputs["gates"].values()]
        args = dict(q=inputs["q"], k=inputs["k"], v=inputs["v"], **inputs["gates"])
        g = torch.Generator(device=device).manual_seed(seed + 1)
        grad_out = torch.randn(shape.B, shape.T, shape.H, shape.D, generator=g, device=device, dtype=dtype)
        if backward:
            for x in leaves:
                x.requires_grad_(True)
        o = infer()                                    # warm-up: compiles and autotunes kernels
        if expected is not None:
            result.err_vs_loop = relative_rms(o, expected)
        if not torch.isfinite(o).all():                # the time is still measured: a NaN costs the same
            warnings.append("non-finite output")
        del o
        if backward:
            train_step()
            if not all(x.grad is None or torch.isfinite(x.grad).all() for x in leaves):
                warnings.append("non-finite gradient")
        for x in leaves:
            x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            (train_step if backward else infer)()
            torch.cuda.synchronize()
            result.peak_mb = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
            for x in leaves:
                x.grad = None
        result.fwd_ms = median_ms(infer, device, repeats)
        if backward:
            result.fwd_bwd_ms = median_ms(train_step, device, repeats, leaves)
        result.status = "ok"
        result.note = "; ".join(warnings)
    except Exception as error:  # one failing case (OOM, kernel error) must not end the run
        result.status = "failed"
        message = str(error).strip().splitlines()
        result.note = f"{type(error).__name__}: {message[0] if message else ''}"[:160]
    finally:
        del inputs, leaves, args, grad_out, expected
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def add_ratios(results: list[CaseResult]) -> None:
    """Time (fwd+bwd, or fwd without backward) and peak memory of each case over its rule's fla counterpart's
    (``COUNTERPART``) in the same shape."""
    def key_time(r: CaseResult) -> float | None:
        return r.fwd_bwd_ms if r.fwd_bwd_ms is not None else r.fwd_ms

    fla = {(r.shape, r.rule): r for r in results if r.impl == "fla" and r.status == "ok"}
    for r in results:
        counterpart = fla.get((r.shape, COUNTERPART.get(r.rule)))
        if r.status != "ok" or counterpart is None:
            continue
        if key_time(counterpart):
            r.vs_fla = key_time(r) / key_time(counterpart)
        if r.peak_mb is not None and counterpart.peak_mb:
            r.peak_vs_fla = r.peak_mb / counterpart.peak_mb


def format_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def format_table(results: list[CaseResult]) -> str:
    """A Markdown table (readable in a terminal, pasteable into BENCHMARKS.md)."""
    header = ["B,T,H,D", "rule", "impl", "fwd ms", "fwd+bwd ms", "peak MB", "err vs loop", "vs fla",
              "peak vs fla", "note"]
    ratio = lambda x: "-" if x is None else f"{x:.2f}x"
    rows = [[r.shape, r.rule, r.impl, format_ms(r.fwd_ms), format_ms(r.fwd_bwd_ms),
             "-" if r.peak_mb is None else f"{r.peak_mb:.0f}",
             "-" if r.err_vs_loop is None else f"{r.err_vs_loop:.1e}",
             ratio(r.vs_fla), ratio(r.peak_vs_fla),
             r.note if r.status == "ok" else f"{r.status}: {r.note}"] for r in results]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def environment(device: torch.device, fla) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": distribution_version("triton"),
        "fla": getattr(fla, "__version__", None) if fla is not None else None,
        "python": platform.python_version(),
    }


def load_resume(path: Path, options: dict, device: str) -> list[CaseResult]:
    """The finished ("ok") cases of an earlier bench JSON, after checking it was made like this run."""
    try:
        report = json.loads(path.read_text())
        earlier_options, earlier_device = report["options"], report["environment"]["device"]
        cases = [CaseResult(**case) for case in report["results"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--resume: {path} is not a readable sandbox bench JSON ({type(error).__name__})") from None
    for name, value in options.items():
        if earlier_options.get(name) != value:
            raise ValueError(f"--resume: {path} was run with {name} = {earlier_options.get(name)!r}, "
                             f"this run has {value!r}")
    if earlier_device != device:
        raise ValueError(f"--resume: {path} was measured on {earlier_device}, this run is on {device}")
    return [case for case in cases if case.status == "ok"]


def default_out_path() -> Path:
    """``bench-<time>.json`` in the working directory, with a counter if that name is taken."""
    stem = f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, n = Path(f"{stem}.json"), 1
    while path.exists():
        path, n = Path(f"{stem}-{n}.json"), n + 1
    return path


def bench_command(
    shape: Optional[list[str]] = typer.Option(None, "--shape", help="B,T,H,D (head dim D for keys and values); "
                                              "repeatable. Default: 8,4096,16,128 and 32,512,4,64."),
    rule: Optional[list[str]] = typer.Option(None, "--rule", help="Rule to time; repeatable. Default: all."),
    impl: Optional[list[str]] = typer.Option(None, "--impl", help="naive, chunk, triton or fla; repeatable. "
                                             "Default: all (fla only when it is installed)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32 (q, k, v; gates are float32)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON file for the results (must not exist). "
                                       "Default: bench-<time>.json."),
    backward: bool = typer.Option(True, "--backward/--no-backward", help="Also time forward+backward."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu. Default: cuda when available."),
    chunk_size: int = typer.Option(64, "--chunk-size", help="Chunk length for chunk and triton."),
    naive_max_t: int = typer.Option(512, "--naive-max-t", help="Longest T for which the per-token loop is run."),
    repeats: int = typer.Option(5, "--repeats", help="Runs per median with the CPU timer (CUDA uses do_bench)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare each forward output with the float64 "
                                                                  "per-token loop (relative RMS error column)."),
    fla_lift_guard: bool = typer.Option(False, "--fla-lift-hopper-guard",
                                        help="Let fla's gated kernels run on Hopper with Triton < 3.7.1 "
                                             "(their gradients can be wrong there; for timing only)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="JSON of an earlier run on the same GPU with the "
                                          "same --dtype, --chunk-size, --seed, --backward/--check: its finished "
                                          "cases are kept, only the others run; all go to --out."),
) -> None:
    """Time forward and forward+backward, and peak memory, of the rules' implementations (and fla's)."""
    try:
        shapes = list(dict.fromkeys(parse_shape(s) for s in (shape or DEFAULT_SHAPES)))   # repeats dropped
        unknown = [name for name in rule or [] if name not in list_rules()]
        if unknown:
            raise ValueError(f"--rule: unknown rule '{unknown[0]}', expected one of: {', '.join(list_rules())}")
        rules = [get_rule(name) for name in dict.fromkeys(rule or list_rules())]
        torch_dtype = parse_dtype(dtype)
        torch_device = parse_device(device)
        for name, value, low in (("--repeats", repeats, 1), ("--naive-max-t", naive_max_t, 0)):
            if value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
        if chunk_size not in (16, 32, 64, 128):
            raise ValueError(f"--chunk-size: expected 16, 32, 64 or 128, got {chunk_size}")
        fla = import_fla()
        impls = [parse_impl(name) for name in dict.fromkeys(impl)] if impl else [i for i in IMPLS if i != "fla" or fla is not None]
        if out is not None and out.exists():
            raise ValueError(f"--out: {out} already exists (earlier results are never overwritten); pick a new name")
        if out is not None and not out.parent.is_dir():
            raise ValueError(f"--out: folder {out.parent} does not exist")
        run_options = {"dtype": dtype, "backward": backward, "chunk_size": chunk_size, "seed": seed, "check": check}
        earlier = load_resume(resume, run_options, environment(torch_device, fla)["device"]) if resume else []
        path = out or default_out_path()
        try:
            open(path, "x").close()                # claim the name now; "x" never overwrites an existing file
        except OSError as error:
            raise ValueError(f"--out: cannot create {path} ({error.strerror})") from None
    except ValueError as error:
        fail(str(error))

    notes = [f"resumed from {resume}: {len(earlier)} finished cases kept"] if resume else []
    if fla is not None and fla_lift_guard:
        import fla.ops.common.chunk_o as fla_chunk_o

        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
        notes.append(FLA_GUARD_NOTE)
        typer.echo(f"note: {FLA_GUARD_NOTE}", err=True)
    timer = ("triton.testing.do_bench, median (after a warm-up call)" if torch_device.type == "cuda"
             else f"time.perf_counter, median of {repeats} runs (after a warm-up call)")

    env = environment(torch_device, fla)
    report = {
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": env,
        "timer": timer,
        "options": {"shapes": [str(s) for s in shapes], "rules": [r.name for r in rules], "impls": impls,
                    "dtype": dtype, "backward": backward, "chunk_size": chunk_size, "naive_max_t": naive_max_t,
                    "repeats": repeats, "seed": seed, "check": check,
                    "fla_lift_hopper_guard": fla_lift_guard},
        "notes": notes,
        "results": [],
    }

    def table_order(case: tuple[Shape, Rule, str]) -> tuple[int, int, int]:
        shape_, rule_, impl_ = case
        return shapes.index(shape_), rules.index(rule_), impls.index(impl_)

    def run_order(case: tuple[Shape, Rule, str]) -> tuple[int, int, int, int]:
        """Our kernels, the fla counterparts of the ratio columns, the chunk form, the loop, other fla, each
        over all shapes: a run cut short (time limit, crash) has already saved the cases that matter most."""
        shape_, rule_, impl_ = case
        counterpart = impl_ == "fla" and rule_.name in COUNTERPART.values()
        order = ("triton", "fla counterpart", "chunk", "naive", "fla")
        priority = order.index("fla counterpart" if counterpart else impl_)
        return priority, shapes.index(shape_), rules.index(rule_), impls.index(impl_)

    cases = sorted(((s, r, i) for s in shapes for r in rules for i in impls), key=run_order)
    done: dict[tuple[Shape, Rule, str], CaseResult] = {}
    kept = {(e.shape, e.rule, e.impl): e for e in earlier}
    for case in cases:
        if (str(case[0]), case[1].name, case[2]) in kept:
            done[case] = kept[(str(case[0]), case[1].name, case[2])]
    cases = [case for case in cases if case not in done]

    def save() -> list[CaseResult]:
        results = [done[case] for case in sorted(done, key=table_order)]
        add_ratios(results)
        report["results"] = [asdict(x) for x in results]
        write_text_atomically(path, json.dumps(report, indent=2) + "\n")   # never half a file
        return results

    results = save()                     # valid JSON from the start (with the cases --resume kept)
    references: dict[tuple[Shape, str], Callable[[], Tensor]] = {}
    for s, r, i in tqdm(cases, desc="bench", unit="case"):
        # the loop's output is computed once per (shape, rule), and only if some impl of it runs
        reference = references.setdefault((s, r.name), functools.cache(
            lambda r=r, s=s: loop_reference(r, s, torch_dtype, torch_device, seed)))
        result = run_case(r, i, s, torch_dtype, torch_device, backward=backward, chunk_size=chunk_size,
                          naive_max_t=naive_max_t, repeats=repeats, seed=seed, fla=fla,
                          reference=reference if check else None)
        done[(s, r, i)] = result
        tqdm.write(f"{s} {r.name} {i}: {result.status}, fwd {format_ms(result.fwd_ms)} ms, "
                   f"fwd+bwd {format_ms(result.fwd_bwd_ms)} ms {result.note}".rstrip())
        results = save()                 # after every case: a run cut short keeps its results

    typer.echo(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | fla {env['fla'] or '-'} | "
               f"{dtype} | timer: {timer}")
    typer.echo(format_table(results))
    typer.echo(f"results written to {path}")
