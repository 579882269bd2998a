"""The token mixers: a linear-attention layer around any update rule (the MDN layer), and softmax attention.

``RuleMixer`` follows rules.md section 4. Per token:

    q, k, v  = SiLU(causal depthwise conv4(W_q x)), ...      (the conv is the ``short_conv`` switch)
    q, k     = l2-normalised per head
    gates    = exactly the rule's gates, from one small projection each, in float32:
               log_alpha = -exp(A_log) softplus(a + dt_bias)                (Mamba2-style decay)
               log_mu    = max(-exp(Mu_log) softplus(m + mu_bias), min_log_mu)
               beta      = sigmoid(b)  (2 sigmoid(b) with allow_neg_eigval),   eta = tanh(e / sqrt(d_model)) + 1
               momentum rules: theta = arctan(eta exp(log_factor)), beta *= sin^2 theta,
               log_alpha += log cos^2 theta                                 (stability constraint)
    o        = rule(q, k, v, gates)                          (o_t = scale S_t^T q_t)
    y        = W_o (RMSNorm(o) * sigmoid(W_g x))

The layer runs a whole sequence (``forward``, through ``rule.naive``, ``rule.chunk`` or ``rule.triton``) or
one token at a time (``step``, through ``rule.step``), carrying the rule's state and the convolution's last
inputs; a sequence forward can start from, and return, the same carried state.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.inits import DECAY_INITS, DEFAULT_DECAY_INIT, DEFAULT_MOMENTUM_INIT
from sandbox.rules import Rule, State
from sandbox.rules.rule import TRITON_MISSING

CONV_SIZE = 4


class MixerState(NamedTuple):
    """What a rule mixer carries between tokens: the rule's state and the last inputs of each short conv."""

    rule: State
    conv: tuple[Tensor, ...]   # (q, k, v), each [B, channels, CONV_SIZE - 1]; empty without short_conv


