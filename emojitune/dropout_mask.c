/* Dropout masks drawn the way PyTorch's default CPU kernel for `tensor.bernoulli_(p)` draws them, from the
 * same generator state, about 5x faster. Compiled and loaded by dropout_masks.py, which checks the result
 * against torch's own draws before using it.
 *
 * What torch does (the serial kernel it runs on CPUs other than Intel's; ATen's MT19937RNGEngine.h,
 * CPUGeneratorImpl.cpp, DistributionsHelper.h, TransformationHelper.h): for each element in memory order,
 * two 32-bit words of its Mersenne Twister (MT19937), the first as the high half of a 64-bit number; the
 * low 53 bits of that number times 2^-53 is a uniform double u; the element is 1 when u < p. One element
 * at a time: ~5.1 ns per element on the 2-core AMD machine we measure on.
 *
 * Here the same words and the same comparison run in loops the compiler turns into vector instructions:
 * the state's refill (the "twist"), the tempering of a block of words, and the comparison, which is done on
 * integers (u < p exactly when the 53-bit number is below ceil(p * 2^53), which the caller passes). The
 * masked input x * mask is written in the same pass. ~0.8-1.1 ns per element.
 */
#include <stdint.h>

enum { N = 624, M = 397, CHUNK = 1024 };

static inline uint32_t twist(uint32_t u, uint32_t v)
{
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

/* The next N words of state, as the reference MT19937 (and torch's engine) computes them. */
static void refill(uint32_t *s)
{
    int j;
    for (j = 0; j < N - M; j++)
        s[j] = s[j + M] ^ twist(s[j], s[j + 1]);
    for (; j < N - 1; j++)
        s[j] = s[j + M - N] ^ twist(s[j], s[j + 1]);
    s[N - 1] = s[M - 1] ^ twist(s[N - 1], s[0]);
}

/* The next `count` tempered words into out. `left` and `next` mean what they mean in torch's engine: the
 * word to hand out is s[next], and the state is refilled when `left` counts down to 0 (left - 1 words of
 * the current state remain). */
static void words(uint32_t *s, int64_t *left, int64_t *next, uint32_t *out, int64_t count)
{
    int64_t done = 0;
    while (done < count) {
        int64_t avail = *left - 1;
        if (avail == 0) {
            refill(s);
            *left = N + 1;
            *next = 0;
            avail = N;
        }
        int64_t take = count - done < avail ? count - done : avail;
        const uint32_t *src = s + *next;
        uint32_t *dst = out + done;
        for (int64_t i = 0; i < take; i++) {
            uint32_t y = src[i];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c5680u;
            y ^= (y << 15) & 0xefc60000u;
            y ^= y >> 18;
            dst[i] = y;
        }
        *next += take;
        *left -= take;
        done += take;
    }
}

/* n mask elements: mask[i] = 1 when element i is kept, xm[i] = x[i] * mask[i] (a float product, as torch's
 * x * mask: a dropped -0.5 gives -0.0, a dropped NaN stays NaN). `state`, `left` and `next` point into the
 * bytes of torch.get_rng_state() (624 64-bit words holding 32-bit values, a 32-bit and a 64-bit integer),
 * which are advanced as torch's own draws would advance them. */
void draw_dropout_mask(uint64_t *state, int32_t *left, uint64_t *next, int64_t n, uint64_t threshold,
                       const float *x, float *xm, uint8_t *mask)
{
    uint32_t s[N], w[2 * CHUNK], keep[CHUNK];
    int64_t words_left = *left, word_next = (int64_t)*next;
    for (int i = 0; i < N; i++)
        s[i] = (uint32_t)state[i];
    for (int64_t start = 0; start < n; start += CHUNK) {
        int64_t len = n - start < CHUNK ? n - start : CHUNK;
        words(s, &words_left, &word_next, w, 2 * len);
        /* Two loops rather than one: with the 64-bit comparison and the 8- and 32-bit stores in one loop,
         * gcc 12 vectorizes none of it (1.2 ns per element instead of 0.8). */
        for (int64_t i = 0; i < len; i++) {
            uint64_t v = ((uint64_t)(w[2 * i] & 0x1fffffu) << 32) | w[2 * i + 1];
            keep[i] = v < threshold;
        }
        for (int64_t i = 0; i < len; i++) {
            mask[start + i] = (uint8_t)keep[i];
            xm[start + i] = x[start + i] * (float)keep[i];
        }
    }
    for (int i = 0; i < N; i++)
        state[i] = s[i];
    *left = (int32_t)words_left;
    *next = (uint64_t)word_next;
}
