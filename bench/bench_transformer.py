"""Transformers fxquant quantizes and torch.ao leaves in float: fp32 against fxquant's static and dynamic convert_fx.

    .venv/bin/python bench/bench_transformer.py                  # d_model 512, 8 heads, ff 2048, 4 layers, 128 tokens
    .venv/bin/python bench/bench_transformer.py --layers 2 --tokens 64 --rounds 15
    .venv/bin/python bench/bench_transformer.py --arch gpt2 --d-model 768 --heads 12 --ff 3072 --layers 2

``--arch encoder`` (default): nn.TransformerEncoder. torch.ao keeps nn.Transformer* modules whole (torch.nn leaves),
so its converted model runs them in float: the fp32 column is torch.ao's time too. fxquant traces into them and
quantizes their Linear layers. ``--arch gpt2``: GPT-2 blocks written as Hugging Face writes them, every projection a
``Conv1D`` (``torch.addmm(bias, x, weight)``), which no torch.ao pattern matches; fxquant rewrites them as linears.
Where torch.ao is installed its converted model is timed too. One thread, batch 1, medians of interleaved rounds,
random weights.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn

import fxquant


class Encoder(nn.Module):
    def __init__(self, d_model: int, heads: int, ff: int, layers: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, batch_first=True, dropout=0.1)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D: the weight stored (in, out), applied with torch.addmm."""

    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__()
        self.n_out = n_out
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.n_out,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2Block(nn.Module):
    def __init__(self, d_model: int, heads: int, ff: int, max_tokens: int = 1024) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.c_attn, self.attn_proj = Conv1D(3 * d_model, d_model), Conv1D(d_model, d_model)
        self.c_fc, self.mlp_proj = Conv1D(ff, d_model), Conv1D(d_model, ff)
        # a parameter, not a buffer as in Hugging Face: torch.fx then slices it symbolically, so torch.ao can trace
        # the block (it cannot trace Hugging Face's GPT-2; fxquant traces either on the example inputs)
        self.mask = nn.Parameter(torch.full((max_tokens, max_tokens), -1e4).triu(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.size(0), x.size(1), x.size(2)
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (d // self.heads) ** 0.5 + self.mask[:t, :t]
        attn = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn_proj(attn)
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, d_model: int, heads: int, ff: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(GPT2Block(d_model, heads, ff) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(self.blocks(x))


def _torchao_lib() -> Any:
    try:
        from torch.ao.quantization import get_default_qconfig_mapping, default_dynamic_qconfig, QConfigMapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError:
        return None
    return {"static": get_default_qconfig_mapping("x86"),
            "dynamic": QConfigMapping().set_global(default_dynamic_qconfig)}, prepare_fx, convert_fx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("encoder", "gpt2"), default="encoder")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ff", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    arch = Encoder if args.arch == "encoder" else GPT2
    model = arch(args.d_model, args.heads, args.ff, args.layers).eval()
    calib = [torch.randn(1, args.tokens, args.d_model) for _ in range(3)]
    converted = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (traced on the example inputs: nn.TransformerEncoder checks sizes)
        for name, mapping in (("static", fxquant.get_default_qconfig_mapping("x86")),
                              ("dynamic", fxquant.QConfigMapping().set_global(fxquant.default_dynamic_qconfig))):
            prepared = fxquant.prepare_fx(model, mapping, (calib[0],))
            with torch.no_grad():
                for x in calib:
                    prepared(x)
            converted[name] = fxquant.convert_fx(prepared)
        ao = _torchao_lib()
        failures = {}
        for name, mapping in (ao[0].items() if ao is not None and args.arch == "gpt2" else ()):
            try:
                prepared = ao[1](copy.deepcopy(model), mapping, (calib[0],))
                with torch.no_grad():
                    for x in calib:
                        prepared(x)
                converted[f"torch.ao {name}"] = ao[2](prepared)
            except Exception as err:  # noqa: BLE001  (a library failing on the model is a result)
                failures[f"torch.ao {name}"] = f"{type(err).__name__}: {str(err)[:100]}"
    models = {"fp32": model, **converted}
    x = torch.randn(1, args.tokens, args.d_model)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(args.rounds):
            for k, m in models.items():
                start = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - start)
        ref = model(x)
        sqnr = {k: float(10 * torch.log10(ref.pow(2).mean() / (ref - m(x)).pow(2).mean())) for k, m in converted.items()}
    fp32 = statistics.median(times["fp32"])
    print("| model | ms | vs fp32 | SQNR dB |\n|---|---:|---:|---:|")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"| {k} | {med * 1e3:.1f} | {fp32 / med:.2f}x | {sqnr.get(k, float('inf')):.1f} |")
    for k, why in failures.items():
        print(f"| {k} | fails: {why} | | |")


if __name__ == "__main__":
    main()
