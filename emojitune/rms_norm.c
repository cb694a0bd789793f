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

/* y = x * r * scale per row, r = 1 / sqrt(mean(x^2) + eps) kept in r[] for the backward; scale = 1 + w. */
void rms_norm_forward(const float *x, const float *scale, int64_t rows, int64_t d, float eps, float *y, float *r)
{
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * d;
        float *yi = y + i * d;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t j = 0; j < d; j++)
            squares += xi[j] * xi[j];
        float ri = 1.0f / sqrtf(squares / (float)d + eps);
        r[i] = ri;
#pragma omp simd
        for (int64_t j = 0; j < d; j++)
            yi[j] = (xi[j] * ri) * scale[j];
    }
}

/* The input gradient for an output gradient g: with u = g * scale,
 * dL/dx = r * u - x * r^3 * sum(u * x) / d (r depends on every x of its row). */
void rms_norm_backward(const float *x, const float *scale, const float *r, const float *g, int64_t rows,
                       int64_t d, float *grad_x)
{
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * d, *gi = g + i * d;
        float *oi = grad_x + i * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < d; j++)
            dot += gi[j] * scale[j] * xi[j];
        float ri = r[i];
        float c = ri * ri * ri * dot / (float)d;
#pragma omp simd
        for (int64_t j = 0; j < d; j++)
            oi[j] = ri * (gi[j] * scale[j]) - c * xi[j];
    }
}
