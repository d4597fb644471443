"""Attention for one shared-prompt row, ``prompt | chosen | rejected``, in two causal parts.

As one sequence the row needs an explicit mask (the rejected reply must not see the chosen one), and with a
mask the CPU's fused attention computes every block of the ``[T, T]`` scores. Split, each part is one the
kernel handles well:

- the prompt and the chosen reply attend causally among themselves (``is_causal``, no mask);
- the rejected reply's queries attend to the prompt and, causally, to themselves: keys ``prompt | rejected``
  under a ``[R, P + R]`` mask.

That is exactly the packed row's attention, and the masked scores the kernel would have computed are mostly
not computed at all: on a SmolLM2 step (docs/benchmarks.md, "2026-11-30 (night)") attention went from 22.9%
to 16.1% of the operators' time.

Registered with transformers as its own attention implementation that defers to transformers' SDPA for
every call without a ``shared_prompt`` argument (batched rows, generation), so only the kernel's row-by-row
passes take it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

NAME = "duet_sdpa"


def register() -> None:
    """Make ``NAME`` known to transformers (idempotent): this attention, SDPA's mask rules."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(NAME, shared_prompt_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def shared_prompt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prompt: tuple[int, int, int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature (query ``[1, heads, T, d]``, key and value ``[1, kv heads, T, d]``;
    the output ``[1, T, heads, d]``). ``shared_prompt`` = (prompt, chosen, rejected) lengths of the row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prompt is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    prompt, chosen, rejected = shared_prompt
    first = prompt + chosen
    assert query.shape[0] == 1 and query.shape[2] == first + rejected, "one unpadded shared-prompt row"
    kwargs.pop("is_causal", None)
    head, _ = sdpa_attention_forward(
        module, query[:, :, :first], key[:, :, :first], value[:, :, :first], None, dropout, scaling, is_causal=True
    )
    keys = torch.cat([key[:, :, :prompt], key[:, :, first:]], dim=2)
    values = torch.cat([value[:, :, :prompt], value[:, :, first:]], dim=2)
    tail, _ = sdpa_attention_forward(
        module, query[:, :, first:], keys, values, rejected_sees(prompt, rejected, query.device), dropout, scaling
    )
    return torch.cat([head, tail], dim=1), None


@functools.lru_cache(maxsize=16)
def rejected_sees(prompt: int, rejected: int, device: torch.device) -> torch.Tensor:
    """[1, 1, R, P + R]: rejected token i sees the whole prompt and rejected tokens 0..i (key j where
    j <= prompt + i). Every layer of a row asks for the same one."""
    return torch.ones(rejected, prompt + rejected, dtype=torch.bool, device=device).tril(diagonal=prompt)[None, None]
