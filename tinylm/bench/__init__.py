"""`tinylm bench`: decode, batch and serving speed and memory of one tinylm configuration, side by side with
transformers and llama.cpp on the same weights: the repository's one benchmark entry point for speed.

    tinylm bench [--model M | --shape smollm2-135m|tinyllama-1.1b|qwen3-next|moe] [--dtype D] [--quantize Q]
                 [--compile] [--kv-cache-dtype int8] [--batch 1 16] [--prompt-tokens 128] [--new-tokens 128]
                 [--repeats 3] [--compare transformers,llama.cpp,llama.cpp:bf16] [--pairs N] [--variant FLAGS]
                 [--serve | --clients 1 16 64] [--threads T] [--json]

For each batch size B, B prompts of P seeded random token ids (any model, with or without a tokenizer, gets the
same work) are generated greedily to N new tokens, EOS ignored, after a short warm-up run (and the compiled
graphs' warm-up). Every system is timed the same way: when each sequence got each token (tinylm/bench/timing.py).
Reported, from the fastest of --repeats runs end to end: time to the first token (the median prompt's and the
last prompt's), prefill tokens/s (B x P over the last first token), decode tokens/s (the tokens after each prompt's
first over the time after the last first token), end-to-end tokens/s, inter-token gaps, and the peak resident
memory of the run (Linux). References (--compare) load one at a time after tinylm is freed, so each peak is its
own; ratios are tinylm / reference. --pairs N adds N rounds of all systems back to back, the order rotating,
and each ratio's median and lowest round: the shared VM drifts 10-25% between minutes, a round does not.
--variant FLAGS adds a second tinylm configuration as a reference (an A/B in one process); --serve (or --clients
N ...) times tinylm through `tinylm serve` in a process of its own, the streaming clients in another
(tinylm/bench/load.py), with llm.stream as the reference tinylm-stream; --compare llama-server adds llama.cpp's
own server under the same load (tinylm/bench/serve.py, tinylm/bench/llama_server.py).

--json prints one document (command, machine, ISA, date, versions, figures, ratios, rounds);
`python -m tinylm.bench.report RESULTS.json...` turns such documents into markdown tables. benchmarks/ keeps the
studies that measure something else (memory, quality, kernels, training, speculative decoding, eval, K/V cache).
"""

from tinylm.bench.cli import register

__all__ = ["register"]
