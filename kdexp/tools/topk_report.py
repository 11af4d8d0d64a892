"""How much top-k truncation of ``q_t`` moves the smoothed embeddings, on a run's real MLM and dev text.

    python -m kdexp.tools.topk_report task=sst2 data.max_train_samples=1000 --top-k 16,64,256,1024

Builds the run's context for ``method=text_smoothing`` with the given overrides, takes its MLM
(the adaptation stage runs once per key, or is reused from the cache), runs it on the first
``--rows`` dev rows (text the adaptation never saw) and prints, per ``k``, the mean and
minimum mass ``q_t`` keeps in its top ``k``, the relative L2 distance of the top-k smoothed
embeddings from the exact ones, and the largest distance against its bound. It also prints
the adapted MLM's held-out masked-token accuracy and the bytes per token a top-k store takes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from kdexp.data import MODEL_INPUTS, make_loader
from kdexp.run import build_context, compose_config, resolve_method
from kdexp.smoothing.mlm_teacher import prepare_mlm_teacher
from kdexp.smoothing.smoothing import measure_topk_embedding_error


def topk_report(overrides: list[str], top_ks: list[int], rows: int) -> dict:
    cfg = compose_config(["logger=none", "method=text_smoothing", *overrides])
    context, _, _ = build_context(cfg, Path("."))
    mlm = prepare_mlm_teacher(context, resolve_method(cfg.method)[1].mlm)
    dev_split = context.data.tokenized[context.task.eval_splits[0]]
    dev = dev_split.select(range(min(rows, len(dev_split))))
    batch = next(iter(make_loader(dev, context.data, len(dev), shuffle=False)))
    with torch.no_grad():
        logits = mlm.model.eval()(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
    special = torch.tensor(sorted(context.data.tokenizer.all_special_ids))
    keep_one_hot = torch.isin(batch["input_ids"], special) | ~batch["attention_mask"].bool()
    weight = context.student.get_input_embeddings().weight
    errors = measure_topk_embedding_error(
        logits,
        batch["input_ids"],
        keep_one_hot,
        weight,
        top_ks,
        float(cfg.method.smooth_rate),
        float(cfg.method.temperature),
    )
    return {
        "overrides": overrides,
        "mlm": mlm.path,
        "adaptation_metrics": mlm.info.get("metrics"),
        "dev_rows": len(dev),
        "smoothed_positions": int((~keep_one_hot).sum()),
        "vocab_size": int(logits.shape[-1]),
        "store_bytes_per_token": {k: 6 * k for k in top_ks},  # float16 probability + int32 id
        "errors": [asdict(e) for e in errors],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run (method=text_smoothing is implied)")
    parser.add_argument("--top-k", default="16,64,256,1024", help="comma-separated k values")
    parser.add_argument("--rows", type=int, default=128, help="first N dev rows")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    result = topk_report(args.overrides, [int(k) for k in args.top_k.split(",")], args.rows)
    metrics = result["adaptation_metrics"] or {}
    if "masked_token_accuracy" in metrics:
        print(
            f"MLM {result['mlm']}: held-out masked-token accuracy {metrics['masked_token_accuracy']:.4f} "
            f"({metrics.get('heldout_masked_tokens')} tokens)"
        )
    print(
        f"{result['smoothed_positions']} smoothed positions in {result['dev_rows']} dev rows; |V| = {result['vocab_size']}"
    )
    print("   k  mean mass  min mass  rel. L2  max L2 / bound  bytes/token")
    for e in result["errors"]:
        print(
            f"{e['top_k']:4d}  {e['mean_retained_mass']:9.3f}  {e['min_retained_mass']:8.3f}  "
            f"{e['relative_l2_difference']:7.4f}  {e['max_l2_difference']:.3f} / {e['max_l2_bound']:.3f}  "
            f"{result['store_bytes_per_token'][e['top_k']]:11d}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
