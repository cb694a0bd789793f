/* Gemma 3's RMSNorm, y = x / sqrt(mean(x^2) + eps) * (1 + w), forward and input gradient, a row of the last
 * dimension at a time. Compiled and loaded by fused_norm.py, which checks the results against transformers'
 * own layer before using it.
 *
 * PyTorch computes the layer as seven elementwise operations forward (square, mean, add, rsqrt and three
 * products) and about as many backward, each a pass over the tensor and an autograd node; here each
 * direction is one pass that keeps a row in the cache. Single-threaded: split over two threads it was slower
 * in whole steps (the second core is PyTorch's, busy or spinning).
 */
#include <math.h>
#include <stdint.h>

/* Row (i, j) of x starts at x + i * outer_stride + j * inner_stride (i < outer, j < inner): two levels, so that
 * the queries and keys of the attention, viewed [batch, heads, positions, head_dim] inside the fused q/k/v
 * product's output, are read where they are. The results y, grad_x and the gradient g are contiguous rows in
 * that (i, j) order. */

/* y = x * r * scale per row, r = 1 / sqrt(mean(x^2) + eps) kept in r[] for the backward; scale = 1 + w. */
void rms_norm_forward(const float *x, int64_t outer, int64_t outer_stride, int64_t inner, int64_t inner_stride,
                      int64_t d, const float *scale, float eps, float *y, float *r)
{
    for (int64_t i = 0; i < outer; i++) {
        for (int64_t j = 0; j < inner; j++) {
            const float *xi = x + i * outer_stride + j * inner_stride;
            int64_t row = i * inner + j;
            float *yi = y + row * d;
            float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
            for (int64_t k = 0; k < d; k++)
                squares += xi[k] * xi[k];
            float ri = 1.0f / sqrtf(squares / (float)d + eps);
            r[row] = ri;
#pragma omp simd
            for (int64_t k = 0; k < d; k++)
                yi[k] = (xi[k] * ri) * scale[k];
        }
    }
}

/* The input gradient for an output gradient g: with u = g * scale,
 * dL/dx = r * u - x * r^3 * sum(u * x) / d (r depends on every x of its row). */
void rms_norm_backward(const float *x, int64_t outer, int64_t outer_stride, int64_t inner, int64_t inner_stride,
                       int64_t d, const float *scale, const float *r, const float *g, float *grad_x)
{
    for (int64_t i = 0; i < outer; i++) {
        for (int64_t j = 0; j < inner; j++) {
            const float *xi = x + i * outer_stride + j * inner_stride;
            int64_t row = i * inner + j;
            const float *gi = g + row * d;
            float *oi = grad_x + row * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t k = 0; k < d; k++)
                dot += gi[k] * scale[k] * xi[k];
            float ri = r[row];
            float c = ri * ri * ri * dot / (float)d;
#pragma omp simd
            for (int64_t k = 0; k < d; k++)
                oi[k] = ri * (gi[k] * scale[k]) - c * xi[k];
        }
    }
}
