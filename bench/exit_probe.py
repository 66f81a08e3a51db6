"""Why shallow [CLS] exits stay at the majority class, and what the standardising init buys.

On the fine-tuned MiniLM classifier that `pipelines/text_classifier_*.yaml` use (frozen), for the
hidden states after layers 1 and 2 of held-out glosses (the teacher never trained on them):
  * spread: the mean over features of the across-sentence std, over the mean |value|
            ([CLS] barely varies between sentences after one or two layers; mean pooling does)
  * probe:  BERT's exit head (pooler dense + tanh, dropout 0.1, linear; BERT's init) trained with
            AdamW (lr 3e-4, 8 epochs, batch 32) on 70 % of the glosses, accuracy on the rest:
            on raw [CLS], on [CLS] with the standardising fold that `hf_classifier`'s `data_init`
            applies, and on the mean-pooled state (which a BertForSequenceClassification exit
            cannot use: the bound the fold is measured against)
Writes bench/results/exit_probe.json.

    python bench/exit_probe.py [--glosses 3000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import save  # noqa: E402


def states(model_dir: Path, texts: list[str], depths: list[int], max_length: int) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    parts: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            b = tok(
                texts[i : i + 128], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            )
            hs = model(**b, output_hidden_states=True).hidden_states
            mask = b["attention_mask"].unsqueeze(-1).float()
            parts.append(
                {
                    **{f"cls{d}": hs[d][:, 0] for d in depths},
                    **{f"mean{d}": (hs[d] * mask).sum(1) / mask.sum(1) for d in depths},
                }
            )
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def probe(x: torch.Tensor, y: torch.Tensor, n_train: int, standardise: bool, seed: int = 0) -> float:
    """Held-out accuracy of BERT's exit head trained on `x[:n_train]`."""
    from torch import nn

    from students.hf_classifier import fold_standardisation

    torch.manual_seed(seed)
    width, classes = x.shape[1], int(y.max()) + 1
    dense, out = nn.Linear(width, width), nn.Linear(width, classes)
    for layer in (dense, out):  # BERT's init
        nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    if standardise:  # the fold `HFClassifierStudent.data_init` applies, statistics of the train rows
        fold_standardisation(dense, x[:n_train].mean(0), x[:n_train].std(0, unbiased=False))
    head = nn.Sequential(dense, nn.Tanh(), nn.Dropout(0.1), out)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-4)
    for _ in range(8):
        order = torch.randperm(n_train)
        for i in range(0, n_train, 32):
            idx = order[i : i + 32]
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        return float((head(x[n_train:]).argmax(1) == y[n_train:]).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glosses", type=int, default=3000)
    ap.add_argument("--teachers", default=str(ROOT / ".kdpipe" / "teachers"))
    args = ap.parse_args(argv)
    import numpy as np

    from kdpipe.config import load_spec
    from kdpipe.finetune import FinetuneRecipe, finetune
    from kdpipe.lm.corpus import load_labeled_glosses

    torch.set_num_threads(2)
    clf = load_spec(str(ROOT / "pipelines" / "text_classifier_hierarchical.yaml")).teachers[0].params
    recipe = FinetuneRecipe(**clf["finetune"])
    model_dir = finetune(recipe, root=args.teachers).path  # trained once, reused by digest
    rows = load_labeled_glosses("heldout", "all", recipe.split, args.glosses)
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    texts, y = [t for t, _ in rows], torch.tensor([lab for _, lab in rows])
    n_train = int(0.7 * len(rows))
    depths = [1, 2]
    feats = states(model_dir, texts, depths, recipe.max_length)
    majority = float((y[n_train:] == torch.bincount(y[:n_train]).argmax()).float().mean())
    out: dict[str, object] = {
        "command": "python bench/exit_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "teacher": str(model_dir.name),
        "glosses": len(rows),
        "train": n_train,
        "majority_class_acc": round(majority, 4),
        "depths": {},
    }
    for d in depths:
        cls, mean = feats[f"cls{d}"], feats[f"mean{d}"]
        row = {
            f"{name}_spread": round(float(v.std(0).mean() / v.mean(0).abs().mean()), 4)
            for name, v in (("cls", cls), ("mean", mean))
        }
        row.update(
            {
                "cls_bert_init": round(probe(cls, y, n_train, False), 4),
                "cls_standardised": round(probe(cls, y, n_train, True), 4),
                "mean_pooled_bert_init": round(probe(mean, y, n_train, False), 4),
            }
        )
        out["depths"][str(d)] = row  # type: ignore[index]
        print(f"after layer {d}: {row}", flush=True)
    print(f"majority class {majority:.4f}; wrote {save('exit_probe', out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
