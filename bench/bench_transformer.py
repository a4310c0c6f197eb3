"""nn.TransformerEncoder: fp32 (torch's fused fast path) against fxquant's static and dynamic convert_fx.

    .venv/bin/python bench/bench_transformer.py                  # d_model 512, 8 heads, ff 2048, 4 layers, 128 tokens
    .venv/bin/python bench/bench_transformer.py --layers 2 --tokens 64 --rounds 15

torch.ao keeps nn.Transformer* modules whole (torch.nn leaves), so its converted model runs them in float: the fp32
column is torch.ao's time too. fxquant traces into them and quantizes their Linear layers. One thread, batch 1,
medians of interleaved rounds, random weights.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ff", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Encoder(args.d_model, args.heads, args.ff, args.layers).eval()
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


if __name__ == "__main__":
    main()
