"""Helpers shared by test files in several folders: `from tests.helpers import ...` (fixtures are in
tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass

from tinylm.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`tinylm ARGV...` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    """The command failed with exit code 1 and one line `tinylm: error: ...` holding every word, no traceback."""
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tinylm: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@dataclass
class EngineRun:
    outputs: list[list]  # per prompt, in the prompts' order: the StepOutputs of its request
    steps: int  # engine.step() calls until nothing was left

    @property
    def tokens(self) -> list[list[int]]:
        return [[output.token_id for output in outputs] for outputs in self.outputs]


def run_engine(engine, prompts: list[list[int]], params, max_steps: int = 10_000) -> EngineRun:
    """Add one request per prompt (ids "0", "1", ...; `params` one SamplingParams for all or a list, one per
    prompt) and step the engine until every request has finished."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params[i] if isinstance(params, list) else params)
    outputs: list[list] = [[] for _ in prompts]
    steps = 0
    while engine.has_unfinished():
        assert steps < max_steps, f"requests still unfinished after {max_steps} steps"
        steps += 1
        for output in engine.step():
            outputs[int(output.request_id)].append(output)
    return EngineRun(outputs, steps)


def assert_same_model(llm, reference) -> None:
    """`llm` and `reference` (two tinylm.LLM of one tiny model) give bitwise the same logits for two 8-token rows and
    the same greedy tokens through the engine (its prefill and decode steps)."""
    import torch  # noqa: PLC0415

    from tinylm import SamplingParams  # noqa: PLC0415

    ids = torch.tensor([[5, 77, 300, 12, 9, 101, 44, 2], [17, 260, 3, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(llm.model(ids).logits, reference.model(ids).logits)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[5, 77, 300, 12], [17, 260, 3]]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in reference.generate(prompts, params)]


def assert_compiled_gives_eager_tokens(llm) -> None:
    """`llm` (loaded with compile=False) decodes the same greedy tokens once the engine compiles its steps."""
    from tinylm import SamplingParams  # noqa: PLC0415
    from tinylm.engine.engine import EngineConfig  # noqa: PLC0415

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 77, 300, 12, 9], [17, 260, 3], [8, 8, 40, 41]]
    eager = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert llm.engine_for(EngineConfig(compile=True)).runner.compiled is not None
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == eager
