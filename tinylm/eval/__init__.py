"""tinylm.eval: perplexity and multiple-choice benchmarks scored as lm-evaluation-harness scores them.

    tinylm eval perplexity MODEL --data FILE [--context N] [--stride S]
    tinylm eval tasks MODEL [MODEL ...] --tasks hellaswag,arc_challenge,... --data-dir DIR [--num-fewshot K]

Modules: tasks (the task definitions), loading (task files under --data-dir), prompts (few-shot contexts and
requests), loglikelihood (batched scoring through `llm.forward`), metrics, runner, cache (resume), perplexity,
results (JSON, CSV, tables), checkpoints (training-token convention), plot, cli.
"""
