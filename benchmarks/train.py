"""Training throughput, MFU and peak memory: tinylm's training step vs the same loop on transformers' model.

Shapes (random weights, same initial values on both sides):
  qed-75m         QED-75M (32 layers, d_model 384, 6 heads of 64, SwiGLU 1024, vocab 49152, embedding tied to an
                  output head with a bias), sequence 512. transformers has no QED class: its closest is
                  LlamaForCausalLM with the same shapes, whose lm_head gets the same bias and tie.
  tinyllama-1.1b  TinyLlama 1.1B (22 layers, d 2048, 32 heads / 4 KV heads, SwiGLU 5632, vocab 32000), sequence 2048.

Each side runs alone in its own process (so its peak memory is its own: the largest resident set on CPU,
torch.cuda.max_memory_allocated on CUDA), one warm-up step, then --steps timed steps of the same loop: AdamW (decay
on matrices), forward, summed next-token cross-entropy over the batch / label count, backward, clip at 1.0, step.
tinylm's side is what `tinylm train` runs: the chunked output head + loss (train.loss_chunk), host memory kept for
reuse (tinylm/train/host_memory.py; --same-malloc gives transformers' side the same), optionally compiled
decoder layers (--compile) and activation checkpointing (--activation-checkpointing, given to both sides:
transformers' gradient_checkpointing). transformers' side materializes the (B, T, V) logits, as a plain loop does.
Both use the same autocast (--precision bf16) over float32 master weights.

Reported: median step time, tokens/s, MFU = FLOPs/token x tokens/s / peak, with FLOPs/token = 6 N + 6 L d T
(tinylm.train.metrics) and the peak measured by a matmul probe in the step's dtype on this machine
(--peak-flops to override), peak memory, and the ratio tinylm / transformers.

    .venv/bin/python benchmarks/train.py --shape qed-75m --precision bf16 --compile
    .venv/bin/python benchmarks/train.py --shape tinyllama-1.1b --precision bf16 --compile --activation-checkpointing
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from tinylm.bench.shapes import TINYLLAMA_1_1B
from tinylm.config import ModelConfig
from tinylm.model.transformer import CausalLM
from tinylm.tiny import init_weights
from tinylm.train.config import OptimSection
from tinylm.train.host_memory import keep_freed_memory
from tinylm.train.losses import lm_loss_sum
from tinylm.train.metrics import flops_per_token, measured_peak_flops
from tinylm.train.setup import autocast, build_optimizer
from tinylm.train.speed import apply_speed_options
from tinylm.train.tasks import LMObjective

QED_75M = dict(model_type="qed", vocab_size=49152, d_model=384, n_layers=32, n_heads=6, ffn_hidden_dim=1024,
               max_seq_len=8192, rope_theta=10000.0, rms_norm_eps=1e-5, bias=False, tie_word_embeddings=True)
# name -> (config.json keys, key of the layer count, default sequence length, default batch)
SHAPES = {"qed-75m": (QED_75M, "n_layers", 512, 2),
          "tinyllama-1.1b": (TINYLLAMA_1_1B, "num_hidden_layers", 2048, 1)}


def tinylm_model(shape: str, layers: int | None) -> CausalLM:
    config, layer_key, _, _ = SHAPES[shape]
    model = CausalLM(ModelConfig.from_hf_dict({**config, **({layer_key: layers} if layers else {})}))
    init_weights(model, seed=0)
    return model


def transformers_model(source: CausalLM) -> nn.Module:
    """LlamaForCausalLM with the source's shapes, head bias and tie, and the source's weights."""
    import transformers

    c = source.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False)
    model = transformers.LlamaForCausalLM(config)
    if c.lm_head_bias:
        model.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=True)
        model.lm_head.weight = model.model.embed_tokens.weight
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.train()


def make_step(side: str, model: nn.Module, args):
    """-> step(input_ids) -> loss: one optimizer step of the side's loop."""
    optimizer, _ = build_optimizer(model, OptimSection(lr=1e-4, weight_decay=0.1))
    params = [p for p in model.parameters() if p.requires_grad]
    if side == "tinylm":
        apply_speed_options(model, args.compile, args.activation_checkpointing)
        objective = LMObjective(model, args.loss_chunk, args.compile)
        loss_sum = lambda ids: objective(ids, ids)[0]  # noqa: E731
    else:
        if args.same_malloc:  # the one host-side setting tinylm's step makes, given to transformers' loop too
            keep_freed_memory()
        if args.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_sum = lambda ids: lm_loss_sum(model(input_ids=ids).logits, ids)  # noqa: E731

    def step(input_ids: torch.Tensor) -> float:
        with autocast(args.precision, input_ids.device):
            loss = loss_sum(input_ids) / (input_ids.numel() - input_ids.shape[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run_side(args) -> dict:
    """One side alone: warm-up + timed steps -> times, first loss, peak memory (JSON-able)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = tinylm_model(args.shape, args.layers)
    model = ours if args.side == "tinylm" else transformers_model(ours)
    if model is not ours:
        del ours
    model.to(device)
    step = make_step(args.side, model, args)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
               for _ in range(args.steps + args.warmup)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        losses.append(step(batch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"times": times, "first_loss": losses[0], "peak_bytes": peak}


def child_command(args, side: str) -> list[str]:
    flags = [f"--shape={args.shape}", f"--seq={args.seq}", f"--batch={args.batch}", f"--steps={args.steps}",
             f"--warmup={args.warmup}", f"--precision={args.precision}", f"--device={args.device}",
             f"--loss-chunk={args.loss_chunk}", f"--side={side}"]
    flags += [f"--layers={args.layers}"] * bool(args.layers) + [f"--threads={args.threads}"] * bool(args.threads)
    flags += ["--compile"] * args.compile + ["--same-malloc"] * args.same_malloc
    flags += ["--activation-checkpointing"] * args.activation_checkpointing
    return [sys.executable, __file__, *flags]


def report(args, results: dict[str, dict]) -> None:
    model = tinylm_model(args.shape, args.layers)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = args.peak_flops or measured_peak_flops(torch.device(args.device), dtype)
    per_token = flops_per_token(model, args.seq)
    tokens = args.batch * args.seq
    c = model.config
    print(f"{args.shape}: {c.num_hidden_layers} layers, {per_token / 6e6:.1f}M FLOP-params/token incl. attention, "
          f"batch {args.batch} x seq {args.seq} = {tokens} tokens/step, {args.precision}, {args.device}, "
          f"{torch.get_num_threads()} threads, measured peak {peak / 1e9:.0f} GFLOP/s, compile={args.compile}, "
          f"activation checkpointing={args.activation_checkpointing}, loss_chunk={args.loss_chunk}, "
          f"transformers' malloc={'kept freed memory (as tinylm)' if args.same_malloc else 'glibc defaults'}")
    rates = {}
    for name, r in results.items():
        median = statistics.median(r["times"])
        rates[name] = tokens / median
        print(f"{name:>12}: {median:7.2f} s/step  {rates[name]:8.1f} tokens/s  MFU {100 * per_token * rates[name] / peak:5.1f}%"
              f"  peak memory {r['peak_bytes'] / 2**30:6.2f} GiB  (steps {', '.join(f'{t:.2f}' for t in r['times'])};"
              f" first loss {r['first_loss']:.4f})")
    print(f"ratio tinylm / transformers tokens/s: {rates['tinylm'] / rates['transformers']:.2f}")
    loss_gap = abs(results["tinylm"]["first_loss"] - results["transformers"]["first_loss"])
    assert loss_gap < (1e-3 if args.precision == "fp32" else 5e-2), "the two models should start identical"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qed-75m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after the warm-up steps)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (compilation, allocator)")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 (qed-75m), 1 (tinyllama-1.1b)")
    parser.add_argument("--seq", type=int, default=None, help="default: 512 (qed-75m), 2048 (tinyllama-1.1b)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="tinylm: torch.compile each decoder layer")
    parser.add_argument("--activation-checkpointing", action="store_true", help="both sides")
    parser.add_argument("--same-malloc", action="store_true",
                        help="transformers' side also keeps freed host memory as tinylm's step does "
                             "(tinylm/train/host_memory.py): the ratio of the loops alone")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="tinylm's fused loss chunk; 0 = plain logits")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peak-flops", type=float, default=None)
    parser.add_argument("--side", choices=["tinylm", "transformers"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _, _, seq, batch = SHAPES[args.shape]
    args.seq, args.batch = args.seq or seq, args.batch or batch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side is not None:  # a child: one side, one JSON line
        print(json.dumps(run_side(args)))
        return
    results = {}
    for side in ("tinylm", "transformers"):
        out = subprocess.run(child_command(args, side), capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{side} side failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    report(args, results)


if __name__ == "__main__":
    main()
