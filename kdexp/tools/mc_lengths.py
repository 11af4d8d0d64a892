"""How many multiple-choice questions a maximum length keeps whole: per split, the share of questions whose
every option sequence (encoders: passage, question with option) fits in each length; the others lose the
end of their passage. For choosing `data.max_length` on DREAM, RACE or one's own files.

    MRC_DIR=../shared/mrc_data python -m kdexp.tools.mc_lengths task=dream --lengths 128,256,384,512

The overrides compose like `kdexp-train`'s (task, data source, `teacher.name_or_path` for the tokenizer);
the splits are read whole (`data.max_*_samples` are ignored).
"""

from __future__ import annotations

import argparse
import json

from kdexp.data import DataSource, load_split
from kdexp.errors import ConfigError
from kdexp.families import multiple_choice
from kdexp.models import load_tokenizer, resolve_model_path
from kdexp.run import compose_config, task_from_config
from kdexp.tasks import MULTIPLE_CHOICE


def question_lengths(rows: dict[str, list], tokenizer: object) -> list[int]:
    """Per question, the tokens of its longest option sequence, the passage untruncated."""
    firsts, seconds = [], []
    for context, question, choices in zip(rows["context"], rows["question"], rows["choices"]):
        firsts += [context] * len(choices)
        seconds += [multiple_choice.option_text(question, choice) for choice in choices]
    lengths = [len(ids) for ids in tokenizer(firsts, seconds)["input_ids"]]  # type: ignore[operator]
    longest, start = [], 0
    for choices in rows["choices"]:
        longest.append(max(lengths[start : start + len(choices)]))
        start += len(choices)
    return longest


def mc_lengths(overrides: list[str], lengths: list[int]) -> dict:
    cfg = compose_config(["logger=none", *overrides])
    task = task_from_config(cfg.task)
    if task.family != MULTIPLE_CHOICE:
        raise ConfigError(f"task={task.name} is not multiple choice; give task=dream, task=race or one's own MC files.")
    source = DataSource.from_config(cfg.data.source, cfg.data.glue_dir, cfg.data.hub_dataset, cfg.data.mrc_dir)
    tokenizer = load_tokenizer(resolve_model_path(cfg.teacher.name_or_path, "teacher.name_or_path"))
    report: dict = {"task": task.name, "tokenizer": str(cfg.teacher.name_or_path), "splits": {}}
    for split in (task.train_split, *task.eval_splits):
        per_question = question_lengths(load_split(task, split, source).to_dict(), tokenizer)
        report["splits"][split] = {
            "questions": len(per_question),
            "fits": {
                length: round(sum(n <= length for n in per_question) / len(per_question), 4) for length in lengths
            },
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for kdexp-train (task=dream ...)")
    parser.add_argument("--lengths", default="128,256,384,512", help="comma-separated maximum lengths")
    args = parser.parse_args()
    print(json.dumps(mc_lengths(args.overrides, [int(n) for n in args.lengths.split(",")]), indent=2))


if __name__ == "__main__":
    main()
