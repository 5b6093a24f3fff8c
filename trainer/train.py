"""
nightlab baseline pretraining script: single device, single file (the EDITABLE part).
Follows karpathy/autoresearch's train.py (itself cherry-picked from nanochat): a small GPT
trained for a fixed wall-clock budget, scored by val_bpb from the fixed harness prepare.py.

Usage: python train.py   (cwd = a workspace with prepare.py next to this file)

Hyperparameters are the UPPER_CASE constants right below the imports; edit them in place
(`NAME = value` lines: the search proposer and the profiles rewrite exactly those lines).
The run, top to bottom: pick device + attention backend -> build model + optimizer ->
fit the device batch to memory -> train until TIME_BUDGET seconds are counted -> keep the
trained weights -> evaluate val_bpb -> print the summary block + METRIC lines.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import gc
import math
import sys
import time
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
try:
    from torch.nn.attention.flex_attention import flex_attention, create_block_mask
except ImportError:  # torch < 2.5
    flex_attention = create_block_mask = None

from prepare import MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, Tokenizer, make_dataloader, evaluate_bpb

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

PROFILE = "default"     # name of the profile these constants came from (information only)

# Model architecture
DEPTH = 8               # number of transformer layers
ASPECT_RATIO = 64       # model_dim = depth * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128          # target head dimension for attention
WINDOW_PATTERN = "SSSL" # sliding window pattern per layer: L = full context, S = half context
SOFTCAP = 15.0          # logit soft-cap: logits = SOFTCAP * tanh(logits / SOFTCAP)

# Optimization
TOTAL_BATCH_SIZE = 2**19 # tokens per optimizer step (2**19 = ~524K)
DEVICE_BATCH_SIZE = 128 # rows per forward/backward (upper bound: lowered to fit memory)
EMBEDDING_LR = 0.6      # learning rate for token and value embeddings (Adam)
UNEMBEDDING_LR = 0.004  # learning rate for lm_head (Adam)
MATRIX_LR = 0.04        # learning rate for matrix parameters (Muon)
SCALAR_LR = 0.5         # learning rate for per-layer scalars (Adam)
WEIGHT_DECAY = 0.2      # cautious weight decay for Muon
ADAM_BETAS = (0.8, 0.95) # Adam beta1, beta2
WARMUP_RATIO = 0.0      # fraction of time budget for LR warmup
WARMDOWN_RATIO = 0.5    # fraction of time budget for LR warmdown
FINAL_LR_FRAC = 0.0     # final LR as fraction of initial

# Run
UNTIMED_STEPS = 10      # the first steps (compilation, warm-up) do not count against TIME_BUDGET
ATTENTION_BACKEND = "auto" # auto | fa3 | flex | sdpa
COMPILE = True          # torch.compile model and optimizer (CUDA only; CPU/MPS run eager)
SAVE_CHECKPOINT = False # torch.save the trained state_dict before eval (or env NIGHTLAB_CHECKPOINT=path)
SEED = 42

# ---------------------------------------------------------------------------
# Device helpers: peak FLOPs table, memory, synchronisation
# ---------------------------------------------------------------------------

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, FP32 accumulate, from NVIDIA's datasheets.
# Matched in order against torch.cuda.get_device_name(): more specific names first.
gpu_peak_bf16_flops = [
    ("H100 NVL", 835.5e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),      # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.5e12),
    ("H200 NVL", 835.5e12),
    ("H200", 989.5e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
    ("RTX 5090", 209.5e12),
]


def peak_flops_for(device_name):
    """Peak bf16 FLOP/s for a GPU name, or None when unknown (MFU is then reported as n/a)."""
    for key, flops in gpu_peak_bf16_flops:
        if key.lower() in device_name.lower():
            return flops
    return None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device):
    """Peak memory of the device the model lives on (CPU: the process's peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024 / 1024
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1024 / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def available_memory_bytes(device):
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

# ---------------------------------------------------------------------------
# Attention backends: FA3 (Hopper, via `kernels`), FlexAttention, SDPA
# ---------------------------------------------------------------------------

fa3 = None  # the flash_attn_interface module when the fa3 backend is in use
fa3_repos = ["varunneal/flash-attention-3", "kernels-community/flash-attn3"]


def load_fa3():
    """Load a locally cached FA3 kernel through `kernels`. Returns (module, None) or (None, why).
    Never downloads unless NIGHTLAB_KERNELS_DOWNLOAD=1: the run must not hang on an offline box."""
    if os.environ.get("NIGHTLAB_KERNELS_DOWNLOAD") != "1":
        os.environ["HF_HUB_OFFLINE"] = "1"
    errors = []
    try:
        from kernels import get_kernel
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            from huggingface_hub import constants as hf_constants
            hf_constants.HF_HUB_OFFLINE = True  # in case huggingface_hub was imported earlier
    except Exception as e:
        return None, f"kernels package unusable ({type(e).__name__}: {e})"
    for repo in fa3_repos:
        try:
            try:
                kernel = get_kernel(repo, trust_remote_code=[repo])
            except TypeError:  # older `kernels` without trust_remote_code
                kernel = get_kernel(repo)
            module = getattr(kernel, "flash_attn_interface", kernel)
            if not hasattr(module, "flash_attn_func"):
                raise AttributeError("no flash_attn_func")
            return module, None
        except Exception as e:
            errors.append(f"{repo}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    return None, "; ".join(errors)


def fa3_works(module, device):
    """Run FA3 once on a tiny input: a kernel that loads but cannot run must not be chosen."""
    try:
        q = torch.randn(1, 128, 1, 64, device=device, dtype=torch.bfloat16)
        y = module.flash_attn_func(q, q, q, causal=True, window_size=(64, 0))
        y = y[0] if isinstance(y, tuple) else y
        synchronize(device)
        return bool(torch.isfinite(y.float()).all())
    except Exception:
        return False


def flex_available():
    return flex_attention is not None


def select_attention_backend(device_type, capability=None, requested="auto", compile_model=True):
    """Pick the attention backend. Returns (name, fa3_module_or_None, note explaining the choice).
    auto: fa3 on Hopper when the kernel is cached locally and runs; else flex on CUDA when the
    model is compiled (flex is slow eager); else sdpa (CPU, MPS, or no compile)."""
    requested = requested.lower()
    if requested not in ("auto", "fa3", "flex", "sdpa"):
        raise ValueError(f"ATTENTION_BACKEND must be auto, fa3, flex or sdpa, not {requested!r}")
    notes = []
    if requested in ("auto", "fa3"):
        if device_type != "cuda":
            notes.append(f"fa3 needs CUDA (device is {device_type})")
        elif capability is not None and tuple(capability) != (9, 0):
            notes.append(f"fa3 needs Hopper sm90 (this GPU is sm{capability[0]}{capability[1]})")
        else:
            module, why = load_fa3()
            if module is not None and fa3_works(module, torch.device("cuda")):
                return "fa3", module, "FA3 kernel loaded from the local kernels cache"
            notes.append(f"fa3 kernel not available ({why or 'failed a smoke test'})")
        if requested == "fa3":
            notes.append("falling back")
    if requested == "flex" or (requested in ("auto", "fa3") and device_type == "cuda" and compile_model):
        if flex_available():
            return "flex", None, "; ".join(notes + ["FlexAttention with sliding-window block masks"])
        notes.append("FlexAttention unavailable in this torch")
    return "sdpa", None, "; ".join(notes + ["SDPA (causal; explicit boolean mask for sliding windows)"])


def window_mask(T, window, device):
    """Boolean (T, T) mask: query i sees keys j with i - window <= j <= i (FA's window_size=(window, 0))."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j <= window)


def flex_block_mask(T, window, device):
    def sliding_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def attention(q, k, v, window, backend, masks):
    """Causal attention with a left window. q: (B, T, H, D), k/v: (B, T, Hkv, D) -> (B, T, H, D)."""
    B, T, H, D = q.shape
    full = window >= T - 1
    if backend == "fa3":
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.size(1) != H
    if backend == "flex":
        key = ("flex", T, window)
        if key not in masks:
            masks[key] = flex_block_mask(T, min(window, T), q.device)
        y = flex_attention(q, k, v, block_mask=masks[key], enable_gqa=gqa)
    elif full:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        key = ("sdpa", T, window)
        if key not in masks:
            masks[key] = window_mask(T, window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[key], enable_gqa=gqa)
    return y.transpose(1, 2)

# ---------------------------------------------------------------------------
# GPT Model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"
    softcap: float = 15.0
    attn_backend: str = "sdpa"


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # RMSNorm without weights


def has_ve(layer_idx, n_layer):
    """Value embedding on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)


def compute_window_sizes(n_layer, sequence_len, window_pattern):
    """Left window per layer: L = full context, S = half of it; the last layer is always full."""
    pattern = window_pattern.upper()
    if not pattern or any(c not in "SL" for c in pattern):
        raise ValueError(f"WINDOW_PATTERN must be a non-empty string of S and L, not {window_pattern!r}")
    sizes = {"L": sequence_len, "S": sequence_len // 2}
    windows = [sizes[pattern[i % len(pattern)]] for i in range(n_layer)]
    windows[-1] = sequence_len
    return windows


def mean_attended_keys(T, window):
    """Average number of keys a query attends to under causal attention with a left window."""
    w = min(window, T - 1)
    return (w * (w + 1) / 2 + (T - w) * (w + 1)) / T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0
        assert config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = min(32, config.n_embd)
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None
        self.backend = config.attn_backend

    def forward(self, x, ve, cos_sin, window, masks):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # Value residual (ResFormer): mix in the value embedding with an input-dependent gate per head
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        y = attention(q, k, v, window, self.backend, masks)
        y = y.contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window, masks):
        x = x + self.attn(norm(x), ve, cos_sin, window, masks)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = compute_window_sizes(config.n_layer, config.sequence_len, config.window_pattern)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.masks = {}  # attention masks by (backend, T, window), built before compiling

    @torch.no_grad()
    def init_weights(self, compute_dtype=torch.float32):
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform with std 1/sqrt(n_embd)
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)  # 2*sigmoid(0) = 1: neutral gate
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        head_dim = self.config.n_embd // self.config.n_head
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim, dtype=compute_dtype)
        if compute_dtype == torch.bfloat16:  # embeddings live in bf16 on GPU, as upstream
            self.transformer.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000, dtype=torch.float32):
        device = self.transformer.wte.weight.device
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return cos[None, :, None, :], sin[None, :, None, :]

    def build_masks(self, T, device):
        """Build the attention masks for sequence length T up front (not inside a compiled graph)."""
        for window in self.window_sizes:
            if self.config.attn_backend == "flex":
                key = ("flex", T, window)
                if key not in self.masks:
                    self.masks[key] = flex_block_mask(T, min(window, T), device)
            elif self.config.attn_backend == "sdpa" and window < T - 1:
                key = ("sdpa", T, window)
                if key not in self.masks:
                    self.masks[key] = window_mask(T, window, device)

    def estimate_flops(self):
        """FLOPs per token (forward + backward): 6 per matmul weight + attention with the real
        number of attended keys (causal triangle and sliding windows counted exactly)."""
        nparams = sum(p.numel() for p in self.parameters())
        nparams_exclude = (self.transformer.wte.weight.numel()
                           + sum(ve.weight.numel() for ve in self.value_embeds.values())
                           + self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h = self.config.n_head
        d = self.config.n_embd // self.config.n_head
        t = self.config.sequence_len
        attn_flops = sum(12 * h * d * mean_attended_keys(t, w) for w in self.window_sizes)
        return 6 * (nparams - nparams_exclude) + attn_flops

    def num_scaling_params(self):
        counts = {
            "wte": sum(p.numel() for p in self.transformer.wte.parameters()),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": sum(p.numel() for p in self.lm_head.parameters()),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        return counts

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        adam_betas=(0.8, 0.95), scalar_lr=0.5, compile_steps=False, ns_dtype=torch.bfloat16):
        model_dim = self.config.n_embd
        matrix_params = list(self.transformer.h.parameters())
        value_embeds_params = list(self.value_embeds.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        assert len(list(self.parameters())) == (len(matrix_params) + len(embedding_params) +
            len(lm_head_params) + len(value_embeds_params) + 2)
        dmodel_lr_scale = (model_dim / 768) ** -0.5  # AdamW LRs scale as 1/sqrt(dmodel), tuned at 768
        print(f"Scaling AdamW LRs by 1/sqrt({model_dim}/768) = {dmodel_lr_scale:.6f}")
        adam = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        param_groups = [
            dict(adam, params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
            dict(adam, params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
            dict(adam, params=value_embeds_params, lr=embedding_lr * dmodel_lr_scale),
            dict(adam, params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(adam, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        for shape in sorted({p.shape for p in matrix_params}):
            param_groups.append(dict(
                kind="muon", params=[p for p in matrix_params if p.shape == shape], lr=matrix_lr,
                momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay,
            ))
        param_groups = [g for g in param_groups if g["params"]]
        optimizer = MuonAdamW(param_groups, compile_steps=compile_steps, ns_dtype=ns_dtype)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.size()
        assert T <= self.cos.size(1)
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], self.masks)
        x = norm(x)
        logits = self.lm_head(x).float()
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is not None:
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1, reduction=reduction)
        return logits

# ---------------------------------------------------------------------------
# Optimizer: Muon (polar-express orthogonalisation, NorMuon) for block matrices, AdamW for the rest
# ---------------------------------------------------------------------------

polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p.add_(exp_avg / denom * (-lr_t / bias1))


def muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
              momentum_t, lr_t, wd_t, beta2_t, ns_steps, red_dim, ns_dtype):
    # Nesterov momentum
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    # Polar express orthogonalisation (Newton-Schulz-like iterations)
    X = g.to(ns_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if g.size(-2) > g.size(-1):
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    g = X
    # NorMuon variance reduction
    beta2 = beta2_t.to(g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled_sq_sum = (v_mean * red_dim_size) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt()
    final_scale = step_size * (v_norm / v_norm_new.clamp_min(1e-10))
    g = g * final_scale.to(g.dtype)
    # Cautious weight decay + parameter update
    lr = lr_t.to(g.dtype)
    wd = wd_t.to(g.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """Combined optimizer: Muon for 2D block matrices, AdamW for embeddings, head and scalars."""

    def __init__(self, param_groups, compile_steps=False, ns_dtype=torch.bfloat16):
        super().__init__(param_groups, defaults={})
        self.ns_dtype = ns_dtype
        self._adamw_fn = torch.compile(adamw_step, dynamic=False, fullgraph=True) if compile_steps else adamw_step
        self._muon_fn = torch.compile(muon_step, dynamic=False, fullgraph=True) if compile_steps else muon_step
        # 0-D CPU tensors so that changing values do not trigger recompilation
        t = lambda: torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._adamw_step_t, self._adamw_lr_t, self._adamw_beta1_t = t(), t(), t()
        self._adamw_beta2_t, self._adamw_eps_t, self._adamw_wd_t = t(), t(), t()
        self._muon_momentum_t, self._muon_lr_t, self._muon_wd_t, self._muon_beta2_t = t(), t(), t(), t()

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            self._adamw_step_t.fill_(state["step"])
            self._adamw_lr_t.fill_(group["lr"])
            self._adamw_beta1_t.fill_(group["betas"][0])
            self._adamw_beta2_t.fill_(group["betas"][1])
            self._adamw_eps_t.fill_(group["eps"])
            self._adamw_wd_t.fill_(group["weight_decay"])
            self._adamw_fn(p, p.grad, state["exp_avg"], state["exp_avg_sq"], self._adamw_step_t,
                           self._adamw_lr_t, self._adamw_beta1_t, self._adamw_beta2_t,
                           self._adamw_eps_t, self._adamw_wd_t)

    def _step_muon(self, group):
        params = group["params"]
        if all(p.grad is None for p in params):
            return
        p = params[0]
        state = self.state[p]  # one state for the whole group: its params are stacked
        shape, device, dtype = p.shape, p.device, p.dtype
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(len(params), *shape, dtype=dtype, device=device)
            state_shape = (len(params), shape[-2], 1) if shape[-2] >= shape[-1] else (len(params), 1, shape[-1])
            state["second_momentum_buffer"] = torch.zeros(state_shape, dtype=dtype, device=device)
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        stacked_grads = torch.stack([q.grad if q.grad is not None else torch.zeros_like(q) for q in params])
        stacked_params = torch.stack(params)
        self._muon_momentum_t.fill_(group["momentum"])
        self._muon_beta2_t.fill_(group["beta2"] if group["beta2"] is not None else 0.0)
        self._muon_lr_t.fill_(group["lr"] * max(1.0, shape[-2] / shape[-1])**0.5)
        self._muon_wd_t.fill_(group["weight_decay"])
        self._muon_fn(stacked_grads, stacked_params, state["momentum_buffer"], state["second_momentum_buffer"],
                      self._muon_momentum_t, self._muon_lr_t, self._muon_wd_t, self._muon_beta2_t,
                      group["ns_steps"], red_dim, self.ns_dtype)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            elif group["kind"] == "muon":
                self._step_muon(group)

# ---------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------

def build_model_config(depth, vocab_size, sequence_len, attn_backend="sdpa"):
    base_dim = depth * ASPECT_RATIO
    model_dim = ((base_dim + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    return GPTConfig(
        sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
        n_kv_head=num_heads, n_embd=model_dim, window_pattern=WINDOW_PATTERN, softcap=SOFTCAP,
        attn_backend=attn_backend,
    )


def estimate_train_bytes(config, num_params, rows, T):
    """Rough peak memory of one forward/backward: activations per token (calibrated on upstream's
    45 GB at depth 8, dim 512, 128 x 2048 rows) + fp32 logits + params, grads and optimizer state."""
    per_token = 24 * config.n_layer * config.n_embd + 12 * config.vocab_size
    return rows * T * per_token + 16 * num_params


def fit_device_batch(config, num_params, T, device):
    """Largest device batch <= DEVICE_BATCH_SIZE that divides the rows of TOTAL_BATCH_SIZE and
    (by the estimate above) fits the device's free memory. Grad accumulation keeps TOTAL_BATCH_SIZE."""
    if TOTAL_BATCH_SIZE % T != 0 or TOTAL_BATCH_SIZE < T:
        raise ValueError(f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a positive multiple of MAX_SEQ_LEN ({T})")
    total_rows = TOTAL_BATCH_SIZE // T
    candidates = [b for b in range(min(DEVICE_BATCH_SIZE, total_rows), 0, -1) if total_rows % b == 0]
    if not candidates:
        raise ValueError(f"DEVICE_BATCH_SIZE must be >= 1, not {DEVICE_BATCH_SIZE}")
    free = available_memory_bytes(device)
    if free is None:
        return candidates[0]
    for b in candidates:
        if estimate_train_bytes(config, num_params, b, T) <= 0.9 * free:
            return b
    return candidates[-1]


def smaller_batch(B, total_rows):
    """Next smaller divisor of total_rows below B (for an OOM retry), or None."""
    for b in range(B // 2, 0, -1):
        if total_rows % b == 0:
            return b
    return None


def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    elif progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    else:
        cooldown = (1.0 - progress) / WARMDOWN_RATIO
        return cooldown * 1.0 + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def cpu_hint(device_type, flops_per_step):
    """A line suggesting the tiny profile when there is no GPU and the constants are GPU-sized."""
    if device_type == "cuda" or flops_per_step <= 1e13:
        return None
    return (f"HINT: no GPU found, and train.py still has GPU-sized constants ({flops_per_step:.1e} FLOPs per "
            f"optimizer step): one step will take many minutes here. Use the tiny profile (trainer/profiles.py "
            f"PROFILES['tiny']; nightlab picks it automatically on machines without a GPU).")


def fail(message, code=1):
    print(f"\nFAIL: {message}", flush=True)
    sys.exit(code)

# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def main():
    t_start = time.time()
    torch.manual_seed(SEED)
    torch.set_float32_matmul_precision("high")

    # Device and precision
    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.cuda.manual_seed(SEED)
        capability = torch.cuda.get_device_capability()
        device_name = torch.cuda.get_device_name()
        compute_dtype = torch.bfloat16
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device, capability, device_name, compute_dtype = torch.device("mps"), None, "Apple MPS", torch.float32
    else:
        device, capability, device_name, compute_dtype = torch.device("cpu"), None, "CPU", torch.float32
    peak_flops = peak_flops_for(device_name) if device.type == "cuda" else None
    use_compile = COMPILE and device.type == "cuda"
    autocast_ctx = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else torch.autocast(device_type="cpu", enabled=False))
    print(f"Device: {device.type} ({device_name}{f', sm{capability[0]}{capability[1]}' if capability else ''}), "
          f"compute dtype {str(compute_dtype).replace('torch.', '')}, compile {use_compile}")

    backend, fa3_module, backend_note = select_attention_backend(device.type, capability, ATTENTION_BACKEND, use_compile)
    global fa3
    fa3 = fa3_module
    print(f"Attention backend: {backend} ({backend_note})")

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")

    T = MAX_SEQ_LEN
    config = build_model_config(DEPTH, vocab_size, T, backend)
    print(f"Model config: {asdict(config)}")

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(compute_dtype)
    model.build_masks(T, device)

    param_counts = model.num_scaling_params()
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    num_params = param_counts["total"]
    num_flops_per_token = model.estimate_flops()
    print(f"Estimated FLOPs per token: {num_flops_per_token:e}")

    hint = cpu_hint(device.type, num_flops_per_token * TOTAL_BATCH_SIZE)
    if hint:
        print(hint)

    try:
        device_batch = fit_device_batch(config, num_params, T, device)
    except ValueError as e:
        fail(str(e))
    total_rows = TOTAL_BATCH_SIZE // T
    if device_batch != DEVICE_BATCH_SIZE:
        print(f"Device batch size: {device_batch} (DEVICE_BATCH_SIZE {DEVICE_BATCH_SIZE} lowered to fit memory / divide {total_rows} rows)")

    optimizer = model.setup_optimizer(
        unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, scalar_lr=SCALAR_LR,
        adam_betas=ADAM_BETAS, matrix_lr=MATRIX_LR, weight_decay=WEIGHT_DECAY,
        compile_steps=use_compile, ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )
    raw_model = model
    if use_compile:
        model = torch.compile(model, dynamic=False)

    # On CUDA, probe one forward/backward first (also the compile step); on OOM halve the device batch
    while True:
        train_loader = make_dataloader(tokenizer, device_batch, T, "train", device=device)
        x, y, epoch = next(train_loader)
        if device.type != "cuda":
            break
        try:
            with autocast_ctx:
                loss = model(x, y)
            loss.backward()
            break
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            del train_loader, x, y
            loss = None
            raw_model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            smaller = smaller_batch(device_batch, total_rows)
            if smaller is None:
                fail(f"out of memory at device batch 1 (seq {T}); the model does not fit this device")
            print(f"Out of memory at device batch {device_batch}; retrying with {smaller}")
            device_batch = smaller
    if device.type == "cuda":
        raw_model.zero_grad(set_to_none=True)
        del loss
        x, y, epoch = next(train_loader)
    grad_accum_steps = total_rows // device_batch

    print(f"Time budget: {TIME_BUDGET}s")
    print(f"Device batch: {device_batch} x {T} tokens, gradient accumulation steps: {grad_accum_steps}")

    # -----------------------------------------------------------------------
    # Training loop: stop when counted time (steps after UNTIMED_STEPS) reaches TIME_BUDGET
    # -----------------------------------------------------------------------
    t_start_training = time.time()
    interactive = sys.stdout.isatty()
    smooth_train_loss = 0.0
    total_training_time = 0.0
    step = 0
    last_print = 0.0
    while True:
        synchronize(device)
        t0 = time.time()
        loss_sum = 0.0
        for micro_step in range(grad_accum_steps):
            with autocast_ctx:
                loss = model(x, y)
            loss_sum = loss_sum + loss.detach()
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)

        progress = min(total_training_time / TIME_BUDGET, 1.0)
        lrm = get_lr_multiplier(progress)
        muon_momentum = get_muon_momentum(step)
        muon_weight_decay = get_weight_decay(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay
        optimizer.step()
        raw_model.zero_grad(set_to_none=True)

        train_loss_f = (loss_sum / grad_accum_steps).item()
        # Fast fail: NaN/inf or exploding loss
        if math.isnan(train_loss_f) or math.isinf(train_loss_f):
            fail(f"loss is {'nan' if math.isnan(train_loss_f) else 'inf'} at step {step}")
        if train_loss_f > 100:
            fail(f"loss exploded to {train_loss_f:.1f} at step {step}")

        synchronize(device)
        dt = time.time() - t0
        if step >= UNTIMED_STEPS:
            total_training_time += dt

        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta**(step + 1))
        tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
        mfu_text = f"{100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops:.1f}%" if peak_flops else "n/a"
        remaining = max(0.0, TIME_BUDGET - total_training_time)
        step += 1
        done = step > UNTIMED_STEPS and total_training_time >= TIME_BUDGET

        now = time.time()
        if interactive or step <= UNTIMED_STEPS + 1 or done or now - last_print >= 0.5:
            last_print = now
            line = (f"step {step - 1:05d} ({100 * progress:.1f}%) | loss {debiased_smooth_loss:.3f} | lrm {lrm:.2f} | "
                    f"dt {dt * 1000:.0f}ms | tok/sec {tok_per_sec:,} | mfu {mfu_text} | epoch {epoch} | remaining {remaining:.0f}s")
            print(f"\r{line}    " if interactive else line, end="" if interactive else "\n", flush=True)

        # GC management (Python's GC causes ~500ms stalls)
        if step == 1:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

        if done:
            break

    if interactive:
        print()
    total_tokens = step * TOTAL_BATCH_SIZE
    timed_steps = step - min(step, UNTIMED_STEPS)
    tokens_per_sec = TOTAL_BATCH_SIZE * timed_steps / total_training_time if total_training_time > 0 else 0.0
    steady_state_mfu = (100 * num_flops_per_token * tokens_per_sec / peak_flops) if peak_flops else None

    # Keep the trained weights before evaluation: a crash in eval must not lose the run
    trained_state = {k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()}
    checkpoint_path = os.environ.get("NIGHTLAB_CHECKPOINT") or ("checkpoint.pt" if SAVE_CHECKPOINT else None)
    if checkpoint_path:
        torch.save(trained_state, checkpoint_path)
        print(f"Saved trained weights to {checkpoint_path}")

    # Final eval (not counted in the budget); on failure retry once eagerly with a smaller batch
    gc.enable()
    model.eval()
    t_eval = time.time()
    try:
        with autocast_ctx:
            val_bpb = evaluate_bpb(model, tokenizer, device_batch)
    except Exception as e:
        print(f"WARNING: evaluation failed ({type(e).__name__}: {e}); retrying uncompiled with batch {max(1, device_batch // 2)}")
        raw_model.load_state_dict(trained_state)
        raw_model.eval()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            with autocast_ctx:
                val_bpb = evaluate_bpb(raw_model, tokenizer, max(1, device_batch // 2))
        except Exception as e2:
            fail(f"evaluation failed: {type(e2).__name__}: {e2}"
                 + (f" (trained weights saved at {checkpoint_path})" if checkpoint_path else ""))
    if not math.isfinite(val_bpb):
        fail(f"val_bpb is {val_bpb}")
    t_end = time.time()

    # Final summary: upstream's block (names, order, formats), then METRIC lines
    peak_vram_mb = peak_memory_mb(device)
    print(f"attention_backend: {backend}")
    print(f"device: {device.type} ({device_name})")
    print(f"profile: {PROFILE}")
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {total_training_time:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
    print(f"mfu_percent:      {f'{steady_state_mfu:.2f}' if steady_state_mfu is not None else 'n/a'}")
    print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    metrics = {
        "val_bpb": f"{val_bpb:.6f}",
        "training_seconds": f"{total_training_time:.1f}",
        "total_seconds": f"{t_end - t_start:.1f}",
        "peak_vram_mb": f"{peak_vram_mb:.1f}",
        "mfu_percent": f"{steady_state_mfu:.2f}" if steady_state_mfu is not None else None,
        "total_tokens_M": f"{total_tokens / 1e6:.1f}",
        "num_steps": f"{step}",
        "num_params_M": f"{num_params / 1e6:.1f}",
        "depth": f"{DEPTH}",
        "tokens_per_sec": f"{tokens_per_sec:.0f}",
        "startup_seconds": f"{t_start_training - t_start:.1f}",
        "eval_seconds": f"{t_end - t_eval:.1f}",
        "overhead_seconds": f"{t_end - t_start - total_training_time:.1f}",
        "time_budget": f"{TIME_BUDGET}",
        "max_seq_len": f"{T}",
        "eval_tokens": f"{EVAL_TOKENS}",
        "total_batch_size": f"{TOTAL_BATCH_SIZE}",
        "device_batch_size": f"{device_batch}",
        "grad_accum_steps": f"{grad_accum_steps}",
        "flops_per_token": f"{num_flops_per_token:.6e}",
        "peak_flops": f"{peak_flops:.4e}" if peak_flops else None,
        "cuda_capability": f"{capability[0]}.{capability[1]}" if capability else None,
    }
    for name, value in metrics.items():
        if value is not None:
            print(f"METRIC {name}={value}")
    sys.stdout.flush()


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("\nFAIL: interrupted", flush=True)
        sys.exit(130)
    except Exception as e:
        import traceback
        traceback.print_exc()
        print(f"FAIL: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        sys.exit(1)
