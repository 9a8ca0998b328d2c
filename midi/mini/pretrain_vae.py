"""Pretrains midi-mini's shape VAE (the project's TripoSGVAEModel at small widths) on procedural shapes.

    python -m midi.mini.pretrain_vae --output models/midi-mini/pretrain/vae-bce-sdf --steps 1400   # start
    python -m midi.mini.pretrain_vae --output models/midi-mini/pretrain/vae-bce-sdf --steps 1400 --resume

Objective: the decoder's output is a signed distance (positive inside, the decoder's and extraction's
sign) trained at near-surface and uniform query points by two terms: occupancy BCE on the logit
``output / bce_scale`` (the inside/outside sign: what extraction at level 0 needs) plus, as TripoSG's
VAE, L1 on the signed distance truncated at +-``truncation`` (in units of the truncation); plus
``kl_weight`` times the per-element KL to N(0, I), ramped up linearly over ``kl_warmup_steps``.
The first recipe (SDF L1 alone, KL 1e-2 from step 0, the posterior at its default std-1 start)
decoded 15-16 of 16 held-out shapes to no surface: its latent stayed nearly the prior (std ~0.8,
KL ~0.4 per element), too noisy to place a small scene-frame object, so the decoder learned a
field negative everywhere that only approaches 0 at the surface. See ``build_vae``.

Every random draw is a function of ``(seed, step)`` (the batch's shapes, the encoder's point subset
and FPS start, the posterior sample), so a checkpoint (model, optimizer, step, curves; written
atomically) resumes bit-exactly. The run ends by saving the VAE with ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from midi.data.atomic import atomic_write, commit_dir, make_tmp_dir, write_json, write_text

try:  # the package is being reorganised: extraction moved under midi.inference
    from midi.inference.extraction import ExtractionConfig, extract_coarse_to_fine
except ImportError:  # pragma: no cover - the layout before the move
    from midi.extraction import ExtractionConfig, extract_coarse_to_fine
from midi.data.meshes import DEFAULT_BOUND
from midi.data.shapes import Part, random_shape, sample_surface, shape_bounds, shape_field, transform_parts
from midi.data.synthetic import scene_parts
from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGVAEModel

CHECKPOINT = "checkpoint.pt"
EVAL_STREAM, TRAIN_STREAM = 1, 0  # disjoint RNG streams: held-out shapes are never trained on


@dataclass
class VAERecipe:
    """Everything that determines the run (saved with it; a resume must match)."""

    width_encoder: int = 64
    width_decoder: int = 96
    num_layers_encoder: int = 1
    num_layers_decoder: int = 2
    num_attention_heads: int = 4
    latent_channels: int = 8
    num_tokens: int = 128  # = the future DiT width: the pipeline takes num_tokens = transformer.config.width
    batch_size: int = 16
    surface_points: int = 1024  # encoder input per shape (needs >= 4 * num_tokens)
    near_points: int = 512  # surface + N(0, sigma^2), half at each of near_sigmas
    uniform_points: int = 512  # half in the cube, half in the shape's padded box
    near_sigmas: tuple[float, float] = (0.01, 0.04)
    truncation: float = 0.1
    bce_weight: float = 1.0  # occupancy BCE on output / bce_scale (0: the SDF L1 alone, the first recipe)
    bce_scale: float = 1.0  # output units per logit unit (the BCE's logit is output / bce_scale)
    sdf_scale: float = 0.1  # scene units per output unit (the output is a signed distance / sdf_scale): see recon_terms
    sdf_weight: float = 1.0
    kl_weight: float = 1e-3
    kl_warmup_steps: int = 500  # KL weight ramps linearly from 0 to kl_weight
    init_logvar: float = -6.0  # initial posterior log-variance (bias of quant's logvar half): see build_vae
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    steps: int = 3500
    seed: int = 0
    eval_every: int = 500
    eval_shapes: int = 16
    eval_depth: int = 7
    log_every: int = 50
    shapes: str = "domains"  # "domains": the objects of synthetic scenes of both domains; "general": random_shape
    init_from: str = ""  # a VAE folder (save_pretrained) to start from instead of the seeded init


def build_vae(r: VAERecipe) -> TripoSGVAEModel:
    if r.init_from:  # a warm start: the earlier run's weights, its posterior width included
        return TripoSGVAEModel.from_pretrained(r.init_from)
    return _seeded_vae(r)


def _seeded_vae(r: VAERecipe) -> TripoSGVAEModel:
    """The seeded VAE. Its posterior starts narrow (log-variance ``init_logvar``): at the default
    initialisation (std 1, the prior's) the sample's noise drowns the 8-channel latent, which then
    carries too little to place a small object in the scene frame, and the decoder settles on the
    all-outside field (measured: sign accuracy stuck at the outside fraction, 16/16 decoded empty)."""
    torch.manual_seed(r.seed)
    vae = TripoSGVAEModel(latent_channels=r.latent_channels, num_attention_heads=r.num_attention_heads,
                          width_encoder=r.width_encoder, width_decoder=r.width_decoder,
                          num_layers_encoder=r.num_layers_encoder, num_layers_decoder=r.num_layers_decoder)
    with torch.no_grad():
        vae.quant.bias[r.latent_channels:] += r.init_logvar  # quant outputs [mean | logvar]
    return vae


def scene_objects(rng: np.random.Generator, domain: str | None = None) -> list[list[Part]]:
    """The objects of one synthetic scene of ``domain`` (None: either, at random) as
    ``prepare_data.py --synthetic`` writes them: jointly normalised into [-0.95, 0.95]^3."""
    domain = domain or ("base" if rng.random() < 0.5 else "target")
    objects = [parts for _, parts in scene_parts(int(rng.integers(2**31)), domain)]
    lo, hi = shape_bounds([part for parts in objects for part in parts])
    scale = 2 * DEFAULT_BOUND / float((hi - lo).max())
    return [transform_parts(parts, -scale * (lo + hi) / 2, scale) for parts in objects]


def draw_objects(r: VAERecipe, rng: np.random.Generator, count: int) -> list[list[Part]]:
    """``count`` training objects of the recipe's distribution (``r.shapes``)."""
    if r.shapes == "general":
        return [random_shape(rng) for _ in range(count)]
    objects: list[list[Part]] = []
    while len(objects) < count:
        objects += scene_objects(rng)
    return objects[:count]


def shape_sample(r: VAERecipe, rng: np.random.Generator, parts: list[Part]) -> dict[str, np.ndarray]:
    """One shape's encoder input ``(P, 6)``, queries ``(Q, 3)`` and targets ``(Q,)`` (positive inside)."""
    pts, nrm = sample_surface(parts, r.surface_points, rng)
    near_src = pts[rng.integers(0, len(pts), r.near_points)]
    sigma = np.repeat(r.near_sigmas, [r.near_points // 2, r.near_points - r.near_points // 2])[:, None]
    near = near_src + sigma * rng.standard_normal((r.near_points, 3))
    lo, hi = pts.min(axis=0) - 0.1, pts.max(axis=0) + 0.1
    n_cube = r.uniform_points // 2
    uniform = np.concatenate([rng.uniform(-1.0, 1.0, (n_cube, 3)), rng.uniform(lo, hi, (r.uniform_points - n_cube, 3))])
    queries = np.concatenate([near, uniform])
    return {"surface": np.concatenate([pts, nrm], axis=1), "queries": queries,
            "target": shape_field(parts, queries), "parts": parts}


def make_batch(r: VAERecipe, step: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng([r.seed, TRAIN_STREAM, step])
    items = [shape_sample(r, rng, parts) for parts in draw_objects(r, rng, r.batch_size)]
    return {k: torch.from_numpy(np.stack([it[k] for it in items])).float() for k in ("surface", "queries", "target")}


def step_seed(r: VAERecipe, step: int) -> int:
    return (r.seed * 1_000_003 + step) % 2**31


def kl_weight_at(r: VAERecipe, step: int) -> float:
    """The KL weight at ``step``: linear from 0 to ``kl_weight`` over ``kl_warmup_steps``."""
    return r.kl_weight * min(1.0, (step + 1) / r.kl_warmup_steps) if r.kl_warmup_steps > 0 else r.kl_weight


def recon_terms(pred: torch.Tensor, sdf: torch.Tensor, r: VAERecipe) -> dict[str, torch.Tensor]:
    """The reconstruction terms of decoded values ``pred`` against signed distances ``sdf`` (positive inside)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(pred / r.bce_scale, (sdf > 0).to(pred.dtype))
    sdf_l1 = (pred * r.sdf_scale - sdf.clamp(-r.truncation, r.truncation)).abs().mean() / r.truncation
    return {"recon": r.bce_weight * bce + r.sdf_weight * sdf_l1, "bce": bce, "sdf_l1": sdf_l1}


def losses(vae: TripoSGVAEModel, r: VAERecipe, batch: dict[str, torch.Tensor], seed: int,
           step: int | None = None) -> dict[str, torch.Tensor]:
    """The objective on one batch; ``step`` sets the KL warm-up (None: the full KL weight)."""
    posterior = vae.encode(batch["surface"], num_tokens=r.num_tokens, seed=seed).latent_dist  # (B, T, C)
    z = posterior.sample(generator=torch.Generator().manual_seed(seed))
    pred = vae.decode(z, batch["queries"]).sample[..., 0]  # (B, Q), positive inside
    terms = recon_terms(pred, batch["target"], r)
    kl = posterior.kl().mean()
    kl_w = r.kl_weight if step is None else kl_weight_at(r, step)
    with torch.no_grad():
        inside = batch["target"] > 0
        sign_acc = ((pred > 0) == inside).float().mean()
    return {"loss": terms["recon"] + kl_w * kl, **terms, "kl": kl, "latent_std": posterior.mean.std(),
            "post_std": posterior.std.mean(), "sign_acc": sign_acc}


def lr_at(r: VAERecipe, step: int) -> float:
    """Linear warmup, then cosine from ``lr`` down to ``min_lr_ratio * lr``."""
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    t = min(1.0, (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps))
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def f_score(pred: np.ndarray, gt: np.ndarray, tau: float) -> float:
    """F-score of two point sets ``(N, 3)``, ``(M, 3)`` at distance ``tau`` (scene units)."""
    precision = (cKDTree(gt).query(pred)[0] < tau).mean()
    recall = (cKDTree(pred).query(gt)[0] < tau).mean()
    return float(2 * precision * recall / max(precision + recall, 1e-12))


def chamfer(pred: np.ndarray, gt: np.ndarray) -> float:
    """Symmetric mean nearest-neighbour distance (L1 Chamfer, scene units)."""
    return float((cKDTree(gt).query(pred)[0].mean() + cKDTree(pred).query(gt)[0].mean()) / 2)


@torch.no_grad()
def evaluate(vae: TripoSGVAEModel, r: VAERecipe, num_points: int = 10000) -> dict[str, float]:
    """Held-out reconstruction: mesh by the pipeline's coarse-to-fine extraction over the whole cube,
    F-score at 0.1 / 0.05 and Chamfer against analytic surface points, volume IoU from 65,536
    uniform points of the cube. Shapes that decode to no surface score 0 (and are counted)."""
    was_training = vae.training
    vae.eval()
    config = ExtractionConfig(method="coarse_to_fine", octree_depth=r.eval_depth, smooth=False, vertex_mapping="exact")
    rows = []
    for i in range(r.eval_shapes):
        rng = np.random.default_rng([r.seed, EVAL_STREAM, i])
        if r.shapes == "general":
            parts = random_shape(rng)
        else:  # alternate the domains, one object of a held-out scene each
            objects = scene_objects(rng, "base" if i % 2 == 0 else "target")
            parts = objects[int(rng.integers(len(objects)))]
        sample = shape_sample(r, rng, parts)
        gt, _ = sample_surface(sample["parts"], num_points, rng)
        surface = torch.from_numpy(sample["surface"]).float()[None]
        latent = vae.encode(surface, num_tokens=r.num_tokens, seed=i).latent_dist.mode()  # (1, T, C)
        probe = rng.uniform(-1.0, 1.0, (65536, 3))
        pred_in = vae.decode(latent, torch.from_numpy(probe).float()[None]).sample[0, :, 0].numpy() > 0
        gt_in = shape_field(sample["parts"], probe) > 0
        row = {"iou": float((pred_in & gt_in).sum() / max((pred_in | gt_in).sum(), 1))}
        mesh = extract_coarse_to_fine(vae, latent[0], config).mesh
        if mesh is None:
            row.update({"f@0.1": 0.0, "f@0.05": 0.0, "cd": float("nan"), "empty": 1.0})
        else:
            pred = np.asarray(mesh.sample(num_points, seed=i))
            row.update({"f@0.1": f_score(pred, gt, 0.1), "f@0.05": f_score(pred, gt, 0.05),
                        "cd": chamfer(pred, gt), "empty": 0.0})
        rows.append(row)
    vae.train(was_training)
    return {k: float(np.nanmean([row[k] for row in rows])) if k != "empty" else float(sum(row[k] for row in rows))
            for k in rows[0]}


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def train(r: VAERecipe, output: Path, final_dir: Path | None = None, resume: bool = False,
          checkpoint_minutes: float = 3.0, stop_after: int | None = None) -> TripoSGVAEModel:
    """Runs (or resumes) the recipe in ``output``; returns the VAE.

    Args:
        r: the recipe.
        output: run folder (checkpoint, ``curve.csv``, ``eval.csv``, ``recipe.json``, ``final.json``).
        final_dir: where ``save_pretrained`` puts the finished VAE (None: not saved).
        resume: continue from ``output/checkpoint.pt`` (its recipe must equal ``r``).
        checkpoint_minutes: wall time between checkpoints (also written at each evaluation and at the end).
        stop_after: write a checkpoint and return after this step count (tests, chunked runs).
    """
    output.mkdir(parents=True, exist_ok=True)
    vae = build_vae(r)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, curve, evals, elapsed, acc = 0, [], [], 0.0, []
    ckpt = output / CHECKPOINT
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["recipe"] != dataclasses.asdict(r) | {"near_sigmas": list(r.near_sigmas)}:
            raise ValueError(f"{ckpt} was written by a different recipe: {state['recipe']}")
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, curve, evals, elapsed = state["step"], state["curve"], state["evals"], state["elapsed"]
        acc = state.get("acc", [])  # the steps since the last curve row, so its mean is the uninterrupted one
        print(f"resumed at step {step} from {ckpt}", flush=True)
    elif ckpt.exists():
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or choose another --output")
    write_json(output / "recipe.json", dataclasses.asdict(r))

    def checkpoint() -> None:
        save_checkpoint(ckpt, {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                               "torch_rng": torch.get_rng_state(), "curve": curve, "evals": evals, "acc": acc,
                               "elapsed": elapsed, "recipe": dataclasses.asdict(r) | {"near_sigmas": list(r.near_sigmas)}})
        _write_csv(output / "curve.csv", curve)
        _write_csv(output / "eval.csv", evals)

    stop = {"now": False}  # SIGTERM: finish the step, checkpoint, exit (kill -9 falls back on the last one)
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    vae.train()
    last_ckpt, t0 = time.time(), time.time() - elapsed
    try:
        while step < r.steps and not stop["now"] and (stop_after is None or step < stop_after):
            for group in opt.param_groups:
                group["lr"] = lr_at(r, step)
            out = losses(vae, r, make_batch(r, step), step_seed(r, step), step)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), r.grad_clip)
            opt.step()
            step += 1
            acc.append({k: v.item() for k, v in out.items()} | {"grad_norm": grad_norm.item()})
            elapsed = time.time() - t0
            if step % r.log_every == 0 or step == r.steps:
                row = {"step": step, "seconds": round(elapsed, 1), "lr": lr_at(r, step - 1)}
                row |= {k: float(np.mean([a[k] for a in acc])) for k in acc[0]}
                curve.append(row)
                acc = []
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            if step % r.eval_every == 0 or step == r.steps:
                evals.append({"step": step, "seconds": round(elapsed, 1)} | evaluate(vae, r))
                print("eval", json.dumps(evals[-1]), flush=True)
                checkpoint()
                last_ckpt = time.time()
            elif time.time() - last_ckpt > 60 * checkpoint_minutes:
                checkpoint()
                last_ckpt = time.time()
        checkpoint()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if step >= r.steps and final_dir is not None:
        save_final(vae, r, output, final_dir, evals, elapsed)
    return vae


def save_final(vae: TripoSGVAEModel, r: VAERecipe, output: Path, final_dir: Path, evals: list[dict],
               elapsed: float) -> None:
    """``save_pretrained`` (safetensors) into a temporary folder renamed onto ``final_dir``."""
    tmp = make_tmp_dir(final_dir.parent, final_dir.name)
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is meant to be shared
    vae.save_pretrained(tmp, safe_serialization=True)
    commit_dir(tmp, final_dir)
    params = sum(p.numel() for p in vae.parameters())
    write_json(output / "final.json", {"steps": r.steps, "seconds": round(elapsed, 1), "parameters": params,
                                       "num_tokens": r.num_tokens, "eval": evals[-1] if evals else None,
                                       "saved_to": str(final_dir)})
    print(f"saved the VAE ({params} parameters) to {final_dir}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("models/midi-mini/pretrain/vae-bce-sdf"))
    parser.add_argument("--final_dir", type=Path, default=Path("models/midi-mini/vae"))
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --output")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--checkpoint_minutes", type=float, default=3.0)
    parser.add_argument("--stop_after", type=int, default=None, help="checkpoint and exit after this many steps")
    for f in dataclasses.fields(VAERecipe):
        if f.type in ("int", "float", "str"):
            parser.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type], default=f.default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = VAERecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(VAERecipe) if hasattr(args, f.name)})
    train(recipe, args.output, args.final_dir, args.resume, args.checkpoint_minutes, args.stop_after)


if __name__ == "__main__":
    main()
