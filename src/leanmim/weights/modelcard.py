"""A short model card (``README.md``) for every export folder: what was trained, on which data, how far, the
figures the run has measured, and how to load the folder. Everything in it is read from the run's own files
(``run.json``, ``summary.json``, ``finetune.json``); a figure the run has not measured is left out, never guessed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import atomic_write_text, read_json_object


def _percent(value: Any) -> str:
    return f"{100 * value:.2f} %" if isinstance(value, (int, float)) else "not measured"


def model_card(checkpoint_path: Path, library: str, classifier: bool, notes: list[str] | None = None) -> str:
    """The card's Markdown for the run (or fine-tuning) whose checkpoint is ``checkpoint_path``; ``notes``: where
    the exported model differs from what leanmim evaluated."""
    directory = Path(checkpoint_path).parent.parent
    results = read_json_object(directory / "finetune.json") if classifier else {}
    pretraining = Path(results["source"]).parent.parent if results.get("source") else directory
    summary, record = read_json_object(pretraining / "summary.json"), read_json_object(pretraining / "run.json")
    identity = record.get("identity", {})
    lines = ["---", "library_name: " + ("timm" if library == "timm" else "transformers"), "tags: [leanmim, vit, "
             "masked-image-modeling]", "---", "",
             f"# {'Fine-tuned classifier' if classifier else 'Pretrained encoder'} from leanmim", "",
             f"- method: {identity.get('method', summary.get('method', 'unknown'))}, model "
             f"{identity.get('model.name', summary.get('model', 'unknown'))}",
             f"- pretraining data: {record.get('facts', {}).get('data_path', 'unknown')} (fingerprint "
             f"{identity.get('data.fingerprint', 'not recorded')})",
             f"- pretraining steps: {summary.get('global_step', 'unknown')} of {summary.get('total_steps', 'unknown')}",
             f"- exported from: {checkpoint_path}"]
    for key, probe in sorted((summary.get("probes") or {}).items()):
        lines.append(f"- probe {key}: kNN top-1 {_percent(probe.get('knn_top1'))}, linear top-1 "
                     f"{_percent(probe.get('linear_top1'))} ({probe.get('data')})")
    if classifier:
        lines += [f"- fine-tuned on: {results.get('data')} ({results.get('num_train')} training images, classes "
                  f"{', '.join(results.get('class_names') or [])})",
                  f"- selected epoch {results.get('selected_epoch')} on validation: val top-1 "
                  f"{_percent(results.get('selected_val_top1'))}, test top-1 {_percent(results.get('selected_test_top1'))}"]
    lines += ["", "## Loading", "", "```python"]
    if library == "timm":
        lines += ["import timm", "from PIL import Image", "from timm.data import resolve_data_config, create_transform",
                  "model = timm.create_model('local-dir:THIS_FOLDER', pretrained=True).eval()",
                  "transform = create_transform(**resolve_data_config({}, model=model))",
                  "output = model(transform(Image.open('image.jpg').convert('RGB')).unsqueeze(0))"]
        if classifier:
            lines.append("labels = model.pretrained_cfg['label_names']")
    else:
        auto = "AutoModelForImageClassification" if classifier else "AutoModel"
        lines += ["from PIL import Image", f"from transformers import AutoImageProcessor, {auto}",
                  "processor = AutoImageProcessor.from_pretrained('THIS_FOLDER')",
                  f"model = {auto}.from_pretrained('THIS_FOLDER').eval()",
                  "output = model(**processor(images=Image.open('image.jpg').convert('RGB'), return_tensors='pt'))"]
        if classifier:
            lines.append("label = model.config.id2label[output.logits.argmax(-1).item()]")
    lines += ["```", "", "Preprocessing (resize, crop, mean, std) is the one leanmim evaluates with; it travels in "
              + ("config.json's pretrained_cfg." if library == "timm" else
                 "preprocessor_config.json (a CLIPImageProcessor: shorter side resized, centre crop)."), ""]
    lines += [f"Note: {note}." for note in notes or []] + ([""] if notes else [])
    return "\n".join(lines)


def write_model_card(out: Path, checkpoint_path: Path, library: str, classifier: bool,
                     notes: list[str] | None = None) -> Path:
    path = Path(out) / "README.md"
    atomic_write_text(path, model_card(checkpoint_path, library, classifier, notes))
    return path
