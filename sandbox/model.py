"""A small language model whose token mixer is any update rule (or softmax attention).

    tokens -> embedding -> N x [x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> tied head

Like nanoGPT, but every block's attention is replaced by a ``RuleMixer`` (sandbox/layer.py) unless the
rule is ``"attention"``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.config import ATTENTION
from sandbox.inits import DEFAULT_DECAY_INIT, DEFAULT_MOMENTUM_INIT
from sandbox.layer import AttentionMixer, MixerState, RuleMixer
from sandbox.rules import get_rule


class SwiGLU(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        hidden = 16 * math.ceil(8 * d_model / 3 / 16)   # 8/3 d keeps the parameters of a 4 d GELU MLP
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.mixer = mixer
        self.mlp_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.mlp = SwiGLU(d_model)

    def forward(self, x: Tensor, state: MixerState | None = None,
                output_state: bool = False) -> tuple[Tensor, MixerState | None]:
        mixed, state = self.mixer(self.mixer_norm(x), state, output_state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state

    def step(self, x: Tensor, state: MixerState | None) -> tuple[Tensor, MixerState]:
        mixed, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, rule: str, d_model: int, layers: int, heads: int, *,
                 short_conv: bool = True, stability_constraint: bool = True, min_log_mu: float = -2.0,
                 chunk_size: int = 64, impl: str = "chunk", decay_init: str = DEFAULT_DECAY_INIT,
                 momentum_init: str = DEFAULT_MOMENTUM_INIT, allow_neg_eigval: bool = False):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model: expected a multiple of heads ({heads}), got {d_model}")
        self.rule = rule
        self.embedding = nn.Embedding(vocab_size, d_model)

        def mixer() -> nn.Module:
            if rule == ATTENTION:
                return AttentionMixer(d_model, heads, short_conv=short_conv)
            return RuleMixer(get_rule(rule), d_model, heads, short_conv=short_conv, impl=impl,
                             stability_constraint=stability_constraint, min_log_mu=min_log_mu,
                             chunk_size=chunk_size, decay_init=decay_init, momentum_init=momentum_init,
                             allow_neg_eigval=allow_neg_eigval)

        self.blocks = nn.ModuleList([Block(mixer(), d_model) for _ in range(layers)])
        self.final_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.apply(self._init_weights)
        # GPT-2: shrink the residual-stream outputs so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def _logits(self, x: Tensor) -> Tensor:
        return F.linear(self.final_norm(x), self.embedding.weight)   # tied head

    def forward(self, tokens: Tensor, states: list[MixerState] | None = None,
                output_states: bool = False) -> tuple[Tensor, list[MixerState] | None]:
        """``tokens: [B, T]`` -> logits ``[B, T, vocab]``; recurrent mixers can continue from / return their states."""
        x = self.embedding(tokens)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, state = block(x, states[i] if states is not None else None, output_states)
            new_states.append(state)
        return self._logits(x), (new_states if output_states else None)

    def step(self, tokens: Tensor, states: list[MixerState] | None = None) -> tuple[Tensor, list[MixerState]]:
        """One token per sequence, ``tokens: [B]`` -> logits ``[B, vocab]`` and the advanced states."""
        if self.rule == ATTENTION:
            raise ValueError("rule: step mode needs a recurrent rule; attention keeps a growing KV cache")
        x = self.embedding(tokens)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, state = block.step(x, states[i] if states is not None else None)
            new_states.append(state)
        return self._logits(x), new_states

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_size(self, seq_len: int) -> tuple[int, str]:
        """Floats of inference state per sequence, with a label saying what they are."""
        if self.rule == ATTENTION:
            d_model = self.embedding.weight.shape[1]
            return 2 * len(self.blocks) * d_model * seq_len, f"KV-cache floats at T={seq_len} (grows with T)"
        floats = sum(block.mixer.state_floats() for block in self.blocks)
        return floats, "recurrent state floats (layers x heads x K x V, x2 with momentum)"

    def set_record_stats(self, enabled: bool) -> None:
        for block in self.blocks:
            block.mixer.record_stats = enabled

    def mixer_stats(self) -> list[dict[str, float]]:
        """Per layer, the mean gates and state norms of the last forward with recording on."""
        return [block.mixer.last_stats for block in self.blocks]

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices and embeddings only; per-head gate parameters, norms and biases are exempt."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
