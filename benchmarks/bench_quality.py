"""Recipe quality over seeds (issue 8): fer7_b0_112 at 112 px on the stand-in archives.

Every recipe is trained through the normal stage functions (`stages.train`, `stages.evaluate`)
with the same epoch budget, evaluated on the eval split of every archive, and summarised as
mean ± std over seeds beside the zero-shot figure of the same checkpoint. Each finished run
is kept under benchmarks/out/quality/ (one JSON per recipe, training set and seed), so an
interrupted benchmark continues where it stopped; `--fresh` starts over.

    python benchmarks/bench_quality.py                       # the issue's table (3 seeds)
    python benchmarks/bench_quality.py --recipes "new default" --seeds 1
    python benchmarks/bench_quality.py --ablation            # the measurements behind the defaults
    python benchmarks/bench_quality.py --recipes HSEmotion --train-on LFW-FER   # one archive only
    python benchmarks/bench_quality.py --report-only         # tables from the runs kept so far

Recipes (all with the budget of --head-epochs + --full-epochs):
    HSEmotion          Adam + SAM, constant lr 1e-3 / 1e-4, no augmentation, LS 0.1 x class weights, batch 64
    previous default   the params.yaml recipe before issue 8 (random head, one lr, BN in train mode, ...)
    new default        params.yaml as it is
    new default + masks        synthetic masks on the bare archive (train.augment.synthetic_mask_p)
    new default + face crop    faces placed in larger frames, prepared with prepare.face_crop=detect
    new default, fp32 / bf16   train.amp off / bf16 (on CUDA the new default is bf16, on a CPU fp32)
    new default (union), new default + masks (union)
                               trained on the union of the three archives (data.unions), evaluated on each

On a GPU machine, FERFLOW_BENCH_WORK keeps its runs apart from the CPU's, and --seed-list /
--workers let several processes share the card:

    FERFLOW_BENCH_WORK=/tmp/w python benchmarks/bench_quality.py --recipes "new default" --train-on LFW-FER --seed-list 43
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import FER7, HSEMOTION_RECIPE, STANDIN, WORK, ensure_prepared, load_params_like, standin_params  # noqa: E402

from ferflow import stages  # noqa: E402
from ferflow.fileio import atomic_write_json  # noqa: E402
from ferflow.training.trainer import recipe_hash  # noqa: E402

DATASETS = ("LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut")
OUT = WORK / "quality"
MODEL = "fer7_b0_112"
REPORT_ONLY = False  # --report-only: tables from kept runs, nothing trained
N_SEEDS = 3
DETECTOR = Path(os.environ.get("FERFLOW_DETECTOR", REPO / ".venv" / "assets" / "facenet_pytorch-2.6.0-py3-none-any.whl"))

PREVIOUS_DEFAULT = [  # params.yaml before issue 8, spelled out so the comparison survives new defaults
    "train.head_init=random", "train.head_stage.lr=0.001", "train.full_stage.lr=0.0002", "train.layer_decay=1.0",
    "train.batchnorm=train", "train.loss.class_weights=inverse_frequency", "train.loss.label_smoothing=0.1",
    "train.augment.hflip=true", "train.augment.rotate_deg=10", "train.augment.translate=0.05",
    "train.augment.scale=[0.9, 1.1]", "train.augment.erasing_p=0.25", "train.augment.synthetic_mask_p=0",
    "train.optimizer.name=adamw", "train.optimizer.weight_decay=0.05", "train.optimizer.sam=false",
    "train.batch_size=32", "train.schedule=cosine", "train.grad_clip=1.0",
]
HSEMOTION = HSEMOTION_RECIPE + ["train.head_init=random", "train.head_stage.lr=0.001", "train.full_stage.lr=0.0001",
                                "train.layer_decay=1.0", "train.batchnorm=train", "train.augment.synthetic_mask_p=0"]
MASKS = ["train.augment.synthetic_mask_p=0.5"]
UNION = "LFW-emotion-all"  # params.yaml data.unions: the three archives together
RECIPES: dict[str, list[str]] = {
    "HSEmotion": HSEMOTION,
    "previous default": PREVIOUS_DEFAULT,
    "new default": [],
    "new default + masks": MASKS,
    "new default + face crop": [],  # trained on the framed archives, prepared with face_crop=detect
    "new default, fp32": ["train.amp='off'"],
    "new default, bf16": ["train.amp=bf16"],
    "new default, sqrt class weights": ["train.loss.class_weights=sqrt_inverse_frequency"],
    "new default (union)": [],
    "new default + masks (union)": MASKS,
}
PRECISION = ("new default, fp32", "new default, bf16")
VARIANTS = (*PRECISION, "new default, sqrt class weights")  # trained and evaluated in-domain only
UNION_RECIPES = ("new default (union)", "new default + masks (union)")
FRAMED = {"LFW-FER": "LFW-FER-framed", "M-LFW-FER": "M-LFW-FER-framed"}
FACE_CROP = ["prepare.face_crop=detect:0.55", "prepare.face_margin=1.0"]


def ablations() -> dict[str, list[str]]:
    """One change at a time from the new default: what each default choice is worth."""
    return {
        "new default": [],
        "head_init=random": ["train.head_init=random"],
        "layer_decay=1 (one lr)": ["train.layer_decay=1.0"],
        "batchnorm=train": ["train.batchnorm=train"],
        "class_weights=inverse_frequency": ["train.loss.class_weights=inverse_frequency"],
        "class_weights=sqrt_inverse_frequency": ["train.loss.class_weights=sqrt_inverse_frequency"],
        "augment: previous (+ erasing 0.25)": ["train.augment.erasing_p=0.25"],
        "augment: stronger (20 deg, 10 %, 0.8-1.2)": ["train.augment.rotate_deg=20", "train.augment.translate=0.1",
                                                      "train.augment.scale=[0.8, 1.2]"],
        "augment: none": ["train.augment.hflip=false", "train.augment.rotate_deg=0", "train.augment.translate=0",
                          "train.augment.scale=[1.0, 1.0]", "train.augment.erasing_p=0"],
    }


def frame_archive(source: Path, dest: Path, seed: int = 0) -> Path:
    """The archive with each face placed in a 250 x 250 frame, like an LFW photo: scaled to
    100-140 px, its centre within 25 px of the frame's, over a blurred, enlarged other face
    of the archive as background. Deterministic; written once."""
    import hashlib
    import io
    import zipfile

    import numpy as np
    from PIL import Image, ImageFilter

    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(tmp, "w") as out:
        names = sorted(n for n in src.namelist() if n.lower().endswith(".jpg") and "__MACOSX" not in n)
        for name in names:
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
            side = int(rng.integers(100, 141))
            cx, cy = (125 + int(v) for v in rng.integers(-25, 26, 2))
            background = Image.open(io.BytesIO(src.read(names[int(rng.integers(len(names)))]))).convert("RGB")
            frame = background.resize((250, 250), Image.BILINEAR).filter(ImageFilter.GaussianBlur(8))
            face = Image.open(io.BytesIO(src.read(name))).convert("RGB").resize((side, side), Image.BILINEAR)
            frame.paste(face, (cx - side // 2, cy - side // 2))
            buf = io.BytesIO()
            frame.save(buf, format="JPEG", quality=95)
            out.writestr(name, buf.getvalue())
    tmp.replace(dest)
    return dest


def with_framed(base):
    """Params that also hold the framed archives (prepared with a face crop)."""
    from ferflow.fileio import sha256_file

    archives = base.data.model_dump(mode="json")["archives"]
    for name, framed in FRAMED.items():
        path = frame_archive(base.data.raw_dir / f"{name}.zip", WORK / "framed" / f"{framed}.zip")
        archives[framed] = {"uri": str(path), "sha256": sha256_file(path)}
    return load_params_like(base, [f"data.archives={json.dumps(archives)}", *FACE_CROP,
                                   f"prepare.detector.weights={DETECTOR}"])


def run_one(base, recipe: str, overrides: list[str], train_ds: str, seed: int, eval_sets=DATASETS) -> dict:
    """Train + evaluate once, or read the result of an earlier identical run."""
    tag = recipe.replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "")
    record = OUT / "runs" / tag / train_ds / f"seed{seed}.json"
    work = OUT / "work" / tag / train_ds / f"seed{seed}"
    p = load_params_like(base, [f"seed={seed}", f"train.out_dir={work / 'models'}",
                                f"evaluate.out_dir={work / 'evaluation'}", *overrides])
    # What is trained, whatever params.yaml said then; the checkpoint by name, not by where it
    # lies, so runs made on another machine (benchmarks/gpu.sh) read back here.
    digest = recipe_hash(load_params_like(p, [f"models.{MODEL}.pretrained={FER7.name}"]), train_ds, MODEL)
    if record.is_file():
        data = json.loads(record.read_text())
        legacy = recipe_hash(p, train_ds, MODEL)  # records kept before the checkpoint was named by file
        if data.get("recipe_hash") in (digest, legacy) and set(eval_sets) <= set(data["eval"]):
            if data["recipe_hash"] != digest:  # keep it in the portable form from now on
                data["recipe_hash"] = digest
                atomic_write_json(record, data)
            return data
    if REPORT_ONLY:
        return None
    import torch

    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    result = stages.train(p, train_ds, MODEL)
    train_s = time.perf_counter() - start
    summary = stages.evaluate(p, train_ds, MODEL, list(eval_sets))
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available() and p.require_train().device != "cpu"
               else f"CPU, {os.cpu_count()} cores")
    data = {"recipe": recipe, "overrides": overrides, "recipe_hash": digest, "train_dataset": train_ds, "seed": seed,
            "machine": machine, "train_seconds": train_s, "best_epoch": result.best_epoch,
            "history": [{k: h[k] for k in ("epoch", "stage", "val_accuracy", "val_macro_f1")} for h in result.history],
            "eval": {ds: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} for ds, m in summary.items()}}
    atomic_write_json(record, data)  # a run stopped mid-write leaves no half record
    shutil.rmtree(work / "models", ignore_errors=True)  # weights are not needed after evaluation
    print(f"  {recipe} | train {train_ds} | seed {seed}: "
          + ", ".join(f"{ds} {100 * m['accuracy']:.2f}/{100 * m['macro_f1']:.2f}" for ds, m in data["eval"].items())
          + f" | best epoch {result.best_epoch} | {train_s / 60:.1f} min", flush=True)
    return data


def zero_shot(base, eval_sets=DATASETS) -> dict:
    record = OUT / f"zero-shot-{'-'.join(eval_sets)}.json"
    if record.is_file():
        return json.loads(record.read_text())
    if REPORT_ONLY:
        return {}
    p = load_params_like(base, [f"evaluate.out_dir={OUT / 'work' / 'zero-shot'}"])
    summary = stages.zero_shot(p, MODEL, list(eval_sets))
    data = {ds: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} for ds, m in summary.items()}
    atomic_write_json(record, data)
    return data


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values: list[float]) -> str:
    m, s = mean_std([100 * v for v in values])
    return f"{m:.2f} ± {s:.2f}"


def metric(runs: list[dict], ds: str, key: str) -> list[float]:
    return [r["eval"][ds][key] for r in runs]


def cell(runs: dict, key: tuple[str, str], ds: str, metrics=("accuracy", "macro_f1")) -> str:
    """mean ± std (n) of the kept runs, or a dash where none ran."""
    got = runs.get(key) or []
    if not got:
        return "–"
    text = " / ".join(pct(metric(got, ds, m)) for m in metrics)
    return text + (f" (n={len(got)})" if len(got) != N_SEEDS else "")


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def goal(text: str, ok: bool, detail: str) -> None:
    print(f"  [{'met' if ok else 'NOT met'}] {text}: {detail}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-list", type=int, nargs="+", help="exactly these seeds (default: 42 .. 42+seeds-1)")
    ap.add_argument("--workers", type=int, default=2, help="loader workers per run")
    ap.add_argument("--max-steps", type=int, help="steps per epoch (smoke tests of this script only)")
    ap.add_argument("--recipes", nargs="*", help="subset of recipe names (default: all)")
    ap.add_argument("--ablation", action="store_true", help="one-change-at-a-time variants on LFW-FER")
    ap.add_argument("--head-epochs", type=int, default=1)
    ap.add_argument("--full-epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--fresh", action="store_true", help="forget earlier results")
    ap.add_argument("--train-on", nargs="*", choices=DATASETS,
                    help="archives to train on (default: all three)")
    ap.add_argument("--report-only", action="store_true", help="print the tables from kept runs; train nothing")
    ap.add_argument("--setup-only", action="store_true",
                    help="prepare the archives and their union and record zero-shot, then stop (before parallel runs)")
    args = ap.parse_args()
    global REPORT_ONLY, N_SEEDS
    REPORT_ONLY, N_SEEDS = args.report_only, len(args.seed_list or range(args.seeds))
    train_on = tuple(args.train_on or DATASETS)
    needs = [(STANDIN / "SHA256SUMS", "stand-in archives (FERFLOW_STANDIN)"), (FER7, "fer7 checkpoint (FERFLOW_FER7)")]
    if not args.recipes or "new default + face crop" in args.recipes:
        needs.append((DETECTOR, "detector wheel (make assets, or FERFLOW_DETECTOR)"))
    for path, what in needs:
        if not path.is_file():
            sys.exit(f"{what} not found at {path}")
    if args.fresh:
        shutil.rmtree(OUT, ignore_errors=True)
    budget = [f"train.head_stage.epochs={args.head_epochs}", f"train.full_stage.epochs={args.full_epochs}",
              "train.early_stopping_patience=0", f"train.workers={args.workers}"]
    if args.max_steps:
        budget.append(f"train.max_steps_per_epoch={args.max_steps}")
    base = standin_params(args.size, budget)
    ensure_prepared(base, DATASETS)
    seeds = args.seed_list or [42 + i for i in range(args.seeds)]
    print(f"fer7_b0_112 at {args.size} px, {args.head_epochs} head + {args.full_epochs} full epochs, seeds {seeds}, "
          f"runs in {WORK}", flush=True)
    zs = zero_shot(base)
    if args.setup_only:
        ensure_prepared(base, (UNION,))
        return 0
    if args.ablation:
        return run_ablation(base, seeds, zs)
    # The five by default; --report-only shows every recipe that has kept runs.
    names = args.recipes or (list(RECIPES) if REPORT_ONLY else list(RECIPES)[:5])
    runs: dict[tuple[str, str], list[dict]] = {}
    for name in names:
        if name == "new default + masks":
            runs[(name, "LFW-FER")] = [run_one(base, name, MASKS, "LFW-FER", s) for s in seeds]
        elif name in UNION_RECIPES:
            if not REPORT_ONLY:
                ensure_prepared(base, (UNION,))
            runs[(name, UNION)] = [run_one(base, name, RECIPES[name], UNION, s) for s in seeds]
        elif name in VARIANTS:
            for ds in train_on:
                runs[(name, ds)] = [run_one(base, name, RECIPES[name], ds, s, eval_sets=(ds,)) for s in seeds]
        elif name == "new default + face crop":
            framed_sets = {ds: fr for ds, fr in FRAMED.items() if ds in train_on}
            framed = with_framed(base)
            if not REPORT_ONLY:
                ensure_prepared(framed, tuple(framed_sets.values()))
            for ds, fr in framed_sets.items():
                runs[(name, ds)] = [run_one(framed, name, [], fr, s, eval_sets=(fr,)) for s in seeds]
                zs.update(zero_shot(framed, (fr,)))
        else:
            for ds in train_on:
                evals = DATASETS if name == "new default" else (ds,)
                runs[(name, ds)] = [run_one(base, name, RECIPES[name], ds, s, eval_sets=evals) for s in seeds]
    runs = {key: [r for r in got if r is not None] for key, got in runs.items()}
    report(names, runs, zs, seeds)
    return 0


def report(names: list[str], runs: dict, zs: dict, seeds: list[int]) -> None:
    def mean(key, ds, m="accuracy"):
        got = runs.get(key) or []
        return statistics.fmean(metric(got, ds, m)) if got else None

    def minutes(name, sets=DATASETS):
        secs = [r["train_seconds"] for d in sets for r in runs.get((name, d)) or []]
        return statistics.fmean(secs) / 60 if secs else None

    machines = sorted({r.get("machine", "CPU, 2 cores") for got in runs.values() for r in got})
    print(f"\nmachine: {', '.join(machines) or '-'}")
    plain = [n for n in names if n in ("HSEmotion", "previous default", "new default")]
    rows = [["zero-shot (no training)", *[f"{100 * zs[d]['accuracy']:.2f} / {100 * zs[d]['macro_f1']:.2f}"
                                          for d in DATASETS], "–"]]
    for name in plain:
        t = minutes(name)
        rows.append([name, *[cell(runs, (name, d), d) for d in DATASETS], "–" if t is None else f"{t:.1f}"])
    table(f"In-domain eval accuracy / macro-F1 (%), mean ± std over {len(seeds)} seeds unless n says otherwise "
          "(trained and evaluated on the same archive)", ["recipe", *DATASETS, "train min"], rows)

    if "new default" in names:
        rows = [[f"trained on {t}", *[cell(runs, ("new default", t), e, ("accuracy",)) for e in DATASETS]]
                for t in DATASETS]
        table("Cross-dataset accuracy (%) of the new default, mean ± std", ["", *DATASETS], rows)
    if "new default + masks" in names:
        rows = [[f"{name} (trained on LFW-FER)", *[cell(runs, (name, "LFW-FER"), d) for d in DATASETS]]
                for name in ("new default", "new default + masks")]
        table("Mask augmentation: trained on the bare archive, evaluated on bare and masked faces (acc / macro-F1 %)",
              ["model", *DATASETS], rows)
    shown = [n for n in ("new default", *PRECISION) if n in names and any(runs.get((n, d)) for d in DATASETS)]
    if any(n in shown for n in PRECISION):
        rows = [[name if name in PRECISION else "new default (amp auto: bf16 on CUDA, off on a CPU)",
                 *[cell(runs, (name, d), d) for d in DATASETS],
                 "–" if minutes(name) is None else f"{minutes(name):.1f}"] for name in shown]
        table("Precision: the new default with train.amp off (fp32) and bf16 autocast (acc / macro-F1 %)",
              ["recipe", *DATASETS, "train min"], rows)
    name = "new default, sqrt class weights"
    if name in names and any(runs.get((name, d)) for d in DATASETS):
        rows = [[n, *[cell(runs, (n, d), d) for d in DATASETS]] for n in ("new default", name)]
        table("Class weights on each archive: none (the new default) vs sqrt inverse frequency (acc / macro-F1 %)",
              ["recipe", *DATASETS], rows)
    if any(runs.get((n, UNION)) for n in UNION_RECIPES if n in names):
        rows = [[f"{name}", *[cell(runs, (name, UNION), d) for d in DATASETS],
                 "–" if minutes(name, (UNION,)) is None else f"{minutes(name, (UNION,)):.1f}"]
                for name in UNION_RECIPES if name in names]
        table(f"One model for all three archives: trained on {UNION}, evaluated on each (acc / macro-F1 %)",
              ["model", *DATASETS, "train min"], rows)
    if "new default + face crop" in names:
        rows = []
        for ds, fr in FRAMED.items():
            if ("new default + face crop", ds) not in runs:
                continue
            rows.append([ds, cell(runs, ("new default", ds), ds, ("accuracy",)),
                         cell(runs, ("new default + face crop", ds), fr, ("accuracy",)),
                         f"{100 * zs[ds]['accuracy']:.2f}",
                         f"{100 * zs[fr]['accuracy']:.2f}" if fr in zs else "–"])
        table("Face crop: faces framed in 250 px photos, prepared with face_crop=detect (accuracy %)",
              ["archive", "unframed, new default", "framed + face crop, new default", "zero-shot unframed",
               "zero-shot framed + face crop"], rows)

    print("\nGoals (means over the kept runs)")
    for d in DATASETS:
        acc, f1 = mean(("new default", d), d), mean(("new default", d), d, "macro_f1")
        if acc is None:
            continue
        dz = (acc - zs[d]["accuracy"]) * 100, (f1 - zs[d]["macro_f1"]) * 100
        goal(f"{d}: new default >= zero-shot +3 acc / +8 macro-F1", dz[0] >= 3 and dz[1] >= 8,
             f"{dz[0]:+.2f} / {dz[1]:+.2f}")
        if mean(("HSEmotion", d), d) is not None:
            dh = [(acc - mean(("HSEmotion", d), d)) * 100, (f1 - mean(("HSEmotion", d), d, "macro_f1")) * 100]
            goal(f"{d}: new default >= HSEmotion +2 acc and macro-F1", min(dh) >= 2, f"{dh[0]:+.2f} / {dh[1]:+.2f}")
    for masked_key, without_key in ((("new default + masks", "LFW-FER"), ("new default", "LFW-FER")),
                                    (("new default + masks (union)", UNION), ("new default (union)", UNION))):
        if mean(masked_key, "LFW-FER") is None:
            continue
        trained = f"trained on {masked_key[1]}"
        bare_acc, mask_acc = mean(masked_key, "LFW-FER"), mean(masked_key, "M-LFW-FER")
        goal(f"masked accuracy >= 0.95 x bare accuracy (mask-augmented, {trained})", mask_acc >= 0.95 * bare_acc,
             f"{100 * mask_acc:.2f} vs {100 * bare_acc:.2f} (ratio {mask_acc / bare_acc:.3f})")
        without = mean(without_key, "M-LFW-FER")
        if without is not None:
            goal(f"masked accuracy >= same recipe without masks + 5 ({trained})", (mask_acc - without) * 100 >= 5,
                 f"{100 * mask_acc:.2f} vs {100 * without:.2f} ({100 * (mask_acc - without):+.2f})")
    for ds, fr in FRAMED.items():
        a, b = mean(("new default + face crop", ds), fr), mean(("new default", ds), ds)
        if a is not None and b is not None:
            goal(f"{ds}: framed + face crop within 2 points of unframed", abs(a - b) * 100 <= 2, f"{100 * (a - b):+.2f}")
    # time on the archives both recipes trained on
    # The fastest run of each: on a shared machine a run that had company is only slower.
    both = [d for d in DATASETS if runs.get(("new default", d)) and runs.get(("previous default", d))]
    if both:
        t_new = min(r["train_seconds"] for d in both for r in runs[("new default", d)])
        t_old = min(r["train_seconds"] for d in both for r in runs[("previous default", d)])
        goal("training time <= 1.3 x the previous default's (fastest run of each)", t_new <= 1.3 * t_old,
             f"{t_new / t_old:.2f}x, {t_new / 60:.1f} vs {t_old / 60:.1f} min ({', '.join(both)})")


def run_ablation(base, seeds: list[int], zs: dict) -> int:
    variants = ablations()
    # The new default is evaluated everywhere, so that the main benchmark reuses these runs.
    results = {name: [run_one(base, name, ov, "LFW-FER", s, eval_sets=DATASETS if not ov else ("LFW-FER",))
                      for s in seeds] for name, ov in variants.items()}
    rows = [["zero-shot", f"{100 * zs['LFW-FER']['accuracy']:.2f}", f"{100 * zs['LFW-FER']['macro_f1']:.2f}", "–"]]
    for name, got in results.items():
        rows.append([name, pct(metric(got, "LFW-FER", "accuracy")), pct(metric(got, "LFW-FER", "macro_f1")),
                     f"{statistics.fmean(r['train_seconds'] for r in got) / 60:.1f}"])
    table(f"Ablation on LFW-FER: one change from the new default, mean ± std over {len(seeds)} seeds",
          ["variant", "accuracy %", "macro-F1 %", "train min"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
