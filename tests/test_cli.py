"""The `tinylm` command line: answers on the default model, and one-line errors (no traceback) on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import assert_one_line_error, run_cli


def test_chat_once_answers_paris(capsys, smollm2_gguf):
    code, out, _ = run_cli(capsys, "chat", "--model", str(smollm2_gguf), "-m", "What is the capital of France?",
                        "--temperature", "0", "--max-tokens", "24")
    assert code == 0 and "Paris" in out


def test_chat_with_the_builtin_default_as_a_user_runs_it(smollm2_gguf):
    """No --model: the built-in default (already cached by the fixture), in a real process."""
    result = subprocess.run([sys.executable, "-m", "tinylm.cli", "chat", "-m", "What is the capital of France?",
                             "--temperature", "0", "--max-tokens", "16"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_repl_keeps_history(monkeypatch, capsys, smollm2_gguf):
    """The second turn's prompt holds the first question and the model's first answer."""
    import io

    import tinylm

    seen: list[list[dict]] = []
    original = tinylm.LLM.apply_chat_template

    def spy(self, messages, **kwargs):
        seen.append([dict(m) for m in messages])
        return original(self, messages, **kwargs)

    monkeypatch.setattr(tinylm.LLM, "apply_chat_template", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("My name is Ada.\n/reset\nHi\nWhat is my name?\n"))
    code, out, _ = run_cli(capsys, "chat", "--model", str(smollm2_gguf), "--temperature", "0", "--max-tokens", "12")
    assert code == 0
    first_answer = out.splitlines()[0]
    assert seen[0] == [{"role": "user", "content": "My name is Ada."}]
    assert seen[1] == [{"role": "user", "content": "Hi"}]  # /reset dropped the first exchange
    assert seen[2][:2] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": seen[2][1]["content"]}]
    assert seen[2][1]["content"].strip() and seen[2][2] == {"role": "user", "content": "What is my name?"}
    assert first_answer.strip()


def test_generate_streams_text(capsys, smollm2_gguf):
    code, out, _ = run_cli(capsys, "generate", "--model", str(smollm2_gguf), "--temperature", "0",
                        "--max-tokens", "8", "The capital of France is")
    assert code == 0 and out.strip()


def test_generate_with_a_draft_prints_the_same_text(capsys, smollm2_gguf):
    args = ["generate", "--model", str(smollm2_gguf), "--dtype", "float32", "--temperature", "0", "--max-tokens", "12",
            "The capital of France is"]
    plain = run_cli(capsys, *args)
    for draft in (["--draft-model", "[ngram]"], ["--draft-model", str(smollm2_gguf), "--draft-quantize", "int8"]):
        assert run_cli(capsys, *args, *draft, "--num-speculative-tokens", "4") == plain


def test_generate_with_an_int8_kv_cache_answers(capsys, smollm2_gguf):
    code, out, _ = run_cli(capsys, "generate", "--model", str(smollm2_gguf), "--temperature", "0", "--max-tokens", "8",
                        "--kv-cache-dtype", "int8", "The capital of France is")
    assert code == 0 and "Paris" in out


def test_info_reports_architecture_and_size(capsys, smollm2_gguf):
    code, out, _ = run_cli(capsys, "info", "--model", str(smollm2_gguf), "--dtype", "float32")
    assert code == 0
    assert "llama" in out and "134,515,008" in out


def test_unknown_model_is_one_line(capsys):
    code, _, err = run_cli(capsys, "generate", "--model", "no-such-model", "hi")
    assert_one_line_error(code, err, "no-such-model")


def test_over_long_prompt_is_one_line(capsys, smollm2_gguf):
    prompt = "hello " * 9000
    code, _, err = run_cli(capsys, "generate", "--model", str(smollm2_gguf), prompt)
    assert_one_line_error(code, err, "8192")


def test_invalid_sampling_parameter_is_one_line(capsys, smollm2_gguf):
    code, _, err = run_cli(capsys, "generate", "--model", str(smollm2_gguf), "--top-p", "0", "hi")
    assert_one_line_error(code, err, "top_p")


def test_corrupt_gguf_is_one_line(capsys, smollm2_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_gguf.read_bytes()[:1_000_000])
    code, _, err = run_cli(capsys, "info", "--model", str(broken))
    assert_one_line_error(code, err, "broken.gguf")


def test_unknown_architecture_folder_is_one_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}')
    code, _, err = run_cli(capsys, "info", "--model", str(tmp_path))
    assert_one_line_error(code, err, "mamba")


def test_serve_passes_the_kv_cache_dtype_to_its_engine():
    from tinylm.cli import build_parser
    from tinylm.server.cli import server_config

    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])
    assert server_config(args).engine.kv_cache_dtype == "int8"
    assert server_config(build_parser().parse_args(["serve"])).engine.kv_cache_dtype == "auto"


def _sampling_namespace(model, **flags):
    import argparse

    base = dict(model=model, max_tokens=8, temperature=None, top_p=None, top_k=None, min_p=None,
                repetition_penalty=None, presence_penalty=0.0, frequency_penalty=0.0, stop=None, seed=None,
                ignore_eos=False)
    return argparse.Namespace(**{**base, **flags})


def test_sampling_defaults_follow_the_model(tmp_path):
    """Flags not given take the model's recommendation (generation_config.json, or the built-in model's card, as
    vLLM reads them), else tinylm's own defaults; a flag given always wins."""
    from tinylm.cli import sampling_params

    builtin = sampling_params(_sampling_namespace(None))
    assert (builtin.temperature, builtin.top_p) == (0.2, 0.9)  # SmolLM2-135M-Instruct's card
    assert sampling_params(_sampling_namespace(None, temperature=0.0, top_p=1.0)).temperature == 0.0
    folder = tmp_path / "model"
    folder.mkdir()
    plain = sampling_params(_sampling_namespace(str(folder)))
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (0.6, 0.9, -1, 1.0)
    (folder / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.7, "top_k": 20, '
                                                   '"repetition_penalty": 1.05, "eos_token_id": 2}')
    given = sampling_params(_sampling_namespace(str(folder)))
    assert (given.temperature, given.top_p, given.top_k, given.repetition_penalty) == (0.7, 0.9, 20, 1.05)
    assert sampling_params(_sampling_namespace(str(folder), top_k=5)).top_k == 5
    (folder / "generation_config.json").write_text("{not json")
    assert sampling_params(_sampling_namespace(str(folder))).temperature == 0.6


