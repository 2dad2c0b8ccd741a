"""tinylm.eval: perplexity and multiple-choice benchmarks scored as lm-evaluation-harness scores them.

    tinylm eval perplexity MODEL --data FILE [--context N] [--stride S]
    tinylm eval tasks MODEL [MODEL ...] --tasks hellaswag,arc_challenge,... --data-dir DIR [--num-fewshot K]

Modules: tasks (the task definitions), loading (task files under --data-dir), prompts (few-shot contexts and
requests), loglikelihood (lm-eval's request encoding and batching), shared_context (each example's context run once,
logits only at the scored tokens), shared_head (a few-shot block
several examples start with run once for all of them), metrics, runner, cache (resume), perplexity,
results (JSON, CSV, tables), checkpoints (training-token convention), plot, cli.
"""
