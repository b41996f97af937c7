"""Time-series forecasting: the STanHop-Net family (OutEffHop paper, section 4.3) on ETT-shaped CSVs.

- `hopfield`  Hopfield retrieval (attention) with the paper's association variants
- `model`     STanHopNet, its config, and checkpoints (config.json + model.safetensors)
- `data`      CSV -> standard split -> train-fitted scaler -> sliding windows
- `metrics`   MSE / MAE, persistence and least-squares linear baselines, the paper's outlier summary
- `quant`     W8A8 (paper recipe) on the forecaster
- training: `outlier_probe.train.forecasting` (the forecasting task of the train package)
"""
