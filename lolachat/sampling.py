"""Next-token choice: greedy, temperature, top-k, top-p, with a seedable generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingOptions:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")


class Sampler:
    def __init__(self, options: SamplingOptions, device="cpu"):
        self.options = options
        self.generator = torch.Generator(device=device)
        if options.seed is not None:
            self.generator.manual_seed(options.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] (fp32) -> token id."""
        o = self.options
        if o.temperature == 0:
            return int(torch.argmax(logits))
        scores = logits.float() / o.temperature
        if o.top_k:
            kth = torch.topk(scores, min(o.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if o.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            # drop a token once the tokens before it already reach top_p; the first always stays
            outside = cumulative - torch.softmax(sorted_scores, dim=-1) >= o.top_p
            scores[order[outside]] = float("-inf")
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
