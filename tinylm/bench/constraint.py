"""`tinylm bench --json-schema`: the cost of structured outputs, timed as constrained twins of tinylm and llama.cpp
("tinylm+json", "llama.cpp+json") beside the unconstrained systems of the same run.

The built-in schema ("records") asks for a long array of small objects (integers in a range, short strings, numbers,
an enum), so the constraint holds for all of --new-tokens (the grammar never ends the reply early) and the masks
go through keys, strings and numbers, as an extraction pipeline's do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

RECORDS = {"type": "array", "minItems": 200, "maxItems": 200, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "score", "kind"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                   "name": {"type": "string", "maxLength": 12},
                   "score": {"type": "number"},
                   "kind": {"enum": ["alpha", "beta", "gamma"]}}}}
SCHEMAS = {"records": RECORDS}


def load_schema(name_or_path: str) -> dict:
    """A built-in schema by name, or a JSON schema file."""
    if name_or_path in SCHEMAS:
        return SCHEMAS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"--json-schema: {name_or_path!r} is neither a built-in schema ({', '.join(SCHEMAS)}) nor a "
                         "file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--json-schema: {path} is not JSON: {exc}") from None


def compile_seconds(llm, schema: dict) -> float:
    """Time to compile the schema against the model's tokenizer (the tokenizer's own setup excluded), cold."""
    from tinylm.engine.structured import GrammarCompiler
    from tinylm.sampling_params import StructuredOutputsParams

    compiler = GrammarCompiler(llm.tokenizer, llm.config.vocab_size, llm.eos_token_ids)
    compiler.llg_tokenizer  # noqa: B018  (built once per engine, not per schema)
    start = time.perf_counter()
    compiler.compile(StructuredOutputsParams(json=schema))
    return time.perf_counter() - start


def llama_cpp_grammar(schema: dict):
    """llama.cpp's GBNF grammar for the schema (llama-cpp-python's converter)."""
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
