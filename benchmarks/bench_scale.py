"""Scale benchmarks (run through bench.py): big checkpoints with and without offload, GGUF quantize.

offload   random OPT-1.3B-shaped checkpoint, `stats` alone vs `--device-map auto --max-memory 3GiB`:
          peak RSS (VmHWM) of each, wall-time ratio, same stats.csv to 1e-6   target peak <= 4.5 GB capped
gguf      `quantize` of a random Llama-shaped GGUF (SmolLM-135M's shape, written with the `gguf` package)
          broken down: load + dequantize, float eval (+ site observers), quantized copy, calibration,
          quantized eval; whole command / (load + 3 float evaluations)         target <= 1.5x
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ offload

_RSS_CHILD = """
import json, resource, sys, time
from outlier_probe.cli.main import main
sys.argv = ["outlier-probe", *sys.argv[1:]]
t0 = time.perf_counter()
try:
    main()
except SystemExit as e:
    code = e.code
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gb": int(hwm.split()[1]) / 1024**2}))
"""


def _child(args: list[str], timeout: int = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, *args], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [l for l in out.stdout.strip().splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def write_random_checkpoint(folder: Path, config, shard_bytes: int = 1 << 30, seed: int = 0) -> Path:
    """A random checkpoint of `config`'s shape written shard by shard (never the whole model in memory)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    tied = getattr(config, "tie_word_embeddings", False)
    gen = torch.Generator().manual_seed(seed)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in current})
            current, size = {}, 0

    for key, param in meta.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        if key.endswith(("layer_norm.weight", "layernorm.weight", "norm.weight")):
            tensor = torch.ones(param.shape)
        elif key.endswith("bias"):
            tensor = torch.zeros(param.shape)
        else:
            tensor = torch.randn(param.shape, generator=gen) * 0.02
        current[key] = tensor
        size += tensor.numel() * 4
        if size >= shard_bytes:
            flush()
    flush()
    total = sum(p.numel() * 4 for k, p in meta.state_dict().items() if not (tied and k == "lm_head.weight"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(str(folder))
    return folder


def _tokenizer(vocab: int = 4096):
    from outlier_probe.data import builtin_text
    from outlier_probe.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer([builtin_text()[0]], vocab_size=vocab)


def bench_offload() -> None:
    from outlier_probe.models import Arch, Shape, build_config

    cfg = build_config(Arch.opt, Shape(24, 2048, 32), vocab_size=50272, max_positions=2048)  # OPT-1.3B's shape
    samples = os.environ.get("BENCH_OFFLOAD_SAMPLES", "8")
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as tmp:
        t0 = time.perf_counter()
        ckpt = write_random_checkpoint(Path(tmp) / "opt-1.3b-random", cfg)
        _tokenizer().save_pretrained(str(ckpt))
        params = sum(1 for _ in ())  # noqa: F841
        print(f"offload   wrote a random OPT-1.3B-shaped checkpoint ({sum(f.stat().st_size for f in ckpt.glob('*.safetensors')) / 1e9:.2f} GB "
              f"float32) in {time.perf_counter() - t0:.0f} s")
        common = ["stats", str(ckpt), "--samples", samples, "--seq-len", "128", "--batch-size", "4", "--no-plots", "-q"]
        runs = {}
        for label, extra in (("whole model", []), ("--max-memory 3GiB", ["--device-map", "auto", "--max-memory", "3GiB"])):
            out = Path(tmp) / label.replace(" ", "_")
            runs[label] = {**_child([*common, "--out", str(out), *extra]), "csv": out / "stats.csv"}
            r = runs[label]
            print(f"offload   {label:18s} peak RSS {r['peak_rss_gb']:.2f} GB, wall {r['wall_s']:.0f} s (exit {r['code']})")
        import pandas as pd

        a, b = (pd.read_csv(runs[k]["csv"]) for k in runs)
        num = a.select_dtypes("number").columns
        rel = ((a[num] - b[num]).abs() / a[num].abs().clip(lower=1e-300)).max().max()
        plain, capped = runs["whole model"], runs["--max-memory 3GiB"]
        print(f"offload   capped / whole: wall {capped['wall_s'] / plain['wall_s']:.2f}x, peak {capped['peak_rss_gb']:.2f} GB "
              f"(target <= 4.5 GB) vs {plain['peak_rss_gb']:.2f} GB; stats.csv max relative difference {rel:.1e} (target <= 1e-6)")


# --------------------------------------------------------------------------------------------- gguf


def write_llama_gguf(path: Path, tokenizer, *, layers: int = 30, hidden: int = 576, heads: int = 9, kv_heads: int = 3,
                     ffn: int = 1536, vocab: int = 49152, seed: int = 0) -> int:
    """A random Llama GGUF (float32 tensors) with SmolLM-135M's shape, token list padded to `vocab`; -> parameters."""
    import gguf

    gen = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("random-llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [""] * len(spec["model"]["vocab"])
    for token, idx in spec["model"]["vocab"].items():
        tokens[idx] = token
    tokens += [f"<unused{i}>" for i in range(vocab - len(tokens))]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    head_dim = hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (heads * head_dim, hidden), f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden), f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden), f"blk.{i}.ffn_down.weight": (hidden, ffn),
        })
    params = 0
    for name, shape in shapes.items():
        array = np.ones(shape, np.float32) if name.endswith("norm.weight") else (gen.standard_normal(shape, np.float32) * 0.02)
        writer.add_tensor(name, array)
        params += array.size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return params


