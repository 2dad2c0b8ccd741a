"""`tinylm train pretrain|sft|dpo CONFIG [--set key=value ...] [--stop-after-steps N]`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    train = commands.add_parser("train", help="pretrain, SFT or DPO from a YAML/JSON run config")
    modes = train.add_subparsers(metavar="MODE", dest="train_mode")
    for mode, text in (("pretrain", "next-token pretraining on text / JSONL, packed into fixed-length rows"),
                       ("sft", "supervised fine-tuning on chat `messages`, loss on assistant tokens"),
                       ("dpo", "direct preference optimization on prompt/chosen/rejected pairs")):
        sub = modes.add_parser(mode, help=text)
        sub.add_argument("config", type=Path, metavar="CONFIG", help="YAML or JSON run config (see examples/)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
        sub.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                         help="save a checkpoint and stop once N steps are done (resume later with the same command)")
        sub.set_defaults(handler=cmd_train, train_mode=mode)
    train.set_defaults(handler=lambda args: train.print_help() or 2)


def cmd_train(args: argparse.Namespace) -> int:
    from tinylm.train import load_config, train

    config = load_config(args.config, mode=args.train_mode, overrides=args.set)
    result = train(config, stop_after=args.stop_after_steps)
    if result.stopped_by is not None:
        from tinylm.train.preemption import exit_status

        if _is_main():
            print(f"stopped by {result.stopped_by} at step {result.step}: checkpoint {result.last_checkpoint}; "
                  "rerun the same command to resume", flush=True)
        return exit_status(result.stopped_by)  # 143 / 130: not finished (why not 0: preemption.exit_status)
    if result.last_checkpoint is not None and _is_main():
        print(f"step {result.step}: checkpoint {result.last_checkpoint}")
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
