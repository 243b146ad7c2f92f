"""Weight/activation quantization of linear layers: COMET's FMPQ (W4A4 / W4A8) and baselines.

Quick use::

    model, tok = lowbit.load_model("smollm2")
    calib = lowbit.wa.calibration_ids(ids_from_other_text, n=8, length=256, seed=0)
    lowbit.wa.quantize_model(model, "fmpq:w=4,a=4,block=128,int8_frac=0.1", calib=calib)
    lowbit.wa.save_quantized(model, "out/fmpq")
    model = lowbit.wa.load_quantized("out/fmpq", "smollm2")
    lowbit.wa.fuse_projections(model)  # serving: q/k/v and gate/up as one W4Ax GEMM each

See docs/FMPQ.md for the algorithm, the storage layout and measurements.
"""

from lowbit.wa.fuse import fuse_projections, unfuse_projections
from lowbit.wa.io import QuantizedCheckpointError, load_quantized, save_quantized
from lowbit.wa.linear import QuantLinear
from lowbit.wa.methods import WA_METHODS, WAConfig, parse_wa_spec, resolve_config
from lowbit.wa.model import (
    WAReport,
    calibration_ids,
    collect_channel_stats,
    fp16_nbytes,
    model_nbytes,
    quantize_model,
    select_linears,
    set_mode,
)

__all__ = [
    "WA_METHODS",
    "QuantLinear",
    "QuantizedCheckpointError",
    "WAConfig",
    "WAReport",
    "calibration_ids",
    "collect_channel_stats",
    "fp16_nbytes",
    "fuse_projections",
    "load_quantized",
    "model_nbytes",
    "parse_wa_spec",
    "quantize_model",
    "resolve_config",
    "save_quantized",
    "select_linears",
    "set_mode",
    "unfuse_projections",
]
