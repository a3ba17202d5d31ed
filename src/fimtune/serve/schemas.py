"""Request and response bodies of the three API shapes editors speak (pydantic models).

- TGI (llm-vscode / llm-ls): ``POST /generate``, ``/generate_stream``, ``/``.
- OpenAI completions (Continue, ...): ``POST /v1/completions``, ``GET /v1/models``.
- llama.cpp (llama.vim, ...): ``POST /infill``.

Unknown fields are ignored (clients send many we do not use); known ones are type-checked
and range-checked here, and checked against the server's limits in :mod:`fimtune.serve.app`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# Defaults of the APIs themselves, when a request does not say.
TGI_DEFAULT_NEW_TOKENS = 100
OPENAI_DEFAULT_MAX_TOKENS = 16
OPENAI_DEFAULT_TEMPERATURE = 1.0
LLAMACPP_DEFAULT_TEMPERATURE = 0.8
LLAMACPP_DEFAULT_TOP_K = 40
LLAMACPP_DEFAULT_TOP_P = 0.95
MAX_PROMPTS = 16  # OpenAI `prompt` may be a list; at most this many per request
LLAMACPP_RANDOM_SEED = -1  # llama.cpp's `seed` that asks for a random one (its default)

# A sampling seed: the range torch's generators take (a seed outside it would fail the generation)
Seed = Annotated[int | None, Field(ge=-(2**63), le=2**64 - 1)]


class _Body(BaseModel):
    # JSON's NaN and Infinity (Python's json reads them) are no temperature or probability
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def unsupported(value: Any, info: ValidationInfo, neutral: dict[str, tuple[Any, ...]]) -> Any:
    """An option other servers honour and this one does not: sent with a value other than its neutral
    ones, a clear error (ignored, it would change nothing a client asked for)."""
    values = neutral[info.field_name]
    if value not in values:
        raise ValueError(f"not supported by this server: leave it out (or send {json.dumps(values[-1])})")
    return value


# ---- TGI -------------------------------------------------------------------------------


# Options of TGI and OpenAI this server does not have, each with its neutral values
TGI_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0),
    "frequency_penalty": (None, 0.0),
    "typical_p": (None, 1.0),
    "top_n_tokens": (None, 0),
    "best_of": (None, 1),  # GET /info says max_best_of 1, as TGI does where it has no more
    "decoder_input_details": (False,),
    "watermark": (False,),
    "grammar": (None,),
}
OPENAI_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None,),
    "best_of": (None, 1),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "logit_bias": (None, {}),
}


class TgiParameters(_Body):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    do_sample: bool = False
    return_full_text: bool | None = False
    stop: list[str] = Field(default_factory=list)
    seed: Seed = None
    truncate: int | None = Field(None, ge=1)
    details: bool = False
    adapter_id: str | None = None  # TGI's multi-LoRA field: one of GET /v1/models
    # TGI's, not supported: refused unless neutral
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    top_n_tokens: int | None = None
    best_of: int | None = None
    decoder_input_details: bool = False
    watermark: bool = False
    grammar: dict[str, Any] | None = None

    @field_validator(*TGI_UNSUPPORTED)
    @classmethod
    def _supported(cls, v: Any, info: ValidationInfo) -> Any:
        return unsupported(v, info, TGI_UNSUPPORTED)

    @field_validator("stop", mode="before")
    @classmethod
    def _no_null(cls, v: Any) -> Any:
        return [] if v is None else v

    def sampling(self) -> bool:
        """TGI samples when asked to, or when any sampling parameter differs from its neutral value."""
        return (
            self.do_sample
            or self.temperature not in (None, 1.0)
            or self.top_p not in (None, 1.0)
            or self.top_k not in (None, 0)
        )


class TgiRequest(_Body):
    inputs: str
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool = False

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, v: Any) -> Any:
        return {} if v is None else v


class TgiToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class TgiDetails(BaseModel):
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    seed: int | None = None


class TgiGenerateDetails(TgiDetails):
    """`/generate`'s details: those of a stream's last event, and the tokens."""

    prefill: list[TgiToken] = Field(default_factory=list)  # empty: `decoder_input_details` is not supported
    tokens: list[TgiToken]


class TgiResponse(BaseModel):
    generated_text: str
    details: TgiGenerateDetails | None = None


class TgiStreamEvent(BaseModel):
    index: int
    token: TgiToken
    generated_text: str | None = None
    details: TgiDetails | None = None


# ---- OpenAI ----------------------------------------------------------------------------


class CompletionRequest(_Body):
    model: str | None = None
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int | None = Field(None, ge=1)  # unsent: OPENAI_DEFAULT_MAX_TOKENS, within the server's limit
    temperature: float | None = Field(OPENAI_DEFAULT_TEMPERATURE, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0: off
    stop: str | list[str] | None = None
    stream: bool | None = False  # OpenAI's optional fields may be null: their defaults
    n: int | None = Field(1, ge=1, le=1)
    seed: Seed = None
    echo: bool | None = False
    # OpenAI's, not supported: refused unless neutral
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator(*OPENAI_UNSUPPORTED)
    @classmethod
    def _supported(cls, v: Any, info: ValidationInfo) -> Any:
        return unsupported(v, info, OPENAI_UNSUPPORTED)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not 1 <= len(v) <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CachedTokens(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "fimtune"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


# ---- llama.cpp -------------------------------------------------------------------------


class InfillExtra(_Body):
    filename: str = ""
    text: str = ""


class InfillRequest(_Body):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillExtra] = Field(default_factory=list)
    prompt: str = ""  # llama.vim: the current line up to the cursor, after input_prefix
    n_predict: int = Field(-1, ge=-1)  # -1: up to the server's max_new_tokens; 0: none (llama.vim's warm-ups)
    temperature: float = LLAMACPP_DEFAULT_TEMPERATURE  # <= 0: greedy
    top_k: int = LLAMACPP_DEFAULT_TOP_K
    top_p: float = Field(LLAMACPP_DEFAULT_TOP_P, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    seed: Seed = None  # -1: a random one (llama.cpp)
    model: str | None = None
    # the answer's fields to keep, `a/b` taking b out of a as the key "a/b" (llama.vim asks for
    # "timings/prompt_n", ...); a field the answer lacks is left out, as llama.cpp's server does
    response_fields: list[str] = Field(default_factory=list)


class InfillResponse(BaseModel):
    content: str
    stop: bool = True
    model: str
    stop_type: str  # "eos" | "word" (a stop string) | "limit"
    stopping_word: str = ""  # the stop string it ended at ("\n" for a single line's end), else ""
    truncated: bool = False  # fitting the prompt to max_input_tokens cut some of its text
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    timings: dict[str, int | float]
