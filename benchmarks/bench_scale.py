"""The whole `clip-prune prune` at scale: COCO-like JPEGs, a ViT-B/16-shaped CLIP, stage times and their ratios.

    python benchmarks/bench_scale.py --samples 256                      # this CPU: a few minutes
    python benchmarks/bench_scale.py --samples 8192 --batch-size 128 --workers 14 --precision bf16-mixed  # a GPU

Writes once, into `--cache`, a COCO-format set of 640×480-class JPEGs (smooth gradients, shapes
and sensor-like noise at quality 90, about COCO's bytes per pixel; five captions each) and a
CLIP with openai/clip-vit-base-patch16's shapes (random weights: times do not depend on the
values). Then runs the real CLI, `clip-prune prune --options.steps 1`, in a child process (its
peak memory is its own) and prints `report.json`'s stage times beside baselines timed here on
the same data, workers and batch size:

- data path: the calibration DataLoader (read, decode, resize, normalise, tokenise) against
  decode-only (a full-size JPEG decode per image), and against the per-image processor call
  that the data path made before `clip_prune.data.pixels`; then, in this process, one image's
  path step by step (`--data-path-only` stops there): where its time goes, and the decode at 1/8
  scale, which leaves only the entropy decoding that no downscaling skips;
- Fisher pass against a plain forward+backward (the same loss, one gradient to a shared mask);
- reconstruction against one dense vision forward over the images it uses;
- save + verification + evaluation against the rest of the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from bench_pipeline import save_vit_b16_clip
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from clip_prune.core.pruning.fisher_pass import mask_loss
from clip_prune.data.pixels import PixelLoader
from clip_prune.data.synthetic import caption_vocabulary
from clip_prune.lightning.data import CocoDataModule
from clip_prune.lightning.module import MaskedCLIPModule

SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (640, 512), (427, 640))
RECONSTRUCT_SAMPLES = 512  # PruningOptions.reconstruct_samples' default
REPEATS = 3  # passes over the calibration images per data-path measurement


def draw_photo(index: int, seed: int) -> Image.Image:
    """A photo-like image: a smooth colour gradient, 3-8 filled shapes and Gaussian noise."""
    rng = np.random.default_rng([seed, index])
    width, height = SIZES[index % len(SIZES)]
    corners = rng.uniform(0, 255, (2, 2, 3)).astype(np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    base = (corners[0, 0] * (1 - x) + corners[0, 1] * x) * (1 - y) + (corners[1, 0] * (1 - x) + corners[1, 1] * x) * y
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0, extent = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 220)
        box = (x0, y0, x0 + extent, y0 + extent * rng.uniform(0.5, 1.5))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.integers(0, 256, 3).tolist()))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 20, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_image(job: tuple[Path, int, int]) -> None:
    path, index, seed = job
    if not path.exists():
        draw_photo(index, seed).save(path.with_suffix(".tmp"), format="JPEG", quality=90)
        path.with_suffix(".tmp").rename(path)


def ensure_coco(root: Path, split: str, count: int, first_id: int, seed: int = 0) -> None:
    """`count` images of `split` in COCO's layout (existing files are kept: image i depends only on seed and i)."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    ids = range(first_id, first_id + count)
    jobs = [(root / split / f"{image_id:012d}.jpg", image_id, seed) for image_id in ids]
    with ProcessPoolExecutor(max(1, (os.cpu_count() or 1))) as pool:
        list(pool.map(_write_image, jobs, chunksize=16))
    vocabulary = caption_vocabulary()
    images, annotations = [], []
    for image_id in ids:
        width, height = SIZES[image_id % len(SIZES)]
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        rng = np.random.default_rng([seed, image_id, 1])
        for _ in range(5):
            words = rng.choice(vocabulary, size=int(rng.integers(6, 15)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": " ".join(words)})
    content = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(content))


class DecodeOnly(Dataset):
    """Full-size decode of each file, nothing else: the floor the data path is measured against."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            image.load()
        return torch.zeros(())


class ProcessorPerImage(DecodeOnly):
    """The path before `clip_prune.data.pixels`: decode in full, then one image-processor call per image."""

    def __init__(self, paths: list[Path], processor: object) -> None:
        super().__init__(paths)
        self.processor = processor

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def images_per_second(loader: DataLoader) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["pixel_values"] if isinstance(batch, dict) else batch)
    return count / (time.perf_counter() - start)


def prune_command(args: argparse.Namespace, model_dir: Path, data_root: Path, output_dir: Path) -> list[str]:
    return ["prune", "--model.pretrained", str(model_dir), "--data.root", str(data_root),
            "--data.num_samples", str(args.samples), "--data.batch_size", str(args.batch_size),
            "--data.num_workers", str(args.workers), "--data.eval_samples", str(args.eval_images),
            "--constraint", str(args.constraint), "--options.steps", "1", "--trainer.precision", args.precision,
            "--output_dir", str(output_dir), "--overwrite", "true",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def run_child(cli_args: list[str]) -> None:
    """In a fresh process: the CLI, then its peak host and device memory as one JSON line."""
    from clip_prune.lightning.cli import main as clip_prune

    clip_prune(cli_args)
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_device_mib": device_peak}))


def baseline_seconds(args: argparse.Namespace, model_dir: Path, datamodule: CocoDataModule) -> tuple[float, float]:
    """(plain forward+backward over the calibration batches, one dense forward over the reconstruction images)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = MaskedCLIPModule(str(model_dir)).to(device)
    module.masks.set(module.masks.head_mask.to(device), module.masks.neuron_mask.to(device))
    bf16 = args.precision.startswith("bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    shared = [module.masks.head_mask.requires_grad_(True), module.masks.neuron_mask.requires_grad_(True)]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    start = time.perf_counter()
    for batch in datamodule.val_dataloader():
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        with autocast:
            loss = mask_loss(module.model, batch, module.hparams.loss, module.hparams.noise_seed)  # no DDP padding
        torch.autograd.grad(loss, shared)
    synchronize()
    backward = time.perf_counter() - start
    module.masks.remove()
    images = min(args.samples, RECONSTRUCT_SAMPLES)
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.inference_mode(), autocast:
        module.model.vision_model(pixel_values=pixels)  # warm-up
        synchronize()
        start = time.perf_counter()
        for _ in range(math.ceil(images / args.batch_size)):
            module.model.vision_model(pixel_values=pixels)
        synchronize()
    return backward, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="calibration images (--data.num_samples)")
    parser.add_argument("--eval-images", type=int, default=64, help="evaluation images (5 captions each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--precision", default="32-true", help="--trainer.precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--constraint", type=float, default=0.75)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "clip-prune" / "bench_scale")
    parser.add_argument("--image-size", type=int, default=224, help="ViT-B/16 input size (smaller: a quick try)")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (ViT-B/16: 12; fewer: a quick try)")
    parser.add_argument("--data-path-only", action="store_true", help="measure only the image path (no prune run)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_child(args.child)
        return
    data_root = args.cache / "coco"
    shape = "" if (args.image_size, args.layers) == (224, 12) else f"-{args.image_size}px-{args.layers}layers"
    model_dir = args.cache / f"vit-b16-clip{shape}"
    start = time.perf_counter()
    ensure_coco(data_root, "train2017", args.samples, first_id=1)
    ensure_coco(data_root, "val2017", args.eval_images, first_id=10_000_000)
    if not (model_dir / "config.json").is_file():
        save_vit_b16_clip(model_dir, image_size=args.image_size, layers=args.layers)
    print(f"data and model in {args.cache} ({time.perf_counter() - start:.0f} s)")

    datamodule = CocoDataModule(str(data_root), str(model_dir), num_samples=args.samples,
                                batch_size=args.batch_size, num_workers=args.workers)
    datamodule.setup()
    rates = data_path_rates(datamodule)
    print(format_rates(rates))
    print(format_steps(image_path_steps(datamodule)))
    if args.data_path_only:
        return

    command = [sys.executable, __file__, "--child", *prune_command(args, model_dir, data_root, args.cache / "run")]
    start = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        sys.exit(f"clip-prune prune failed:\n{child.stderr[-4000:]}")
    memory = json.loads(child.stdout.strip().splitlines()[-1])
    report = json.loads((args.cache / "run" / "report.json").read_text())
    backward, forward = baseline_seconds(args, model_dir, datamodule)
    print_table(args, report, memory, wall, rates, backward, forward)


def data_path_rates(datamodule: CocoDataModule) -> dict[str, float]:
    """Images/s of the calibration DataLoader and of the two baselines, with the same batch size and workers."""
    paths = [path for path, _ in datamodule.calibration.items]
    plain = {"batch_size": datamodule.hparams.batch_size, "num_workers": datamodule.num_workers}
    loaders = {"data path": datamodule.val_dataloader, "decode only": lambda: DataLoader(DecodeOnly(paths), **plain),
               "processor per image": lambda: DataLoader(ProcessorPerImage(paths, datamodule.image_processor()),
                                                         **plain)}
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(REPEATS):  # interleaved, best of: the machine may be shared
        for name, loader in loaders.items():
            rates[name].append(images_per_second(loader()))
    return {name: max(values) for name, values in rates.items()}


def image_path_steps(datamodule: CocoDataModule, images: int = 96, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per image in this process (one thread) of the image path cut after each of its steps, the
    full-size decode, and the decode at 1/8 scale (what is left when the inverse DCT is almost free); best of
    `repeats` passes over the first `images` calibration images."""
    paths = [path for path, _ in datamodule.calibration.items][:images]
    loader = PixelLoader(datamodule.image_processor(), uint8=True)

    def drafted(path: Path, target: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
        image = Image.open(path)
        resize_target = loader.resize_target(image.size)
        image.draft("RGB", target or resize_target)
        image.load()
        return image, resize_target

    def as_tensor(path: Path) -> tuple[torch.Tensor, tuple[int, int]]:
        image, target = drafted(path)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), target

    steps = {
        "full-size decode": lambda path: Image.open(path).load(),
        "decode at 1/8 scale": lambda path: drafted(path, (1, 1)),
        "drafted decode": drafted,
        "+ to a tensor": as_tensor,
        "+ resize and crop": lambda path: loader.resize_and_crop(*as_tensor(path)),
        "PixelLoader.inputs": loader.inputs,
    }
    milliseconds, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as in one DataLoader worker; restored for the baselines timed after this
    try:
        for name, step in steps.items():
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                for path in paths:
                    step(path)
                best = min(best, (time.perf_counter() - start) / len(paths))
            milliseconds[name] = 1e3 * best
    finally:
        torch.set_num_threads(threads)
    return milliseconds


def format_steps(milliseconds: dict[str, float]) -> str:
    full = milliseconds["full-size decode"]
    return "  one image, one thread: " + "; ".join(f"{name} {value:.2f} ms ({value / full:.2f})"
                                                  for name, value in milliseconds.items())


def format_rates(rates: dict[str, float]) -> str:
    return (f"  data path {rates['data path']:.0f} images/s vs decode-only {rates['decode only']:.0f} images/s: "
            f"{rates['data path'] / rates['decode only']:.2f} (before: processor per image "
            f"{rates['processor per image']:.0f} images/s, {rates['processor per image'] / rates['decode only']:.2f})")


def print_table(args: argparse.Namespace, report: dict, memory: dict, wall: float, rates: dict[str, float],
                backward: float, forward: float) -> None:
    times = report["timings_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    load = os.getloadavg()[0]
    print(f"\nViT-B/16-shaped CLIP, {args.samples} calibration images, batch {args.batch_size}, "
          f"{args.workers} worker(s), {args.precision}, c = {args.constraint}, 1 step; {device}; "
          f"load average {load:.1f}")
    for stage, seconds in times.items():
        print(f"  {stage:<12} {seconds:8.1f} s")
    print(f"  whole command {wall:.1f} s; peak RSS {memory['peak_rss_mib']:.0f} MiB"
          + (f"; peak device memory {memory['peak_device_mib']:.0f} MiB" if memory["peak_device_mib"] else ""))
    finish = times.get("save", 0.0) + times.get("evaluate", 0.0)
    print("ratios")
    print(format_rates(rates))
    print(f"  Fisher pass {times['fisher']:.1f} s vs plain forward+backward {backward:.1f} s: "
          f"{times['fisher'] / backward:.2f}")
    if "reconstruct" in times:
        print(f"  reconstruction {times['reconstruct']:.1f} s vs one dense forward over its "
              f"{min(args.samples, RECONSTRUCT_SAMPLES)} images {forward:.1f} s: {times['reconstruct'] / forward:.2f}")
    print(f"  save+verification+evaluation {finish:.1f} s vs the rest {times['total'] - finish:.1f} s: "
          f"{finish / (times['total'] - finish):.2f}")


if __name__ == "__main__":
    main()
