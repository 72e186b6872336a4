#!/usr/bin/env python3
"""Float64 NumPy reference of the MiniCPM-SALA forward pass, written from MODEL_SPEC.md.

Independent of the C++ engine on purpose: the linear layers use the plain per-token
recurrence (the engine uses the chunked form), attention is computed per query from the
spec's formulas, and the whole prompt is one pass. It prints nothing but what it is asked:
the last prompt position's logits, as a float64 .npy.

    sala_ref.py --model models/small --token-ids-file ids.txt --out ref.npy [--dense-as-sparse]
"""
import argparse
import json
import os
import struct
import sys

import numpy as np


def load_tensors(model_dir):
    """All tensors of a checkpoint (single file or sharded), as float64 arrays."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        with open(os.path.join(model_dir, name), "rb") as f:
            blob = f.read()
        (header_len,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + header_len])
        data = blob[8 + header_len:]
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            raw = data[begin:end]
            if meta["dtype"] == "BF16":
                bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                arr = bits.view(np.float32)
            elif meta["dtype"] == "F16":
                arr = np.frombuffer(raw, dtype=np.float16)
            elif meta["dtype"] == "F32":
                arr = np.frombuffer(raw, dtype=np.float32)
            else:
                raise ValueError(f"{key}: unsupported dtype {meta['dtype']}")
            tensors[key] = arr.astype(np.float64).reshape(meta["shape"])
    return tensors


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def alibi_slopes(n):
    def power_of_two(m):
        start = 2.0 ** (-(2.0 ** -(np.log2(m) - 3)))
        return [start ** (i + 1) for i in range(m)]
    if (n & (n - 1)) == 0:
        return np.array(power_of_two(n))
    p = 2 ** int(np.floor(np.log2(n)))
    return np.array(power_of_two(p) + power_of_two(2 * p)[0::2][: n - p])


def rope(x, positions, theta):
    """NeoX rotate-half RoPE on [T, heads, dim]."""
    dim = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angle = positions[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = x[..., : dim // 2], x[..., dim // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def query_scale(cfg, dim):
    s = cfg.get("lightning_scale", "1/sqrt(d)")
    return 1 / np.sqrt(dim) if s == "1/sqrt(d)" else (1 / dim if s == "1/d" else 1.0)


def linear_layer(cfg, w, x):
    T = x.shape[0]
    H, D = cfg["num_attention_heads"], cfg["head_dim"]
    Hk = cfg.get("lightning_nkv", H)
    eps = cfg["rms_norm_eps"]
    q = (x @ w["self_attn.q_proj.weight"].T).reshape(T, H, D)
    k = (x @ w["self_attn.k_proj.weight"].T).reshape(T, Hk, D)
    v = (x @ w["self_attn.v_proj.weight"].T).reshape(T, Hk, D)
    if cfg.get("qk_norm", True):
        q = rms_norm(q, w["self_attn.q_norm.weight"], eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], eps)
    if cfg.get("lightning_use_rope", True):
        pos = np.arange(T, dtype=np.float64)
        q, k = rope(q, pos, cfg["rope_theta"]), rope(k, pos, cfg["rope_theta"])
    k, v = np.repeat(k, H // Hk, axis=1), np.repeat(v, H // Hk, axis=1)
    decay = np.exp(-alibi_slopes(H))[:, None, None]
    s = query_scale(cfg, D)
    state = np.zeros((H, D, D))
    o = np.empty((T, H, D))
    for t in range(T):  # S_t = exp(g) S_{t-1} + k_tᵀ v_t ; o_t = s q_t S_t
        state = decay * state + k[t][:, :, None] * v[t][:, None, :]
        o[t] = s * np.einsum("hd,hde->he", q[t], state)
    o = o.reshape(T, H * D)
    if cfg.get("use_output_norm", True):
        o = rms_norm(o, w["self_attn.o_norm.weight"], eps)
    if cfg.get("use_output_gate", True):
        o = o / (1 + np.exp(-(x @ w["self_attn.z_proj.weight"].T)))
    return o @ w["self_attn.o_proj.weight"].T


def compress(k, kernel, stride):
    """Means of complete windows: entry j covers rows stride*j .. stride*j + kernel - 1."""
    n = (k.shape[0] - kernel) // stride + 1 if k.shape[0] >= kernel else 0
    return np.stack([k[stride * j: stride * j + kernel].mean(axis=0) for j in range(n)]) if n else \
        np.zeros((0,) + k.shape[1:])


def softmax_attend(q, keys, values, scale):
    logits = keys @ q * scale
    p = np.exp(logits - logits.max())
    return (p / p.sum()) @ values


def sparse_layer(cfg, w, x, sparse):
    T = x.shape[0]
    H, Hk = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // H
    group = H // Hk
    sc = cfg["sparse_config"]
    bs, ks, st = sc["block_size"], sc["kernel_size"], sc["kernel_stride"]
    window_blocks = sc["window_size"] // bs
    n_select = sc["topk"] + window_blocks
    scale = 1 / np.sqrt(hd)
    q = (x @ w["self_attn.q_proj.weight"].T).reshape(T, H, hd)
    k = (x @ w["self_attn.k_proj.weight"].T).reshape(T, Hk, hd)
    v = (x @ w["self_attn.v_proj.weight"].T).reshape(T, Hk, hd)
    k1, k2 = compress(k, ks, st), compress(k, 4 * ks, 4 * st)
    o = np.empty((T, H, hd))
    for i in range(T):
        for g in range(Hk):
            heads = range(g * group, (g + 1) * group)
            if not sparse:
                for h in heads:
                    o[i, h] = softmax_attend(q[i, h], k[: i + 1, g], v[: i + 1, g], scale)
                continue
            # Stage 1: S(j) = Σ_h exp(q_h·k1_j/√d − lse_h), lse over visible k2.
            vis1 = [j for j in range(k1.shape[0]) if st * j + ks <= i + 1]
            vis2 = [j for j in range(k2.shape[0]) if 4 * st * j + 4 * ks <= i + 1]
            S = np.zeros(len(vis1))
            if vis2:
                for h in heads:
                    l2 = k2[vis2, g] @ q[i, h] * scale
                    lse = l2.max() + np.log(np.exp(l2 - l2.max()).sum())
                    S += np.exp(k1[vis1, g] @ q[i, h] * scale - lse)
            bq = i // bs
            score = {}
            for b in range(bq + 1):
                if b < sc["init_blocks"] or bq - window_blocks <= b:
                    score[b] = np.inf
                else:
                    # k1 entries overlapping block b (4b−1 .. 4b+3 for the 9B shape)
                    js = [j for j in range(b * bs // st - ks // st + 1, (b + 1) * bs // st) if 0 <= j < len(vis1)]
                    score[b] = max(S[j] for j in js) if js else -np.inf
            chosen = sorted((b for b in score if score[b] > -np.inf), key=lambda b: (-score[b], b))[:n_select]
            idx = np.concatenate([np.arange(b * bs, min((b + 1) * bs, i + 1)) for b in sorted(chosen)])
            for h in heads:
                o[i, h] = softmax_attend(q[i, h], k[idx, g], v[idx, g], scale)
    o = o.reshape(T, H * hd)
    if cfg.get("attn_use_output_gate", True):
        o = o / (1 + np.exp(-(x @ w["self_attn.o_gate.weight"].T)))
    return o @ w["self_attn.o_proj.weight"].T


def forward(cfg, tensors, ids, dense_as_sparse=False, dense_len=None):
    eps = cfg["rms_norm_eps"]
    L = cfg["num_hidden_layers"]
    r = cfg["scale_depth"] / np.sqrt(L)
    h = tensors["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    # The reference decides dense or sparse once, by the prompt's total length.
    if dense_len is None:
        dense_len = cfg["sparse_config"]["dense_len"]
    sparse = dense_as_sparse or len(ids) >= dense_len
    for i, mixer in enumerate(cfg["mixer_types"]):
        w = {k[len(f"model.layers.{i}."):]: t for k, t in tensors.items() if k.startswith(f"model.layers.{i}.")}
        x = rms_norm(h, w["input_layernorm.weight"], eps)
        h = h + r * (sparse_layer(cfg, w, x, sparse) if mixer == "minicpm4" else linear_layer(cfg, w, x))
        x = rms_norm(h, w["post_attention_layernorm.weight"], eps)
        gate, up = x @ w["mlp.gate_proj.weight"].T, x @ w["mlp.up_proj.weight"].T
        h = h + r * ((gate / (1 + np.exp(-gate)) * up) @ w["mlp.down_proj.weight"].T)
    last = rms_norm(h[-1], tensors["model.norm.weight"], eps) / (cfg["hidden_size"] / cfg["dim_model_base"])
    head = tensors["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else tensors["lm_head.weight"]
    return head @ last


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--token-ids-file", required=True)
    ap.add_argument("--out", required=True, help="last-position logits, float64 .npy")
    ap.add_argument("--dense-as-sparse", action="store_true")
    ap.add_argument("--dense-len", type=int, help="override sparse_config.dense_len")
    args = ap.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    with open(args.token_ids_file) as f:
        ids = np.array([int(t) for t in f.read().replace(",", " ").split()], dtype=np.int64)
    if len(ids) == 0:
        sys.exit("empty prompt")
    np.save(args.out, forward(cfg, load_tensors(args.model), ids, args.dense_as_sparse, args.dense_len))


if __name__ == "__main__":
    main()
