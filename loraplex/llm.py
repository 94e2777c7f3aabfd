"""`LLM`: offline batch generation, the Python face of the engine."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from loraplex.cache import TINY_MODEL_DIRNAME
from loraplex.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine, RequestOutput
from loraplex.engine.sampling import SamplingParams
from loraplex.errors import LoraplexError, invalid
from loraplex.models.default_model import SERVED_NAME, default_model_dir
from loraplex.preflight import check_model_path

logger = logging.getLogger(__name__)

DEMO_MODEL_DIRNAME = TINY_MODEL_DIRNAME
DEMO_SERVED_NAME = "demo"
DEMO_ADAPTERS_DIR = Path(__file__).parent / "demo_adapters"  # trained for SmolLM2 by examples/train_demo_adapters.py
DEMO_ADAPTER_NAMES = ("pirate", "shout", "json")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    served_name: str  # what requests call the base model
    adapters: dict[str, Path]  # adapters that come with the model (the demo's)


def resolve_model(config: EngineConfig) -> ResolvedModel:
    """The checkpoint to serve: `config.model`, or else SmolLM2-135M-Instruct with the demo adapters
    (made once in the data dir), or else, when SmolLM2 cannot be had, the tiny random demo model."""
    if config.model is not None:
        check_model_path(config.model)
        path = Path(config.model).expanduser()
        name = path.resolve().stem if path.is_file() else path.resolve().name
        return ResolvedModel(path, config.served_model_name or name, {})
    data_dir = config.resolved_data_dir()
    try:
        path = default_model_dir(data_dir)
    except (RuntimeError, OSError, ValueError, ImportError, zipfile.BadZipFile) as e:
        logger.warning("SmolLM2-135M-Instruct is not available (%s); serving the tiny random demo model instead", e)
        return tiny_demo_model(config)
    adapters = {name: DEMO_ADAPTERS_DIR / name for name in DEMO_ADAPTER_NAMES if (DEMO_ADAPTERS_DIR / name).is_dir()}
    return ResolvedModel(path, config.served_model_name or SERVED_NAME, adapters)


def tiny_demo_model(config: EngineConfig) -> ResolvedModel:
    """The tiny random-weight Llama (made locally, no download): the fallback and the tests' model."""
    from loraplex.models.demo import DEMO_ADAPTERS, write_demo_model

    path = config.resolved_data_dir() / DEMO_MODEL_DIRNAME
    if not (path / "config.json").exists():
        logger.info("writing the tiny demo model to %s (once)", path)
        write_demo_model(path)
    adapters = {name: path / "adapters" / name for name in DEMO_ADAPTERS}
    return ResolvedModel(path, config.served_model_name or DEMO_SERVED_NAME, adapters)


class LLM:
    """Generate completions for many prompts at once::

        llm = LLM(model="/models/Llama-3.2-1B", dtype="float32")
        outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    """

    def __init__(self, model: str | None = None, adapters: dict[str, str] | None = None, **engine_options) -> None:
        config = EngineConfig.from_options(model=model, **engine_options)
        resolved = resolve_model(config)
        self.engine = LLMEngine(config, resolved.path)
        self.tokenizer = self.engine.tokenizer
        self.served_model_name = resolved.served_name
        if config.max_loras > 0:
            for name, path in {**resolved.adapters, **(adapters or {})}.items():
                self.engine.add_adapter(name, path)
        elif adapters:
            raise invalid("adapters", "given, but max_loras is 0; allow at least one adapter slot")

    def chat(
        self,
        conversations: list[dict[str, str]] | Sequence[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        adapter: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Like `generate`, for conversations ([{"role", "content"}, ...]) rendered by the model's chat
        template with the assistant's turn opened."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)
                   for messages in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, adapter=adapter)

    def resolve_adapter(self, name: str | None) -> str | None:
        """A request's model name -> adapter name; the base model's own name (or None) -> None."""
        return None if name in (None, self.served_model_name) else name

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        adapter: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """All prompts run concurrently through the engine; outputs come back in prompt order.
        `adapter` names one adapter for every prompt, or one per prompt (None = the base model)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise invalid("sampling_params", f"{len(params)} given for {len(prompts)} prompts")
        adapters = [adapter] * len(prompts) if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(adapters) != len(prompts):
            raise invalid("adapter", f"{len(adapters)} given for {len(prompts)} prompts")
        ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for index, (prompt, sp, name) in enumerate(zip(prompts, params, adapters, strict=True)):
                try:
                    ids.append(self.engine.add_request(prompt, sp, adapter=name))
                except LoraplexError as e:
                    raise LoraplexError(e.field, f"{e.message} (prompt {index})", e.kind, e.code) from None
            with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step(finished_only=True):
                        if out.finished:
                            finished[out.request_id] = out
                            bar.update(1)
        finally:
            for request_id in ids:  # after an error, nothing of this call stays queued
                if request_id not in finished:
                    self.engine.abort_request(request_id)
        return [finished[i] for i in ids]
