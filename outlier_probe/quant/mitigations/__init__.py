"""Post-training mitigations: function-preserving weight transforms (smoothing, rotation) applied to a
copy of the float model before it is quantized, and per-token activation scales (quant/recipes)."""
