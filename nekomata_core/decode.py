"""Old names of the step functions, kept for code written against them.

In this project "decode" means tokens → text (the tokenizer); the functions that produce the next
token's logits are *steps* and live in `nekomata_core.accelerate`: `make_decoder` is
`accelerate.make_step`, `StaticDecoder` is `StaticStep`, `NativeDecoder` is `NativeStep`.
"""

from .accelerate import NativeStep as NativeDecoder
from .accelerate import StaticStep as StaticDecoder
from .accelerate import StepStateError as DecodeStateError
from .accelerate import StepUnavailableError as DecodeUnavailableError
from .accelerate import make_step as make_decoder
from .accelerate import native_step_problem as native_decode_problem

__all__ = [
    "DecodeStateError",
    "DecodeUnavailableError",
    "NativeDecoder",
    "StaticDecoder",
    "make_decoder",
    "native_decode_problem",
]
