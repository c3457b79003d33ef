"""Training benchmarks (issue 3), each measured side by side in one run.

P3 input path: end-to-end training images/s (cache -> normalise -> augment -> step) divided
   by model-only images/s (random tensors already in memory), tf_efficientnet_b0, batch 32.
P4 epoch time: ferflow's loop vs a reference loop (torchvision ImageFolder + PIL
   Resize/ToTensor/Normalize, plain NCHW model), same model, batch, threads and images.
P2 recipe: fer7_b0_112 fine-tuned on the stand-in LFW-FER with ferflow's default recipe vs
   HSEmotion's (Adam+SAM, no augmentation, constant lr, batch 64), same init and epochs.

    python benchmarks/bench_train.py p3 p4 [--images 320]
    python benchmarks/bench_train.py p2 [--head-epochs 1 --full-epochs 3 --size 112]
    python benchmarks/bench_train.py timm [--steps 24 --rounds 3]
    python benchmarks/bench_train.py gpu [--gpu-batch 128 --gpu-steps 48]    # on a CUDA machine

timm: ferflow's loop (new default augmentation) against timm's own train.py
   (../shared/anchors/timm-train), same images, model, batch, threads and workers, fp32 and
   bf16 autocast, alternated in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ferflow import stages
from ferflow.config import load_params
from ferflow.data.sources import archives_from_checksums

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STANDIN = Path(os.environ.get("FERFLOW_STANDIN", SHARED / "datasets" / "lfw-emotion-standin"))
FER7 = Path(os.environ.get("FERFLOW_FER7", SHARED / "models" / "fer7-b0-112" / "fer7_b0_112.pt"))
WORK = Path(os.environ.get("FERFLOW_BENCH_WORK", REPO / "benchmarks" / "out"))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

HSEMOTION_RECIPE = [  # FACTS.md: the HSEmotion training notebook
    "train.optimizer.name=adam", "train.optimizer.weight_decay=0", "train.optimizer.sam=true",
    "train.optimizer.sam_rho=0.05", "train.schedule=constant", "train.batch_size=64",
    "train.augment.hflip=false", "train.augment.rotate_deg=0", "train.augment.translate=0",
    "train.augment.scale=[1.0, 1.0]", "train.augment.erasing_p=0", "train.loss.label_smoothing=0.1",
    "train.loss.class_weights=inverse_frequency", "train.grad_clip=0", "train.early_stopping_patience=0",
]


def standin_params(size: int, extra: list[str] = ()):
    archives = archives_from_checksums(STANDIN / "SHA256SUMS")
    return load_params(REPO / "params.yaml", [
        f"data.archives={json.dumps(archives)}",
        f"data.raw_dir={WORK / 'raw'}", f"data.prepared_dir={WORK / f'prepared-{size}'}",
        f"prepare.image_sizes=[{size}]", "fetch.progress=false",
        f"models.fer7_b0_112.pretrained={FER7}", f"train.input_size={size}",
        f"evaluate.out_dir={WORK / 'evaluation'}", "tracking.enabled=false", *extra,
    ])


def ensure_prepared(params, names=("LFW-FER",)) -> None:
    todo = [n for n in names if not (params.data.prepared_dir / n / "manifest.parquet").is_file()]
    unions = [n for n in todo if n in params.data.unions]
    archives = [n for n in todo if n not in unions]
    members = [m for u in unions for m in params.data.members(u)]
    if members:  # a union is gathered from its members' prepared data
        ensure_prepared(params, tuple(dict.fromkeys(members)))
    if archives:
        stages.fetch(params, archives)
        stages.prepare(params, archives)
    if unions:
        stages.prepare(params, unions)


# ---------------------------------------------------------------------------- P3 / P4


def model_only_ips(batch: int, size: int, steps: int, channels_last: bool) -> float:
    import timm

    model = timm.create_model("tf_efficientnet_b0", num_classes=3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 3, (batch,))
    start = time.perf_counter()  # the first (warm-up) step counts, as it does in ferflow's epoch
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def ferflow_ips(params, steps: int) -> tuple[float, float]:
    """(images/s of the training epoch, seconds of that epoch's training loop).

    Both come from the run's history: the loop from the first batch read to the last
    optimizer step (cache read, normalise, augment, forward/backward/step); model set-up
    and the validation pass after it are not part of it (the reference has neither)."""
    out = WORK / "runs" / "p3"
    shutil.rmtree(out, ignore_errors=True)
    p = load_params_like(params, [f"train.out_dir={out}", f"train.max_steps_per_epoch={steps}",
                                  "train.head_stage.epochs=0", "train.full_stage.epochs=1"])
    result = stages.train(p, "LFW-FER", "timm:tf_efficientnet_b0")
    return result.history[-1]["images_per_s"], result.history[-1]["seconds"]


def reference_epoch_seconds(root: Path, size: int, batch: int, images: int, workers: int) -> float:
    import timm
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    ds = torch.utils.data.Subset(datasets.ImageFolder(str(root), transform=tf), range(images))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    model = timm.create_model("tf_efficientnet_b0", num_classes=3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def load_params_like(params, extra: list[str]):
    from ferflow.config import Params, apply_override, parse_override

    tree = params.model_dump(mode="json")
    for text in extra:
        keys, value = parse_override(text)
        apply_override(tree, keys, value, origin=text)
    return Params.model_validate(tree)


def run_p3_p4(args) -> None:
    size, batch = 224, 32
    params = standin_params(size, ["train.workers=2", "train.early_stopping_patience=0", f"train.batch_size={batch}"])
    ensure_prepared(params)
    steps = args.images // batch
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {threads} threads, batch {batch}, {size}px")

    print(f"\nP3 input path ({steps} steps of {batch})")
    ours, _ = ferflow_ips(params, steps)
    model_only = model_only_ips(batch, size, steps, channels_last=True)
    print(f"  end-to-end ferflow (default augmentation)  {ours:8.1f} img/s")
    print(f"  model only (random tensors in RAM)         {model_only:8.1f} img/s")
    print(f"  ratio                                      {ours / model_only:8.3f}   (goal >= 0.95)")

    print(f"\nP4 epoch time over the same {steps * batch} images")
    extracted = WORK / "extracted" / "LFW-FER"
    if not extracted.exists():
        shutil.unpack_archive(WORK / "raw" / "LFW-FER.zip", extracted)
    train_root = next(extracted.rglob("train"))
    ref = reference_epoch_seconds(train_root, size, batch, steps * batch, workers=2)
    ours_plain = load_params_like(params, ["train.augment.hflip=false", "train.augment.rotate_deg=0",
                                           "train.augment.translate=0", "train.augment.scale=[1.0, 1.0]",
                                           "train.augment.erasing_p=0"])
    _, ours_secs = ferflow_ips(ours_plain, steps)
    print(f"  reference ImageFolder loop (no augmentation)   {ref:8.1f} s")
    print(f"  ferflow training loop (augmentation off)       {ours_secs:8.1f} s")
    print(f"  speed-up                                       {ref / ours_secs:8.2f}x   (goal >= 1.5x)")


# ---------------------------------------------------------------------------- vs timm's train.py

TIMM_TRAIN = Path(os.environ.get("FERFLOW_TIMM_TRAIN", SHARED / "anchors" / "timm-train" / "train.py"))


def timm_anchor_ips(data_dir: Path, steps: int, batch: int, size: int, bf16: bool, device: str = "cpu",
                    workers: int = 2, threads: int = 2) -> float:
    """timm's own train.py on the same images: its running average img/s after `steps` steps
    (the number in parentheses on its `Train:` log line), then the process is stopped."""
    import re
    import subprocess

    out = WORK / "timm-out"
    cmd = [sys.executable, str(TIMM_TRAIN), "--data-dir", str(data_dir), "--train-split", "train",
           "--val-split", "eval", "--model", "tf_efficientnet_b0", "--num-classes", "3", "--img-size", str(size),
           "-b", str(batch), "--epochs", "1", "-j", str(workers), "--device", device, "--channels-last",
           "--log-interval", str(steps), "--opt", "adamw", "--lr", "1e-3", "--output", str(out)]
    if bf16:
        cmd += ["--amp", "--amp-dtype", "bfloat16"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    line_re = re.compile(r"Train: 0 \[\s*(\d+)/.*\(\s*[\d.]+s,\s*([\d.]+)/s\)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            m = line_re.search(line)
            if m and int(m.group(1)) >= steps:
                return float(m.group(2))
    finally:
        proc.kill()
        proc.wait()
    raise RuntimeError(f"timm's train.py ended before step {steps}: {' '.join(cmd)}")


def ferflow_subprocess_ips(params, steps: int, threads: int = 2, epochs: int = 1) -> list[float]:
    """`ferflow train` as its own process, as timm's train.py runs (both start cold: no
    warmed-up kernels or caches from an earlier run in the same process): img/s of each of
    `epochs` epochs of `steps` steps (the first is cold, later ones warm)."""
    import subprocess

    import yaml

    out = WORK / "runs" / "vs-timm"
    shutil.rmtree(out, ignore_errors=True)
    p = load_params_like(params, [f"train.out_dir={out}", f"train.max_steps_per_epoch={steps}",
                                  "train.head_stage.epochs=0", f"train.full_stage.epochs={epochs}"])
    params_file = WORK / "vs-timm-params.yaml"
    params_file.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    done = subprocess.run([sys.executable, "-m", "ferflow.cli", "train", "--dataset", "LFW-FER", "--model",
                           "timm:tf_efficientnet_b0", "--params", str(params_file)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)}, timeout=600)
    if done.returncode:
        raise RuntimeError(f"ferflow train exited {done.returncode}: {done.stderr[-1500:]}")
    history = json.loads((out / "LFW-FER" / "timm:tf_efficientnet_b0" / "history.json").read_text())
    return [h["images_per_s"] for h in history if h.get("images_per_s")]


def run_timm(args) -> None:
    """ferflow's training loop against timm's train.py: same images (stand-in LFW-FER train
    split), model (tf_efficientnet_b0 from scratch), batch, threads (2) and loader workers (2),
    fp32 and bf16 autocast, alternating so both see the same machine load."""
    if not TIMM_TRAIN.is_file():
        sys.exit(f"timm's train.py not found at {TIMM_TRAIN} (set FERFLOW_TIMM_TRAIN)")
    size, batch, steps = 224, 32, args.steps
    params = standin_params(size, ["train.workers=2", "train.threads=2", "train.early_stopping_patience=0",
                                   f"train.batch_size={batch}"])
    ensure_prepared(params)
    extracted = WORK / "extracted" / "LFW-FER"
    if not extracted.exists():
        shutil.unpack_archive(WORK / "raw" / "LFW-FER.zip", extracted)
    data_dir = next(extracted.rglob("train")).parent
    aug = params.require_train().augment
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, batch {batch}, {size}px, {steps} steps; ferflow "
          f"augmentation: hflip {aug.hflip}, rotate {aug.rotate_deg}, translate {aug.translate}, scale {aug.scale}, "
          f"erasing {aug.erasing_p}, masks {aug.synthetic_mask_p}")
    results: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for precision in ("fp32", "bf16"):
            bf16 = precision == "bf16"
            results.setdefault(f"timm {precision}", []).append(timm_anchor_ips(data_dir, steps, batch, size, bf16))
            p = load_params_like(params, ["train.amp=bf16" if bf16 else "train.amp='off'"])
            results.setdefault(f"ferflow {precision}", []).append(ferflow_subprocess_ips(p, steps)[0])
            print(f"  round {round_ + 1} {precision}: timm {results[f'timm {precision}'][-1]:.1f} img/s, "
                  f"ferflow {results[f'ferflow {precision}'][-1]:.1f} img/s", flush=True)
    mean = {k: sum(v) / len(v) for k, v in results.items()}
    print(f"\nimg/s averaged over the first {steps} steps, mean of {args.rounds} alternated rounds")
    for key, value in mean.items():
        print(f"  {key:<14} {value:7.1f}   ({', '.join(f'{v:.1f}' for v in results[key])})")
    print(f"  ferflow fp32 / timm fp32   {mean['ferflow fp32'] / mean['timm fp32']:.3f}   (goal >= 1.0)")
    print(f"  ferflow bf16 / timm fp32   {mean['ferflow bf16'] / mean['timm fp32']:.3f}   (goal >= 1.1)")
    print(f"  ferflow bf16 / timm bf16   {mean['ferflow bf16'] / mean['timm bf16']:.3f}")


# ---------------------------------------------------------------------------- GPU


def model_only_gpu_ips(batch: int, size: int, steps: int, channels_last: bool, bf16: bool, compile_: bool) -> float:
    """Steady-state training img/s of the bare model on random tensors already on the GPU
    (warm-up steps, and compilation, not timed): the ceiling the input path is measured against."""
    import timm

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = timm.create_model("tf_efficientnet_b0", num_classes=3).cuda().to(memory_format=fmt).train()
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, 3, (batch,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def run_gpu(args) -> None:
    """The CUDA paths side by side in one run: timm's train.py against `ferflow train` (fp32,
    bf16 autocast; first `steps` steps from a cold start, as timm's log averages them), and
    ferflow's warm epoch against the bare model (input path), with channels_last and
    torch.compile toggled. tf_efficientnet_b0 from scratch, 224 px, stand-in LFW-FER."""
    if not torch.cuda.is_available():
        sys.exit("gpu: no CUDA device is visible")
    size, batch, steps, workers = 224, args.gpu_batch, args.gpu_steps, args.gpu_workers
    threads = max(1, (os.cpu_count() or 2) // 2)
    params = standin_params(size, [f"train.workers={workers}", f"train.threads={threads}", "train.device=cuda",
                                   "train.early_stopping_patience=0", f"train.batch_size={batch}"])
    ensure_prepared(params)
    extracted = WORK / "extracted" / "LFW-FER"
    if not extracted.exists():
        shutil.unpack_archive(WORK / "raw" / "LFW-FER.zip", extracted)
    data_dir = next(extracted.rglob("train")).parent
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {os.cpu_count()} cores, {threads} threads, "
          f"{workers} loader workers, batch {batch}, {size}px, {steps} steps", flush=True)

    def attempt(label, fn):
        try:
            value = fn()
        except Exception as exc:  # one failing path must not cost the others' figures
            print(f"  {label:<44} failed: {type(exc).__name__}: {str(exc)[-300:]}", flush=True)
            return None
        shown = " / ".join(f"{v:.0f}" for v in value) if isinstance(value, list) else f"{value:.0f}"
        print(f"  {label:<44} {shown} img/s", flush=True)
        return value

    def ours(bf16, cl, comp):
        over = ["train.amp=bf16" if bf16 else "train.amp='off'", f"train.channels_last={str(cl).lower()}",
                f"train.compile={str(comp).lower()}"]
        return ferflow_subprocess_ips(load_params_like(params, over), steps, threads, epochs=2)

    # Cheapest and most asked-for first: compilation (a minute or more each) comes last.
    plan = [("model", (False, True, False)), ("model", (True, True, False)), ("model", (True, False, False)),
            ("timm", False), ("ferflow", (False, True, False)), ("timm", True), ("ferflow", (True, True, False)),
            ("ferflow", (True, False, False)), ("model", (True, True, True)), ("ferflow", (True, True, True))]
    bare, mine = {}, {}
    print("model only: random tensors on the GPU, steady state; timm train.py: running average of its first "
          f"{steps} steps from a cold start; ferflow train: cold epoch / warm epoch of {steps} steps", flush=True)
    for kind, key in plan:
        if kind == "timm":
            attempt(f"timm train.py {'bf16' if key else 'fp32'} channels_last=True",
                    lambda: timm_anchor_ips(data_dir, steps, batch, size, key, "cuda", workers, threads))
            continue
        label = f"bf16={key[0]} channels_last={key[1]} compile={key[2]}"
        if kind == "model":
            bare[key] = attempt(f"model only {label}", lambda: model_only_gpu_ips(batch, size, 50, key[1], key[0], key[2]))
        else:
            mine[key] = attempt(f"ferflow {label}", lambda: ours(*key))
    print("\ninput path: ferflow's warm epoch / the bare model (same precision, layout, compile)")
    for key, value in mine.items():
        if value and len(value) > 1 and bare.get(key):
            print(f"  bf16={key[0]} channels_last={key[1]} compile={key[2]}: {value[-1] / bare[key]:.3f}")


# ---------------------------------------------------------------------------- P2


def run_p2(args) -> None:
    if not FER7.is_file():
        sys.exit(f"fer7 checkpoint not found at {FER7} (set FERFLOW_FER7)")
    budget = [f"train.head_stage.epochs={args.head_epochs}", f"train.full_stage.epochs={args.full_epochs}",
              "train.early_stopping_patience=0", "train.workers=2"]
    params = standin_params(args.size, budget)
    ensure_prepared(params)
    recipes = {
        "ferflow default": [],
        "HSEmotion": HSEMOTION_RECIPE + ["train.head_stage.lr=0.001", "train.full_stage.lr=0.0001"],
    }
    rows = {}
    for name, overrides in recipes.items():
        tag = name.split()[0].lower()
        p = load_params_like(params, [f"train.out_dir={WORK / 'runs' / f'p2-{tag}'}",
                                      f"evaluate.out_dir={WORK / 'evaluation' / f'p2-{tag}'}", *overrides])
        shutil.rmtree(p.train.out_dir, ignore_errors=True)
        start = time.perf_counter()
        stages.train(p, "LFW-FER", "fer7_b0_112")
        summary = stages.evaluate(p, "LFW-FER", "fer7_b0_112", ["LFW-FER"])["LFW-FER"]
        rows[name] = (summary, time.perf_counter() - start)
        print(f"{name}: {summary}", flush=True)
    zero = stages.zero_shot(params, "fer7_b0_112", ["LFW-FER"])["LFW-FER"]
    print(f"\nP2 recipe on stand-in LFW-FER eval, fer7_b0_112 at {args.size}px, "
          f"{args.head_epochs}+{args.full_epochs} epochs")
    print(f"{'recipe':<18}{'accuracy':>10}{'macro-F1':>10}{'minutes':>9}")
    print(f"{'zero-shot':<18}{100 * zero['accuracy']:>10.2f}{100 * zero['macro_f1']:>10.2f}{'-':>9}")
    for name, (m, secs) in rows.items():
        print(f"{name:<18}{100 * m['accuracy']:>10.2f}{100 * m['macro_f1']:>10.2f}{secs / 60:>9.1f}")
    ours, hse = rows["ferflow default"][0], rows["HSEmotion"][0]
    print(f"delta (ours - HSEmotion): accuracy {100 * (ours['accuracy'] - hse['accuracy']):+.2f} points, "
          f"macro-F1 {100 * (ours['macro_f1'] - hse['macro_f1']):+.2f} points (goal >= +2)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="+", choices=["p2", "p3", "p4", "timm", "gpu"])
    ap.add_argument("--steps", type=int, default=24, help="timm: training steps compared")
    ap.add_argument("--rounds", type=int, default=3, help="timm: alternated rounds")
    ap.add_argument("--images", type=int, default=320, help="P3/P4: images per measurement")
    ap.add_argument("--size", type=int, default=112, help="P2 input size")
    ap.add_argument("--gpu-batch", type=int, default=128)
    ap.add_argument("--gpu-steps", type=int, default=48, help="gpu: steps per measured epoch")
    ap.add_argument("--gpu-workers", type=int, default=8)
    ap.add_argument("--head-epochs", type=int, default=1)
    ap.add_argument("--full-epochs", type=int, default=3)
    args = ap.parse_args()
    if not (STANDIN / "SHA256SUMS").is_file():
        sys.exit(f"stand-in archives not found at {STANDIN} (set FERFLOW_STANDIN)")
    WORK.mkdir(parents=True, exist_ok=True)
    if "p3" in args.which or "p4" in args.which:
        run_p3_p4(args)
    if "timm" in args.which:
        run_timm(args)
    if "p2" in args.which:
        run_p2(args)
    if "gpu" in args.which:
        run_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
