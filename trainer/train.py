"""
nightlab baseline pretraining script: single device, single file (the EDITABLE part).
Follows karpathy/autoresearch's train.py (itself cherry-picked from nanochat): a small GPT
trained for a fixed budget. Everything here is fair game: constants, model, optimizer, loop.

Usage: python prepare.py run   (trains with this file, then the harness scores the saved model)

The fixed harness (prepare.py: data, tokenizer; harness.py: device, dtype, attention backend,
memory fitting, budget, scoring) is not part of the experiment. The contract with it:
- `build_model(config, device, dtype)` builds the model from a plain config dict; the harness
  calls it in its own process to score the trained weights;
- `model(inputs)` returns logits [B, T, vocab] and position t may only look at inputs <= t;
- the run ends with `rt.finish(model, config, budget, ...)`, which saves the weights.
Hyperparameters are the UPPER_CASE constants right below the imports; edit them in place.
"""

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import harness
from harness import attention
from prepare import MAX_SEQ_LEN, Tokenizer, make_dataloader

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
ATTENTION_BACKEND = "auto" # auto | fa3 | flex | sdpa
COMPILE = True          # torch.compile model and optimizer (CUDA only; CPU/MPS run eager)
SEED = 42

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

    def forward(self, x, ve, cos_sin, window):
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
        y = attention(q, k, v, window)  # the harness's backend: FA3, FlexAttention or SDPA
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

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
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
            x = block(x, ve, cos_sin, self.window_sizes[i])
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

def build_model_config(depth, vocab_size, sequence_len):
    base_dim = depth * ASPECT_RATIO
    model_dim = ((base_dim + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    return GPTConfig(
        sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
        n_kv_head=num_heads, n_embd=model_dim, window_pattern=WINDOW_PATTERN, softcap=SOFTCAP,
    )


def build_model(config, device, dtype=torch.float32):
    """The model for a config dict, initialised on `device` (the harness scores through this)."""
    with torch.device(device):  # not "meta": its Embedding init imports torch._dynamo, ~1 s a process
        model = GPT(GPTConfig(**config))
    model.init_weights(dtype)
    harness.build_masks(model.config.sequence_len, model.window_sizes, device)
    return model


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

# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def main():
    rt = harness.setup(seed=SEED, attention_backend=ATTENTION_BACKEND, compile=COMPILE)
    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")

    T = MAX_SEQ_LEN
    config = asdict(build_model_config(DEPTH, vocab_size, T))
    print(f"Model config: {config}")
    model = build_model(config, rt.device, rt.dtype)

    param_counts = model.num_scaling_params()
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    num_params = param_counts["total"]
    num_flops_per_token = model.estimate_flops()
    print(f"Estimated FLOPs per token: {num_flops_per_token:e}")
    hint = harness.cpu_hint(rt.device.type, num_flops_per_token * TOTAL_BATCH_SIZE)
    if hint:
        print(hint)

    optimizer = model.setup_optimizer(
        unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, scalar_lr=SCALAR_LR,
        adam_betas=ADAM_BETAS, matrix_lr=MATRIX_LR, weight_decay=WEIGHT_DECAY,
        compile_steps=rt.compile, ns_dtype=rt.ns_dtype,
    )
    train_model, train_loader, (x, y, epoch), device_batch, grad_accum_steps = rt.fit(
        model, config, num_params, TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE,
        lambda B: make_dataloader(tokenizer, B, T, "train", device=rt.device))
    budget = harness.Budget.from_env()
    print(f"Budget: {budget.describe()}")

    # Training loop
    while not budget.done:
        harness.synchronize(rt.device)
        t0 = time.time()
        loss_sum = 0.0
        for micro_step in range(grad_accum_steps):
            with rt.autocast():
                loss = train_model(x, y)
            loss_sum = loss_sum + loss.detach()
            rt.backward(loss / grad_accum_steps)
            x, y, epoch = next(train_loader)

        progress = budget.progress
        lrm = get_lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = get_muon_momentum(budget.step)
                group["weight_decay"] = get_weight_decay(progress)
        rt.step(optimizer)
        model.zero_grad(set_to_none=True)

        train_loss = (loss_sum / grad_accum_steps).item()
        harness.synchronize(rt.device)
        dt = time.time() - t0
        budget.tick(dt)
        rt.log_step(budget, train_loss, lrm, dt, TOTAL_BATCH_SIZE, num_flops_per_token, epoch)

    rt.finish(model, config, budget, tokens_per_step=TOTAL_BATCH_SIZE, flops_per_token=num_flops_per_token,
              num_params=num_params, depth=DEPTH, profile=PROFILE, total_batch_size=TOTAL_BATCH_SIZE,
              device_batch_size=device_batch, grad_accum_steps=grad_accum_steps)


if __name__ == "__main__":
    main()
