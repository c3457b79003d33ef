"""Bytes each Kubeflow task reads, per task and per run, from compiled pipelines.

    python benchmarks/bench_pipeline.py [--before GIT_REF] [--after pipelines/ferflow.yaml]

The KFP launcher copies every input artifact onto the pod before the code starts
(FACTS.md), so a task reads the sizes of its input artifacts, plus what its code downloads
itself (a component that calls `stages.fetch` for its dataset). Both pipelines are
read from their compiled YAML: the tasks, the loops they sit in (the matrix of (dataset,
model) pairs, the models), and each input's producing task. Artifact sizes come from
params.yaml: the real archives' sizes and image counts (FACTS.md), the image sizes of
prepare, the models' input sizes. Each task is compared with its own minimum
(`sizing.minimum_bytes`: its images in the smallest form offered, plus its model).

Goals (issue 9): every task <= 1.1x its minimum; the run total <= 1/8 of before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ferflow.config import Params, load_params  # noqa: E402
from ferflow.pipeline import sizing  # noqa: E402

BEFORE = "6d617ac"  # the last commit whose pipeline passed one `prepared` artifact to every task
# Measured (benchmarks/RESULTS.md): `ferflow train` on one H200, tf_efficientnet_b0 at 224 px,
# fp32, warm epochs; `ferflow prepare` on the 2-core VM, both cache sizes written.
H200_TRAIN_IMAGES_PER_S = 3280
PREPARE_IMAGES_PER_S_2_CPUS = 1950


def artifact_bytes(params: Params, producer: str, artifact: str, dataset: str, model: str) -> int:
    """Size of one input artifact by the task and output that made it."""
    every = list(params.data.archives)
    if (producer, artifact) == ("fetch", "raw"):
        return sizing.archives_bytes(params, every)
    if (producer, artifact) == ("prepare", "prepared"):  # every dataset at every cache size
        return sum(sizing.cache_bytes(params, every, s) for s in params.prepare.image_sizes)
    if artifact == "model":  # `registered` holds only the version record
        return sizing.WEIGHTS_BYTES
    return sizing.SMALL_BYTES  # config, reports, evaluations


def tasks(spec: dict):
    """(task name, component name, inputs {name: (producer, artifact, gathered)}, loop) of every
    container task; `loop` is the pipeline parameter its ParallelFor iterates, if any."""
    def walk(dag: dict, loop: str | None):
        for name, task in dag["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                items = task.get("parameterIterator", {}).get("items", {}).get("inputParameter")
                yield from walk(component["dag"], (items or "").removeprefix("pipelinechannel--") or loop)
                continue
            inputs = {}
            for key, source in task.get("inputs", {}).get("artifacts", {}).items():
                if "componentInputArtifact" in source:  # from outside the loop: the channel names it
                    inputs[key] = (*_split_channel(source["componentInputArtifact"]), False)
                else:
                    ref = source["taskOutputArtifact"]
                    if ref["producerTask"].startswith("for-loop"):  # gathered with dsl.Collected
                        inputs[key] = (*_split_channel(ref["outputArtifactKey"]), True)
                    else:
                        inputs[key] = (ref["producerTask"], ref["outputArtifactKey"], False)
            yield name, task["componentRef"]["name"], inputs, loop
    yield from walk(spec["root"]["dag"], None)


def _split_channel(channel: str) -> tuple[str, str]:
    name = channel.removeprefix("pipelinechannel--")
    for task in ("zero-shot", "fetch", "prepare", "train", "evaluate", "register"):
        if name.startswith(task + "-"):
            return task, name[len(task) + 1:]
    raise ValueError(f"cannot tell the producer of channel {channel}")


def measure(text: str, params: Params) -> dict:
    """task -> list of (reads, minimum) over its instances in one run."""
    spec = yaml.safe_load(text.split("\n---\n")[0])
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    matrix = [(p["dataset"], p["model"]) for p in defaults["matrix"]["defaultValue"]]
    models = list(defaults["models"]["defaultValue"])
    executors = spec["deploymentSpec"]["executors"]
    runs = defaultdict(list)
    for name, component, inputs, loop in tasks(spec):
        command = json.dumps(executors[spec["components"][component]["executorLabel"]]["container"])
        fetches_own = "stages.fetch(" in command and name != "fetch"
        instances = {"matrix": matrix, "models": [("", m) for m in models]}.get(loop, [("", "")])
        for dataset, model in instances:
            reads = 0
            for producer, artifact, gathered in inputs.values():
                size = artifact_bytes(params, producer, artifact, dataset, model)
                reads += size * (len(matrix) if producer != "zero-shot" else len(models)) if gathered else size
            if fetches_own:
                reads += sizing.archives_bytes(params, params.data.members(dataset))
            if name == "fetch":
                reads += sizing.archives_bytes(params, params.data.archives)
            kind = name if name in ("fetch", "train", "evaluate", "zero-shot", "register", "promote", "report") \
                else "prepare"
            minimum = (sizing.archives_bytes(params, params.data.archives) if kind == "prepare"
                       else sizing.minimum_bytes(params, kind, dataset, model))
            runs[name].append((reads, minimum))
    return runs


def cost(params: Params) -> None:
    """GPU time of one run's trainings at the measured H200 rate (pixels scale it to other
    sizes: optimistic for B2, whose FLOPs per pixel are higher), and the in-task decode."""
    train = params.require_train()
    epochs = train.head_stage.epochs + train.full_stage.epochs
    gpu_s = decode_s = 0.0
    for dataset in train.datasets:
        images = sum(sizing.archive_images(params, m) for m in params.data.members(dataset))
        for model in train.models:
            size = sizing.model_size(params, model)
            gpu_s += images * epochs / (H200_TRAIN_IMAGES_PER_S * (224 / size) ** 2)
            decode_s += images / PREPARE_IMAGES_PER_S_2_CPUS
    pairs = len(train.datasets) * len(train.models)
    print(f"\ncost of one run ({pairs} trainings, {epochs} epochs each, at most every image per epoch):")
    print(f"  GPU compute at the H200's measured rate: {gpu_s / 3600:.2f} GPU-hours "
          f"({gpu_s / pairs / 60:.1f} min per training, plus pod start-up)")
    print(f"  in-task decode before each training: {decode_s / pairs:.0f} s on 2 CPUs "
          f"({decode_s / 60:.1f} CPU-pair-minutes per run)")


def gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help="git ref of the pipeline to compare against")
    parser.add_argument("--after", type=Path, default=REPO / "pipelines" / "ferflow.yaml")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    before_text = subprocess.run(["git", "show", f"{args.before}:pipelines/ferflow.yaml"], cwd=REPO, check=True,
                                 capture_output=True, text=True).stdout
    results = {"before": measure(before_text, params), "after": measure(args.after.read_text(), params)}
    totals = {}
    for label, runs in results.items():
        print(f"\n{label} ({args.before if label == 'before' else args.after.name}): bytes read per task")
        print(f"{'task':<12}{'tasks':>6}{'each (max)':>14}{'minimum':>12}{'ratio':>8}{'per run':>14}")
        total = 0
        for name, instances in runs.items():
            worst = max(instances, key=lambda rm: rm[0] / max(rm[1], 1))
            run_total = sum(r for r, _ in instances)
            total += run_total
            print(f"{name:<12}{len(instances):>6}{gb(max(r for r, _ in instances)):>14}{gb(worst[1]):>12}"
                  f"{worst[0] / max(worst[1], 1):>7.2f}x{gb(run_total):>14}")
        totals[label] = total
        print(f"{'total':<12}{sum(map(len, runs.values())):>6}{'':>34}{gb(total):>14}")
    after = results["after"]
    worst = max(r / max(m, 1) for inst in after.values() for r, m in inst)
    ratio = totals["after"] / totals["before"]
    print(f"\nrun total after / before: {ratio:.4f} (1/{1 / ratio:.0f}); goal <= 1/8: "
          f"{'met' if ratio <= 1 / 8 else 'NOT met'}")
    print(f"worst task / its minimum: {worst:.2f}x; goal <= 1.1x: {'met' if worst <= 1.1 else 'NOT met'}")
    cost(params)
    return 0 if ratio <= 1 / 8 and worst <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