# --- the chat REPL as llama.cpp and Ollama users expect it

class _CountingLLM:
    """Streams "one two three four" for every prompt; raises SIGINT in this process before the third word when
    `interrupt_at` says so, as Ctrl-C in a terminal would. Records each conversation it is given."""

    def __init__(self, interrupt_at: int | None = None):
        self.interrupt_at, self.conversations, self.closed = interrupt_at, [], 0

    def apply_chat_template(self, messages, **kwargs):
        self.conversations.append([dict(m) for m in messages])
        return [1, 2, 3]

    def stream(self, prompt, params):
        import os
        import signal
        from types import SimpleNamespace

        try:
            for i, word in enumerate(["one ", "two ", "three ", "four "]):
                if i == self.interrupt_at and len(self.conversations) == 1:
                    os.kill(os.getpid(), signal.SIGINT)
                yield SimpleNamespace(text=word)
        finally:
            self.closed += 1


def _run_repl(monkeypatch, capsys, llm, lines: str, history=None) -> tuple[int, str, str]:
    import io

    from tinylm.cli import _repl

    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = _repl(llm, history or [], None)
    out, err = capsys.readouterr()
    return code, out, err


def test_ctrl_c_stops_the_answer_and_keeps_what_was_said(monkeypatch, capsys):
    """The first answer is stopped after "three" and kept as the reply; the session goes on; the stream is closed
    (its request ended) rather than left to the garbage collector."""
    import signal

    llm = _CountingLLM(interrupt_at=2)
    before = signal.getsignal(signal.SIGINT)
    code, out, err = _run_repl(monkeypatch, capsys, llm, "Count.\nAgain.\n")
    assert code == 0 and "(stopped)" in err
    assert out.splitlines() == ["one two three ", "one two three four "]
    assert llm.conversations[1] == [{"role": "user", "content": "Count."},
                                    {"role": "assistant", "content": "one two three "},
                                    {"role": "user", "content": "Again."}]
    assert llm.closed == 2 and signal.getsignal(signal.SIGINT) is before  # Ctrl-C means Ctrl-C again


