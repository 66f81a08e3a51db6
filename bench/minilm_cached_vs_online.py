"""Cached vs online distillation for all-MiniLM-L6-v2 -> a 2-layer student: time per epoch when the
teacher's embeddings come from the cache vs when the teacher runs every step (same student, rows,
batches, optimizer and loss; tokens are pre-computed in both, as the cache provides them)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import best_of, save  # noqa: E402


def main(sentences: int = 512, batch: int = 32, layers: int = 2) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from kdpipe.config import SourceConfig, load_spec
    from kdpipe.datasets.wordnet import read_wordnet
    from kdpipe.train import StudentMeta, build_student
    from teachers.hf_encoder import HFEncoderTeacher, mean_pool

    cfg = load_spec(ROOT / "pipelines" / "minilm_distill.yaml")
    tcfg = cfg.teachers[0]
    d = HFEncoderTeacher.model_dir(tcfg)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    teacher = AutoModel.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
    params = {**cfg.student.params, "layers": layers, "init_from_teacher": [0, 5][:layers] if layers == 2 else None,
              "relations": False}
    student = build_student(cfg.student.kind, params, StudentMeta(None, 0, [tcfg.id], {}))
    ids_key, mask_key = student.serving_inputs
    texts = [r["text"] for r in read_wordnet(SourceConfig(kind="wordnet", limit=sentences))[0]]
    enc = tok(texts, padding="max_length", truncation=True, max_length=int(tcfg.params["max_length"]), return_tensors="pt")

    def teach(i: int) -> torch.Tensor:
        with torch.no_grad():
            out = teacher(input_ids=enc["input_ids"][i : i + batch], attention_mask=enc["attention_mask"][i : i + batch])
            return F.normalize(mean_pool(out.last_hidden_state, enc["attention_mask"][i : i + batch]), dim=-1)

    cached = torch.cat([teach(i) for i in range(0, sentences, batch)])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def epoch(online: bool) -> None:
        student.train()
        for i in range(0, sentences, batch):
            target = teach(i) if online else cached[i : i + batch]
            emb = student({ids_key: enc["input_ids"][i : i + batch], mask_key: enc["attention_mask"][i : i + batch]})["embedding"]
            loss = (1 - F.cosine_similarity(emb, target)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    epoch(False)  # warm-up
    t_cached = best_of(lambda: epoch(False), 3)
    t_online = best_of(lambda: epoch(True), 3)
    out = {"sentences": sentences, "batch_size": batch, "student_layers": layers, "teacher_layers": 6,
           "epoch_s_cached": t_cached, "epoch_s_online": t_online, "speedup": t_online / t_cached,
           "threads": torch.get_num_threads()}
    save("cached_vs_online_minilm", out)
    print(f"MiniLM (6 layers) -> {layers}-layer student, {sentences} glosses: cached {t_cached:.2f} s/epoch, "
          f"online {t_online:.2f} s/epoch -> cache is {t_online / t_cached:.2f}x faster")
    return out


if __name__ == "__main__":
    main()
