"""Recipe quality over seeds (issue 8): fer7_b0_112 at 112 px on the stand-in archives.

Every recipe is trained through the normal stage functions (`stages.train`, `stages.evaluate`)
with the same epoch budget, evaluated on the eval split of every archive, and summarised as
mean ± std over seeds beside the zero-shot figure of the same checkpoint. Each finished run
is kept under benchmarks/out/quality/ (one JSON per recipe, training set and seed), so an
interrupted benchmark continues where it stopped; `--fresh` starts over.

    python benchmarks/bench_quality.py                       # the issue's table (3 seeds)
    python benchmarks/bench_quality.py --recipes "new default" --seeds 1
    python benchmarks/bench_quality.py --ablation            # the measurements behind the defaults

Recipes (all with the budget of --head-epochs + --full-epochs):
    HSEmotion          Adam + SAM, constant lr 1e-3 / 1e-4, no augmentation, LS 0.1 x class weights, batch 64
    previous default   the params.yaml recipe before issue 8 (random head, one lr, BN in train mode, ...)
    new default        params.yaml as it is
    new default + masks        synthetic masks on the bare archive (train.augment.synthetic_mask_p)
    new default + face crop    faces placed in larger frames, prepared with prepare.face_crop=detect
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

DATASETS = ("LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut")
OUT = WORK / "quality"
MODEL = "fer7_b0_112"

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
RECIPES: dict[str, list[str]] = {
    "HSEmotion": HSEMOTION,
    "previous default": PREVIOUS_DEFAULT,
    "new default": [],
}


def ablations() -> dict[str, list[str]]:
    """One change at a time from the new default: what each default choice is worth."""
    return {
        "new default": [],
        "head_init=random": ["train.head_init=random"],
        "layer_decay=1 (one lr)": ["train.layer_decay=1.0"],
        "batchnorm=train": ["train.batchnorm=train"],
        "class_weights=inverse_frequency": ["train.loss.class_weights=inverse_frequency"],
        "class_weights=none": ["train.loss.class_weights=none"],
        "augment: previous (erasing 0.25)": ["train.augment.erasing_p=0.25"],
        "augment: none": ["train.augment.hflip=false", "train.augment.rotate_deg=0", "train.augment.translate=0",
                          "train.augment.scale=[1.0, 1.0]", "train.augment.erasing_p=0"],
    }


def run_one(base, recipe: str, overrides: list[str], train_ds: str, seed: int, eval_sets=DATASETS) -> dict:
    """Train + evaluate once, or read the result of an earlier identical run."""
    tag = recipe.replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "")
    record = OUT / "runs" / tag / train_ds / f"seed{seed}.json"
    if record.is_file():
        data = json.loads(record.read_text())
        if data.get("overrides") == overrides:
            return data
    work = OUT / "work" / tag / train_ds / f"seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    p = load_params_like(base, [f"seed={seed}", f"train.out_dir={work / 'models'}",
                                f"evaluate.out_dir={work / 'evaluation'}", *overrides])
    start = time.perf_counter()
    result = stages.train(p, train_ds, MODEL)
    train_s = time.perf_counter() - start
    summary = stages.evaluate(p, train_ds, MODEL, list(eval_sets))
    data = {"recipe": recipe, "overrides": overrides, "train_dataset": train_ds, "seed": seed,
            "train_seconds": train_s, "best_epoch": result.best_epoch,
            "history": [{k: h[k] for k in ("epoch", "stage", "val_accuracy", "val_macro_f1")} for h in result.history],
            "eval": {ds: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} for ds, m in summary.items()}}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(data, indent=1))
    shutil.rmtree(work / "models", ignore_errors=True)  # weights are not needed after evaluation
    print(f"  {recipe} | train {train_ds} | seed {seed}: "
          + ", ".join(f"{ds} {100 * m['accuracy']:.2f}/{100 * m['macro_f1']:.2f}" for ds, m in data["eval"].items())
          + f" | best epoch {result.best_epoch} | {train_s / 60:.1f} min", flush=True)
    return data


def zero_shot(base, eval_sets=DATASETS) -> dict:
    record = OUT / "zero-shot.json"
    if record.is_file():
        return json.loads(record.read_text())
    p = load_params_like(base, [f"evaluate.out_dir={OUT / 'work' / 'zero-shot'}"])
    summary = stages.zero_shot(p, MODEL, list(eval_sets))
    data = {ds: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} for ds, m in summary.items()}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(data, indent=1))
    return data


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: list[float]) -> str:
    m, s = mean_std([100 * v for v in values])
    return f"{m:.2f} ± {s:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--recipes", nargs="*", help="subset of recipe names (default: all)")
    ap.add_argument("--train-on", nargs="*", default=list(DATASETS), help="training archives")
    ap.add_argument("--ablation", action="store_true", help="one-change-at-a-time variants on LFW-FER")
    ap.add_argument("--head-epochs", type=int, default=1)
    ap.add_argument("--full-epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--fresh", action="store_true", help="forget earlier results")
    args = ap.parse_args()
    for path, what in ((STANDIN / "SHA256SUMS", "stand-in archives (FERFLOW_STANDIN)"), (FER7, "fer7 checkpoint (FERFLOW_FER7)")):
        if not path.is_file():
            sys.exit(f"{what} not found at {path}")
    if args.fresh:
        shutil.rmtree(OUT, ignore_errors=True)
    budget = [f"train.head_stage.epochs={args.head_epochs}", f"train.full_stage.epochs={args.full_epochs}",
              "train.early_stopping_patience=0", "train.workers=2"]
    base = standin_params(args.size, budget)
    ensure_prepared(base, DATASETS)
    seeds = [42 + i for i in range(args.seeds)]
    print(f"fer7_b0_112 at {args.size} px, {args.head_epochs} head + {args.full_epochs} full epochs, seeds {seeds}, "
          f"{os.cpu_count()} cores", flush=True)
    zs = zero_shot(base)

    recipes = ablations() if args.ablation else RECIPES
    train_on = ["LFW-FER"] if args.ablation else args.train_on
    names = args.recipes or list(recipes)
    rows = {}
    for name in names:
        for ds in train_on:
            rows[(name, ds)] = [run_one(base, name, recipes[name], ds, s) for s in seeds]

    print(f"\nIn-domain eval accuracy / macro-F1 (%), mean ± std over {len(seeds)} seeds; train minutes")
    print(f"{'recipe':<34}" + "".join(f"{ds:>34}" for ds in train_on))
    print(f"{'zero-shot':<34}" + "".join(
        f"{100 * zs[ds]['accuracy']:>15.2f} / {100 * zs[ds]['macro_f1']:<15.2f}" for ds in train_on))
    for name in names:
        cells = []
        for ds in train_on:
            runs = rows[(name, ds)]
            cells.append(f"{cell([r['eval'][ds]['accuracy'] for r in runs]):>15} / "
                         f"{cell([r['eval'][ds]['macro_f1'] for r in runs]):<15}")
        minutes = statistics.fmean(r["train_seconds"] for ds in train_on for r in rows[(name, ds)]) / 60
        print(f"{name:<34}" + "".join(f"{c:>34}" for c in cells) + f"  {minutes:5.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
