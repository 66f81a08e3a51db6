"""A causal-LM student: a real Hugging Face decoder (the teacher's architecture, or Llama), smaller.

Built from the teacher's config (`teacher_path`: any local `AutoModelForCausalLM` directory)
with fewer layers and/or a smaller width, or, without a teacher, as a `LlamaForCausalLM` over the
default WordPiece tokenizer (`kdpipe.lm.corpus.default_tokenizer`). The student keeps the
teacher's tokenizer and output rows, so teacher top-k ids index the student's logits directly.

Initialisation from the teacher, as DistilBERT does: `init_from_teacher_layers: [0, 3]` copies
teacher blocks 0 and 3 into student blocks 0 and 1 (one teacher block per student block), and
`init_embeddings` copies the token embeddings, the final norm and an untied LM head. Copying
blocks needs the teacher's width (hidden, heads, key/value heads, intermediate); a narrower
student raises instead. Its embeddings can still start from the teacher's: projected on their
top principal directions (PCA, as `small_transformer` does), the final norm reset to ones.

It reads the teacher's cached tokens (``<tokens_from>.input_ids`` / ``.attention_mask``, (B, T)),
never tokenising while training. `forward` returns
  logits         (B, T, V)        next-token logits (V = the teacher's output rows)
  hidden_states  tuple of (B, T, H), with `output_hidden_states`: index i = after block i
                 (0 = embeddings), Hugging Face numbering, as the `hidden_token` loss reads it
The HF model is `.hf_model`; `save_hf(dir)` writes `save_pretrained` + tokenizer, which
`AutoModelForCausalLM.from_pretrained` and `pipeline("text-generation")` load.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from kdpipe import weights
from kdpipe.lm.corpus import default_tokenizer
from students import STUDENTS


class CausalLMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens_from: str = Field(description="teacher id whose cached input_ids/attention_mask the student reads")
    teacher_path: str | None = Field(
        None,
        description="teacher's local HF directory: architecture, tokenizer, vocabulary "
        "and (for init) weights; null = a Llama over the default tokenizer",
    )
    num_layers: int = Field(2, ge=1, le=64, description="decoder blocks")
    hidden_size: int | None = Field(None, ge=8, description="width; default: the teacher's (256 without a teacher)")
    heads: int | None = Field(None, ge=1, description="attention heads; default: the teacher's (4 without a teacher)")
    kv_heads: int | None = Field(
        None, ge=1, description="key/value heads; default: the teacher's when it divides heads, else heads"
    )
    intermediate_size: int | None = Field(
        None, ge=8, description="MLP width; default: the teacher's when widths match, else 4 × hidden"
    )
    init_from_teacher_layers: list[int] | None = Field(
        None, description="teacher block copied into each student block (one per block; needs the teacher's width)"
    )
    init_embeddings: bool = Field(
        True, description="start from the teacher's embeddings (copied, or PCA-projected when narrower)"
    )
    output_hidden_states: bool = Field(False, description="also return hidden_states (for hidden-state losses)")

    @model_validator(mode="after")
    def _check(self) -> CausalLMParams:
        if self.init_from_teacher_layers is not None:
            if self.teacher_path is None:
                raise ValueError("init_from_teacher_layers needs teacher_path (the teacher's weights)")
            if len(self.init_from_teacher_layers) != self.num_layers:
                raise ValueError(
                    f"init_from_teacher_layers names {len(self.init_from_teacher_layers)} teacher blocks for "
                    f"a {self.num_layers}-block student: give one per student block"
                )
        if self.hidden_size and self.heads and self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self


def load_teacher_config(teacher_path: str) -> Any:
    from transformers import AutoConfig

    d = weights.local_copy(teacher_path)  # fetched once per node when remote
    if not (d / "config.json").is_file():
        raise ValueError(
            f"student.params.teacher_path '{d}' is not a Hugging Face model directory (no config.json); "
            "the teacher must exist before the student is built (kdpipe teach trains a pretrained one)"
        )
    return AutoConfig.from_pretrained(d, local_files_only=True)


def load_tokenizer(teacher_path: str | None) -> Any:
    from transformers import AutoTokenizer

    if teacher_path is None:
        return default_tokenizer()
    return AutoTokenizer.from_pretrained(weights.local_copy(teacher_path), local_files_only=True)


def student_config(p: CausalLMParams, tokenizer: Any) -> Any:
    """The student's HF config: the teacher's with the student's depth/width, or a fresh Llama."""
    if p.teacher_path is None:
        from transformers import LlamaConfig

        hidden, heads = p.hidden_size or 256, p.heads or 4
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=p.kv_heads or heads,
            intermediate_size=p.intermediate_size or 4 * hidden,
            num_hidden_layers=p.num_layers,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            rms_norm_eps=1e-6,
        )
    tc = load_teacher_config(p.teacher_path)
    cfg = copy.deepcopy(tc)
    t_hidden, t_heads = int(tc.hidden_size), int(tc.num_attention_heads)
    t_kv = int(getattr(tc, "num_key_value_heads", None) or t_heads)
    hidden, heads = p.hidden_size or t_hidden, p.heads or t_heads
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by heads {heads}")
    kv = p.kv_heads or (t_kv if heads % t_kv == 0 else heads)
    if heads % kv:
        raise ValueError(f"heads {heads} is not divisible by kv_heads {kv}")
    same_width = hidden == t_hidden and heads == t_heads
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads = hidden, heads, kv
    cfg.intermediate_size = p.intermediate_size or (int(tc.intermediate_size) if hidden == t_hidden else 4 * hidden)
    cfg.num_hidden_layers = p.num_layers
    if hasattr(cfg, "head_dim") and not same_width:
        cfg.head_dim = hidden // heads
    if (
        getattr(cfg, "layer_types", None) is not None
    ):  # per-block attention kinds (sliding/full): keep the chosen blocks'
        picked = p.init_from_teacher_layers or list(range(p.num_layers))
        cfg.layer_types = [tc.layer_types[min(i, len(tc.layer_types) - 1)] for i in picked]
    return cfg


