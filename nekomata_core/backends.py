"""The names of every speed choice, one list each: read by `nekomata_core.accelerate` (which applies
them) and by the CLI (which offers them). No torch import, so `nekomata --help` stays instant."""

ATTENTION_CHOICES = ("auto", "triton", "sdpa", "eager")
OPS_CHOICES = ("auto", "triton", "eager")
STEP_MODES = ("auto", "native", "static", "compiled", "eager")