def test_ctrl_c_before_any_word_forgets_the_question(monkeypatch, capsys):
    llm = _CountingLLM(interrupt_at=0)
    code, out, _ = _run_repl(monkeypatch, capsys, llm, "Count.\nAgain.\n")
    assert code == 0 and out.splitlines()[0] == "one "  # the word already on its way is printed, then it stops
    assert llm.conversations[1][0] == {"role": "user", "content": "Count."}


def test_ctrl_c_or_ctrl_d_at_the_prompt_leaves_cleanly(monkeypatch, capsys):
    import builtins

    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", interrupted)
    assert _run_repl(monkeypatch, capsys, _CountingLLM(), "")[0] == 0
    monkeypatch.undo()
    assert _run_repl(monkeypatch, capsys, _CountingLLM(), "")[0] == 0  # end of input, as Ctrl-D


def test_repl_commands(monkeypatch, capsys):
    llm = _CountingLLM()
    system = [{"role": "system", "content": "Be brief."}]
    code, out, err = _run_repl(monkeypatch, capsys, llm, "/help\nHi\n/reset\n/x now\n/? \nBye\n/bye\nnot sent\n",
                               history=list(system))
    assert code == 0
    assert "/reset" in err and "/exit" in err and "Ctrl-C" in err  # /help and /? list the commands
    assert "history cleared" in err and "unknown command /x; /help lists the commands" in err
    assert llm.conversations == [system + [{"role": "user", "content": "Hi"}],
                                 system + [{"role": "user", "content": "Bye"}]]  # /reset kept the system prompt
    assert len(out.splitlines()) == 2  # only answers on stdout


def test_ctrl_c_in_a_real_chat_session(smollm2_gguf):
    """`tinylm chat` in a process of its own: SIGINT while it answers stops the answer, the next question is
    answered, end of input exits with 0."""
    import os
    import select
    import signal
    import time

    chat = subprocess.Popen([sys.executable, "-m", "tinylm.cli", "chat", "--model", str(smollm2_gguf),
                             "--temperature", "0", "--max-tokens", "400"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        chat.stdin.write(b"Write a very long story about a dragon who learns to bake bread.\n")
        chat.stdin.flush()
        printed, deadline = b"", time.monotonic() + 240
        while len(printed) < 40 and time.monotonic() < deadline:  # the answer has started
            if select.select([chat.stdout], [], [], 1.0)[0]:
                printed += os.read(chat.stdout.fileno(), 4096)
        assert len(printed) >= 40, "no answer started"
        chat.send_signal(signal.SIGINT)
        out, err = chat.communicate(b"/reset\nWhat is the capital of France?\n", timeout=240)
    finally:
        chat.kill()
    assert chat.returncode == 0, err.decode()
    assert b"(stopped)" in err and b"history cleared" in err and b"Traceback" not in err
    assert b"Paris" in out


def test_generate_reads_the_prompt_from_stdin(monkeypatch, capsys, smollm2_gguf):
    import io

    args = ["generate", "--model", str(smollm2_gguf), "--temperature", "0", "--max-tokens", "8"]
    given = run_cli(capsys, *args, "The capital of France is")
    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital of France is\n"))
    assert run_cli(capsys, *args, "-") == given  # the final newline of `echo ... |` is not part of the prompt


@pytest.mark.parametrize("command", ["generate", "chat", "info", "serve", "bench"])
def test_no_check_finite_reaches_the_loader(monkeypatch, command):
    """Every command that loads a model takes --no-check-finite and hands check_finite=False to tinylm.load."""
    import tinylm
    from tinylm.cli import build_parser, load_from_args

    seen = []
    monkeypatch.setattr(tinylm, "load", lambda *args, **kwargs: seen.append(kwargs))
    extra = ["hi"] if command == "generate" else []
    load_from_args(build_parser().parse_args([command, "--no-check-finite", *extra]))
    load_from_args(build_parser().parse_args([command, *extra]))
    assert seen[0]["check_finite"] is False
    assert seen[1].get("check_finite", True) is True
