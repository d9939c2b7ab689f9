"""Memory that find-heads and ABFT fine-tuning need for gpt2-xl and 7B-class models, computed.

    .venv/bin/python benchmarks/memory_table.py [--batch 8] [--seq 128] [--out benchmarks/RESULTS_distributed.md]

Nothing is downloaded: each architecture is built from its published config on PyTorch's ``meta``
device (shapes only, no storage), so the numbers are exact for the Hugging Face model:
  parameters   sum of numel x bytes per element, float32 and bfloat16;
  W_Q/W_K      the ABFT-trainable part, with its gradient and Adam's two moments (float32);
  find-heads   peak activation bytes of one no-grad forward of a batch, measured by running the
               forward on meta tensors and tracking live tensor bytes with a dispatch mode (the
               forward stops after the last layer here; ours stops earlier if fewer layers are asked);
  fine-tune    bytes that autograd saves for the backward pass of one micro-batch with only W_Q/W_K
               trainable (saved-tensor hooks, each saved tensor once; a view saved beside its base counts twice, so an upper bound), all layers (ABFT's worst case: the
               deepest flagged head in the last layer).
  KV cache     2 x layers x batch x tokens x kv_heads x head_dim x 4 bytes: the bridge does not pass
               use_cache=False, so Hugging Face may keep it during a forward; the totals leave it out.
Prompt length: the padded width of a batch; SST-2 4-shot prompts average 92 tokens on SmolLM2's
tokenizer (runs/*/config.json mean_prompt_tokens), so 128 covers a batch's longest prompt.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GiB = 2**30

# Published configs (config.json on the Hub), written out so that nothing needs the network.
ARCHITECTURES = {
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257)),
    "Llama-2-7B (7B class)": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                             max_position_embeddings=4096, tie_word_embeddings=False)),
    "Llama-3-8B (llama3-8b)": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                             max_position_embeddings=8192, tie_word_embeddings=False,
                                             rope_theta=500000.0)),
}


def build(kind: str, fields: dict):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    config = (GPT2Config if kind == "gpt2" else LlamaConfig)(**fields)
    config._attn_implementation = "eager"  # what the TransformerLens bridge forces
    with torch.device("meta"):
        model = (GPT2LMHeadModel if kind == "gpt2" else LlamaForCausalLM)(config)
    return model.eval()


def qk_parameters(model) -> int:
    """W_Q and W_K weights: Llama's q_proj/k_proj; GPT-2's fused c_attn holds Q, K, V (2/3 of it)."""
    total = 0
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            total += param.numel()
        elif name.endswith("c_attn.weight"):
            total += param.numel() * 2 // 3
    return total


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and still alive (weak references)."""

    def __init__(self) -> None:
        super().__init__()
        import weakref

        self.weakref, self.live, self.peak = weakref, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                key = id(tensor)
                self.live[key] = tensor.numel() * tensor.element_size()
                self.weakref.finalize(tensor, self.live.pop, key, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _no_packed_sequences() -> None:
    """transformers checks position ids for packed sequences with .item(), which meta tensors cannot
    answer; ours are never packed."""
    import transformers.masking_utils as masking

    masking.find_packed_sequence_indices = lambda position_ids: None


def inference_peak(model, batch: int, seq: int) -> int:
    tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with torch.no_grad(), LiveBytes() as mode:
        (model.model if hasattr(model, "model") else model.transformer)(tokens, use_cache=False)
    return mode.peak


def saved_for_backward(model, batch: int, seq: int) -> int:
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("q_proj.weight", "k_proj.weight", "c_attn.weight")))
    weights = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}
    kept = []  # keep packed tensors alive so that ids stay unique

    def pack(tensor: torch.Tensor):
        if id(tensor) not in weights:  # the weights are counted once, as parameters
            seen.setdefault(id(tensor), tensor.numel() * tensor.element_size())
            kept.append(tensor)
        return tensor

    tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (model.model if hasattr(model, "model") else model.transformer)(tokens, use_cache=False)
    return sum(seen.values())


def table(batch: int, seq: int) -> str:
    _no_packed_sequences()
    rows = []
    for label, (kind, fields) in ARCHITECTURES.items():
        model = build(kind, fields)
        n = sum(p.numel() for p in model.parameters())
        qk = qk_parameters(model)
        infer = inference_peak(model, batch, seq)
        saved = saved_for_backward(model, batch, seq)
        cfg = model.config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv_cache = 2 * cfg.num_hidden_layers * batch * seq * n_kv * head_dim * 4
        rows.append((label, n, qk, infer, saved, kv_cache))
    lines = [
        f"| model | parameters | weights fp32 | weights bf16 | W_Q/W_K trained (+grad +Adam, fp32) | "
        f"find-heads activations, batch {batch} x {seq} tokens (peak, fp32) | fine-tune saved activations, "
        f"micro-batch {batch} x {seq} (fp32) | KV cache if kept (fp32) | find-heads total fp32 | "
        f"fine-tune total fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, n, qk, infer, saved, kv_cache in rows:
        weights = 4 * n
        train_state = 4 * qk * 3  # gradient + Adam exp_avg + exp_avg_sq
        lines.append(
            f"| {label} | {n / 1e9:.2f} B | {weights / GiB:.1f} GiB | {2 * n / GiB:.1f} GiB | {qk / 1e6:.0f} M: "
            f"{train_state / GiB:.2f} GiB | {infer / GiB:.2f} GiB | {saved / GiB:.2f} GiB | {kv_cache / GiB:.2f} GiB | "
            f"{(weights + infer) / GiB:.1f} GiB | {(weights + train_state + saved) / GiB:.1f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="find-heads --batch-size / finetune --micro-batch-size")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    print(table(args.batch, args.seq))


if __name__ == "__main__":
    main()
