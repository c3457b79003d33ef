"""P6 inference on the CPU, measured side by side in one run (issue 10).

    python benchmarks/bench_inference.py [--shared ../shared] [--images 1000] [--rounds 3]

Engines on the same 3-class Predictor (ferflow.models.inference): eager torch, torch.compile
and onnxruntime (the file `ferflow export` writes: normalisation and softmax inside).
Models: tf_efficientnet_b0 at 224 px (timm architecture, random 3-class head) and
fer7_b0_112 at 112 px (../shared's FER checkpoint, zero-shot head mapped to 3 classes).
Measured: img/s at batch 64 (rounds interleaved across engines, best round kept: this
machine is shared and a round beside other work is only slower) and p50 / p95 latency at
batch 1. Then `ferflow predict`'s own loop (read, decode, crop, infer, in batches of 64)
on a folder of JPEG faces against its engine alone at batch 64.

Goals: the fastest engine >= 2x eager torch at batch 64; predict >= 0.8x its engine alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ferflow.config import load_params  # noqa: E402
from ferflow.cpus import available_cpus  # noqa: E402
from ferflow.models import inference, zoo  # noqa: E402
from ferflow.models.preprocess import Preprocess  # noqa: E402

BATCH = 64


def predictors(shared: Path) -> dict[str, inference.Predictor]:
    cpu = torch.device("cpu")
    found = {}
    entry = zoo.resolve("timm:tf_efficientnet_b0")
    torch.manual_seed(0)
    found["tf_efficientnet_b0@224"] = inference.Predictor(zoo.build_model(entry, num_classes=3), entry,
                                                           Preprocess.for_entry(entry, 224), cpu)
    checkpoint = shared / "models" / "fer7-b0-112" / "fer7_b0_112.pt"
    if checkpoint.is_file():
        params = load_params(REPO / "params.yaml", [f"models.fer7_b0_112.pretrained={checkpoint}"])
        found["fer7_b0_112@112"] = inference.load_zero_shot(params, "fer7_b0_112", cpu)
    else:
        print(f"note: {checkpoint} absent; fer7_b0_112 skipped")
    return found


def engines(predictor: inference.Predictor, work: Path, names: list[str]) -> dict:
    """name -> a function of a uint8 NCHW batch; compile and export happen here, untimed."""
    from ferflow.models.export import OnnxPredictor, export_onnx

    found = {"eager": predictor.probabilities}
    if "compile" in names:
        compiled = inference.Predictor(torch.compile(predictor.model), predictor.entry, predictor.preprocess,
                                       predictor.device, info=predictor.info, head=predictor.head,
                                       collapse=predictor.collapse, classes=predictor.classes)
        found["compile"] = compiled.probabilities
    if "onnxruntime" in names:
        path = work / f"{predictor.entry.name.replace(':', '_')}.onnx"
        export_onnx(predictor, path)
        found["onnxruntime"] = OnnxPredictor(path, threads=available_cpus()).probabilities
    return found


def throughput(run, batch: torch.Tensor, steps: int) -> float:
    run(batch)  # warm (compile's first call, onnxruntime's arena)
    start = time.perf_counter()
    for _ in range(steps):
        run(batch)
    return steps * len(batch) / (time.perf_counter() - start)


def latency(run, image: torch.Tensor, calls: int) -> tuple[float, float]:
    run(image)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(image)
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=20)
    return statistics.median(times), q[18]


def jpeg_folder(shared: Path, n: int, work: Path) -> Path:
    """n JPEG faces: the stand-in LFW-FER archive's members, else generated demo faces."""
    folder = work / "photos"
    folder.mkdir()
    archive = shared / "datasets" / "lfw-emotion-standin" / "LFW-FER.zip"
    if archive.is_file():
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.lower().endswith((".jpg", ".jpeg"))][:n]
            for i, name in enumerate(members):
                (folder / f"{i:05d}.jpg").write_bytes(zf.read(name))
        return folder
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (250, 250, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="batches of 64 per round and engine")
    parser.add_argument("--models", default="tf_efficientnet_b0@224,fer7_b0_112@112")
    parser.add_argument("--engines", default="eager,compile,onnxruntime",
                        help="eager always runs; torch.compile of a model takes minutes on 2 cores")
    args = parser.parse_args(argv)
    torch.set_num_threads(available_cpus())
    print(f"CPUs {available_cpus()}, torch {torch.__version__}, batch {BATCH}, best of {args.rounds} rounds")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        wanted = args.models.split(",")
        models = {k: v for k, v in predictors(args.shared).items() if k in wanted}
        best = {}
        for label, predictor in models.items():
            size = predictor.preprocess.size
            runs = engines(predictor, work, args.engines.split(","))
            batch = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0))
            rates = {name: 0.0 for name in runs}
            for _ in range(args.rounds):  # interleaved: each round sees all engines under like load
                for name, run in runs.items():
                    rates[name] = max(rates[name], throughput(run, batch, args.steps))
            lat = {name: latency(run, batch[:1], 40) for name, run in runs.items()}
            best[label] = rates
            print(f"\n{label}")
            print(f"{'engine':<12}{'img/s @64':>11}{'vs eager':>10}{'p50 ms @1':>11}{'p95 ms @1':>11}")
            for name in runs:
                print(f"{name:<12}{rates[name]:>11.1f}{rates[name] / rates['eager']:>9.2f}x"
                      f"{lat[name][0]:>11.2f}{lat[name][1]:>11.2f}")
            fastest = max(rates, key=rates.get)
            ratio = rates[fastest] / rates["eager"]
            print(f"fastest: {fastest}, {ratio:.2f}x eager; goal >= 2x: {'met' if ratio >= 2 else 'NOT met'}")
            ok &= ratio >= 2

        from ferflow.serving.predict import decode_workers, find_images, predict_images

        label = "fer7_b0_112@112" if "fer7_b0_112@112" in models else "tf_efficientnet_b0@224"
        predictor = models[label]
        folder = jpeg_folder(args.shared, args.images, work)
        sources = find_images([folder])
        predict_images(predictor, sources[:BATCH], BATCH, workers=decode_workers())  # warm
        crop = Preprocess(**{**predictor.preprocess.as_record(), "face_crop": "center:0.55"})
        cropped = inference.Predictor(predictor.model, predictor.entry, crop, predictor.device, info=predictor.info,
                                      head=predictor.head, collapse=predictor.collapse, classes=predictor.classes)
        rate = 0.0
        for _ in range(args.rounds):
            start = time.perf_counter()
            result = predict_images(cropped, sources, BATCH, workers=decode_workers())
            rate = max(rate, len(result.predictions) / (time.perf_counter() - start))
        engine = best[label]["eager"]  # predict runs the torch Predictor
        print(f"\n`ferflow predict` loop, {len(sources)} JPEGs in {folder.name}/ ({label}, centre crop 0.55, "
              f"{decode_workers()} decode threads): {rate:.1f} img/s vs its engine alone (eager @64) "
              f"{engine:.1f}: {rate / engine:.2f}x; goal >= 0.8x: {'met' if rate / engine >= 0.8 else 'NOT met'}")
        ok &= rate / engine >= 0.8
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
