"""Stage entry points: the one implementation that the CLI, dvc.yaml and KFP components call."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import yaml

from ferflow.config import ArchiveSpec, Params, apply_override, dump_params, parse_override, validate
from ferflow.errors import FerflowError


def select_archives(params: Params, names: Optional[Iterable[str]]) -> list[ArchiveSpec]:
    names = list(names or [])
    if not names:
        return params.data.specs
    return [params.data.archive(n) for n in names]


def fetch(params: Params, names: Optional[Iterable[str]] = None):
    """Download (or reuse) and verify the archives named in params."""
    from ferflow.data.sources import fetch_archive

    params.data.raw_dir.mkdir(parents=True, exist_ok=True)
    return [fetch_archive(spec, params.data.raw_dir, params.fetch) for spec in select_archives(params, names)]


def prepare(params: Params, names: Optional[Iterable[str]] = None):
    """Extract, validate and cache each dataset (manifest + report + uint8 caches)."""
    from ferflow.data.prepare import prepare_dataset

    return [
        prepare_dataset(spec, params.data.raw_dir, params.data.prepared_dir, params.prepare)
        for spec in select_archives(params, names)
    ]


def demo_data(params: Params, out_dir: Optional[Path] = None, params_out: Optional[Path] = None):
    """Generate the offline demo archives; optionally write a params file that uses them.

    The written params differ from the input only in `data.archives`, which then point at
    the generated files with their sha256, so the demo runs through the normal fetch path.
    """
    from ferflow.data.demo import demo_sources, generate_demo_archives

    out_dir = Path(out_dir or params.demo.out_dir)
    archives = generate_demo_archives(params.demo, out_dir)
    if params_out is not None:
        tree = dump_params(params)
        for text in params.demo.overrides:
            keys, value = parse_override(text)
            apply_override(tree, keys, value, origin=f"demo.overrides: {text}")
        sources = demo_sources(archives)
        if not out_dir.is_absolute():
            # Relative paths in a params file are read from where its stages run: its folder.
            base = params_out.parent.resolve()
            for src in sources:
                src["uri"] = _relative_to(Path(src["uri"]).resolve(), base)
        tree["data"]["archives"] = {src.pop("name"): src for src in sources}
        validate(tree, origin=str(params_out))  # never write a params file that would not load
        write_yaml_atomic(params_out, tree)
    return archives


def _relative_to(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def write_yaml_atomic(path: Path, tree: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FerflowError(f"cannot write {path}: {exc}") from None


def train(params: Params, dataset: str, model: str, callbacks=()):
    """Fine-tune one zoo model on one prepared dataset (resumes a run dir with last.pt)."""
    from ferflow.training.trainer import train as train_model

    return train_model(params, dataset, model, callbacks=callbacks)


def evaluate(params: Params, dataset: str, model: str, eval_datasets: Optional[Iterable[str]] = None) -> dict:
    """Cross-dataset evaluation of the run trained on `dataset`."""
    from ferflow.evaluation.evaluate import evaluate_run

    return evaluate_run(params, dataset, model, eval_datasets)


def zero_shot(params: Params, model: str, eval_datasets: Optional[Iterable[str]] = None) -> dict:
    """The pretrained expression head mapped to 3 classes: the 'before fine-tuning' row."""
    from ferflow.evaluation.evaluate import evaluate_zero_shot

    return evaluate_zero_shot(params, model, eval_datasets)


def report(params: Params):
    """The models x datasets table beside the seed's published numbers."""
    from ferflow.evaluation.report import collect_results, write_report

    results = collect_results(params.evaluate.out_dir)
    return results, write_report(results, params.report.out_dir)
