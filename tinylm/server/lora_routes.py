"""vLLM's runtime LoRA routes: POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter
{lora_name}. A loaded adapter is a model name on every route (and TGI's adapter_id) and is listed in /v1/models.

Loading reads a path on the server's disk that the request names, so these routes answer 403 unless the server
was started with --allow-runtime-lora (vLLM asks for VLLM_ALLOW_RUNTIME_LORA_UPDATING likewise). The change runs on
the engine thread between two steps: running requests never see a layer change under them.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from tinylm.server.errors import APIError
from tinylm.server.openapi import OpenAIError
from tinylm.server.protocol import FUNCTION_NAME, StrictRequest, documented

router = APIRouter()
FORBIDDEN = {403: {"model": OpenAIError, "description": "Runtime LoRA loading is off (--allow-runtime-lora)"}}


class LoadLoRARequest(StrictRequest):
    lora_name: str = documented(..., pattern=FUNCTION_NAME)
    lora_path: str = documented(..., minLength=1)


class UnloadLoRARequest(StrictRequest):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; the name decides


def _engine(request: Request):
    state = request.app.state.tinylm
    if not state.config.allow_runtime_lora:
        raise APIError(403, "loading and unloading LoRA adapters at runtime is off on this server (start it with "
                       "--allow-runtime-lora)", "PermissionDenied")
    return state


@router.post("/v1/load_lora_adapter", responses=FORBIDDEN)
async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> str:
    state = _engine(request)
    if body.lora_name == state.config.model_name:
        raise ValueError(f"`{body.lora_name}` is the served model's own name")
    engine = state.engine.engine
    await state.engine.call(engine.load_lora, body.lora_name, body.lora_path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", responses=FORBIDDEN)
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> str:
    state = _engine(request)
    engine = state.engine.engine
    await state.engine.call(engine.unload_lora, body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
