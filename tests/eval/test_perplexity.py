"""Sliding-window perplexity: exp of the mean token NLL that `llm.forward` gives on the same windows (computed here
with labels, independently), lm-eval's rolling windows at stride = context, bits per byte."""

from __future__ import annotations

import math

import pytest
import torch

from tinylm.eval.data import EvalDataError
from tinylm.eval.loglikelihood import Scorer
from tinylm.eval.perplexity import perplexity, rolling_windows

TEXT = ("Once upon a time there was a little robot who loved to read. Every day it read a new story about the sea, "
        "the stars and the forest. The user asked: what is the capital of France? The assistant said: Paris. ") * 3


@pytest.fixture(scope="module")
def llm(load_tiny):
    return load_tiny("llama", seed=2, dtype="float32")


def reference_nll(llm, tokens: list[int], prefix: int, context: int, stride: int) -> tuple[float, int]:
    """Sum of NLL and count of scored tokens, from forward(labels=...) as in the transformers perplexity guide:
    each window holds up to `context` tokens of history plus the tokens it scores (labels -100 elsewhere); the first
    window scores everything it can, each later one the next `stride` tokens, ending at the text's end."""
    x = [prefix] + tokens
    nll, count, scored = 0.0, 0, 0
    while scored < len(tokens):
        end = min(context, len(tokens)) if scored == 0 else min(scored + stride, len(tokens))
        begin = max(0, end - context)
        window = torch.tensor([x[begin:end + 1]])  # history and targets; the last token is only a target
        labels = window.clone()
        labels[0, :scored + 1 - begin] = -100  # tokens already scored (and the prefix) are not targets
        loss = llm.forward(window, labels=labels).loss.item()  # mean over the end - scored targets
        nll += loss * (end - scored)
        count += end - scored
        scored = end
    return nll, count


@pytest.mark.parametrize("context, stride, batch", [(48, 16, 1), (48, 48, 3), (32, 7, 4)])
def test_perplexity_equals_exp_mean_nll_from_forward_on_the_same_windows(llm, context, stride, batch):
    scorer = Scorer.from_llm(llm)
    tokens = scorer.encode(TEXT)
    assert len(tokens) > 3 * context  # several windows
    result = perplexity(scorer, [TEXT], context=context, stride=stride, batch_size=batch, progress=False)
    nll, count = reference_nll(llm, tokens, scorer.prefix_token_id, context, stride)
    assert result.tokens == count == len(tokens)  # every token scored exactly once
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll / (len(TEXT.encode()) * math.log(2)), rel=1e-5)
    assert result.windows == 1 + math.ceil((len(tokens) - context) / stride)


def lm_eval_rolling_windows(token_list, prefix_token, max_seq_len, context_len):
    """lm_eval/utils.py get_rolling_token_windows + make_disjoint_window, transcribed."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    windows = [([prefix_token] + token_list[:first_seq_len - 1], token_list[:first_seq_len])]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        windows.append((token_list[window_end - max_seq_len - 1:window_end - 1],
                        token_list[window_end - window_pred_len:window_end]))
        predicted += window_pred_len
    return [(a[:len(a) - (len(b) - 1)], b) for a, b in windows]


@pytest.mark.parametrize("n, context, stride", [(100, 32, 32), (100, 32, 10), (5, 32, 32), (64, 32, 1)])
def test_windows_are_lm_evals_rolling_windows(n, context, stride):
    """stride S over context C is lm-eval's window scheme with context_len = C - S + 1 (S = C: its default)."""
    tokens = list(range(10, 10 + n))
    x = [0] + tokens
    ours = [(x[b:f + 1], x[f + 1:e + 1]) for b, e, f in rolling_windows(n, context, stride)]
    assert ours == lm_eval_rolling_windows(tokens, 0, context, context - stride + 1)


def test_documents_are_scored_separately_and_pooled(llm):
    scorer = Scorer.from_llm(llm)
    docs = ["The robot read a story about the sea.", "Paris is the capital of France. " * 4]
    both = perplexity(scorer, docs, context=16, stride=8, progress=False)
    parts = [perplexity(scorer, [d], context=16, stride=8, progress=False) for d in docs]
    assert both.nll == pytest.approx(sum(p.nll for p in parts), rel=1e-6)
    assert both.tokens == sum(p.tokens for p in parts)
    assert both.as_dict()["word_perplexity"] == pytest.approx(math.exp(both.nll / sum(p.words for p in parts)))


def test_bad_stride_and_empty_text_are_clear_errors(llm):
    scorer = Scorer.from_llm(llm)
    with pytest.raises(EvalDataError, match="--stride must be between 1 and the context"):
        perplexity(scorer, [TEXT], context=16, stride=17, progress=False)
    with pytest.raises(EvalDataError, match="no text to score"):
        perplexity(scorer, [""], context=16, progress=False)
