"""The names of every speed choice, one list each: read by `accelerate` and `quantize` (which apply them),
`kernels.dispatch` (which resolves the attention names) and the CLI (which offers them). No imports, so
`nekomata --help` stays instant and the kernels may read it without knowing the library."""

ATTENTION_CHOICES = ("auto", "triton", "sdpa", "eager")
OPS_CHOICES = ("auto", "triton", "eager")
STEP_MODES = ("auto", "native", "static", "compiled", "eager")
QUANTIZE_CHOICES = ("int8", "int4")  # weight-only formats (nekomata_core.quantize)
