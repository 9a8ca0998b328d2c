"""Multi-instance attention: ours (one attention over a scene's concatenated tokens) vs upstream's
formulation (keys/values of the scene copied once per instance).

Forward + backward of TripoSG DiT blocks at the released width (2048, 16 heads) for one scene of
4 instances x 2048 latent tokens, every block with multi-instance self-attention. Each variant runs
in its own process so peak memory (max RSS over the process baseline) is not shared.

    python bench/bench_mi_attention.py                      # 1 block, 4 x 2048 tokens
    python bench/bench_mi_attention.py --num_layers 2 --repeats 3
    python bench/bench_mi_attention.py --device cuda        # on a GPU: peak CUDA memory

Prints per-variant seconds and peak MB, then the ratios replicate / ours.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class ReplicateKVProcessor:
    """Upstream's arithmetic: for each group of n rows, the concatenated K/V repeated n times."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_rotary_emb=None, num_instances=None, num_instances_per_batch=None):
        import torch
        import torch.nn.functional as F

        from midi.models.attention_processor import project_out, project_qkv

        q, k, v = project_qkv(attn, hidden_states, None)
        n = int(num_instances)
        outs = []
        for s in range(0, q.shape[0], n):
            kk = torch.cat(list(k[s:s + n]), dim=1)[None].repeat(n, 1, 1, 1)  # (n, H, n*T, D)
            vv = torch.cat(list(v[s:s + n]), dim=1)[None].repeat(n, 1, 1, 1)
            outs.append(F.scaled_dot_product_attention(q[s:s + n], kk, vv))
        return project_out(attn, torch.cat(outs), q.dtype)


def _peak_mb(device: str, baseline_kb: int) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from midi.loaders.custom_adapter import set_mi_attention
    from midi.models.transformers.triposg_transformer import TripoSGDiTModel

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = TripoSGDiTModel(num_layers=args.num_layers, width=args.width, num_attention_heads=args.heads).to(args.device, dtype)
    set_mi_attention(model, None)  # every block multi-instance
    if args.variant == "replicate":
        for name, module in model.named_modules():
            if name.endswith("attn1"):
                module.set_processor(ReplicateKVProcessor())
    model.requires_grad_(True)
    n, t = args.num_instances, args.tokens
    x = torch.randn(n, t, 64, device=args.device, dtype=dtype)
    e1 = torch.randn(n, 1, 768, device=args.device, dtype=dtype)
    e2 = torch.randn(n, 257, 1024, device=args.device, dtype=dtype)
    ts = torch.full((n,), 500.0, device=args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = model(x, ts, e1, e2, attention_kwargs={"num_instances": n}).sample
        out.float().square().mean().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return {"variant": args.variant, "seconds": min(times), "peak_mb": _peak_mb(args.device, baseline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_layers", type=int, default=1)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--num_instances", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--variant", choices=["ours", "replicate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("ours", "replicate"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
        print(f"{variant:>9}: {results[variant]['seconds']:.2f} s fwd+bwd, peak +{results[variant]['peak_mb']:.0f} MB")
    ours, rep = results["ours"], results["replicate"]
    print(f"setup: {args.num_layers} block(s), width {args.width}, {args.num_instances} instances x {args.tokens} tokens, "
          f"{args.dtype}, {args.device}")
    print(f"ratio replicate/ours: time {rep['seconds'] / ours['seconds']:.2f}x, peak memory {rep['peak_mb'] / max(ours['peak_mb'], 1):.2f}x")


if __name__ == "__main__":
    main()
