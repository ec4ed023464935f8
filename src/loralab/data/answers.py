"""Reference answers as the tasks store them: GSM8K's cleaned final number and SQuAD v2's unanswerable target.

They live with the data because a task's references are made from them when it loads; evaluation scores against
the same definitions (evaluation/gsm8k.py, evaluation/metrics.py).
"""

from __future__ import annotations

import re

UNANSWERABLE = "unanswerable"  # the target and the normalised prediction of a SQuAD v2 question with no answer
LM_EVAL_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")  # lm-eval gsm8k's regexes_to_ignore, in its order


def gold_answer(answer_text: str) -> str:
    """An answer as lm-eval's exact_match compares it (regexes_to_ignore, then lower case): "#### 1,234." -> "1234"."""
    for pattern in LM_EVAL_IGNORE:
        answer_text = re.sub(pattern, "", answer_text)
    return answer_text.lower()
