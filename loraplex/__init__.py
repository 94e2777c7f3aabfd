"""loraplex: one frozen base model, many adapters, one batch."""

from loraplex.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine, RequestOutput
from loraplex.engine.sampling import SamplingParams
from loraplex.llm import LLM

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
