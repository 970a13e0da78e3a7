"""How far attention over an 8-bit (QuantizedKV) or bfloat16 cache lands from attention over the
float32 cache it was made from, on data shaped like a language model's K/V cache.

No model weights can be fetched here, so the data is synthetic but carries what matters for
per-token quantization: keys with a few outlier channels (10-20x the others, as measured by
KIVI, arXiv:2402.02750, and LLM.int8()), a shared low-rank component so that queries and keys
align and the attention is peaked (a few keys carry most of the weight), per-token scale
variation, and values with heavier tails. The plain Gaussian case is printed for comparison.
Errors are relative to the output's RMS: max |out_q - out_f32| / rms(out_f32) and the RMS of the
difference over rms(out_f32). Usage: python benchmarks/quant_error.py
"""

import ml_dtypes
import numpy as np

import sdpa


def llm_like(rng, B=2, H=8, L=16, S=4096, E=128):
    rank = 16
    basis = rng.standard_normal((H, rank, E))
    channel = np.ones(E)
    channel[rng.choice(E, 6, replace=False)] = rng.uniform(10, 20, 6)  # outlier key channels
    k = rng.standard_normal((B, H, S, rank)) @ basis + 0.5 * rng.standard_normal((B, H, S, E))
    k *= channel * rng.lognormal(0, 0.3, (B, H, S, 1))  # per-token scale
    q = rng.standard_normal((B, H, L, rank)) @ basis / channel  # aligned with the keys
    # logits (scaled by 1/sqrt(E)) with a standard deviation of 3, as trained models' often have:
    # peaked, but not one-hot
    q *= 3.0 / np.std((q @ k[..., :512, :].swapaxes(-1, -2)) / np.sqrt(E))
    v = rng.standard_t(5, (B, H, S, E)) * rng.lognormal(0, 0.5, (B, H, S, 1))
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


def gaussian(rng, B=2, H=8, L=16, S=4096, E=128):
    return tuple(rng.standard_normal((B, H, n, E), dtype=np.float32) for n in (L, S, S))


def errors(out, ref):
    rms = np.sqrt(np.mean(ref.astype(np.float64) ** 2))
    d = np.abs(out.astype(np.float64) - ref)
    return d.max() / rms, np.sqrt(np.mean(d**2)) / rms


def main():
    rng = np.random.default_rng(0)
    print(
        f"{'data':<10} {'cache':<9} {'max err / rms':>14} {'rms err / rms':>14} {'top-weight':>11}"
    )
    for name, make in (("llm-like", llm_like), ("gaussian", gaussian)):
        q, k, v = make(rng)
        ref = sdpa.reference.scaled_dot_product_attention(
            q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)
        )
        w = sdpa.attention_weights(q, k)
        peak = float(np.mean(w.max(axis=-1)))  # how peaked the attention is
        caches = {
            "float32": (k, v),
            "bfloat16": (k.astype(ml_dtypes.bfloat16), v.astype(ml_dtypes.bfloat16)),
            "int8": (sdpa.quantize_kv(k), sdpa.quantize_kv(v)),
        }
        for cache, (kc, vc) in caches.items():
            e_max, e_rms = errors(sdpa.scaled_dot_product_attention(q, kc, vc), ref)
            print(f"{name:<10} {cache:<9} {e_max:>14.2e} {e_rms:>14.2e} {peak:>11.3f}")


if __name__ == "__main__":
    main()
