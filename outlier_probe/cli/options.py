"""Options shared by the commands that load a checkpoint and read data (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from outlier_probe.config import AttentionVariant, DataConfig, Device, DType, LoadConfig, Placement
from outlier_probe.evaluation import MetricName
from outlier_probe.quant.quantizer import Estimator

Checkpoint = Annotated[str, typer.Argument(help="Checkpoint: a Hugging Face folder, a .gguf file, a hub id, or `minilm` (the built-in all-MiniLM-L6-v2).")]
DataPath = Annotated[Optional[Path], typer.Option("--data", help="Text file, folder of text files (see --include), or image folder. Default: built-in English text.")]
Dataset = Annotated[Optional[str], typer.Option("--dataset", help="Hugging Face dataset NAME[:CONFIG[:SPLIT]] (needs `datasets` and network).")]
Include = Annotated[str, typer.Option("--include-files", help="Glob(s) for files inside a --data folder, comma-separated (searched recursively, following links).")]
Samples = Annotated[int, typer.Option("--samples", help="Number of sequences (or images) to evaluate.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for sampling sequences and masks.")]
Dtype = Annotated[DType, typer.Option("--dtype", help="Model dtype.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="cpu, cuda, or auto.")]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the checkpoint's own Python code to run (off by default).")]
Attention = Annotated[Optional[AttentionVariant], typer.Option("--attention", help="Override the attention variant (default: what the checkpoint records, else softmax).")]
Tokenizer = Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer folder or hub id when the checkpoint has none.")]
DeviceMap = Annotated[Optional[str], typer.Option("--device-map", help="accelerate placement: auto (GPUs, then CPU, then disk, within --max-memory), cpu or cuda. Default: the whole model on --device.")]
MaxMemory = Annotated[Optional[str], typer.Option("--max-memory", help="Memory budget per device with --device-map auto, e.g. 20GiB (each device) or cpu=8GiB,0=20GiB; weights beyond it are offloaded to disk.")]
OffloadFolder = Annotated[Optional[Path], typer.Option("--offload-folder", help="Folder for offloaded weights (default: a temporary folder, removed at exit).")]
Out = Annotated[Optional[Path], typer.Option("--out", help="Report folder (default: reports/<model-name>/).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No tables or progress on the terminal.")]
Json = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout (implies --quiet).")]

# quantization recipe (quantize, compare)
Bits = Annotated[Optional[int], typer.Option("--bits", help="Bit width of weights and activations (2-16).")]
WBits = Annotated[Optional[int], typer.Option("--w-bits", help="Weight bits (overrides --bits).")]
ABits = Annotated[Optional[int], typer.Option("--a-bits", help="Activation bits (overrides --bits).")]
PerChannel = Annotated[bool, typer.Option("--per-channel", help="Weights per output channel instead of per tensor.")]
WEstimator = Annotated[Optional[Estimator], typer.Option("--w-estimator", help="Weight range estimator.")]
AEstimator = Annotated[Optional[Estimator], typer.Option("--a-estimator", help="Activation range estimator.")]
Percentile = Annotated[float, typer.Option("--percentile", help="Upper percentile for the percentile estimator.")]
CalibBatches = Annotated[Optional[int], typer.Option("--calib-batches", help="Calibration batches, taken after the evaluation sequences (default: 4, but no more than the batches evaluated).")]
KeepFloatOpt = Annotated[Optional[list[str]], typer.Option("--keep-float", help="Leave these quantization points in float: a plan.json from `sensitivity`, or comma-separated fnmatch patterns on module / point names (repeatable).")]
Metric = Annotated[Optional[MetricName], typer.Option("--metric", help="Metric to require (default: the model's natural one).")]


def load_config(checkpoint: str, dtype: DType, device: Device, trust_remote_code: bool,
                attention: AttentionVariant | None, tokenizer: str | None, device_map: str | None = None,
                max_memory: str | None = None, offload_folder: Path | None = None) -> LoadConfig:
    from outlier_probe.offload import from_pretrained_kwargs

    from_pretrained_kwargs(device_map, max_memory, offload_folder)  # bad combinations fail before any work
    return LoadConfig(source=checkpoint, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                      attention=attention, tokenizer=tokenizer, device_map=device_map, max_memory=max_memory,
                      offload_folder=offload_folder)


def placement(device_map: str | None, max_memory: str | None, offload_folder: Path | None,
              dtype: DType | None = None) -> Placement:
    """The --device-map / --max-memory / --offload-folder (/ --dtype) options of a command that builds its own loads."""
    return Placement(device_map, max_memory, offload_folder, dtype)


def data_config(data: Path | None, dataset: str | None, include: str, samples: int, seq_len: int,
                batch_size: int, seed: int, offset: int = 0) -> DataConfig:
    return DataConfig(path=data, dataset=dataset, include=include, samples=samples, seq_len=seq_len,
                      batch_size=batch_size, seed=seed, offset=offset)


def default_out(checkpoint: str, out: Path | None, suffix: str = "") -> Path:
    from outlier_probe.loading import model_name

    if out is not None:
        return out
    return Path("reports") / (model_name(checkpoint) + suffix)

# post-training mitigations (quantize, compare --mitigations)
SmoothQuant = Annotated[Optional[str], typer.Option("--smoothquant", help="SmoothQuant migration strength alpha in [0, 1], or a comma-separated sweep (0.3,0.5,0.7,0.85): one run each.")]
Rotate = Annotated[Optional[str], typer.Option("--rotate", help="hadamard: QuaRot-style rotation of the residual stream fused into the weights (llama family), plus an online rotation before each down projection.")]
ScoreTransformed = Annotated[bool, typer.Option("--score-transformed", help="Also score each SmoothQuant / rotated float model on the evaluation data (one more float pass per run; transform_error, on one calibration sequence, is always measured).")]
ActScales = Annotated[Optional[Path], typer.Option("--act-scales", help="SmoothQuant input maxima from an earlier --smoothquant run (its act_scales.safetensors or report folder): skips their float pass over the calibration batches.")]
AGranularityOpt = Annotated[Optional[str], typer.Option("--a-granularity", help="per-token: also run dynamic per-token activation scales (per-tensor static is the plain run).")]


def mitigations_from_options(smoothquant: str | None, rotate: str | None, a_granularity: str | None) -> tuple:
    """--smoothquant / --rotate / --a-granularity -> one Mitigation per requested run (plain W8A8 always runs)."""
    from outlier_probe.errors import UsageError
    from outlier_probe.quant.mitigations.apply import AGranularity, Mitigation, Rotation

    out = []
    for part in (smoothquant or "").split(","):
        if not part.strip():
            continue
        try:
            alpha = float(part)
        except ValueError:
            raise UsageError(f"--smoothquant takes numbers in [0, 1] (e.g. 0.5 or 0.3,0.5), got {part.strip()!r}") from None
        out.append(Mitigation(smoothquant=alpha))
    if smoothquant is not None and not out:
        raise UsageError("--smoothquant is empty; give alpha values in [0, 1], e.g. 0.5")
    if rotate is not None:
        try:
            out.append(Mitigation(rotate=Rotation(rotate)))
        except ValueError:
            raise UsageError(f"unknown --rotate {rotate!r}; choose from {', '.join(r.value for r in Rotation)}") from None
    for part in (a_granularity or "").split(","):
        try:
            gran = AGranularity(part.strip()) if part.strip() else None
        except ValueError:
            raise UsageError(f"unknown --a-granularity {part.strip()!r}; choose from "
                             f"{', '.join(g.value for g in AGranularity)}") from None
        if gran is AGranularity.per_token:
            out.append(Mitigation(a_granularity=gran))
    return tuple(dict.fromkeys(out))
