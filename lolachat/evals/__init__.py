"""Quality evaluations: needle retrieval (RULER niah_single_1, classic pass key) and perplexity.

`niah` builds prompts of an exact token length with a needle at a chosen depth, `scoring` is RULER's
substring rule, `passkey` runs the retrieval grid on an engine, `ppl` measures perplexity at a given
context length, `plot` draws the depth × length heat map (matplotlib, optional).
"""

from lolachat.evals.niah import TASKS, NeedlePrompt, build_prompt
from lolachat.evals.ppl import perplexity
from lolachat.evals.scoring import postprocess_pred, sample_score, string_match_all

__all__ = ["TASKS", "NeedlePrompt", "build_prompt", "perplexity", "postprocess_pred", "sample_score",
           "string_match_all"]
