"""The attention kernel a CPU training step runs (encoder.training_attention) computes the same function as
torch's fused kernel, is switched on only where it is chosen, and is restored afterwards."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention

from leanmim.config import ModelConfig
from leanmim.parts.encoder import attention_modules, training_attention
from leanmim.parts.classifier import Classifier, prepare_encoder
from leanmim.train.finetune import FinetuneModule
from leanmim.methods import build_method
from leanmim.parts.relpos import RelPosAttention, relative_buckets

TINY = ModelConfig(name="vit_tiny_patch16", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                   num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).resolved(16, 1)


def fused_flags(model):
    return [module.fused_attn for module in attention_modules(model)]


def test_explicit_and_fused_attention_give_the_same_output_and_gradients():
    torch.manual_seed(0)
    attention = Attention(32, num_heads=4, qkv_bias=True)
    x = torch.randn(3, 17, 32, requires_grad=True)
    results = []
    for fused in (True, False):
        attention.fused_attn = fused
        out = attention(x)
        grad_x, grad_w = torch.autograd.grad((out * torch.linspace(-1, 1, 32)).sum(), (x, attention.qkv.weight))
        results.append((out, grad_x, grad_w))
    for fused_value, explicit_value in zip(*results):
        torch.testing.assert_close(explicit_value, fused_value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("relative_term", ["added", "scaled"])
def test_relative_position_attention_explicit_path_equals_the_sdpa_path(relative_term):
    torch.manual_seed(0)
    attention = RelPosAttention(32, num_heads=2, relative_term=relative_term, qkv_bias=True)
    with torch.no_grad():
        attention.relative_table.normal_()   # zero at initialisation: make the relative term count
    buckets = relative_buckets((4, 4))
    x = torch.randn(2, 17, 32)
    attention.fused_attn = True
    fused = attention(x, buckets)
    attention.fused_attn = False
    explicit = attention(x, buckets)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)
    # and a hand computation of one query row: softmax(q·k·scale + q·r[bucket]) · v ("added")
    qkv = attention.qkv(x).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0][0, 0, 5], qkv[1][0, 0], qkv[2][0, 0]
    relative = attention.relative_table[buckets[5]] @ (q * attention.scale if relative_term == "scaled" else q)
    row = F.softmax(k @ q * attention.scale + relative, dim=0) @ v                      # (16,) head 0, query 5
    heads = explicit_heads(attention, x, buckets)
    torch.testing.assert_close(heads[0, 0, 5], row, rtol=1e-5, atol=1e-6)


def explicit_heads(attention, x, buckets):
    """The per-head attention output (B, H, N, d) before the projection, captured from the forward."""
    captured = {}
    handle = attention.proj.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))
    attention(x, buckets)
    handle.remove()
    batch, length, _ = x.shape
    return captured["x"].reshape(batch, length, attention.num_heads, -1).transpose(1, 2)


def test_training_attention_switches_only_under_cpu_bf16_and_restores():
    method = build_method("mae", TINY, {})
    assert fused_flags(method) and all(fused_flags(method))
    seen = []
    hooks = [module.register_forward_pre_hook(lambda module, args: seen.append(module.fused_attn))
             for module in attention_modules(method)]
    images = torch.randn(2, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), training_attention(method, "cpu"):
        method(images).loss.float().backward()
    assert seen and not any(seen)             # every attention ran explicit under bf16
    assert all(fused_flags(method))           # and is fused again afterwards
    seen.clear()
    with training_attention(method, "cpu"):   # fp32: the flags are left alone
        method(images)
    assert seen and all(seen)
    seen.clear()
    with pytest.raises(RuntimeError, match="boom"):            # restored even when the step fails
        with torch.autocast("cpu", dtype=torch.bfloat16), training_attention(method, "cpu"):
            raise RuntimeError("boom")
    assert all(fused_flags(method))
    for hook in hooks:
        hook.remove()


def test_a_finetune_training_step_runs_explicit_attention_under_bf16():
    from leanmim.config import FinetuneConfig, RunConfig, TrainConfig, DataConfig

    method = build_method("mae", TINY, {})
    classifier = Classifier(prepare_encoder(method.encoder, 0.0, "mean"), num_classes=3)
    module = FinetuneModule(classifier, FinetuneConfig(), RunConfig("mae", TINY, DataConfig(path="x"), TrainConfig(), {}),
                            source="test", train_transform=None, eval_transform=None)
    seen = []
    for attention in attention_modules(classifier):
        attention.register_forward_pre_hook(lambda module, args: seen.append(module.fused_attn))
    module.log = lambda *args, **kwargs: None
    module.optimizers = lambda: torch.optim.SGD(classifier.parameters(), lr=0.1)
    batch = (torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and seen and not any(seen)
    assert all(fused_flags(classifier))


def test_peak_train_memory_measures_the_kernel_training_runs():
    from leanmim.eval.cost import peak_train_memory

    method = build_method("mae", TINY, {})
    seen = []
    for attention in attention_modules(method):
        attention.register_forward_pre_hook(lambda module, args: seen.append(module.fused_attn))
    assert peak_train_memory(method, torch.randn(2, 1, 16, 16), torch.bfloat16) > 0
    assert seen and not any(seen)
