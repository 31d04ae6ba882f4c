"""kvshrink.eval: lm-evaluation-harness runs (standard tasks and an offline suite), comparisons, KV measurements.

Heavy libraries (lm-eval, transformers, matplotlib) are imported inside the functions that use them.
"""

from kvshrink.eval.compare import compare_results
from kvshrink.eval.kv import measure_kv
from kvshrink.eval.offline_suite import OFFLINE_TASKS, build_offline_suite
from kvshrink.eval.options import EvalOptions
from kvshrink.eval.run import run_eval

__all__ = ["OFFLINE_TASKS", "EvalOptions", "build_offline_suite", "compare_results", "measure_kv", "run_eval"]