def _decoder_parts(model: Any) -> tuple[nn.ModuleList, nn.Module | None]:
    """The block list and the final norm of a decoder-only HF model (Llama/Qwen/Mistral layout)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(dec, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder.layers; init_from_teacher_layers supports "
            "Llama-style decoders (model.layers)"
        )
    return layers, getattr(dec, "norm", None)


@STUDENTS.register("causal_lm")
class CausalLMStudent(nn.Module):
    Params = CausalLMParams
    # causal attention: the padding after a row's last token changes none of its outputs, so the
    # train loop and the evaluator cut a batch's all-padding columns (`kdpipe.lm.padding`)
    pads_to_longest = True

    def __init__(
        self,
        in_dim: int | None = None,
        num_classes: int = 0,
        *,
        tokens_from: str,
        teacher_path: str | None = None,
        num_layers: int = 2,
        hidden_size: int | None = None,
        heads: int | None = None,
        kv_heads: int | None = None,
        intermediate_size: int | None = None,
        init_from_teacher_layers: list[int] | None = None,
        init_embeddings: bool = True,
        output_hidden_states: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        p = CausalLMParams(
            tokens_from=tokens_from,
            teacher_path=teacher_path,
            num_layers=num_layers,
            hidden_size=hidden_size,
            heads=heads,
            kv_heads=kv_heads,
            intermediate_size=intermediate_size,
            init_from_teacher_layers=init_from_teacher_layers,
            init_embeddings=init_embeddings,
            output_hidden_states=output_hidden_states,
        )
        self.params = p
        self.tokenizer = load_tokenizer(teacher_path)
        cfg = student_config(p, self.tokenizer)
        self.hf_model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        gc = self.hf_model.generation_config
        gc.bos_token_id, gc.eos_token_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        gc.pad_token_id = self.tokenizer.pad_token_id
        self.serving_inputs = [f"{tokens_from}.input_ids", f"{tokens_from}.attention_mask"]
        self.serving_output = "logits"
        if teacher_path is not None and (init_from_teacher_layers is not None or init_embeddings):
            self._init_from_teacher(teacher_path, init_from_teacher_layers, init_embeddings)

    def _init_from_teacher(self, path: str, layers: list[int] | None, embeddings: bool) -> None:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(
            weights.local_copy(str(path)), local_files_only=True, dtype=torch.float32
        )
        s_cfg, t_cfg = self.hf_model.config, teacher.config
        with torch.no_grad():
            if layers is not None:
                self._copy_blocks(teacher, layers)
            if embeddings and s_cfg.hidden_size == t_cfg.hidden_size:
                self._copy_embeddings(teacher)
            elif embeddings and s_cfg.hidden_size < t_cfg.hidden_size:
                self._project_embeddings(teacher)
        del teacher

    def _copy_blocks(self, teacher: Any, layers: list[int]) -> None:
        s_cfg, t_cfg = self.hf_model.config, teacher.config
        keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
        s_shape = [getattr(s_cfg, k, None) for k in keys]
        t_shape = [getattr(t_cfg, k, None) for k in keys]
        if s_shape != t_shape:
            raise ValueError(
                f"init_from_teacher_layers copies whole blocks, so the student needs the teacher's width "
                f"({', '.join(f'{k}={v}' for k, v in zip(keys, t_shape))}), it has "
                f"{', '.join(f'{k}={v}' for k, v in zip(keys, s_shape))}; drop init_from_teacher_layers for "
                "a narrower student (its embeddings still start from the teacher's, PCA-projected)"
            )
        t_layers, _ = _decoder_parts(teacher)
        s_layers, _ = _decoder_parts(self.hf_model)
        bad = [t for t in layers if not 0 <= t < len(t_layers)]
        if bad:
            raise ValueError(f"init_from_teacher_layers {bad}: the teacher has blocks 0..{len(t_layers) - 1}")
        for i, t in enumerate(layers):
            s_layers[i].load_state_dict(t_layers[t].state_dict())

    def _copy_embeddings(self, teacher: Any) -> None:
        """Token embeddings, final norm and (when untied in the student) the LM head."""
        self.hf_model.get_input_embeddings().load_state_dict(teacher.get_input_embeddings().state_dict())
        _, s_norm = _decoder_parts(self.hf_model)
        _, t_norm = _decoder_parts(teacher)
        if s_norm is not None and t_norm is not None:
            s_norm.load_state_dict(t_norm.state_dict())
        s_head, t_head = self.hf_model.get_output_embeddings(), teacher.get_output_embeddings()
        if (
            s_head is not None
            and t_head is not None
            and s_head.weight is not self.hf_model.get_input_embeddings().weight
        ):
            s_head.load_state_dict(t_head.state_dict())

    def _project_embeddings(self, teacher: Any) -> None:
        """A narrower student keeps what the teacher's embedding table knows: the table centred and
        projected on its top principal directions (PCA). With tied embeddings this also starts the
        LM head; an untied head is projected the same way."""
        w = teacher.get_input_embeddings().weight
        mean = w.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(w - mean, full_matrices=False)
        proj = v[: self.hf_model.config.hidden_size].T  # (teacher width, student width)
        self.hf_model.get_input_embeddings().weight.copy_((w - mean) @ proj)
        s_head, t_head = self.hf_model.get_output_embeddings(), teacher.get_output_embeddings()
        if (
            s_head is not None
            and t_head is not None
            and s_head.weight is not self.hf_model.get_input_embeddings().weight
        ):
            s_head.weight.copy_(t_head.weight @ proj)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """batch[<tokens_from>.input_ids / .attention_mask] (B, T) -> {"logits": (B, T, V),
        "hidden_states": ((B, T, H), …) when `output_hidden_states`}."""
        ids = batch[self.serving_inputs[0]].long()
        mask = batch[self.serving_inputs[1]].long()
        want_hidden = self.params.output_hidden_states
        out = self.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=want_hidden, use_cache=False)
        res: dict[str, Any] = {"logits": out.logits}
        if want_hidden:
            res["hidden_states"] = tuple(out.hidden_states)
        return res

    def save_hf(self, directory: str | Path) -> Path:
        """`save_pretrained` + tokenizer: a standard HF causal-LM directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf_model.save_pretrained(d)
        return self.save_hf_extras(d)

    def hf_tokenizer(self) -> Any:
        return self.tokenizer

    def save_hf_extras(self, directory: Path) -> Path:
        """What `hf_model.save_pretrained` leaves out of the directory: the tokenizer (so whoever
        already wrote the weights, MLflow at registration, does not have them written again)."""
        self.tokenizer.save_pretrained(directory)
        return directory
