"""Training throughput and MFU: tinylm vs transformers, the same loop on the same shapes, side by side.

The model is QED-75M-shaped (seed 004: 32 layers, d_model 384, 6 heads of 64, SwiGLU 1024, vocab 49152, embedding
tied to an output head with a bias). transformers has no QED class; its closest is LlamaForCausalLM with the same
shapes (RoPE, RMSNorm, SwiGLU, SDPA), whose lm_head is given the same bias here, and the same initial weights.

Both sides run one loop: AdamW (decay on matrices), forward, summed next-token cross-entropy over the batch, backward,
clip at 1.0, step; steps alternate between the two models so that a busy machine slows both alike. Reported:
median step time, tokens/s, MFU = 6 N tokens/s / peak (N = parameters the forward multiplies by; the peak is
--peak-flops, default tinylm.train.metrics.default_peak_flops), and the ratio tinylm / transformers.

    .venv/bin/python benchmarks/train.py --steps 3 --batch 2 --seq 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from tinylm.config import ModelConfig
from tinylm.model.transformer import CausalLM
from tinylm.tiny import init_weights
from tinylm.train.losses import lm_loss_sum
from tinylm.train.metrics import default_peak_flops, flop_params
from tinylm.train.setup import autocast, build_optimizer
from tinylm.train.config import OptimSection

QED_75M = dict(model_type="qed", vocab_size=49152, d_model=384, n_layers=32, n_heads=6, ffn_hidden_dim=1024,
               max_seq_len=8192, rope_theta=10000.0, rms_norm_eps=1e-5, bias=False, tie_word_embeddings=True)


def tinylm_model(layers: int) -> CausalLM:
    model = CausalLM(ModelConfig.from_hf_dict({**QED_75M, "n_layers": layers}))
    init_weights(model, seed=0)
    return model


def transformers_model(source: CausalLM) -> nn.Module:
    """LlamaForCausalLM with QED's shapes, a biased lm_head tied to the embedding, and tinylm's weights."""
    import transformers

    c = source.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True, attention_bias=False)
    model = transformers.LlamaForCausalLM(config)
    model.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.train()


def make_step(model: nn.Module, precision: str):
    optimizer, _ = build_optimizer(model, OptimSection(lr=1e-4, weight_decay=0.1))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(input_ids: torch.Tensor) -> float:
        with autocast(precision, input_ids.device):
            logits = model(input_ids=input_ids).logits
            loss = lm_loss_sum(logits, input_ids) / (input_ids.numel() - input_ids.shape[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a quick check")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peak-flops", type=float, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = tinylm_model(args.layers)
    theirs = transformers_model(ours)
    n = flop_params(ours)
    assert n == flop_params(theirs)
    batches = [torch.randint(0, ours.config.vocab_size, (args.batch, args.seq)) for _ in range(args.steps + 1)]
    sides = {"tinylm": make_step(ours, args.precision), "transformers": make_step(theirs, args.precision)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    for i, batch in enumerate(batches):
        for name, step in sides.items():
            start = time.perf_counter()
            losses[name].append(step(batch))
            if i:  # the first step is a warm-up (allocator, lazy init)
                times[name].append(time.perf_counter() - start)
    peak = args.peak_flops or default_peak_flops(torch.device("cpu"), args.precision == "bf16")
    tokens = args.batch * args.seq
    print(f"QED-75M shape, {args.layers} layers, N = {n / 1e6:.1f}M multiplied parameters, batch {args.batch} x "
          f"seq {args.seq} = {tokens} tokens/step, {args.precision}, {torch.get_num_threads()} threads, "
          f"peak {peak / 1e9:.0f} GFLOP/s")
    rates = {}
    for name in sides:
        median = statistics.median(times[name])
        rates[name] = tokens / median
        mfu = 6 * n * rates[name] / peak
        print(f"{name:>12}: {median:7.2f} s/step  {rates[name]:8.1f} tokens/s  MFU {100 * mfu:5.2f}%  "
              f"(steps {', '.join(f'{t:.2f}' for t in times[name])}; first loss {losses[name][0]:.4f})")
    print(f"ratio tinylm / transformers tokens/s: {rates['tinylm'] / rates['transformers']:.2f}")
    assert abs(losses["tinylm"][0] - losses["transformers"][0]) < 1e-3, "the two models should start identical"


if __name__ == "__main__":
    main()