@functools.lru_cache(maxsize=None)
def triton_works(device: torch.device, chunk_size: int = 64, rule_name: str = "momentum_delta",
                 shape: tuple[int, int, int, int] | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """Whether the Triton kernels (as the custom ops the layer calls) run here and agree with ``rule.chunk``,
    forward and backward, on a small problem.

    Returns the verdict and the reason. The backward matters: known compiler bugs (Triton 3.4 to 3.7.0 on
    Hopper) break only gradients. ``shape = (B, T, H, K)`` defaults to one whole chunk and a partial one with
    two heads of 16; a run passes its own rule, sequence, heads, head size and dtype (with B = 1), so that the
    kernels compiled here are the ones its steps use, instead of being compiled twice. Cached per argument.
    """
    from sandbox.kernels.ops import triton_rule
    from sandbox.rules import get_rule

    rule = get_rule(rule_name)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    B, T, H, K = shape or (1, chunk_size + 17, 2, 16)
    all_gates = {"log_alpha": -rand(B, T, H).abs() * 0.1, "beta": rand(B, T, H).sigmoid(),
                 "log_mu": -rand(B, T, H).abs() * 0.5, "eta": rand(B, T, H).sigmoid() + 0.5}
    inputs = {"q": rand(B, T, H, K).to(dtype), "k": F.normalize(rand(B, T, H, K), dim=-1).to(dtype),
              "v": rand(B, T, H, K).to(dtype), **{name: all_gates[name] for name in rule.gates}}
    output_weights = rand(B, T, H, K)

    def outputs_and_gradients(run) -> list[Tensor]:
        leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
        o, _ = run(chunk_size=chunk_size, **leaves)
        (o.float() * output_weights).sum().backward()
        return [o.float()] + [leaves[name].grad.float() for name in inputs]

    try:
        got = outputs_and_gradients(functools.partial(triton_rule, rule))
    except Exception as error:  # any failure (import, compile, launch) means "use the chunk form"
        if isinstance(error, ModuleNotFoundError) and error.name == "triton":
            return False, TRITON_MISSING
        first_line = (str(error).strip().splitlines() or [""])[0]
        return False, f"{type(error).__name__}: {first_line}"[:200]
    want = outputs_and_gradients(rule.chunk)
    errors = [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    worst = max(range(len(errors)), key=lambda i: errors[i])
    name = (["output"] + [f"d{n}" for n in inputs])[worst]
    # Half-precision inputs round the output and gradients (~4e-3 in bf16); a miscompile gives errors near 1.
    tolerance = 1e-2 if dtype in (torch.float32, torch.float64) else 5e-2
    if not errors[worst] < tolerance:
        return False, f"triton differs from the chunk form in {name} (relative error {errors[worst]:.2e})"
    return True, f"triton matches the chunk form, forward and backward (worst relative error {errors[worst]:.1e})"


def resolve_impl(impl: str, device: torch.device, chunk_size: int, **self_test) -> str:
    """``auto`` becomes ``triton`` on CUDA when the kernels work there (and take this chunk size), else ``chunk``.
    ``self_test``: the rule, shape and dtype of ``triton_works``'s check."""
    if impl != "auto":
        return impl
    if device.type == "cuda" and chunk_size in (16, 32, 64) and triton_works(device, chunk_size, **self_test)[0]:
        return "triton"
    return "chunk"


def inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (kernel ``CONV_SIZE``) followed by SiLU, on ``[B, T, channels]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, CONV_SIZE))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the output and the last ``CONV_SIZE - 1`` inputs ``[B, channels, CONV_SIZE - 1]`` (the state
        for the next call). Two ways to the same result, each the faster where it is used (measured: on the CPU
        the shifted products take about a fifth less time than conv1d's grouped kernel with its transposes; on
        CUDA they added about 150 kernels to a captured training step, 700 -> 854, and slowed it)."""
        if x.device.type == "cpu":
            return self.shifted_products(x, previous)
        return self.grouped_conv(x, previous)

    def shifted_products(self, x: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The depthwise convolution as ``CONV_SIZE`` shifted products in the ``[B, T, channels]`` layout,
        accumulated in float32 as conv1d accumulates."""
        T = x.shape[1]
        if previous is None:
            padded = F.pad(x, (0, 0, CONV_SIZE - 1, 0))                # [B, CONV_SIZE - 1 + T, channels]
        else:
            padded = torch.cat([previous.to(x.dtype).transpose(1, 2), x], dim=1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        padded_32, taps = padded.to(dtype), self.weight[:, 0].to(dtype)    # taps [channels, CONV_SIZE]
        y = self.bias.to(dtype) + padded_32[:, :T] * taps[:, 0]
        for i in range(1, CONV_SIZE):
            y = y + padded_32[:, i:i + T] * taps[:, i]
        return F.silu(y).to(x.dtype), padded[:, T:].transpose(1, 2)

    def grouped_conv(self, x: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The depthwise convolution as one grouped ``conv1d`` in the ``[B, channels, T]`` layout."""
        x = x.transpose(1, 2)                                           # [B, channels, T]
        if previous is None:
            previous = x.new_zeros(x.shape[0], x.shape[1], CONV_SIZE - 1)
        padded = torch.cat([previous.to(x.dtype), x], dim=-1)
        y = F.conv1d(padded, self.weight.to(x.dtype), self.bias.to(x.dtype), groups=x.shape[1])
        return F.silu(y).transpose(1, 2), padded[..., -(CONV_SIZE - 1):]


class RuleMixer(nn.Module):
    """The MDN-style linear-attention layer around one update rule (see the module docstring)."""

    def __init__(self, rule: Rule, d_model: int, heads: int, *, head_dim: int | None = None,
                 value_dim: int | None = None, short_conv: bool = True, stability_constraint: bool = True,
                 min_log_mu: float = -2.0, chunk_size: int = 64, impl: str = "chunk",
                 decay_init: str = DEFAULT_DECAY_INIT, momentum_init: str = DEFAULT_MOMENTUM_INIT,
                 allow_neg_eigval: bool = False):
        super().__init__()
        if impl not in ("naive", "chunk", "triton"):
            raise ValueError(f"impl: expected naive, chunk or triton (resolve 'auto' first), got '{impl}'")
        for name, value in (("decay_init", decay_init), ("momentum_init", momentum_init)):
            if value not in DECAY_INITS:
                raise ValueError(f"{name}: expected one of {', '.join(DECAY_INITS)}, got '{value}'")
        if allow_neg_eigval and not rule.delta:
            raise ValueError(f"allow_neg_eigval: only the delta rules have a transition I - beta k k^T whose "
                             f"eigenvalue 1 - beta can turn negative; '{rule.name}' has none")
        # beta in (0, 2) lets the delta transition's eigenvalue along k, 1 - beta, reach (-1, 1) (Grazzi et al.).
        self.beta_scale = 2.0 if allow_neg_eigval else 1.0
        self.rule, self.heads, self.impl, self.chunk_size = rule, heads, impl, chunk_size
        self.head_dim = head_dim or d_model // heads
        self.value_dim = value_dim or self.head_dim
        self.min_log_mu = min_log_mu
        self.stability_constraint = stability_constraint and rule.momentum
        self.tau = math.sqrt(d_model)
        key_width, value_width = heads * self.head_dim, heads * self.value_dim

        self.q_proj = nn.Linear(d_model, key_width, bias=False)
        self.k_proj = nn.Linear(d_model, key_width, bias=False)
        self.v_proj = nn.Linear(d_model, value_width, bias=False)
        self.convs = nn.ModuleList([ShortConv(key_width), ShortConv(key_width), ShortConv(value_width)]
                                   if short_conv else [])

        # One projection per gate the rule takes, plus the per-head parameters of section 4.
        self.gate_projs = nn.ModuleDict({name: nn.Linear(d_model, heads, bias=False) for name in rule.gates})
        if "log_alpha" in rule.gates:
            A, dt = DECAY_INITS[decay_init].sample(heads)
            self.A_log = nn.Parameter(A.log())
            self.dt_bias = nn.Parameter(inverse_softplus(dt))
        if rule.momentum:
            Mu, dt = DECAY_INITS[momentum_init].sample(heads)
            self.Mu_log = nn.Parameter(Mu.log())
            self.mu_bias = nn.Parameter(inverse_softplus(dt))
        if self.stability_constraint:
            self.log_factor = nn.Parameter(torch.empty(heads).uniform_(0, 4).clamp_(min=1e-4).log())

        self.g_proj = nn.Linear(d_model, value_width, bias=False)
        self.o_norm = nn.RMSNorm(self.value_dim, eps=1e-6)
        self.o_proj = nn.Linear(value_width, d_model, bias=False)
        self.record_stats = False   # when set, forward keeps the mean gates and the state norm in last_stats
        self.last_stats: dict[str, float] = {}

    def gates(self, x: Tensor) -> dict[str, Tensor]:
        """The rule's gates ``[B, T, H]`` (or ``[B, H]`` for one token), in float32 (float64 for float64 x)."""
        if not self.gate_projs:   # linear takes no gates
            return {}
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            # One product for all gates: a [d_model, heads]-weight product costs mostly per call on the CPU.
            weight = torch.cat([proj.weight for proj in self.gate_projs.values()]).to(dtype)
            raw = dict(zip(self.gate_projs, F.linear(x.to(dtype), weight).split(self.heads, dim=-1)))
            gates = {}
            if "log_alpha" in raw:
                gates["log_alpha"] = -self.A_log.exp() * F.softplus(raw["log_alpha"] + self.dt_bias)
            if "beta" in raw:
                gates["beta"] = self.beta_scale * raw["beta"].sigmoid()
            if "log_mu" in raw:
                log_mu = -self.Mu_log.exp() * F.softplus(raw["log_mu"] + self.mu_bias)
                gates["log_mu"] = log_mu.clamp(min=self.min_log_mu)
            if "eta" in raw:
                gates["eta"] = torch.tanh(raw["eta"] / self.tau) + 1
            if self.stability_constraint:
                # theta = arctan(gain): sin^2 = gain^2 / (1 + gain^2), log cos^2 = -log(1 + gain^2).
                gain_sq = (gates["eta"] * self.log_factor.exp()).square()
                gates["beta"] = gates["beta"] * gain_sq / (1 + gain_sq)
                gates["log_alpha"] = gates["log_alpha"] - torch.log1p(gain_sq)
        return gates

    def _qkv(self, x: Tensor, conv_state: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
        """Projected (and convolved) q, k, v as ``[B, T, H, D]``; q and k l2-normalised."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_conv = ()
        if self.convs:
            previous = conv_state or (None, None, None)
            (q, cq), (k, ck), (v, cv) = (conv(t, p) for conv, t, p in zip(self.convs, (q, k, v), previous))
            new_conv = (cq, ck, cv)
        B, T = x.shape[:2]
        q, k, v = (t.reshape(B, T, self.heads, -1) for t in (q, k, v))
        # Normalise in at least float32 (v is bf16 under autocast), then hand the kernels v's dtype.
        dtype = torch.promote_types(v.dtype, torch.float32)
        q = F.normalize(q.to(dtype), dim=-1).to(v.dtype)
        k = F.normalize(k.to(dtype), dim=-1).to(v.dtype)
        return q, k, v, new_conv

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        gate = self.g_proj(x).reshape(*o.shape).sigmoid()
        # The norm in at least float32 (its weight's dtype); o_proj runs in bf16 again under autocast.
        o = self.o_norm(o.to(torch.promote_types(o.dtype, torch.float32))) * gate
        return self.o_proj(o.flatten(-2))

    def forward(self, x: Tensor, state: MixerState | None = None,
                output_state: bool = False) -> tuple[Tensor, MixerState | None]:
        """``x: [B, T, d_model]`` -> ``[B, T, d_model]``; optionally continue from / return the carried state."""
        q, k, v, conv = self._qkv(x, state.conv if state is not None else ())
        gates = self.gates(x)
        if self.impl == "triton":
            from sandbox.kernels.ops import triton_rule   # the kernels as custom ops: no graph breaks

            run = functools.partial(triton_rule, self.rule)
        else:
            run = {"naive": self.rule.naive, "chunk": self.rule.chunk}[self.impl]
        extra = {} if self.impl == "naive" else {"chunk_size": self.chunk_size}
        want_state = output_state or self.record_stats
        # The rule manages its own precision (bf16 q, k, v in, float32 states and gates); autocast would
        # push its internal float32 products (and the triangular solve) down to bf16.
        with torch.autocast(x.device.type, enabled=False):
            o, rule_state = run(q, k, v, initial_state=state.rule if state is not None else None,
                                output_final_state=want_state, **extra, **gates)
        if self.record_stats:
            self.last_stats = self._stats(gates, rule_state)
        return self._output(o, x), (MixerState(rule_state, conv) if output_state else None)

    def step(self, x: Tensor, state: MixerState | None = None) -> tuple[Tensor, MixerState]:
        """One token, ``x: [B, d_model]``: the recurrent form, with ``rule.step`` and ``o = scale S^T q``."""
        q, k, v, conv = self._qkv(x[:, None], state.conv if state is not None else ())
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        gates = {name: g[:, 0] for name, g in self.gates(x[:, None]).items()}
        dtype = torch.promote_types(v.dtype, torch.float32)
        rule_state = state.rule if state is not None else None
        if rule_state is None:
            zeros = v.new_zeros(x.shape[0], self.heads, self.head_dim, self.value_dim, dtype=dtype)
            rule_state = (zeros, zeros.clone()) if self.rule.momentum else zeros
        rule_state = self.rule.step(rule_state, k.to(dtype), v.to(dtype), **gates)
        S = rule_state[0] if self.rule.momentum else rule_state
        o = self.head_dim ** -0.5 * torch.einsum("bhkv,bhk->bhv", S, q.to(dtype))
        return self._output(o.to(v.dtype)[:, None], x[:, None])[:, 0], MixerState(rule_state, conv)

    def _stats(self, gates: dict[str, Tensor], rule_state: State) -> dict[str, float]:
        """Mean gate values and the mean Frobenius norm of S (and M) over batch and heads."""
        stats = {}
        with torch.no_grad():
            for name, g in gates.items():
                if name.startswith("log_"):
                    stats[name[4:]] = g.exp().mean().item()
                else:
                    stats[name] = g.mean().item()
            states = rule_state if self.rule.momentum else (rule_state,)
            for label, s in zip(("state_norm", "momentum_norm"), states):
                stats[label] = s.float().norm(dim=(-2, -1)).mean().item()
        return stats

    def state_floats(self) -> int:
        """Floats of recurrent state per sequence: H K V, twice for momentum rules (S and M)."""
        return self.heads * self.head_dim * self.value_dim * (2 if self.rule.momentum else 1)



class RotaryEmbedding(nn.Module):
    """Rotary positions (rotate-half form) for ``[B, T, H, D]`` queries and keys."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.inv_freq)
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class AttentionMixer(nn.Module):
    """Causal softmax attention with rotary positions, the baseline every rule is compared against.

    With ``short_conv`` (the default, as for the rule mixers) q, k and v pass through the same causal
    depthwise convolution + SiLU as in ``RuleMixer``, so that an attention-vs-rule comparison differs in the
    mixer only. The convolution hands each position its predecessors' tokens, which is what the
    previous-token half of an induction head needs; without it attention must first learn that head from
    positions alone, which takes far longer than the sandbox's short runs (Zoology adds it for the same reason).
    """

    def __init__(self, d_model: int, heads: int, *, short_conv: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        if self.head_dim % 2:
            raise ValueError(f"d_model: attention needs an even head dimension (d_model / heads), got {self.head_dim}")
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        # Depthwise, so one convolution over the fused q, k, v channels is three separate ones.
        self.conv = ShortConv(3 * d_model) if short_conv else None
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim)
        self.record_stats = False
        self.last_stats: dict[str, float] = {}

    def forward(self, x: Tensor, state: None = None, output_state: bool = False) -> tuple[Tensor, None]:
        if state is not None or output_state:
            raise ValueError("state: the attention mixer keeps no recurrent state (its KV cache grows with T)")
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        if self.conv is not None:
            qkv, _ = self.conv(qkv)
        q, k, v = qkv.reshape(B, T, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.rotary(q), self.rotary(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), None
