"""The whole `clip-prune prune` pipeline at ViT-B/16 size (random weights), with its stage timings.

    python benchmarks/bench_pipeline.py                      # 64 calibration images, constraint 0.5
    python benchmarks/bench_pipeline.py --samples 128 --constraint 0.75

Builds a CLIPModel with openai/clip-vit-base-patch16's shapes (random weights: timings and
memory do not depend on the values), a synthetic COCO-format folder at 224 px (`--image-size`), runs the real
CLI on them, and prints the per-stage seconds of `report.json` next to one dense forward pass
over the same calibration images, timed in this process.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from clip_prune.data.synthetic import caption_vocabulary, write_synthetic_coco
from clip_prune.data.tokenizer import build_word_tokenizer
from clip_prune.lightning.cli import main as clip_prune


def save_vit_b16_clip(path: Path, image_size: int = 224, layers: int = 12) -> None:
    """A random CLIP with ViT-B/16's vision tower and CLIP's text tower, saved like a Hub checkpoint (`image_size`
    below 224: the same layers on fewer tokens; fewer `layers` in both towers: for a quick try)."""
    tokenizer = build_word_tokenizer(caption_vocabulary(), max_length=77)
    text = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "num_hidden_layers": layers,
            "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"image_size": image_size, "patch_size": 16, "num_hidden_layers": layers}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)


@torch.inference_mode()
def dense_forward_seconds(model_dir: Path, samples: int, batch_size: int) -> float:
    model = CLIPModel.from_pretrained(model_dir).eval()
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch_size, 3, size, size)
    model.vision_model(pixel_values=pixels)  # warm-up
    start = time.perf_counter()
    for _ in range(0, samples, batch_size):
        model.vision_model(pixel_values=pixels)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="calibration images (Fisher and rescaling)")
    parser.add_argument("--eval-images", type=int, default=32, help="evaluation images (5 captions each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--constraint", type=float, default=0.5)
    parser.add_argument("--image-size", type=int, default=224, help="ViT-B/16 input size (smaller: a quick try)")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (ViT-B/16: 12; fewer: a quick try)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        save_vit_b16_clip(root / "model", image_size=args.image_size, layers=args.layers)
        write_synthetic_coco(root / "data", num_train=args.samples, num_val=args.eval_images,
                             image_size=args.image_size)
        start = time.perf_counter()
        clip_prune(["prune", "--model.pretrained", str(root / "model"), "--data.root", str(root / "data"),
                    "--data.num_samples", str(args.samples), "--data.batch_size", str(args.batch_size),
                    "--data.num_workers", "1", "--options.reconstruct_samples", str(args.samples),
                    "--constraint", str(args.constraint), "--output_dir", str(root / "run"),
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
        wall = time.perf_counter() - start
        report = json.loads((root / "run" / "report.json").read_text())
        forward = dense_forward_seconds(root / "model", args.samples, args.batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nViT-B/16 CLIP (random weights), {args.samples} calibration images, batch {args.batch_size}, "
          f"constraint {args.constraint}, {torch.get_num_threads()} threads")
    print(f"  one dense vision forward over the {args.samples} images: {forward:.1f} s")
    for stage, seconds in report["timings_s"].items():
        print(f"  {stage:<10} {seconds:8.1f} s  ({seconds / forward:5.2f} x dense forward)")
    print(f"  whole command: {wall:.1f} s; peak RSS {peak:.0f} MiB")
    print(f"  MAC ratio {report['macs']['ratio']:.3f} (counted {report['macs_counted']['ratio']:.3f}), "
          f"speedup {report['latency_s']['speedup']:.2f}x at batch {report['latency_s']['batch']}, "
          f"equivalence max |diff| {report['equivalence']['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
