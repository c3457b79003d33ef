"""The model card: the Markdown description of a registered version (what it is, how it did
against its zero-shot starting point, what it is for, its licence)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ferflow.tracking.packaging import ENGINE_TAG, ONNX_OPSET_TAG, ONNX_PATH_TAG, ONNX_SHA_TAG, WEIGHTS_TAG

if TYPE_CHECKING:
    from ferflow.tracking.queries import Evaluation

LICENCE_NOTE = (
    "Fine-tuned on the LFW emotion dataset (Yang, Wu, Hattori, MUM 2020; "
    "KDDI-AI-Center/LFW-emotion-dataset), released for academic / non-commercial use only: "
    "this model inherits that restriction. The base checkpoint keeps its own licence."
)


def model_card(name: str, info: dict, dataset: str, tags: dict, evaluation: Evaluation) -> str:
    """A short Markdown model card: what it is, how it did, what it is for."""
    base, base_sha = tags.get("model.base_checkpoint", "none"), tags.get("model.base_sha256", "none")
    per = evaluation.per_dataset()
    rows = []
    for eval_ds in sorted(per, key=lambda d: (d != dataset, d)):
        m = per[eval_ds]
        rows.append(f"| {eval_ds}{' (in-domain)' if eval_ds == dataset else ''} | {_pct(m.get('accuracy'))} | "
                    f"{_pct(m.get('macro_f1'))} | {_pct(m.get('balanced_accuracy'))} | "
                    f"{_pct(m.get('baseline_accuracy'))} | {_delta_pct(m.get('accuracy'), m.get('baseline_accuracy'))} | "
                    f"{_pct(m.get('baseline_macro_f1'))} | {_delta_pct(m.get('macro_f1'), m.get('baseline_macro_f1'))} | "
                    f"{int(m.get('n', 0)) or '–'} |")
    return "\n".join([
        f"# {name}: `{info['model']}` fine-tuned on {dataset}",
        "",
        "Facial-expression classifier with three classes: " + ", ".join(info["classes"]) + ".",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{info['model']}` (architecture `{tags.get('model.arch', '?')}`, input {info['input_size']} px) |",
        f"| base checkpoint | {base}" + (f" (sha256 `{base_sha[:16]}…`)" if base_sha != "none" else "") + " |",
        f"| initial weights | {info.get('init') or ('random' if base == 'none' else 'pretrained')} |",
        f"| training data | {dataset} (archive sha256 `{tags.get('dataset.archive_sha256', '?')[:16]}…`) |",
        f"| recipe | `{tags.get('recipe.hash', '?')}` (ferflow {tags.get('ferflow.version', '?')}, "
        f"git `{tags.get('git.commit', '?')[:12]}`) |",
        f"| weights | sha256 `{tags[WEIGHTS_TAG][:16]}…` |",
        *([f"| ONNX | `{tags[ONNX_PATH_TAG]}` of this version's model (sha256 `{tags[ONNX_SHA_TAG][:16]}…`, "
            f"opset {tags.get(ONNX_OPSET_TAG, '?')}): uint8 RGB NCHW in, probabilities out; "
            f"served by {tags.get(ENGINE_TAG, 'torch')} |"] if ONNX_SHA_TAG in tags else []),
        f"| source run | `{tags['source_run_id']}` |",
        "",
        f"## Evaluation ({tags.get('eval.split', 'eval')} split, data manifest `{tags['eval.manifest_sha256'][:16]}…`)",
        "",
        "Zero-shot: the base checkpoint's own expression head mapped to the three classes, on the "
        "same images: the starting point this model must beat to be promoted.",
        "",
        "| evaluated on | accuracy % | macro F1 % | balanced accuracy % | zero-shot accuracy % | Δ accuracy | "
        "zero-shot macro F1 % | Δ macro F1 | images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "## Intended use",
        "",
        "Research and benchmarking of facial-expression recognition on face images like LFW's "
        "(one face per image, RGB). Input: a DataFrame column `image` with base64-encoded image "
        "bytes; output: `label` and `p_<class>` probabilities. Not for decisions about people: "
        "expressions are not emotions, and accuracy drops on other data (see the cross-dataset rows).",
        "",
        "## Licence",
        "",
        LICENCE_NOTE,
        "",
    ])


def _pct(value) -> str:
    return "–" if value is None else f"{100.0 * float(value):.2f}"


def _delta_pct(value, start) -> str:
    return "–" if value is None or start is None else f"{100.0 * (float(value) - float(start)):+.2f}"