def _phases(gguf_path: Path, samples: int = 8) -> dict[str, float]:
    """quantize's phases, each timed in CPU seconds, on the library calls run_quantize makes (plus 2 plain
    float evals for the baseline), in this process: imports, load, float eval with the site observers,
    quantized copy, calibration (backbone only), quantized eval with the SQNR meter, reports. Run it in a
    fresh process (`python bench_scale.py phases PATH`): imports and the first load are then what a
    command pays."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # since the process started: its imports included
        return usage.ru_utime + usage.ru_stime

    t: dict[str, float] = {}
    clock = 0.0

    def lap(name: str) -> None:
        nonlocal clock
        now = cpu()
        t[name] = t.get(name, 0.0) + now - clock
        clock = now

    import math

    from outlier_probe.cli import quantize as _cli  # noqa: F401 - what the command imports
    from outlier_probe.config import DataConfig, LoadConfig, ObserverConfig
    from outlier_probe.data import batches_for_model
    from outlier_probe.evaluation import Evaluator
    from outlier_probe.loading import load_model
    from outlier_probe.quant.recipes import QuantConfig, default_calib_batches, quantize_model
    from outlier_probe.quant.calibration import calibrate, calibration_config
    from outlier_probe.quant.sqnr import SQNRMeter, stats_sites
    from outlier_probe.stats.hooks import observe
    from outlier_probe.stats.observer import OutlierObserver

    lap("python start + imports")
    loaded = load_model(LoadConfig(source=str(gguf_path)))
    lap("load + dequantize")
    data = DataConfig(samples=samples, seq_len=128, batch_size=8)
    batches = batches_for_model(loaded.processor, loaded.info, data)
    evaluator = Evaluator(loaded.info.task, batches.batches, loaded.processor, 0)
    lap("data")
    for i in range(3):
        score = evaluator(loaded.model)
        lap(f"float eval {i + 1}")
    assert math.isfinite(score.value)
    recipe = QuantConfig(calib_batches=default_calib_batches(data.samples, data.batch_size))  # as the command resolves it
    calib = batches_for_model(loaded.processor, loaded.info, calibration_config(data, recipe))
    qmodel, qsites = quantize_model(loaded.model, recipe)
    lap("quantized copy")
    sites = stats_sites(loaded.model, qsites)
    with observe(sites, lambda _s: OutlierObserver(ObserverConfig()), root=loaded.model) as observers:
        evaluator(loaded.model)
    [observers[s.name].result() for s in sites]
    lap(f"float eval + {len(sites)} site observers")
    calibrate(qmodel, calib)
    lap(f"calibration ({len(calib.batches)} batches)")
    with SQNRMeter(qsites):
        evaluator(qmodel)
    lap("quantized eval + SQNR")
    return t


def bench_gguf(rounds: int = 2) -> None:
    """Phases (each round a fresh process; best of `rounds` per phase), then the whole command at the default
    calibration (8 sequences evaluated in batches of 8: one calibration batch, calibration tokens = evaluated
    tokens) and at --calib-batches 4 (the papers' 4 batches, 4x the evaluated tokens), each best of `rounds`,
    against (load + 3 float evals), load taken in a fresh process as a command pays it."""
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        path = Path(tmp) / "random-llama-135m.gguf"
        params = write_llama_gguf(path, _tokenizer())
        print(f"gguf      wrote {path.name}: {params / 1e6:.0f}M parameters, float32, {path.stat().st_size / 1e9:.2f} GB")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        runs = []
        for _ in range(rounds):
            out = subprocess.run([sys.executable, __file__, "phases", str(path)], capture_output=True, text=True, env=env,
                                 timeout=900)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"phases child failed: {out.stderr[-2000:]}")
            runs.append(json.loads(lines[-1]))
        phases = {name: min(r[name] for r in runs) for name in runs[0]}
        for name, sec in phases.items():
            print(f"gguf        {name:36s} {sec:6.1f} s CPU")
        evals = sum(v for k, v in phases.items() if k.startswith("float eval ") and k[-1].isdigit())
        base = phases["load + dequantize"] + evals
        with_imports = base + phases["python start + imports"]
        command = ["quantize", str(path), "--samples", "8", "--seq-len", "128", "--batch-size", "8", "-q"]
        for calib in ([], ["--calib-batches", "4"]):
            whole = min((_child([*command, *calib, "--out", str(Path(tmp) / f"report-{len(calib)}-{i}")])
                         for i in range(rounds)), key=lambda w: w["cpu_s"])
            label = "--calib-batches 4" if calib else "default (1 calibration batch)"
            print(f"gguf      quantize {label}: {whole['cpu_s']:.1f} s CPU, {whole['wall_s']:.1f} s wall (exit {whole['code']}, "
                  f"peak RSS {whole['peak_rss_gb']:.2f} GB) / (load + 3 float evals = {base:.1f} s CPU): "
                  f"{whole['cpu_s'] / base:.2f}x  (target <= 1.5x); / (the same + python start and imports = "
                  f"{with_imports:.1f} s): {whole['cpu_s'] / with_imports:.2f}x")


if __name__ == "__main__" and sys.argv[1:2] == ["phases"]:  # threads as the command gets them (OMP_NUM_THREADS)
    print(json.dumps(_phases(Path(sys.argv[2]))))
