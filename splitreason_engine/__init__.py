"""splitreason-engine: a small and a big model in one process, on one shared paged KV pool."""

import logging

from .engine import Engine
from .engine_config import EngineConfig
from .step_loop import EngineBroken
from .outputs import RequestMetrics, RequestOutput, StreamEvent
from .sampling import SamplingParams

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["Engine", "EngineBroken", "EngineConfig", "RequestMetrics", "RequestOutput", "SamplingParams", "StreamEvent"]
__version__ = "0.1.0"
