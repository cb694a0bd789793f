/* The training loss's pass over a frozen output layer for a few answer rows, in one read of the layer.
 * Compiled and loaded by output_pass.py, which checks the result against PyTorch's cross-entropy before
 * using it, and runs one call per thread over its own part of the vocabulary.
 *
 * The cross-entropy of the logits z = h @ w.T and its gradient for h need, per hidden row, the largest logit
 * m, the sum s of exp(z - m) and the exp(z - m)-weighted sum of the rows of w (the softmax's average of w,
 * before dividing by s). PyTorch computes the logits in one pass over w and the gradient in a second; here
 * they come from one: each block of 16 rows of w is read once from memory, its logits computed, and, while
 * the block is still in the cache, added to the sums (the sums rescaled when a larger logit appears: the
 * online softmax). At batch 1 the 262,144 x 640 float32 layer of Gemma 3 is 671 MB, and memory, not
 * arithmetic, bounds both passes.
 */
#include <math.h>
#include <stdint.h>

enum { BLOCK = 16, MAX_ROWS = 16 };

/* exp(x) for x <= 0, or 0 below the cut-off (output_pass.py's EXP_CUTOFF, -69: see why there). */
static inline float exp_or_zero(float x, float cutoff)
{
    return x < cutoff ? 0.0f : expf(x);
}

/* The logits of rows [start, start + count) of w for hidden row hr into z[.][r]: four rows of w at a time, so
 * that four independent sums, not one, wait on the multiply-adds. */
static void block_logits(const float *w, const float *hr, int d, int64_t start, int count, float z[][MAX_ROWS],
                         int r)
{
    int i = 0;
    for (; i + 4 <= count; i += 4) {
        const float *a = w + (start + i) * d, *b = a + d, *c = b + d, *e = c + d;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int k = 0; k < d; k++) {
            s0 += hr[k] * a[k];
            s1 += hr[k] * b[k];
            s2 += hr[k] * c[k];
            s3 += hr[k] * e[k];
        }
        z[i][r] = s0;
        z[i + 1][r] = s1;
        z[i + 2][r] = s2;
        z[i + 3][r] = s3;
    }
    for (; i < count; i++) {
        const float *a = w + (start + i) * d;
        float s0 = 0.0f;
#pragma omp simd reduction(+ : s0)
        for (int k = 0; k < d; k++)
            s0 += hr[k] * a[k];
        z[i][r] = s0;
    }
}

/* Rows [v0, v1) of w (V x d, row-major) against h (n x d, n <= MAX_ROWS). For each hidden row r: m[r], the
 * largest logit in the range, s[r], the sum of exp(logit - m[r]), and acc[r * d ...], the sum of
 * exp(logit - m[r]) * w[v], leaving out the terms whose logit - m[r] is below cutoff. */
void output_pass(const float *w, const float *h, int n, int d, int64_t v0, int64_t v1, float cutoff, float *m,
                 double *s, float *acc)
{
    float z[BLOCK][MAX_ROWS];
    float e[BLOCK];
    for (int r = 0; r < n; r++) {
        m[r] = -INFINITY;
        s[r] = 0.0;
        for (int k = 0; k < d; k++)
            acc[r * d + k] = 0.0f;
    }
    for (int64_t start = v0; start < v1; start += BLOCK) {
        int count = v1 - start < BLOCK ? (int)(v1 - start) : BLOCK;
        const float *rows = w + start * d;
        for (int r = 0; r < n; r++)
            block_logits(w, h + r * d, d, start, count, z, r);
        for (int r = 0; r < n; r++) {
            float top = m[r];
            for (int i = 0; i < count; i++)
                top = z[i][r] > top ? z[i][r] : top;
            float *ar = acc + r * d;
            if (top > m[r]) { /* rescale what was summed against the old maximum (exp(-inf) = 0 at first) */
                float scale = exp_or_zero(m[r] - top, cutoff);
                s[r] *= scale;
                for (int k = 0; k < d; k++)
                    ar[k] *= scale;
                m[r] = top;
            }
            for (int i = 0; i < count; i++) {
                e[i] = exp_or_zero(z[i][r] - top, cutoff);
                s[r] += e[i];
            }
            if (count == BLOCK) { /* the block's weighted rows summed first: one pass over acc, not 16 */
#pragma omp simd
                for (int k = 0; k < d; k++) {
                    float t = 0.0f;
                    for (int i = 0; i < BLOCK; i++)
                        t += e[i] * rows[i * d + k];
                    ar[k] += t;
                }
            } else {
                for (int i = 0; i < count; i++)
                    for (int k = 0; k < d; k++)
                        ar[k] += e[i] * rows[i * d + k];
            }
        }
    }
}
